package vhdx

import (
	"bytes"
	"crypto/sha256"
	"encoding/hex"
	"os"

	"errors"
	"fmt"
	"github.com/vhdkit/vhdkit/disk"
	"math/rand"
	randv2 "math/rand/v2"
	"path/filepath"
	"testing"

	"github.com/vhdkit/vhdkit/storage"
)

// Crash and fault tests: a workload runs on a FaultFile over a MemFile that
// stops (every operation fails) at its i-th operation, for every i; the
// MemFile's crash clone — what was synced plus a random subset of what was
// not — must then open, replay, check clean and hold every write
// acknowledged by the last successful Flush.

const crashSize = 6<<20 + 512*5 // a partial last block

// step is one operation of a workload.
type step struct {
	off   int64
	data  []byte // nil: Flush
	zero  int64  // >0: WriteZeroes of this length (data nil)
	close bool
}

// crashWorkload mixes allocating and in-place writes, unaligned and
// block-crossing ones, zeroing, and flushes. Within one flush window the
// writes do not overlap, so after a crash every sector holds either its
// last flushed or its newest content.
func crashWorkload(seed int64, size int64) []step {
	r := rand.New(rand.NewSource(seed))
	var steps []step
	for w := 0; w < 4; w++ {
		slots := r.Perm(int(size / (256 << 10)))
		for _, s := range slots[:5] {
			off := int64(s)*(256<<10) + r.Int63n(4096)
			n := r.Int63n(200<<10) + 1
			if w == 2 && s%2 == 0 {
				steps = append(steps, step{off: off / 512 * 512, zero: (n + 511) / 512 * 512})
				continue
			}
			b := make([]byte, n)
			r.Read(b)
			steps = append(steps, step{off: off, data: b})
		}
		steps = append(steps, step{})
	}
	// A block-crossing write, then close (flush + clean header).
	b := make([]byte, 1<<20+1000)
	r.Read(b)
	steps = append(steps, step{off: 2<<20 - 500, data: b}, step{close: true})
	return steps
}

// expectation tracks what must survive a crash.
type expectation struct {
	durable []byte // content as of the last successful Flush
	newest  []byte // content with every write applied
}

func (x *expectation) apply(s step) {
	switch {
	case s.data != nil:
		copy(x.newest[s.off:], s.data)
	case s.zero > 0:
		clear(x.newest[s.off : s.off+s.zero])
	}
}

func (x *expectation) flushed() { copy(x.durable, x.newest) }

// verify checks that each sector of got holds its durable or newest content.
func (x *expectation) verify(got []byte) error {
	for off := 0; off < len(got); off += 512 {
		end := min(off+512, len(got))
		if !bytes.Equal(got[off:end], x.durable[off:end]) && !bytes.Equal(got[off:end], x.newest[off:end]) {
			return fmt.Errorf("sector at %d holds neither its flushed nor its newest content: got %x.. flushed %x.. newest %x..", off, got[off:off+16], x.durable[off:off+16], x.newest[off:off+16])
		}
	}
	return nil
}

// runWorkload runs steps on im until one fails, updating x as writes and
// flushes are acknowledged.
func runWorkload(im *Image, steps []step, x *expectation) error {
	for _, s := range steps {
		var err error
		switch {
		case s.close:
			err = im.Close()
			if err == nil {
				x.flushed()
			}
			return err
		case s.data != nil:
			_, err = im.WriteAt(s.data, s.off)
		case s.zero > 0:
			err = im.WriteZeroes(s.off, s.zero, true)
		default:
			err = im.Flush()
			if err == nil {
				x.flushed()
			}
		}
		// A failed write may have landed in part: its sectors may hold
		// the new content too.
		x.apply(s)
		if err != nil {
			return err
		}
	}
	return nil
}

// afterCrash opens the crash clone read-only (log replayed in memory), then
// read-write (replayed on the file), checks it, and compares with x.
func afterCrash(t *testing.T, clone *storage.MemFile, path string, x *expectation) {
	t.Helper()
	ro, err := OpenFile(keepOpen{clone}, path, OpenOptions{ReadOnly: true})
	if err != nil {
		t.Fatalf("read-only open after crash: %v", err)
	}
	roData := readAll(t, ro)
	ro.Close()
	if err := x.verify(roData); err != nil {
		t.Fatalf("read-only open: %v", err)
	}
	rw, err := OpenFile(keepOpen{clone}, path, OpenOptions{})
	if err != nil {
		t.Fatalf("read-write open after crash: %v", err)
	}
	if got := readAll(t, rw); !bytes.Equal(got, roData) {
		t.Fatalf("read-write open reads differently from read-only, first at %d", firstDiff(got, roData))
	}
	// The replayed image takes writes and closes cleanly.
	if _, err := rw.WriteAt([]byte("after the crash"), 12345); err != nil {
		t.Fatal(err)
	}
	if err := rw.Close(); err != nil {
		t.Fatal(err)
	}
	probs, err := CheckFile(clone, path)
	if err != nil || len(probs) > 0 {
		t.Fatalf("check after crash and reopen: %v %v", probs, err)
	}
}

// crashSweep runs the workload once per operation index, stopping the disk
// there, and checks a few crash clones of each. It returns the number of
// crash points exercised.
func crashSweep(t *testing.T, newImage func(f storage.File) (*Image, []byte, error), path string, seed int64) int {
	steps := crashWorkload(seed, crashSize)
	points := 0
	for i := int64(0); ; i++ {
		base := storage.NewMemFile(nil)
		ff := &storage.FaultFile{File: base, FailAt: -1}
		im, initial, err := newImage(ff)
		if err != nil {
			t.Fatal(err)
		}
		x := &expectation{durable: bytes.Clone(initial), newest: bytes.Clone(initial)}
		ff.FailAt = ff.Ops() + i
		ff.Dead = true
		werr := runWorkload(im, steps, x)
		if werr != nil && !errors.Is(werr, storage.ErrInjected) {
			t.Fatalf("point %d: unexpected error %v", i, werr)
		}
		if !ff.Injected() {
			if werr != nil {
				t.Fatal(werr)
			}
			return points
		}
		points++
		for c := 0; c < 3; c++ {
			rng := randv2.New(randv2.NewPCG(uint64(i), uint64(c)))
			clone := base.CrashClone(rng)
			checkCrashState(t, clone, i)
			afterCrash(t, clone, path, x)
		}
	}
}

func TestCrashDynamic(t *testing.T) {
	for _, sector := range []uint32{512, 4096} {
		t.Run(fmt.Sprint(sector), func(t *testing.T) {
			path := filepath.Join(t.TempDir(), "crash.vhdx")
			n := crashSweep(t, func(f storage.File) (*Image, []byte, error) {
				im, err := CreateFile(f, path, CreateOptions{Size: crashSize / 4096 * 4096, BlockSize: 1 << 20, LogicalSectorSize: sector})
				if err != nil {
					return nil, nil, err
				}
				return im, make([]byte, im.Size()), nil
			}, path, 1)
			t.Logf("%d crash points", n)
		})
	}
}

func TestCrashDifferencing(t *testing.T) {
	dir := t.TempDir()
	basePath := filepath.Join(dir, "base.vhdx")
	base, err := Create(basePath, CreateOptions{Size: crashSize, BlockSize: 1 << 20})
	if err != nil {
		t.Fatal(err)
	}
	parentData := make([]byte, crashSize)
	fillRandom(t, base, parentData, 5, 20, 1<<20)
	if err := base.Close(); err != nil {
		t.Fatal(err)
	}
	path := filepath.Join(dir, "child.avhdx")
	n := crashSweep(t, func(f storage.File) (*Image, []byte, error) {
		im, err := CreateFile(f, path, CreateOptions{Parent: basePath, BlockSize: 1 << 20})
		return im, parentData, err
	}, path, 2)
	t.Logf("%d crash points", n)
}

// TestCrashCreate stops the disk at every operation of CreateFile: the
// result either is not yet an image (no valid header: Create never links
// it into place) or is a complete one.
func TestCrashCreate(t *testing.T) {
	path := filepath.Join(t.TempDir(), "new.vhdx")
	for i := int64(0); ; i++ {
		base := storage.NewMemFile(nil)
		ff := &storage.FaultFile{File: base, FailAt: i, Dead: true}
		_, err := CreateFile(ff, path, CreateOptions{Size: 8 << 20})
		if !ff.Injected() {
			if err != nil {
				t.Fatal(err)
			}
			t.Logf("%d crash points", i)
			return
		}
		for c := 0; c < 3; c++ {
			clone := base.CrashClone(randv2.New(randv2.NewPCG(uint64(i), uint64(c))))
			probs, cerr := CheckStructure(clone)
			im, err := OpenFile(clone, path, OpenOptions{})
			if err == nil && (cerr != nil || len(violations(probs)) > 0) {
				t.Fatalf("point %d: an image that opens fails the strict check: %v %v", i, probs, cerr)
			}
			if err != nil {
				if !errors.Is(err, ErrFormat) && !errors.Is(err, ErrChecksum) {
					t.Fatalf("point %d: open: %v, want a format error", i, err)
				}
				continue
			}
			if got := readAll(t, im); !bytes.Equal(got, make([]byte, len(got))) {
				t.Fatalf("point %d: a new image holds data", i)
			}
			im.Close()
		}
	}
}

// TestErrorInjection fails the i-th I/O once (the disk keeps working) for
// every i: the failing call returns the error, and after it the image
// still works, flushes and, reopened, holds every acknowledged write.
func TestErrorInjection(t *testing.T) {
	path := filepath.Join(t.TempDir(), "err.vhdx")
	steps := crashWorkload(3, crashSize)
	for i := int64(0); ; i++ {
		base := storage.NewMemFile(nil)
		ff := &storage.FaultFile{File: base, FailAt: -1, TornWrite: true}
		im, err := CreateFile(ff, path, CreateOptions{Size: crashSize / 4096 * 4096, BlockSize: 1 << 20})
		if err != nil {
			t.Fatal(err)
		}
		ff.FailAt = ff.Ops() + i
		// Run the workload, retrying a failed step once: an I/O error is
		// reported and leaves the image usable.
		model := make([]byte, im.Size())
		x := &expectation{durable: model, newest: bytes.Clone(model)}
		for _, s := range steps {
			err := runWorkload(im, []step{s}, x)
			if err != nil && !errors.Is(err, storage.ErrInjected) {
				t.Fatalf("point %d: %v", i, err)
			}
			if err != nil && !s.close {
				if err := runWorkload(im, []step{s}, x); err != nil {
					t.Fatalf("point %d: retry after an injected error: %v", i, err)
				}
			}
			if err != nil && s.close {
				// Close reports the error but has closed the image.
				break
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
		if err := x.verify(readAll(t, im)); err != nil {
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

// dataDigest hashes the data extents of an image with their offsets: cheap
// for large, mostly empty disks.
func dataDigest(t testing.TB, im *Image) string {
	t.Helper()
	h := sha256.New()
	ext, err := im.Extents(0, im.Size())
	if err != nil {
		t.Fatal(err)
	}
	buf := make([]byte, 1<<20)
	for _, e := range ext {
		if e.Type != disk.Data {
			continue
		}
		for off := e.Offset; off < e.Offset+e.Length; {
			n := min(int64(len(buf)), e.Offset+e.Length-off)
			if _, err := im.ReadAt(buf[:n], off); err != nil {
				t.Fatal(err)
			}
			if !disk.IsZero(buf[:n]) {
				fmt.Fprintf(h, "%d:", off)
				h.Write(buf[:n])
			}
			off += n
		}
	}
	return hex.EncodeToString(h.Sum(nil))
}

// TestCrashDuringReplay stops the disk at every operation of replaying the
// pending log of a real Hyper-V image: the crash clone still replays to the
// same content, since replay is idempotent and the log is cleared last.
func TestCrashDuringReplay(t *testing.T) {
	dir := t.TempDir()
	path := sample(t, "hyperv/discutils-vhdx-log-replay.vhdx.gz", dir, "")
	orig, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	ref, err := OpenFile(storage.NewMemFile(orig), path, OpenOptions{ReadOnly: true})
	if err != nil {
		t.Fatal(err)
	}
	want := dataDigest(t, ref)
	ref.Close()
	for i := int64(0); ; i++ {
		base := storage.NewMemFile(orig)
		ff := &storage.FaultFile{File: base, FailAt: i, Dead: true}
		im, err := OpenFile(ff, path, OpenOptions{})
		if !ff.Injected() {
			if err != nil {
				t.Fatal(err)
			}
			im.Close()
			t.Logf("%d crash points", i)
			return
		}
		if err == nil {
			im.Close()
		}
		for c := 0; c < 3; c++ {
			clone := base.CrashClone(randv2.New(randv2.NewPCG(uint64(i), uint64(c))))
			checkCrashState(t, clone, i)
			im, err := OpenFile(clone, path, OpenOptions{})
			if err != nil {
				t.Fatalf("point %d: reopen: %v", i, err)
			}
			if got := dataDigest(t, im); got != want {
				t.Fatalf("point %d: content differs after an interrupted replay", i)
			}
			im.Close()
		}
	}
}
