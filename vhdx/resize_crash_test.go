package vhdx

import (
	"errors"
	"fmt"
	"math/rand"
	randv2 "math/rand/v2"
	"path/filepath"
	"testing"

	"github.com/vhdkit/vhdkit/storage"
)

// Crash and fault tests of Resize, as crash_test.go does for writes: the
// workload runs on a FaultFile over a MemFile that stops at its i-th
// operation, for every i, and crash clones of what is left must open with
// the old or the new size, check clean and hold every sector as of the
// last durable point (Flush, Resize or Close) or newer.

// rstep is one operation of a resize workload.
type rstep struct {
	off    int64
	data   []byte // with neither data nor resize: Flush
	resize int64  // >0: Resize to this size
	close  bool
}

// rexpect is what may survive a crash: the content as of the last durable
// point, the newest, and while a Resize is not acknowledged the newest
// before it (the old size with the writes before it), each with its size.
type rexpect struct{ durable, before, newest *diskModel }

func (x *rexpect) apply(s rstep) {
	switch {
	case s.resize > 0:
		x.before = x.newest.clone()
		x.newest.resize(s.resize)
	case s.data != nil:
		x.newest.write(s.data, s.off)
	}
}

func (x *rexpect) flushed() { x.durable, x.before = x.newest.clone(), nil }

// check compares im with what may have survived.
func (x *rexpect) check(im *Image) error {
	if x.before != nil {
		return checkModels(im, x.durable, x.before, x.newest)
	}
	return checkModels(im, x.durable, x.newest)
}

// runResizeWorkload runs steps on im until one fails, updating x as
// operations are acknowledged. A failed operation may have taken effect
// (a Resize too, once its entry reached the disk), so it counts as newest.
func runResizeWorkload(im *Image, steps []rstep, x *rexpect) error {
	for _, s := range steps {
		var err error
		switch {
		case s.close:
			if err = im.Close(); err == nil {
				x.flushed()
			}
			return err
		case s.resize > 0:
			err = im.Resize(s.resize)
		case s.data != nil:
			_, err = im.WriteAt(s.data, s.off)
		default:
			err = im.Flush()
		}
		x.apply(s)
		if err == nil && s.data == nil {
			x.flushed() // Flush, and Resize, which flushes
		}
		if err != nil {
			return err
		}
	}
	return nil
}

// resizeWorkload builds steps: writes (not overlapping within a flush
// window, so each sector is either durable or newest) around the given
// points, then each size in turn with writes after it, a flush, and Close.
func resizeWorkload(seed, size int64, sizes ...int64) []rstep {
	r := rand.New(rand.NewSource(seed))
	var steps []rstep
	writes := func(size int64, points ...int64) {
		var used [][2]int64
	next:
		for len(used) < 4 {
			at := min(max(points[r.Intn(len(points))]+r.Int63n(1<<20)-512<<10, 0), size-1)
			n := min(r.Int63n(300<<10)+1, size-at)
			for _, u := range used {
				if at < u[1] && u[0] < at+n {
					continue next
				}
			}
			used = append(used, [2]int64{at, at + n})
			b := make([]byte, n)
			r.Read(b)
			steps = append(steps, rstep{off: at, data: b})
		}
	}
	writes(size, 0, size/2, size)
	steps = append(steps, rstep{})
	for _, next := range sizes {
		steps = append(steps, rstep{resize: next})
		writes(next, 0, size, next/2, next)
		size = next
	}
	steps = append(steps, rstep{})
	writes(size, size/3, size)
	return append(steps, rstep{close: true})
}

// afterResizeCrash opens a crash clone read-only (log replayed in memory)
// and read-write (replayed on the file), compares both with x, writes, and
// checks the file clean.
func afterResizeCrash(t *testing.T, clone *storage.MemFile, path string, x *rexpect, point int64) {
	t.Helper()
	checkCrashState(t, clone, point)
	ro, err := OpenFile(keepOpen{clone}, path, OpenOptions{ReadOnly: true})
	if err != nil {
		t.Fatalf("point %d: read-only open after crash: %v", point, err)
	}
	size := ro.Size()
	err = x.check(ro)
	ro.Close()
	if err != nil {
		t.Fatalf("point %d: read-only open: %v", point, err)
	}
	rw, err := OpenFile(keepOpen{clone}, path, OpenOptions{})
	if err != nil {
		t.Fatalf("point %d: read-write open after crash: %v", point, err)
	}
	if rw.Size() != size {
		t.Fatalf("point %d: read-write open has %d bytes, read-only %d", point, rw.Size(), size)
	}
	if err := x.check(rw); err != nil {
		t.Fatalf("point %d: read-write open: %v", point, err)
	}
	if _, err := rw.WriteAt([]byte("after the crash"), 12345); err != nil {
		t.Fatal(err)
	}
	if err := rw.Close(); err != nil {
		t.Fatal(err)
	}
	if probs, err := CheckFile(clone, path); err != nil || len(probs) > 0 {
		t.Fatalf("point %d: check after crash and reopen: %v %v", point, probs, err)
	}
}

// resizeSweep runs steps once per operation index, stopping the disk
// there, and checks three crash clones of each. It returns the number of
// crash points and how many clones had the old and the new size of the
// Resize that was cut short.
func resizeSweep(t *testing.T, path string, newImage func(f storage.File) (*Image, *diskModel, error), steps []rstep) (points, oldSize, newSize int) {
	for i := int64(0); ; i++ {
		base := storage.NewMemFile(nil)
		ff := &storage.FaultFile{File: base, FailAt: -1}
		im, initial, err := newImage(ff)
		if err != nil {
			t.Fatal(err)
		}
		x := &rexpect{durable: initial.clone(), newest: initial.clone()}
		ff.FailAt = ff.Ops() + i
		ff.Dead = true
		werr := runResizeWorkload(im, steps, x)
		if werr != nil && !errors.Is(werr, storage.ErrInjected) {
			t.Fatalf("point %d: unexpected error %v", i, werr)
		}
		if !ff.Injected() {
			if werr != nil {
				t.Fatal(werr)
			}
			return points, oldSize, newSize
		}
		points++
		for c := 0; c < 3; c++ {
			clone := base.CrashClone(randv2.New(randv2.NewPCG(uint64(i), uint64(c))))
			afterResizeCrash(t, clone, path, x, i)
			if x.durable.size != x.newest.size {
				if im, err := OpenFile(keepOpen{clone}, path, OpenOptions{ReadOnly: true}); err == nil {
					if im.Size() == x.durable.size {
						oldSize++
					} else {
						newSize++
					}
					im.Close()
				}
			}
		}
	}
}

// TestCrashResizeGrow: a dynamic image with 1 MiB blocks grows from
// 1 MiB + 3 sectors to 130 GiB, past its BAT region, so the BAT moves.
func TestCrashResizeGrow(t *testing.T) {
	for _, sector := range []uint32{512, 4096} {
		t.Run(fmt.Sprint(sector), func(t *testing.T) {
			ss := int64(sector)
			path := filepath.Join(t.TempDir(), "grow.vhdx")
			size := 1<<20 + 3*ss
			steps := resizeWorkload(int64(sector), size, 130<<30+7*4096)
			n, o, w := resizeSweep(t, path, func(f storage.File) (*Image, *diskModel, error) {
				im, err := CreateFile(f, path, CreateOptions{Size: uint64(size), BlockSize: 1 << 20, LogicalSectorSize: sector})
				return im, newModel(size, nil), err
			}, steps)
			t.Logf("%d crash points; %d clones with the old size, %d with the new", n, o, w)
		})
	}
}

// TestCrashResizeShrink: a dynamic image shrinks, dropping blocks and
// cutting one, then grows back over the cut block's old bytes.
func TestCrashResizeShrink(t *testing.T) {
	path := filepath.Join(t.TempDir(), "shrink.vhdx")
	size := int64(6<<20 + 5*512)
	steps := resizeWorkload(7, size, 2<<20+3*512, 5<<20)
	n, o, w := resizeSweep(t, path, func(f storage.File) (*Image, *diskModel, error) {
		im, err := CreateFile(f, path, CreateOptions{Size: uint64(size), BlockSize: 1 << 20})
		return im, newModel(size, nil), err
	}, steps)
	t.Logf("%d crash points; %d clones with the old size, %d with the new", n, o, w)
}

// TestCrashResizeFixed: a fixed image grows (new blocks allocated) and
// shrinks.
func TestCrashResizeFixed(t *testing.T) {
	path := filepath.Join(t.TempDir(), "fixed.vhdx")
	size := int64(3<<20 + 512)
	steps := resizeWorkload(8, size, 9<<20+3*512, 2<<20+512)
	n, o, w := resizeSweep(t, path, func(f storage.File) (*Image, *diskModel, error) {
		im, err := CreateFile(f, path, CreateOptions{Type: Fixed, Size: uint64(size), BlockSize: 1 << 20})
		return im, newModel(size, nil), err
	}, steps)
	t.Logf("%d crash points; %d clones with the old size, %d with the new", n, o, w)
}

// TestCrashResizeDifferencing: a child shrinks below its parent, then
// grows to 130 GiB (the BAT, full of ZERO entries, moves: several log
// entries before the switch); the new range never shows the parent.
func TestCrashResizeDifferencing(t *testing.T) {
	dir := t.TempDir()
	basePath := filepath.Join(dir, "base.vhdx")
	base, err := Create(basePath, CreateOptions{Size: 8 << 20, BlockSize: 1 << 20})
	if err != nil {
		t.Fatal(err)
	}
	parentData := make([]byte, 8<<20)
	fillRandom(t, base, parentData, 5, 20, 1<<20)
	if err := base.Close(); err != nil {
		t.Fatal(err)
	}
	path := filepath.Join(dir, "child.avhdx")
	steps := resizeWorkload(9, 8<<20, 5<<20+3*512, 130<<30)
	n, o, w := resizeSweep(t, path, func(f storage.File) (*Image, *diskModel, error) {
		im, err := CreateFile(f, path, CreateOptions{Parent: basePath, BlockSize: 1 << 20})
		return im, newModel(8<<20, parentData), err
	}, steps)
	t.Logf("%d crash points; %d clones with the old size, %d with the new", n, o, w)
}

// TestResizeErrorInjection fails the i-th I/O once (torn if a write; the
// disk keeps working) for every i of a shrink and a grow past the BAT
// region: the failing call returns the error, a retry succeeds, and the
// reopened image holds every acknowledged write under the final size.
func TestResizeErrorInjection(t *testing.T) {
	path := filepath.Join(t.TempDir(), "err.vhdx")
	size := int64(3<<20 + 512)
	steps := resizeWorkload(10, size, 1<<20+3*512, 130<<30)
	for i := int64(0); ; i++ {
		base := storage.NewMemFile(nil)
		ff := &storage.FaultFile{File: base, FailAt: -1, TornWrite: true}
		im, err := CreateFile(ff, path, CreateOptions{Size: uint64(size), BlockSize: 1 << 20})
		if err != nil {
			t.Fatal(err)
		}
		ff.FailAt = ff.Ops() + i
		x := &rexpect{durable: newModel(size, nil), newest: newModel(size, nil)}
		for _, s := range steps {
			err := runResizeWorkload(im, []rstep{s}, x)
			if err != nil && !errors.Is(err, storage.ErrInjected) {
				t.Fatalf("point %d: %v", i, err)
			}
			if err != nil && s.close {
				break // Close reports the error but has closed the image
			}
			if err != nil {
				if err := runResizeWorkload(im, []rstep{s}, x); err != nil {
					t.Fatalf("point %d: retry after an injected error: %v", i, err)
				}
			}
		}
		if !ff.Injected() {
			t.Logf("%d error points", i)
			return
		}
		disk := storage.NewMemFile(base.Bytes())
		checkCrashState(t, disk, i)
		im, err = OpenFile(keepOpen{disk}, path, OpenOptions{})
		if err != nil {
			t.Fatalf("point %d: reopen: %v", i, err)
		}
		if im.Size() != x.newest.size {
			t.Fatalf("point %d: size %d, want %d", i, im.Size(), x.newest.size)
		}
		if err := x.check(im); err != nil {
			t.Fatalf("point %d: %v", i, err)
		}
		if err := im.Close(); err != nil {
			t.Fatal(err)
		}
		if probs, err := CheckFile(disk, path); err != nil || len(probs) > 0 {
			t.Fatalf("point %d: check: %v %v", i, probs, err)
		}
	}
}
