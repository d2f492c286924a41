package vhdx

import (
	"bytes"
	"errors"
	"fmt"
	"hash/maphash"
	"os"
	"path/filepath"
	"slices"
	"sync"
	"testing"

	"github.com/vhdkit/vhdkit/disk"
	"github.com/vhdkit/vhdkit/storage"
	"github.com/vhdkit/vhdkit/storage/faulttest"
)

// The package's fault and crash sweeps run on the one harness
// (storage/faulttest): an operation on a storage.MemFS holding the image
// and its chain, stopped at every counted operation in each mode (a dead
// disk with power cuts, one I/O error, a full disk). A workload is a list
// of steps run against a byte model (expectation); after every point,
// checkImage judges what was left: the strict check as found, both kinds
// of open reading as the model allows and alike, a write after reopening.
// The formats resolve parent locators by stat on the real file system, so
// a parent is also a real file in the test's folder.

// strictFS checks the VHDX file at path in fsys with the strict checker:
// no rule a reader enforces may be broken (but knownWriterFindings).
func strictFS(fsys *storage.MemFS, path string) error {
	f, err := fsys.OpenFile(path, os.O_RDONLY, 0)
	if err != nil {
		return fmt.Errorf("%s is gone: %w", filepath.Base(path), err)
	}
	defer f.Close()
	probs, err := CheckStructure(f)
	if err != nil {
		return err
	}
	for _, p := range violations(probs) {
		if !slices.Contains(knownWriterFindings, p.Rule) {
			return fmt.Errorf("strict check: %v", probs)
		}
	}
	return nil
}

// TestSweepWriteFlushClose sweeps the life of a session on an existing
// image: open, an allocating write, Flush, Close. After every point the
// file passes the strict check, reads the old or (once the Flush
// succeeded) the new data, and opens read-write and closes cleanly.
//
// It found that a Flush whose header update (naming the session's new
// LogGuid) failed was retried by Close, which wrote a new entry over the
// one the header on the disk may name: torn, the file had a LogGuid
// naming no entry, which readers refuse.
func TestSweepWriteFlushClose(t *testing.T) {
	path := filepath.Join(t.TempDir(), "s.vhdx")
	im, err := Create(path, CreateOptions{Size: 8 << 20, BlockSize: 1 << 20})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := im.WriteAt(bytes.Repeat([]byte{7}, 4096), 0); err != nil {
		t.Fatal(err)
	}
	if err := im.Close(); err != nil {
		t.Fatal(err)
	}
	initial, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	data := bytes.Repeat([]byte("new data"), 512)
	const at = 3 << 20
	faulttest.Run(t, faulttest.Sweep{
		Files: map[string][]byte{path: initial},
		Start: func(fsys *storage.MemFS) (func() error, error) {
			return func() error {
				im, err := Open(path, OpenOptions{FS: fsys})
				if err != nil {
					return err
				}
				_, err = im.WriteAt(data, at)
				if err == nil {
					err = im.Flush()
				}
				return errors.Join(err, im.Close())
			}, nil
		},
		Check: func(fsys *storage.MemFS, p faulttest.Point) error {
			if err := strictFS(fsys, path); err != nil {
				return fmt.Errorf("as found: %w", err)
			}
			im, err := Open(path, OpenOptions{FS: fsys, ReadOnly: true})
			if err != nil {
				return err
			}
			got := make([]byte, len(data))
			_, err = im.ReadAt(got, at)
			im.Close()
			if err != nil {
				return err
			}
			switch {
			case p.Err == nil && !bytes.Equal(got, data):
				return errors.New("the run succeeded but the data is not there")
			case !bytes.Equal(got, data) && !bytes.Equal(got, make([]byte, len(data))):
				return errors.New("the written range holds neither the old nor the new data")
			}
			rw, err := Open(path, OpenOptions{FS: fsys})
			if err != nil {
				return fmt.Errorf("read-write open: %w", err)
			}
			if err := rw.Close(); err != nil {
				return fmt.Errorf("closing after the read-write open: %w", err)
			}
			return strictFS(fsys, path)
		},
	})
}

// step is one operation of a workload; with none of data, zero, trim,
// resize and close set it is a Flush.
type step struct {
	off    int64
	data   []byte // WriteAt of these bytes
	zero   int64  // >0: WriteZeroes (unmapping) of this many bytes
	trim   int64  // >0: Trim of this many bytes (reads as zeros after)
	resize int64  // >0: Resize to this size
	close  bool
}

// expectation is what an image may read as after a point, sector by
// sector: as of the last durable point (a successful Flush, Resize or
// Close), or newest (every write applied, acknowledged or not: a failed
// write may have landed in part), or, while a Resize is not acknowledged,
// newest as it was before it, under the old size. Within one flush window
// the workloads' writes do not overlap, so no sector has more states.
type expectation struct{ durable, before, newest *diskModel }

func newExpectation(initial *diskModel) *expectation {
	return &expectation{durable: initial.clone(), newest: initial.clone()}
}

func (x *expectation) apply(s step) {
	switch {
	case s.resize > 0:
		if x.before == nil { // a retried Resize keeps the state before the first try
			x.before = x.newest.clone()
		}
		x.newest.resize(s.resize)
	case s.data != nil:
		x.newest.write(s.data, s.off)
	case s.zero > 0 || s.trim > 0:
		x.newest.write(make([]byte, s.zero+s.trim), s.off)
	}
}

func (x *expectation) flushed() { x.durable, x.before = x.newest.clone(), nil }

// check compares im with what may have survived.
func (x *expectation) check(im *Image) error {
	if x.before != nil {
		return checkModels(im, x.durable, x.before, x.newest)
	}
	return checkModels(im, x.durable, x.newest)
}

// runWorkload runs steps on im until one fails, updating x as they are
// acknowledged. With retry (a disk that failed one operation and works
// on), a failed step is tried again, as a program would: the retry must
// succeed, unless the image said it takes no more flushes (a header
// update failed, see Image.logLost), and Close is not retried (it has
// closed the image).
func runWorkload(im *Image, steps []step, x *expectation, retry bool) error {
	for _, s := range steps {
		err := runStep(im, s, x)
		if err == nil {
			continue
		}
		if !retry || s.close {
			return err
		}
		if rerr := runStep(im, s, x); rerr != nil {
			if im.logLost != nil {
				return rerr
			}
			// Not wrapped: the harness reports an error that lost the
			// injected cause, naming the point.
			return fmt.Errorf("retrying %s after the injected error (%v): %v", s, err, rerr)
		}
	}
	return nil
}

// runStep runs one step and updates x.
func runStep(im *Image, s step, x *expectation) error {
	var err error
	switch {
	case s.close:
		err = im.Close()
	case s.resize > 0:
		err = im.Resize(s.resize)
	case s.data != nil:
		_, err = im.WriteAt(s.data, s.off)
	case s.zero > 0:
		err = im.WriteZeroes(s.off, s.zero, true)
	case s.trim > 0:
		err = im.Trim(s.off, s.trim)
	default:
		err = im.Flush()
	}
	x.apply(s)
	if err == nil && s.data == nil && s.zero == 0 && s.trim == 0 {
		x.flushed() // Flush, Close, and Resize, which flushes
	}
	return err
}

func (s step) String() string {
	switch {
	case s.close:
		return "Close"
	case s.resize > 0:
		return fmt.Sprintf("Resize(%d)", s.resize)
	case s.data != nil:
		return fmt.Sprintf("WriteAt(%d bytes, %d)", len(s.data), s.off)
	case s.zero > 0:
		return fmt.Sprintf("WriteZeroes(%d, %d)", s.off, s.zero)
	case s.trim > 0:
		return fmt.Sprintf("Trim(%d, %d)", s.off, s.trim)
	}
	return "Flush"
}

// powerCuts is how many power cuts the workload sweeps check per crash
// point, besides the state as left: 2 (20 in long mode). Each point has
// its own seed, so the short form still tries some hundreds per sweep.
func powerCuts() int {
	if faulttest.Long() {
		return 20
	}
	return 2
}

// singleFault reports whether fsys's schedule fails one operation and
// works on (faulttest.IOError), rather than stopping (Crash, NoSpace).
func singleFault(fsys *storage.MemFS) bool {
	ff := fsys.Faults()
	return ff != nil && !ff.Dead
}

// workloadSweep runs steps on the image at path (in files, with its
// chain) from its Open on, stopped at every point of every mode, and
// checks each state with checkImage. It returns the sweep's result and,
// over the states left while a Resize was not acknowledged, how many had
// the old size and how many the new.
func workloadSweep(t *testing.T, files map[string][]byte, path string, initial *diskModel, steps []step) (res faulttest.Result, oldSize, newSize int) {
	t.Helper()
	var x *expectation
	res = faulttest.Run(t, faulttest.Sweep{
		Files:     files,
		PowerCuts: powerCuts(),
		Start: func(fsys *storage.MemFS) (func() error, error) {
			im, err := Open(path, OpenOptions{FS: fsys})
			if err != nil {
				return nil, err
			}
			x = newExpectation(initial)
			return func() error { return runWorkload(im, steps, x, singleFault(fsys)) }, nil
		},
		Check: func(fsys *storage.MemFS, p faulttest.Point) error {
			if p.Mode == faulttest.Crash && p.PowerCut == 0 && p.Err == nil {
				return errors.New("the workload succeeded on a stopped disk")
			}
			size, err := checkImage(fsys, path, x)
			if err == nil && x.before != nil && x.before.size != x.newest.size {
				if size == x.before.size {
					oldSize++
				} else {
					newSize++
				}
			}
			return err
		},
	})
	return res, oldSize, newSize
}

// checkImage is the check after a point of a workload on the image at
// path: as found, before any reader replays its log, it passes the
// strict check; opened read-only (a log replayed in memory) it keeps the
// writer's own rules (writerRules) and reads as x allows, and opened
// read-write (replayed on the file) it reads the same; it takes a write, closes, and
// passes the strict check again. It returns the size it read.
func checkImage(fsys *storage.MemFS, path string, x *expectation) (int64, error) {
	if err := strictFS(fsys, path); err != nil {
		return 0, fmt.Errorf("as found: %w", err)
	}
	var size int64
	var digest string
	for _, ro := range []bool{true, false} {
		im, err := Open(path, OpenOptions{FS: fsys, ReadOnly: ro})
		if err != nil {
			return 0, fmt.Errorf("open (read-only %v): %w", ro, err)
		}
		if ro { // the read-write open must read the same
			err = x.check(im)
			if err == nil {
				err = writerRules(im)
			}
		}
		var d string
		if err == nil {
			d, err = contentDigest(im)
		}
		if err != nil {
			im.Close()
			return 0, fmt.Errorf("open (read-only %v): %w", ro, err)
		}
		if ro {
			size, digest = im.Size(), d
			if err := im.Close(); err != nil {
				return 0, err
			}
			continue
		}
		if im.Size() != size || d != digest {
			im.Close()
			return 0, fmt.Errorf("the read-write open reads %d bytes unlike the read-only open's %d (or other data)", im.Size(), size)
		}
		if _, err := im.WriteAt([]byte("after the point"), 12345); err != nil {
			im.Close()
			return 0, fmt.Errorf("writing after reopening: %w", err)
		}
		if err := im.Close(); err != nil {
			return 0, fmt.Errorf("closing after reopening: %w", err)
		}
	}
	if err := strictFS(fsys, path); err != nil {
		return 0, fmt.Errorf("after a write and close: %w", err)
	}
	return size, nil
}

// writerRules holds the file of im, as its reader sees it (a pending log
// replayed, in memory for a read-only open), to the writer's own rules
// (writerProblems): on the file as found, before replay, the BAT may be
// half moved, which the log is there to finish.
func writerRules(im *Image) error {
	size, err := im.f.Size()
	if err != nil {
		return err
	}
	// The structures only, found as writerProblems finds them: the
	// payload blocks are not read (it does not look at them), and the
	// copy ends with the last structure.
	head := make([]byte, min(newLogOffset, size))
	if _, err := im.f.ReadAt(head, 0); err != nil {
		return err
	}
	var cur header
	for _, off := range []int64{header1Offset, header2Offset} {
		if h, err := parseHeader(head[off:], "header", off); err == nil && h.Seq >= cur.Seq {
			cur = h
		}
	}
	rt, err := parseRegionTable(head[region1Offset:], "region table", region1Offset)
	if err != nil {
		return err
	}
	ranges := [][2]int64{{int64(cur.LogOffset), int64(cur.LogLength)}}
	end := int64(len(head))
	for _, r := range rt {
		ranges = append(ranges, [2]int64{int64(r.Offset), int64(r.Length)})
	}
	for _, r := range ranges {
		end = max(end, min(r[0]+r[1], size))
	}
	b := make([]byte, end)
	copy(b, head)
	for _, r := range ranges {
		if r[0] < 0 || r[0] >= min(r[0]+r[1], end) {
			continue
		}
		if _, err := im.f.ReadAt(b[r[0]:min(r[0]+r[1], end)], r[0]); err != nil {
			return err
		}
	}
	if probs := writerProblems(b); len(probs) > 0 {
		return fmt.Errorf("as found, the log replayed: %v", probs)
	}
	return nil
}

// contentDigest hashes the data of an image with its offsets, extent by
// extent: cheap for large, mostly empty disks. Two opens of one image
// compare by it (maphash: a sweep hashes gigabytes; a collision is one
// chance in 2^64).
func contentDigest(im *Image) (string, error) {
	var h maphash.Hash
	h.SetSeed(digestSeed)
	ext, err := im.Extents(0, im.Size())
	if err != nil {
		return "", err
	}
	buf := bufPool.Get().(*[]byte)
	defer bufPool.Put(buf)
	for _, e := range ext {
		if e.Type != disk.Data {
			continue
		}
		for off := e.Offset; off < e.Offset+e.Length; {
			b := (*buf)[:min(int64(len(*buf)), e.Offset+e.Length-off)]
			if _, err := im.ReadAt(b, off); err != nil {
				return "", err
			}
			if !disk.IsZero(b) {
				fmt.Fprintf(&h, "%d:", off)
				h.Write(b)
			}
			off += int64(len(b))
		}
	}
	return fmt.Sprintf("%016x", h.Sum64()), nil
}

var (
	digestSeed = maphash.MakeSeed()
	// bufPool holds 1 MiB buffers: the sweeps read every state whole,
	// and a fresh large buffer each time costs more than the reading.
	bufPool = sync.Pool{New: func() any { b := make([]byte, 1<<20); return &b }}
)

// memFiles makes the initial files of a sweep: build runs on a MemFS
// holding the real files named (a chain's parents, say), and what that
// then holds is returned.
func memFiles(t testing.TB, real []string, build func(fsys *storage.MemFS) error) map[string][]byte {
	t.Helper()
	files := map[string][]byte{}
	for _, p := range real {
		b, err := os.ReadFile(p)
		if err != nil {
			t.Fatal(err)
		}
		files[p] = b
	}
	fsys := storage.NewMemFS(files)
	if err := build(fsys); err != nil {
		t.Fatal(err)
	}
	return fsys.Contents()
}

// createClosed makes an image in fsys and closes it.
func createClosed(fsys *storage.MemFS, path string, opts CreateOptions) error {
	opts.FS = fsys
	im, err := Create(path, opts)
	if err != nil {
		return err
	}
	return im.Close()
}
