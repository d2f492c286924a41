package nbd

import (
	"sync"
	"sync/atomic"

	"github.com/vhdkit/vhdkit/disk"
)

// memChunk is the allocation unit of memImage, like a VHDX block.
const memChunk = 64 << 10

// memImage is a sparse in-memory disk.Image for tests: a map of 64 KiB
// chunks, optionally over a read-only parent, so that Extents reports
// data, zero and hole ranges and chain depths like a differencing image.
type memImage struct {
	mu     sync.RWMutex
	size   int64
	sector int
	data   map[int64][]byte // chunk index → contents
	zero   map[int64]bool   // chunk index → allocated, reads as zeros
	parent *memImage

	flushes atomic.Int64
	writes  atomic.Int64
	// outside counts requests that reached the image beyond its end: the
	// server must refuse those itself.
	outside atomic.Int64
}

// checkRange is disk.CheckRange, counting the requests it refuses.
func (m *memImage) checkRange(off, n int64) error {
	err := disk.CheckRange(off, n, m.size)
	if err != nil {
		m.outside.Add(1)
	}
	return err
}

func newMemImage(size int64, sector int, parent *memImage) *memImage {
	return &memImage{size: size, sector: sector, data: map[int64][]byte{}, zero: map[int64]bool{}, parent: parent}
}

func (m *memImage) Size() int64             { return m.size }
func (m *memImage) Close() error            { return nil }
func (m *memImage) LogicalSectorSize() int  { return m.sector }
func (m *memImage) PhysicalSectorSize() int { return m.sector }
func (m *memImage) Flush() error {
	m.flushes.Add(1)
	return nil
}

func (m *memImage) layers() int {
	if m.parent == nil {
		return 1
	}
	return 1 + m.parent.layers()
}

// pieces calls f for each chunk-bounded piece of [off, off+n).
func pieces(off, n int64, f func(idx, lo, hi int64) error) error {
	for n > 0 {
		idx := off / memChunk
		lo := off % memChunk
		hi := min(memChunk, lo+n)
		if err := f(idx, lo, hi); err != nil {
			return err
		}
		off += hi - lo
		n -= hi - lo
	}
	return nil
}

func (m *memImage) ReadAt(p []byte, off int64) (int, error) {
	if err := m.checkRange(off, int64(len(p))); err != nil {
		return 0, err
	}
	m.mu.RLock()
	defer m.mu.RUnlock()
	pos := 0
	err := pieces(off, int64(len(p)), func(idx, lo, hi int64) error {
		dst := p[pos : pos+int(hi-lo)]
		pos += len(dst)
		if d := m.data[idx]; d != nil {
			copy(dst, d[lo:hi])
		} else if m.zero[idx] || m.parent == nil {
			clear(dst)
		} else {
			_, err := m.parent.ReadAt(dst, idx*memChunk+lo)
			return err
		}
		return nil
	})
	return len(p), err
}

// chunkLocked returns chunk idx allocated, filled from the parent when new.
func (m *memImage) chunkLocked(idx int64) []byte {
	d := m.data[idx]
	if d == nil {
		d = make([]byte, memChunk)
		if m.parent != nil && !m.zero[idx] {
			start := idx * memChunk
			m.parent.ReadAt(d[:min(memChunk, m.size-start)], start)
		}
		m.data[idx] = d
		delete(m.zero, idx)
	}
	return d
}

func (m *memImage) WriteAt(p []byte, off int64) (int, error) {
	if err := m.checkRange(off, int64(len(p))); err != nil {
		return 0, err
	}
	m.writes.Add(1)
	m.mu.Lock()
	defer m.mu.Unlock()
	pos := 0
	pieces(off, int64(len(p)), func(idx, lo, hi int64) error {
		copy(m.chunkLocked(idx)[lo:hi], p[pos:])
		pos += int(hi - lo)
		return nil
	})
	return len(p), nil
}

// Trim drops whole chunks (revealing the parent) and zeroes partial ones.
func (m *memImage) Trim(off, n int64) error {
	if err := m.checkRange(off, n); err != nil {
		return err
	}
	m.mu.Lock()
	defer m.mu.Unlock()
	return pieces(off, n, func(idx, lo, hi int64) error {
		if lo == 0 && (hi == memChunk || idx*memChunk+hi == m.size) {
			delete(m.data, idx)
			delete(m.zero, idx)
		} else if d := m.data[idx]; d != nil {
			clear(d[lo:hi])
		}
		return nil
	})
}

func (m *memImage) WriteZeroes(off, n int64, mayUnmap bool) error {
	if err := m.checkRange(off, n); err != nil {
		return err
	}
	m.mu.Lock()
	defer m.mu.Unlock()
	return pieces(off, n, func(idx, lo, hi int64) error {
		if lo == 0 && (hi == memChunk || idx*memChunk+hi == m.size) {
			delete(m.data, idx)
			if mayUnmap && m.parent == nil {
				delete(m.zero, idx)
			} else {
				m.zero[idx] = true
			}
		} else {
			clear(m.chunkLocked(idx)[lo:hi])
		}
		return nil
	})
}

func (m *memImage) Extents(off, n int64) ([]disk.Extent, error) {
	if err := m.checkRange(off, n); err != nil {
		return nil, err
	}
	m.mu.RLock()
	defer m.mu.RUnlock()
	var list []disk.Extent
	err := pieces(off, n, func(idx, lo, hi int64) error {
		e := disk.Extent{Offset: idx*memChunk + lo, Length: hi - lo}
		switch {
		case m.data[idx] != nil:
			e.Type = disk.Data
		case m.zero[idx]:
			e.Type = disk.Zero
		case m.parent != nil:
			sub, err := m.parent.Extents(e.Offset, e.Length)
			for _, s := range sub {
				if s.Type != disk.Hole {
					s.Depth++
				} else {
					s.Depth = m.layers()
				}
				list = disk.AppendExtent(list, s)
			}
			return err
		default:
			e.Type = disk.Hole
			e.Depth = 1
		}
		list = disk.AppendExtent(list, e)
		return nil
	})
	return list, err
}

// snapshot returns the whole disk's contents.
func (m *memImage) snapshot() []byte {
	b := make([]byte, m.size)
	m.ReadAt(b, 0)
	return b
}

// plainImage hides every optional interface of an image, for the
// fallback paths (no Trimmer, Zeroer, Extenter, SectorSizer).
type plainImage struct{ img disk.Image }

func (p plainImage) ReadAt(b []byte, off int64) (int, error)  { return p.img.ReadAt(b, off) }
func (p plainImage) WriteAt(b []byte, off int64) (int, error) { return p.img.WriteAt(b, off) }
func (p plainImage) Size() int64                              { return p.img.Size() }
func (p plainImage) Flush() error                             { return p.img.Flush() }
func (p plainImage) Close() error                             { return p.img.Close() }
