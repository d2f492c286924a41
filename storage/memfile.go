package storage

import (
	"bytes"
	"errors"
	"io"
	"math/rand/v2"
	"slices"
	"sync"
)

// SectorSize is the unit in which MemFile tracks durability: a crash keeps
// or loses each unsynced sector whole, as disks do.
const SectorSize = 512

// memFileMaxSize bounds a MemFile so that a hostile offset fails instead of
// allocating the machine's memory.
const memFileMaxSize = 1 << 32

// maxVersions bounds the superseded unsynced versions kept per sector, so
// a loop rewriting one sector without syncing cannot exhaust memory; the
// oldest are forgotten first.
const maxVersions = 8

// pageSize is the copy-on-write unit of MemFile's content; a multiple of
// SectorSize, so that a sector never straddles two pages.
const pageSize = 16 << 10

type page = [pageSize]byte

var (
	errMemTooLarge = errors.New("storage: MemFile size limit (4 GiB) exceeded")
	errNegative    = errors.New("storage: negative offset or size")
)

var zeroPage page

// MemFile is an in-memory File that remembers what Sync made durable, so a
// test can simulate a power cut with CrashClone.
//
// It keeps the current content in pages that clones share until one side
// writes them, so CrashClone costs little more than the sectors changed
// since the last Sync. For each such sector it also keeps the earlier
// versions: the synced one and those that later writes superseded. Sync
// forgets them; its cost is the number of sectors changed, not the size.
//
// MemFile is safe for concurrent use. Sizes beyond 4 GiB are refused.
type MemFile struct {
	mu   sync.Mutex
	size int64
	// pages hold the content; a nil page reads as zeros. Bytes past size
	// in the last page are zero, so that growing exposes zeros.
	pages []*page
	// owned[i] says pages[i] is not shared with a clone and may be
	// written in place.
	owned []bool
	// sizes lists the distinct sizes since the last Sync, starting with
	// the synced one: a crash may leave any of them, since a size change
	// is metadata that reaches the disk independently of data.
	sizes []int64
	// history maps each sector changed since the last Sync to its earlier
	// versions, oldest first: [0] is the synced content, the rest were
	// superseded by later writes. A version is zero-padded to a sector;
	// nil reads as zeros (also for a sector beyond the size at the time).
	// The newest version is the sector's current content.
	history map[int64][][]byte
	closed  bool
}

// NewMemFile returns a file holding a copy of initial, all of it durable.
func NewMemFile(initial []byte) *MemFile {
	f := newMemFile(int64(len(initial)))
	for i := range f.pages {
		b := initial[i*pageSize:]
		b = b[:min(len(b), pageSize)]
		if !bytes.Equal(b, zeroPage[:len(b)]) {
			f.pages[i] = new(page)
			copy(f.pages[i][:], b)
			f.owned[i] = true
		}
	}
	return f
}

// newMemFile returns a durable file of size zeros.
func newMemFile(size int64) *MemFile {
	n := pagesFor(size)
	return &MemFile{
		size:    size,
		pages:   make([]*page, n),
		owned:   make([]bool, n),
		sizes:   []int64{size},
		history: make(map[int64][][]byte),
	}
}

func pagesFor(size int64) int { return int((size + pageSize - 1) / pageSize) }

// ReadAt reads the current content, durable or not.
func (f *MemFile) ReadAt(p []byte, off int64) (int, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	if f.closed {
		return 0, ErrClosed
	}
	if off < 0 {
		return 0, errNegative
	}
	if len(p) == 0 {
		return 0, nil
	}
	if off >= f.size {
		return 0, io.EOF
	}
	n := int(min(int64(len(p)), f.size-off))
	f.read(p[:n], off)
	if n < len(p) {
		return n, io.EOF
	}
	return n, nil
}

// read copies [off, off+len(p)), which lies within the size, into p.
func (f *MemFile) read(p []byte, off int64) {
	for len(p) > 0 {
		i, po := off/pageSize, off%pageSize
		k := min(len(p), int(pageSize-po))
		if pg := f.pages[i]; pg != nil {
			copy(p[:k], pg[po:])
		} else {
			clear(p[:k])
		}
		p, off = p[k:], off+int64(k)
	}
}

// WriteAt writes p at off, growing the file when it writes past the end.
func (f *MemFile) WriteAt(p []byte, off int64) (int, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	if f.closed {
		return 0, ErrClosed
	}
	if off < 0 {
		return 0, errNegative
	}
	if off > memFileMaxSize || int64(len(p)) > memFileMaxSize-off {
		return 0, errMemTooLarge
	}
	if len(p) == 0 {
		return 0, nil
	}
	n, end := len(p), off+int64(len(p))
	f.saveSectors(off/SectorSize, (end+SectorSize-1)/SectorSize)
	if end > f.size {
		f.resize(end)
	}
	for len(p) > 0 {
		i, po := off/pageSize, off%pageSize
		k := copy(f.writable(int(i))[po:], p)
		p, off = p[k:], off+int64(k)
	}
	return n, nil
}

// writable returns page i for writing, allocating or unsharing it first.
func (f *MemFile) writable(i int) *page {
	pg := f.pages[i]
	switch {
	case pg == nil:
		pg = new(page)
	case !f.owned[i]:
		c := *pg
		pg = &c
	default:
		return pg
	}
	f.pages[i], f.owned[i] = pg, true
	return pg
}

// Truncate changes the size; bytes cut off and grown back read as zeros.
func (f *MemFile) Truncate(size int64) error {
	f.mu.Lock()
	defer f.mu.Unlock()
	if f.closed {
		return ErrClosed
	}
	if size < 0 {
		return errNegative
	}
	if size > memFileMaxSize {
		return errMemTooLarge
	}
	if size < f.size {
		// Growing only exposes zeros past the old end, which every
		// version of those sectors already reads as; cutting changes them.
		f.saveSectors(size/SectorSize, (f.size+SectorSize-1)/SectorSize)
	}
	f.resize(size)
	return nil
}

// resize sets the size, keeping bytes past it zero, and records the size
// change. f.mu is held.
func (f *MemFile) resize(size int64) {
	n := pagesFor(size)
	if size < f.size {
		clear(f.pages[n:]) // let the garbage collector have them
		f.pages, f.owned = f.pages[:n], f.owned[:n]
		if t := size % pageSize; t != 0 && f.pages[n-1] != nil {
			clear(f.writable(n - 1)[t:])
		}
	} else if k := n - len(f.pages); k > 0 {
		f.pages = append(f.pages, make([]*page, k)...)
		f.owned = append(f.owned, make([]bool, k)...)
	}
	f.size = size
	if f.sizes[len(f.sizes)-1] != size {
		f.sizes = append(f.sizes, size)
	}
}

// saveSectors records the current content of sectors [lo, hi) as a version
// before they change. f.mu is held.
func (f *MemFile) saveSectors(lo, hi int64) {
	var slab []byte // one allocation for the non-zero sectors of a call
	for s := lo; s < hi; s++ {
		var v []byte // nil: all zeros, typically an append past the end
		if off := s * SectorSize; off < f.size {
			if pg := f.pages[off/pageSize]; pg != nil {
				cur := pg[off%pageSize:][:SectorSize] // zero past the size
				if !bytes.Equal(cur, zeroPage[:SectorSize]) {
					if len(slab) == 0 {
						slab = make([]byte, min(hi-s, 256)*SectorSize)
					}
					v, slab = slab[:SectorSize:SectorSize], slab[SectorSize:]
					copy(v, cur)
				}
			}
		}
		h := f.history[s]
		if len(h) > maxVersions {
			h = slices.Delete(h, 1, 2) // never the synced version
		}
		f.history[s] = append(h, v)
	}
}

// Size returns the current size.
func (f *MemFile) Size() (int64, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	if f.closed {
		return 0, ErrClosed
	}
	return f.size, nil
}

// Sync makes the current content durable.
func (f *MemFile) Sync() error {
	f.mu.Lock()
	defer f.mu.Unlock()
	if f.closed {
		return ErrClosed
	}
	clear(f.history)
	f.sizes = append(f.sizes[:0], f.size)
	return nil
}

// Close makes further operations fail with ErrClosed. Like a process
// exiting, it does not sync: CrashClone still sees unsynced writes as such.
func (f *MemFile) Close() error {
	f.mu.Lock()
	defer f.mu.Unlock()
	if f.closed {
		return ErrClosed
	}
	f.closed = true
	return nil
}

// Bytes returns a copy of the current content, durable or not. It works
// on a closed file too.
func (f *MemFile) Bytes() []byte {
	f.mu.Lock()
	defer f.mu.Unlock()
	b := make([]byte, f.size)
	f.read(b, 0)
	return b
}

// CrashClone returns a new open file holding what a disk could contain
// after a power cut now.
//
// The size is one of the sizes the file has had since the last Sync,
// chosen uniformly. Each sector changed since the last Sync independently
// keeps its synced content (probability 1/2) or one of the versions
// written since, chosen uniformly (only the last 8 superseded ones are
// remembered). Bytes past the chosen size are gone, whichever version
// they belong to, as data written past a size update that did not reach
// the disk is.
//
// Everything in the clone is durable. CrashClone works on a closed file
// too; for a given history and rng state it is deterministic.
func (f *MemFile) CrashClone(rng *rand.Rand) *MemFile {
	f.mu.Lock()
	defer f.mu.Unlock()
	size := f.sizes[rng.IntN(len(f.sizes))]
	c := newMemFile(size)
	copy(c.pages, f.pages)
	clear(f.owned) // shared from now on, by both files
	if t := size % pageSize; t != 0 && size < f.size && c.pages[len(c.pages)-1] != nil {
		clear(c.writable(len(c.pages) - 1)[t:])
	}
	// Sorted, so that the use of rng does not depend on map order.
	sectors := make([]int64, 0, len(f.history))
	for s := range f.history {
		sectors = append(sectors, s)
	}
	slices.Sort(sectors)
	for _, s := range sectors {
		off := s * SectorSize
		if off >= size {
			break
		}
		h := f.history[s]
		var v []byte
		if rng.IntN(2) == 0 {
			v = h[0] // lost: the synced content stays
		} else if i := rng.IntN(len(h)); i+1 < len(h) {
			v = h[i+1] // an unsynced version later superseded
		} else {
			continue // the current content, already in c
		}
		i := int(off / pageSize)
		if v == nil && c.pages[i] == nil {
			continue
		}
		dst := c.writable(i)[off%pageSize:][:min(SectorSize, size-off)]
		clear(dst[copy(dst, v):])
	}
	return c
}
