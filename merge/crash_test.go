package merge

import (
	"bytes"
	"context"
	"fmt"
	randv2 "math/rand/v2"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"testing"

	"github.com/vhdkit/vhdkit/storage"
	"github.com/vhdkit/vhdkit/vhdx"
)

// memDisk holds a chain's files in MemFiles, so a merge can be stopped at
// its i-th I/O (counted across all its files and removals: one
// storage.FaultFile schedule they share) and the files crash-cloned.
// Empty files of the same names stand on the real file system for the
// path lookups (stat, glob).
type memDisk struct {
	mu     sync.Mutex
	files  map[string]*storage.MemFile
	faults *storage.FaultFile // the schedule every handle shares
	// cloned counts the bytes moved by clone (MemFile stands in for one),
	// to show that a sweep goes through the cloning path.
	cloned atomic.Int64
}

// newMemDisk holds a copy of files, each with an empty placeholder of its
// name on the real file system; it stops at operation failAt (-1: never),
// or with once fails that one operation and works on.
func newMemDisk(files map[string][]byte, failAt int64, once bool) *memDisk {
	d := &memDisk{files: map[string]*storage.MemFile{}, faults: &storage.FaultFile{FailAt: failAt, Dead: !once}}
	for p, b := range files {
		d.files[p] = storage.NewMemFile(b)
		os.WriteFile(p, nil, 0o644)
	}
	return d
}

// readFiles returns the content of each path.
func readFiles(t *testing.T, paths []string) map[string][]byte {
	t.Helper()
	out := map[string][]byte{}
	for _, p := range paths {
		b, err := os.ReadFile(p)
		if err != nil {
			t.Fatal(err)
		}
		out[p] = b
	}
	return out
}

// hit reports whether the schedule has failed an operation.
func (d *memDisk) hit() bool { return d.faults.Injected() }

// workOn makes the disk work on without faults (for the handles opened
// from now on).
func (d *memDisk) workOn() { d.faults = &storage.FaultFile{FailAt: -1} }

func (d *memDisk) open(path string, flag int) (storage.File, error) {
	d.mu.Lock()
	defer d.mu.Unlock()
	f, ok := d.files[path]
	if !ok {
		return nil, fmt.Errorf("open %s: %w", path, os.ErrNotExist)
	}
	return &memHandle{FaultFile: storage.FaultFile{File: f, Shared: d.faults}, d: d}, nil
}

func (d *memDisk) remove(path string) error {
	if err := d.faults.Fault(storage.OpRemove); err != nil {
		return err
	}
	d.mu.Lock()
	delete(d.files, path)
	d.mu.Unlock()
	return os.Remove(path)
}

// crash replaces every file by a crash clone of it.
func (d *memDisk) crash(rng *randv2.Rand) *memDisk {
	d.mu.Lock()
	defer d.mu.Unlock()
	c := &memDisk{files: map[string]*storage.MemFile{}, faults: &storage.FaultFile{FailAt: -1}}
	for p, f := range d.files {
		c.files[p] = f.CrashClone(rng)
	}
	return c
}

// memHandle is an open file of a memDisk: its I/O goes through the
// disk's fault schedule.
type memHandle struct {
	storage.FaultFile
	d *memDisk
}

// CopyRangeFrom is one operation, like a write: a clone into the file
// (MemFile copies, and keeps or loses the range per sector at a crash).
func (f *memHandle) CopyRangeFrom(src storage.File, srcOff, dstOff, n int64) (storage.Moved, error) {
	m, err := f.FaultFile.CopyRangeFrom(src, srcOff, dstOff, n)
	f.d.cloned.Add(m.Cloned)
	return m, err
}

func (f *memHandle) Close() error { return nil } // the MemFile outlives its handles

func (d *memDisk) options(into string) Options {
	return Options{Into: into, OpenFile: d.open, Remove: d.remove}
}

// leafContent reads the chain from top, or from the target once top is
// gone (the merge finished).
func (d *memDisk) leafContent(t *testing.T, top, target string) []byte {
	t.Helper()
	leaf := top
	d.mu.Lock()
	if _, ok := d.files[top]; !ok {
		leaf = target
	}
	d.mu.Unlock()
	im, err := open(leaf, true, Options{OpenFile: d.open})
	if err != nil {
		t.Fatalf("opening %s after the crash: %v", filepath.Base(leaf), err)
	}
	defer im.Close()
	b := make([]byte, im.Size())
	if _, err := im.ReadAt(b, 0); err != nil {
		t.Fatal(err)
	}
	return b
}

// knownVHDXFindings are vhdx.Check rules the VHDX writer still breaks at
// some crash points, tolerated until its fix lands (issue 11); empty: every
// VHDX file after every crash point must pass the strict check.
var knownVHDXFindings = []vhdx.Rule{}

// checkVHDX validates every VHDX file of d strictly (vhdx.CheckStructure),
// as the crash or failed I/O left it: the strictest reader must accept it.
func (d *memDisk) checkVHDX(t *testing.T, point int64, when string) {
	t.Helper()
	d.mu.Lock()
	defer d.mu.Unlock()
	for p, f := range d.files {
		var sig [8]byte
		if n, _ := f.ReadAt(sig[:], 0); n < 8 || string(sig[:]) != "vhdxfile" {
			continue // a VHD, a journal or a file not written yet
		}
		probs, err := vhdx.CheckStructure(f)
		if err != nil {
			t.Fatalf("point %d: strict check of %s %s: %v", point, filepath.Base(p), when, err)
		}
		for _, pr := range probs {
			if pr.Violation() && !slices.Contains(knownVHDXFindings, pr.Rule) {
				t.Fatalf("point %d: strict check of %s %s: %v", point, filepath.Base(p), when, probs)
			}
		}
	}
}

// TestMergeCrash stops the disk at every I/O of a merge (top into parent,
// and three levels into the base) and crash-clones every file, keeping a
// random part of what was not synced. The leaf must open and read the
// newest data, and running the merge again must finish it.
func TestMergeCrash(t *testing.T) {
	for _, c := range []struct {
		name  string
		build func(testing.TB, string, int) ([]string, [][]byte)
		into  int // index of the target in the chain, base 0
	}{
		{"vhdx/top-into-parent", buildChain, 2},
		{"vhdx/into-base", buildChain, 0},
		{"vhd/top-into-parent", buildVHDChain, 2},
		{"vhd/into-base", buildVHDChain, 0},
	} {
		t.Run(c.name, func(t *testing.T) {
			dir := t.TempDir()
			paths, contents := c.build(t, dir, 3)
			want := contents[3]
			orig := readFiles(t, paths)
			top, target := paths[3], paths[c.into]
			points := 0
			for i := int64(0); ; i++ {
				d := newMemDisk(orig, i, false)
				_, err := Merge(context.Background(), top, d.options(target))
				if !d.hit() {
					if err != nil {
						t.Fatal(err)
					}
					if strings.HasPrefix(c.name, "vhdx/") && d.cloned.Load() == 0 {
						t.Fatal("the merge cloned nothing: the sweep missed the cloning path")
					}
					break
				}
				if err == nil {
					t.Fatalf("point %d: merge succeeded on a stopped disk", i)
				}
				points++
				// The journal is synced before it is used: each clone
				// starts with it as the stopped run left it.
				jb, jerr := os.ReadFile(journalPath(top))
				for s := 0; s < 2; s++ {
					if jerr == nil {
						os.WriteFile(journalPath(top), jb, 0o644)
					}
					cd := d.crash(randv2.New(randv2.NewPCG(uint64(i), uint64(s))))
					for p := range orig {
						if _, ok := cd.files[p]; ok {
							os.WriteFile(p, nil, 0o644)
						} else {
							os.Remove(p)
						}
					}
					cd.checkVHDX(t, i, "after the crash")
					if got := cd.leafContent(t, top, target); !bytes.Equal(got, want) {
						t.Fatalf("point %d: the leaf reads different data after the crash", i)
					}
					if _, ok := cd.files[top]; ok {
						if _, err := Merge(context.Background(), top, cd.options(target)); err != nil {
							t.Fatalf("point %d: re-running the merge: %v", i, err)
						}
					}
					cd.checkVHDX(t, i, "after a re-run")
					if got := cd.leafContent(t, top, target); !bytes.Equal(got, want) {
						t.Fatalf("point %d: the target does not hold the merge after a re-run", i)
					}
				}
			}
			t.Logf("%d crash points", points)
		})
	}
}

// TestMergeIOError fails one I/O of a merge, for every I/O, with the disk
// working on: the merge reports the error, the leaf still reads the newest
// data, and running the merge again finishes it.
func TestMergeIOError(t *testing.T) {
	t.Run("vhdx", func(t *testing.T) { testMergeIOError(t, buildChain) })
	t.Run("vhd", func(t *testing.T) { testMergeIOError(t, buildVHDChain) })
}

func testMergeIOError(t *testing.T, build func(testing.TB, string, int) ([]string, [][]byte)) {
	dir := t.TempDir()
	paths, contents := build(t, dir, 2)
	want := contents[2]
	orig := readFiles(t, paths)
	top, target := paths[2], paths[0]
	points := 0
	for i := int64(0); ; i++ {
		os.Remove(journalPath(top))
		d := newMemDisk(orig, i, true)
		_, err := Merge(context.Background(), top, d.options(target))
		if !d.hit() {
			if err != nil {
				t.Fatal(err)
			}
			break
		}
		points++
		if err == nil {
			// The failed operation was retried or not needed: done.
			if got := d.leafContent(t, top, target); !bytes.Equal(got, want) {
				t.Fatalf("point %d: a merge that succeeded left wrong data", i)
			}
			continue
		}
		d.workOn()
		d.checkVHDX(t, i, "after the failed I/O")
		if got := d.leafContent(t, top, target); !bytes.Equal(got, want) {
			t.Fatalf("point %d: the leaf reads different data after %v", i, err)
		}
		if _, err := Merge(context.Background(), top, d.options(target)); err != nil {
			t.Fatalf("point %d: re-running the merge: %v", i, err)
		}
		d.checkVHDX(t, i, "after a re-run")
		if got := d.leafContent(t, top, target); !bytes.Equal(got, want) {
			t.Fatalf("point %d: the target does not hold the merge after a re-run", i)
		}
	}
	t.Logf("%d error points", points)
}
