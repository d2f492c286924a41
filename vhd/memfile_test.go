package vhd

import (
	"errors"
	"io"
	"math/rand/v2"
	"os"
	"slices"
	"sync"
)

// memFile is an in-memory storage.File that knows what Sync made durable
// and can fail its n-th operation: crashClone builds what a disk could
// hold after a power cut, keeping each sector written since the last Sync
// or not, at random.
type memFile struct {
	mu      sync.Mutex
	cur     []byte
	durable []byte
	dirty   map[int64]bool // sectors written since the last Sync
	closed  bool
	ops     int
	failAt  int // fail the operation with this number (counting from 0); -1: never
	failed  bool
}

var errInjected = errors.New("injected I/O error")

func newMemFile() *memFile { return &memFile{dirty: map[int64]bool{}, failAt: -1} }

// op counts an operation and reports whether it must fail.
func (f *memFile) op() error {
	if f.closed {
		return os.ErrClosed
	}
	n := f.ops
	f.ops++
	if n == f.failAt {
		f.failed = true
		return errInjected
	}
	return nil
}

func (f *memFile) ReadAt(p []byte, off int64) (int, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	if err := f.op(); err != nil {
		return 0, err
	}
	if off >= int64(len(f.cur)) {
		return 0, io.EOF
	}
	n := copy(p, f.cur[off:])
	if n < len(p) {
		return n, io.EOF
	}
	return n, nil
}

func (f *memFile) WriteAt(p []byte, off int64) (int, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	if err := f.op(); err != nil {
		return 0, err
	}
	if end := off + int64(len(p)); end > int64(len(f.cur)) {
		f.cur = append(f.cur, make([]byte, end-int64(len(f.cur)))...)
	}
	copy(f.cur[off:], p)
	for s := off / SectorSize; s*SectorSize < off+int64(len(p)); s++ {
		f.dirty[s] = true
	}
	return len(p), nil
}

func (f *memFile) Truncate(size int64) error {
	f.mu.Lock()
	defer f.mu.Unlock()
	if err := f.op(); err != nil {
		return err
	}
	if size < int64(len(f.cur)) {
		f.cur = f.cur[:size:size]
	} else {
		f.cur = append(f.cur, make([]byte, size-int64(len(f.cur)))...)
	}
	return nil
}

func (f *memFile) Size() (int64, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	if f.closed {
		return 0, os.ErrClosed
	}
	return int64(len(f.cur)), nil
}

func (f *memFile) Sync() error {
	f.mu.Lock()
	defer f.mu.Unlock()
	if err := f.op(); err != nil {
		return err
	}
	f.durable = slices.Clone(f.cur)
	clear(f.dirty)
	return nil
}

func (f *memFile) Close() error {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.closed = true
	return nil
}

// reopen makes a closed file usable again, as opening it anew would.
func (f *memFile) reopen() *memFile {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.closed = false
	return f
}

// crashClone returns what the file could hold after a power cut now: the
// durable content, sized as it was at the last Sync or as it is now, with
// each sector written since taken from now or not.
func (f *memFile) crashClone(r *rand.Rand) *memFile {
	f.mu.Lock()
	defer f.mu.Unlock()
	c := newMemFile()
	size := len(f.durable)
	if r.IntN(2) == 0 {
		size = len(f.cur)
	}
	c.cur = make([]byte, size)
	copy(c.cur, f.durable)
	for s := range f.dirty {
		if r.IntN(2) == 0 {
			continue
		}
		lo := s * SectorSize
		hi := min(lo+SectorSize, int64(size), int64(len(f.cur)))
		if lo < hi {
			copy(c.cur[lo:hi], f.cur[lo:hi])
		}
	}
	c.durable = slices.Clone(c.cur)
	return c
}
