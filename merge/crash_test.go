package merge

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"

	"github.com/vhdkit/vhdkit/storage"
	"github.com/vhdkit/vhdkit/storage/faulttest"
	"github.com/vhdkit/vhdkit/vhdx"
)

// The crash and fault sweeps of a merge run on a storage.MemFS holding
// the chain's files (and the journal the merge writes), one fault
// schedule across all of them (storage/faulttest). The formats resolve
// parent locators by stat on the real file system: an empty file of each
// name stands there while the MemFS holds it.

// placeholders makes the real file system hold an empty file for each of
// paths fsys holds, and none for the others.
func placeholders(fsys *storage.MemFS, paths []string) {
	for _, p := range paths {
		if _, err := fsys.Stat(p); err == nil {
			os.WriteFile(p, nil, 0o644)
		} else {
			os.Remove(p)
		}
	}
}

// leafContent reads the chain from top, or from the target once top is
// gone (the merge finished).
func leafContent(fsys *storage.MemFS, top, target string) ([]byte, error) {
	leaf := top
	if _, err := fsys.Stat(top); err != nil {
		leaf = target
	}
	im, err := open(leaf, true, Options{FS: fsys})
	if err != nil {
		return nil, fmt.Errorf("opening %s: %w", filepath.Base(leaf), err)
	}
	defer im.Close()
	b := make([]byte, im.Size())
	if _, err := im.ReadAt(b, 0); err != nil {
		return nil, err
	}
	return b, nil
}

// knownVHDXFindings are vhdx.Check rules the VHDX writer still breaks at
// some crash points, tolerated until its fix lands (issue 11); empty: every
// VHDX file after every crash point must pass the strict check.
var knownVHDXFindings = []vhdx.Rule{}

// checkVHDX validates every VHDX file of fsys strictly
// (vhdx.CheckStructure), as the crash or failed I/O left it: the
// strictest reader must accept it.
func checkVHDX(fsys *storage.MemFS) error {
	for _, p := range fsys.Names() {
		b, _ := fsys.Bytes(p)
		if len(b) < 8 || string(b[:8]) != "vhdxfile" {
			continue // a VHD, a journal or a file not written yet
		}
		if strings.HasPrefix(filepath.Base(p), ".") && strings.Contains(p, ".tmp") {
			continue // a new image's temporary file: not an image until renamed
		}
		probs, err := vhdx.CheckStructure(storage.NewMemFile(b))
		if err != nil {
			return fmt.Errorf("strict check of %s: %w", filepath.Base(p), err)
		}
		for _, pr := range probs {
			if pr.Violation() && !slices.Contains(knownVHDXFindings, pr.Rule) {
				return fmt.Errorf("strict check of %s: %v", filepath.Base(p), probs)
			}
		}
	}
	return nil
}

// mergeSweep merges the top of a chain of depth levels above its base
// into layer into, stopped at every operation in each of modes. After
// each point the files pass the strict check, the leaf reads the newest
// data, and running the merge again finishes it with the target holding
// that data.
func mergeSweep(t *testing.T, build func(testing.TB, string, int) ([]string, [][]byte), depth, into int, modes []faulttest.Mode) {
	dir := t.TempDir()
	paths, contents := build(t, dir, depth)
	want := contents[depth]
	top, target := paths[depth], paths[into]
	merge := func(fsys *storage.MemFS) error {
		_, err := Merge(context.Background(), top, Options{Into: target, FS: fsys})
		return err
	}
	check := func(fsys *storage.MemFS, when string) error {
		if err := checkVHDX(fsys); err != nil {
			return fmt.Errorf("%s: %w", when, err)
		}
		got, err := leafContent(fsys, top, target)
		if err != nil {
			return fmt.Errorf("%s: %w", when, err)
		}
		if !bytes.Equal(got, want) {
			return fmt.Errorf("%s: the leaf reads different data", when)
		}
		return nil
	}
	faulttest.Run(t, faulttest.Sweep{
		Files: faulttest.ReadFiles(t, paths...),
		Modes: modes,
		// One power cut per point besides the state as left: the four
		// sweeps have over a thousand points (more in long mode).
		PowerCuts: map[bool]int{false: 1, true: 10}[faulttest.Long()],
		Start: func(fsys *storage.MemFS) (func() error, error) {
			placeholders(fsys, paths)
			return func() error { return merge(fsys) }, nil
		},
		Check: func(fsys *storage.MemFS, p faulttest.Point) error {
			if p.Mode == faulttest.Crash && p.PowerCut == 0 && p.Err == nil {
				return errors.New("the merge succeeded on a stopped disk")
			}
			placeholders(fsys, paths)
			if err := check(fsys, "as left"); err != nil {
				return err
			}
			if _, err := fsys.Stat(top); err == nil {
				if err := merge(fsys); err != nil {
					return fmt.Errorf("re-running the merge: %w", err)
				}
			}
			return check(fsys, "after a re-run")
		},
	})
}

// TestMergeCrash stops the disk at every operation of a merge (top into
// parent, and three levels into the base; VHDX and VHD) — the I/O of
// every file, the journal's writes, renames and removals — and checks the
// files as left and after power cuts.
func TestMergeCrash(t *testing.T) {
	for _, c := range []struct {
		name  string
		build func(testing.TB, string, int) ([]string, [][]byte)
		into  int  // index of the target in the chain, base 0
		long  bool // swept in long mode only: CI time (each is 250-400 points)
	}{
		{"vhdx/top-into-parent", buildChain, 2, true},
		{"vhdx/into-base", buildChain, 0, false},
		{"vhd/top-into-parent", buildVHDChain, 2, false},
		{"vhd/into-base", buildVHDChain, 0, true},
	} {
		t.Run(c.name, func(t *testing.T) {
			if c.long && !faulttest.Long() {
				t.Skip("long form only (VHDKIT_SWEEP=long)")
			}
			mergeSweep(t, c.build, 3, c.into, []faulttest.Mode{faulttest.Crash})
		})
	}
}

// TestMergeIOError fails one operation of a merge, for every operation,
// with the disk working on, and separately fills the disk from every
// write on: the merge reports the error (or, where the operation was not
// needed, succeeds), the leaf still reads the newest data, and running
// the merge again finishes it.
func TestMergeIOError(t *testing.T) {
	for _, c := range []struct {
		name  string
		build func(testing.TB, string, int) ([]string, [][]byte)
	}{{"vhdx", buildChain}, {"vhd", buildVHDChain}} {
		t.Run(c.name, func(t *testing.T) {
			mergeSweep(t, c.build, 2, 0, []faulttest.Mode{faulttest.IOError, faulttest.NoSpace})
		})
	}
}

// TestMergeSweepClones checks that the sweeps go through the cloning path
// of a VHDX merge (a MemFS stands in for a file system that clones).
func TestMergeSweepClones(t *testing.T) {
	paths, _ := buildChain(t, t.TempDir(), 3)
	fsys := storage.NewMemFS(faulttest.ReadFiles(t, paths...))
	if _, err := Merge(context.Background(), paths[3], Options{Into: paths[0], FS: fsys}); err != nil {
		t.Fatal(err)
	}
	if fsys.Cloned() == 0 {
		t.Fatal("the merge cloned nothing: the sweeps miss the cloning path")
	}
}
