package merge

import (
	"bytes"
	"io"
	"math/rand"
	"os"
	"os/exec"
	"path/filepath"
	"syscall"
	"testing"
	"time"

	"github.com/vhdkit/vhdkit/vhd"
	"github.com/vhdkit/vhdkit/vhdx"
)

// TestKillMerge runs the real `vhdkit merge` and kills it with SIGKILL at
// several moments of its run; each time the leaf must still read the
// newest data, and running the same command again must finish the merge.
func TestKillMerge(t *testing.T) {
	if testing.Short() {
		t.Skip("builds and runs the vhdkit binary")
	}
	bin := filepath.Join(t.TempDir(), "vhdkit")
	if out, err := exec.Command("go", "build", "-o", bin, "../cmd/vhdkit").CombinedOutput(); err != nil {
		t.Fatalf("go build: %v\n%s", err, out)
	}
	for _, format := range []string{"vhdx", "vhd"} {
		t.Run(format, func(t *testing.T) { testKillMerge(t, bin, format) })
	}
}

func testKillMerge(t *testing.T, bin, format string) {
	// The time one whole merge takes, to spread the kills over.
	dir := t.TempDir()
	top, target, want := bigChain(t, dir, format)
	start := time.Now()
	if out, err := exec.Command(bin, "merge", "--into", target, top).CombinedOutput(); err != nil {
		t.Fatalf("merge: %v\n%s", err, out)
	}
	full := time.Since(start)
	if got := readImage(t, target); !bytes.Equal(got, want) {
		t.Fatal("an uninterrupted merge is wrong")
	}
	interrupted := 0
	for k := 1; k <= 6; k++ {
		dir := t.TempDir()
		top, target, want := bigChain(t, dir, format)
		cmd := exec.Command(bin, "merge", "--into", target, top)
		if err := cmd.Start(); err != nil {
			t.Fatal(err)
		}
		time.Sleep(full * time.Duration(k) / 7)
		cmd.Process.Signal(syscall.SIGKILL)
		err := cmd.Wait()
		if err != nil {
			interrupted++
		}
		leaf := top
		if _, err := os.Stat(top); err != nil {
			leaf = target
		}
		if got := readImage(t, leaf); !bytes.Equal(got, want) {
			t.Fatalf("kill %d: %s reads different data", k, filepath.Base(leaf))
		}
		if out, err := exec.Command(bin, "merge", "--into", target, top).CombinedOutput(); err != nil && leaf == top {
			t.Fatalf("kill %d: re-running the merge: %v\n%s", k, err, out)
		}
		if _, err := os.Stat(top); err == nil {
			t.Fatalf("kill %d: %s still exists after the re-run", k, filepath.Base(top))
		}
		if got := readImage(t, target); !bytes.Equal(got, want) {
			t.Fatalf("kill %d: the target does not hold the merge", k)
		}
		check := func(path string) (int, error) { p, err := vhdx.Check(path, false); return len(p), err }
		if format == "vhd" {
			// A killed VHD merge may leave blocks it allocated but never
			// published: Check warns of the leaked space, nothing worse.
			check = func(path string) (int, error) {
				p, err := vhd.Check(path, false)
				n := 0
				for _, x := range p {
					if !x.Warning {
						n++
					}
				}
				return n, err
			}
		}
		if n, err := check(target); err != nil || n > 0 {
			t.Fatalf("kill %d: check: %d problems, %v", k, n, err)
		}
	}
	t.Logf("%d of 6 runs killed before they finished (a merge takes %v)", interrupted, full)
}

// bigChain makes a base image with data and two layers above it, in
// VHDX or VHD, the top one holding 40 MiB of new data, so a merge takes
// long enough to be cut.
func bigChain(t *testing.T, dir, format string) (top, base string, want []byte) {
	t.Helper()
	const size = 64 << 20
	type image interface {
		io.WriterAt
		Close() error
	}
	create := func(path, parent string) image {
		var im image
		var err error
		if format == "vhdx" {
			im, err = vhdx.Create(path, vhdx.CreateOptions{Size: size, Parent: parent})
		} else {
			s := uint64(size)
			if parent != "" {
				s = 0
			}
			im, err = vhd.Create(path, vhd.CreateOptions{Size: s, Parent: parent})
		}
		if err != nil {
			t.Fatal(err)
		}
		return im
	}
	want = make([]byte, size)
	base = filepath.Join(dir, "base."+format)
	im := create(base, "")
	scribble(t, im, want, 1, 8, 4<<20)
	im.Close()
	mid := filepath.Join(dir, "mid.a"+format)
	im = create(mid, base)
	scribble(t, im, want, 2, 40, 64<<10)
	im.Close()
	top = filepath.Join(dir, "top.a"+format)
	im = create(top, mid)
	r := rand.New(rand.NewSource(3))
	buf := make([]byte, 1<<20)
	for i := 0; i < 40; i++ {
		r.Read(buf)
		off := int64(i) * (3 << 19)
		if _, err := im.WriteAt(buf, off); err != nil {
			t.Fatal(err)
		}
		copy(want[off:], buf)
	}
	if err := im.Close(); err != nil {
		t.Fatal(err)
	}
	return top, base, want
}

func readImage(t *testing.T, path string) []byte {
	t.Helper()
	im, err := open(path, true, Options{})
	if err != nil {
		t.Fatalf("%s: %v", filepath.Base(path), err)
	}
	defer im.Close()
	b := make([]byte, im.Size())
	if _, err := im.ReadAt(b, 0); err != nil {
		t.Fatal(err)
	}
	return b
}
