package vhdx

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"testing"

	"github.com/vhdkit/vhdkit/storage"
	"github.com/vhdkit/vhdkit/storage/faulttest"
)

// TestCrashSetParent sweeps set-parent (SetParent and Close of a child
// opened without its parent, as vhdkit set-parent and merge's relink do)
// from parent a.vhdx to b.vhdx, a copy of a written on since (so another
// DataWriteGuid and more data), in every mode. After every point the
// child passes the strict check and its chain opens, read-only and
// read-write alike, over a with the old content or over b with the new:
// never a mix of a path and a linkage. Set-parent run again then
// completes and the child opens over b.
func TestCrashSetParent(t *testing.T) {
	dir := t.TempDir()
	const size = 8 << 20
	a, b, child := filepath.Join(dir, "a.vhdx"), filepath.Join(dir, "b.vhdx"), filepath.Join(dir, "c.avhdx")
	pa, err := Create(a, CreateOptions{Size: size, BlockSize: 1 << 20})
	if err != nil {
		t.Fatal(err)
	}
	fillRandom(t, pa, make([]byte, size), 11, 10, 1<<20)
	if err := pa.Close(); err != nil {
		t.Fatal(err)
	}
	c, err := Create(child, CreateOptions{Parent: a, BlockSize: 1 << 20})
	if err != nil {
		t.Fatal(err)
	}
	fillRandom(t, c, make([]byte, size), 12, 6, 1<<20)
	if err := c.Close(); err != nil {
		t.Fatal(err)
	}
	content, err := os.ReadFile(a)
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(b, content, 0o600); err != nil {
		t.Fatal(err)
	}
	pb, err := Open(b, OpenOptions{})
	if err != nil {
		t.Fatal(err)
	}
	fillRandom(t, pb, make([]byte, size), 13, 10, 1<<20) // a new DataWriteGuid
	linkB := pb.hdr.DataWriteGUID
	if err := pb.Close(); err != nil {
		t.Fatal(err)
	}
	files := memFiles(t, []string{a, b, child}, func(*storage.MemFS) error { return nil })

	setParent := func(fsys *storage.MemFS) error {
		im, err := Open(child, OpenOptions{FS: fsys, NoParent: true})
		if err != nil {
			return err
		}
		err = im.SetParent(b, linkB)
		if cerr := im.Close(); err == nil {
			err = cerr
		}
		return err
	}
	// chain opens the child's chain and returns the parent it took and
	// the digest of what the chain reads.
	chain := func(fsys *storage.MemFS, ro bool) (string, string, error) {
		im, err := Open(child, OpenOptions{FS: fsys, ReadOnly: ro})
		if err != nil {
			return "", "", fmt.Errorf("open (read-only %v): %w", ro, err)
		}
		defer im.Close()
		d, err := contentDigest(im)
		return im.parentPath, d, err
	}
	want := map[string]string{} // parent path to the digest over it
	for _, p := range []string{a, b} {
		fsys := storage.NewMemFS(files)
		if p == b {
			if err := setParent(fsys); err != nil {
				t.Fatal(err)
			}
		}
		got, d, err := chain(fsys, true)
		if err != nil || got != p {
			t.Fatalf("the chain opens over %s (%v), want %s", got, err, p)
		}
		want[p] = d
	}
	if want[a] == want[b] {
		t.Fatal("the chain reads the same over either parent: the sweep could not tell them apart")
	}

	over := map[string]int{} // states found over each parent
	faulttest.Run(t, faulttest.Sweep{
		Files:     files,
		PowerCuts: powerCuts(),
		Start: func(fsys *storage.MemFS) (func() error, error) {
			return func() error { return setParent(fsys) }, nil
		},
		Check: func(fsys *storage.MemFS, p faulttest.Point) error {
			if p.Mode == faulttest.Crash && p.PowerCut == 0 && p.Err == nil {
				return errors.New("set-parent succeeded on a stopped disk")
			}
			if err := strictFS(fsys, child); err != nil {
				return fmt.Errorf("as found: %w", err)
			}
			var first string
			for _, ro := range []bool{true, false} {
				parent, d, err := chain(fsys, ro)
				if err != nil {
					return err
				}
				if d != want[parent] {
					return fmt.Errorf("read-only %v: over %s the chain reads other data", ro, filepath.Base(parent))
				}
				if first != "" && parent != first {
					return fmt.Errorf("read-only opens over %s, read-write over %s", filepath.Base(first), filepath.Base(parent))
				}
				first = parent
			}
			over[filepath.Base(first)]++
			if p.Err == nil && first != b {
				return fmt.Errorf("set-parent succeeded and the child opens over %s", filepath.Base(first))
			}
			if err := setParent(fsys); err != nil {
				return fmt.Errorf("set-parent again: %w", err)
			}
			if parent, d, err := chain(fsys, false); err != nil || parent != b || d != want[b] {
				return fmt.Errorf("after set-parent again, the chain opens over %s (%v), want b.vhdx", filepath.Base(parent), err)
			}
			return strictFS(fsys, child)
		},
	})
	t.Logf("states found over a.vhdx: %d, over b.vhdx: %d", over["a.vhdx"], over["b.vhdx"])
	if over["a.vhdx"] == 0 || over["b.vhdx"] == 0 {
		t.Fatal("the sweep did not find both the old and the new link")
	}
}
