package vhdx

import (
	"bytes"
	"errors"
	"fmt"
	"io"
	"sync/atomic"

	"github.com/vhdkit/vhdkit/disk"
)

// Size returns the virtual size in bytes.
func (im *Image) Size() int64 { return im.size.Load() }

// LogicalSectorSize returns the logical sector size (512 or 4096).
func (im *Image) LogicalSectorSize() int { return int(im.p.LogicalSectorSize) }

// PhysicalSectorSize returns the physical sector size (512 or 4096).
func (im *Image) PhysicalSectorSize() int { return int(im.p.PhysicalSectorSize) }

// checkIO checks a range against the virtual size; the caller holds mu, so
// that a Resize cannot come between the check and the I/O.
func (im *Image) checkIO(off, n int64) error {
	if err := disk.CheckRange(off, n, im.geo.virtualSize); err != nil {
		return fmt.Errorf("vhdx: I/O [%d, +%d) outside a %d-byte disk: %w", off, n, im.geo.virtualSize, err)
	}
	return nil
}

// ReadAt reads len(p) bytes at virtual offset off.
func (im *Image) ReadAt(p []byte, off int64) (int, error) {
	im.mu.RLock()
	defer im.mu.RUnlock()
	if err := im.checkIO(off, int64(len(p))); err != nil {
		return 0, err
	}
	if im.closed {
		return 0, errClosed
	}
	if err := im.read(p, off); err != nil {
		return 0, err
	}
	return len(p), nil
}

var errClosed = errors.New("vhdx: image closed")

// read fills p from virtual offset off; the caller holds mu. Runs of blocks
// stored back to back in the file (a fixed image) are read with one call.
// A range this image does not hold is read straight from the layer below
// that does, found through the layers' BATs without a call per layer, so
// a deep chain reads about as fast as a shallow one.
func (im *Image) read(p []byte, off int64) error {
	var run fileRun
	for len(p) > 0 {
		layer, e, n, foreign := im.locate(off, int64(len(p)))
		var err error
		if layer != im || batState(e) != payloadFullyPresent {
			err = run.flush(im)
		}
		switch {
		case err != nil:
		case foreign != nil:
			_, err = foreign.ReadAt(p[:n], off)
		case layer == nil:
			clear(p[:n]) // in no layer
		case batState(e) == payloadFullyPresent:
			fileOff := batOffset(e) + off%layer.geo.blockSize
			if layer == im {
				err = run.add(im, p[:n], fileOff)
			} else {
				err = layer.readFile(p[:n], fileOff)
			}
		case batState(e) == payloadPartiallyPresent:
			err = layer.readPartial(p[:n], off, off/layer.geo.blockSize, batOffset(e))
		default: // ZERO, UNMAPPED, UNDEFINED: zeros, even over a parent
			clear(p[:n])
		}
		if err != nil {
			return err
		}
		p, off = p[n:], off+n
	}
	return run.flush(im)
}

// locate finds the layer defining the range at off: the first, from im
// down its chain, whose block there is not NOT_PRESENT, with its BAT
// entry. n is cut to the end of that block in every layer visited, and to
// the end of each parent: a layer may be larger than its parent (a child
// expanded after it was made), and past the parent's end the chain holds
// nothing. layer is nil when no layer holds the range; foreign is set when
// the chain goes on in an image that is not VHDX, which then serves the
// range.
func (im *Image) locate(off, n int64) (layer *Image, e uint64, m int64, foreign disk.Image) {
	m = n
	for l := im; ; {
		g := &l.geo
		m = min(m, g.blockSize-off%g.blockSize)
		e = l.bat[g.payloadIndex(off/g.blockSize)]
		if batState(e) != payloadNotPresent {
			return l, e, m, nil
		}
		if l.parent == nil || off >= l.parent.Size() {
			return nil, 0, m, nil
		}
		m = min(m, l.parent.Size()-off)
		p, ok := l.parent.(*Image)
		if !ok {
			return nil, 0, m, l.parent
		}
		l = p
	}
}

// fileRun gathers contiguous pieces of the file to read in one call.
type fileRun struct {
	buf []byte // a prefix of the caller's buffer, grown in place
	off int64
}

func (r *fileRun) add(im *Image, p []byte, fileOff int64) error {
	// Pieces arrive in order from one caller buffer, so p starts where
	// r.buf ends in memory; only the file offsets need to line up.
	if r.buf != nil && r.off+int64(len(r.buf)) == fileOff {
		r.buf = r.buf[:len(r.buf)+len(p)]
		return nil
	}
	if err := r.flush(im); err != nil {
		return err
	}
	r.buf, r.off = p, fileOff
	return nil
}

func (r *fileRun) flush(im *Image) error {
	if r.buf == nil {
		return nil
	}
	err := im.readFile(r.buf, r.off)
	r.buf = nil
	return err
}

// readFile reads payload at a file offset; bytes past the end of the file
// read as zeros (a block may end past it, see checkExtent).
func (im *Image) readFile(p []byte, off int64) error {
	n, err := im.f.ReadAt(p, off)
	if err == io.EOF {
		clear(p[n:])
		return nil
	}
	if err != nil {
		return fmt.Errorf("vhdx: reading payload at file offset %#x: %w", off, err)
	}
	return nil
}

// readPartial reads a part of a PARTIALLY_PRESENT block sector run by
// sector run: sectors whose bitmap bit is set come from this file, the
// others from the parent.
func (im *Image) readPartial(p []byte, off, blk, blockOff int64) error {
	bm, err := im.bitmap(blk)
	if err != nil {
		return err
	}
	ss := im.geo.sectorSize
	blockStart := blk * im.geo.blockSize
	for len(p) > 0 {
		bit := im.bitIndex(off)
		present, run := bitRun(bm, bit, (blockStart+im.geo.blockSize)/ss-off/ss)
		n := min(int64(len(p)), (off/ss+run)*ss-off)
		if present {
			err = im.readFile(p[:n], blockOff+off-blockStart)
		} else {
			err = im.readParent(p[:n], off)
		}
		if err != nil {
			return err
		}
		p, off = p[n:], off+n
	}
	return nil
}

// readParent reads p at off from the parent. What lies past the parent's
// end reads as zeros: a differencing image may be larger than its parent.
func (im *Image) readParent(p []byte, off int64) error {
	ps := im.parent.Size()
	if off >= ps {
		clear(p)
		return nil
	}
	if n := ps - off; n < int64(len(p)) {
		clear(p[n:])
		p = p[:n]
	}
	_, err := im.parent.ReadAt(p, off)
	return err
}

// bitIndex is the bit, within its chunk's sector bitmap, of the sector
// holding virtual offset off.
func (im *Image) bitIndex(off int64) int64 {
	return (off / im.geo.sectorSize) % sectorsPerBitmap
}

// bitRun reports the value of bit i of bm and how many bits from i on, at
// most limit, share it. Bit 0 is the least significant bit of byte 0.
func bitRun(bm []byte, i, limit int64) (bool, int64) {
	set := bm[i/8]>>(i%8)&1 != 0
	var fill byte
	if set {
		fill = 0xff
	}
	n := int64(0)
	for n < limit {
		j := i + n
		if j%8 == 0 && limit-n >= 8 && bm[j/8] == fill {
			n += 8
			continue
		}
		if (bm[j/8]>>(j%8)&1 != 0) != set {
			break
		}
		n++
	}
	return set, n
}

// setBits sets bits [i, i+n) of bm.
func setBits(bm []byte, i, n int64) {
	for ; n > 0 && i%8 != 0; i, n = i+1, n-1 {
		bm[i/8] |= 1 << (i % 8)
	}
	for ; n >= 8; i, n = i+8, n-8 {
		bm[i/8] = 0xff
	}
	for ; n > 0; i, n = i+1, n-1 {
		bm[i/8] |= 1 << (i % 8)
	}
}

// A chunkBitmap is a chunk's sector bitmap block in memory, read from the
// file a 4 KiB page at a time as blocks need their bits: a merge of a 1 GiB
// child looks at a few pages of its MiB, and reading the whole MiB into
// fresh memory costs 256 page faults (16-20 us each on some virtual
// machines). Pages are loaded under bmLoad; a page, once loaded, is
// changed only with mu held for writing, like the rest of the metadata.
type chunkBitmap struct {
	bits   []byte // bitmapBlockSize; a page not loaded reads as zeros
	loaded [bitmapBlockSize / pageSize / 64]atomic.Uint64
}

func (cb *chunkBitmap) isLoaded(pg int64) bool {
	return cb.loaded[pg/64].Load()&(1<<(pg%64)) != 0
}

// has reports whether pages [first, last] are loaded.
func (cb *chunkBitmap) has(first, last int64) bool {
	for pg := first; pg <= last; pg++ {
		if !cb.isLoaded(pg) {
			return false
		}
	}
	return true
}

// clone copies the bits and what is loaded of them.
func (cb *chunkBitmap) clone() *chunkBitmap {
	own := &chunkBitmap{bits: bytes.Clone(cb.bits)}
	for i := range cb.loaded {
		own.loaded[i].Store(cb.loaded[i].Load())
	}
	return own
}

// bitmapPages returns the pages of its chunk's bitmap that hold block blk's
// bits.
func (g *geometry) bitmapPages(blk int64) (first, last int64) {
	bit := blk % g.chunkRatio * g.sectorsPerBlk
	return bit / 8 / pageSize, (bit + g.sectorsPerBlk - 1) / 8 / pageSize
}

// bitmap returns the sector bitmap of the chunk holding block blk, with
// the bits of blk loaded. The caller holds mu.
func (im *Image) bitmap(blk int64) ([]byte, error) {
	c := blk / im.geo.chunkRatio
	first, last := im.geo.bitmapPages(blk)
	if cb := im.bitmaps[c].Load(); cb != nil && cb.has(first, last) {
		return cb.bits, nil
	}
	im.bmLoad.Lock()
	defer im.bmLoad.Unlock()
	cb := im.bitmaps[c].Load()
	if cb == nil {
		cb = &chunkBitmap{bits: make([]byte, bitmapBlockSize)}
		im.bitmaps[c].Store(cb)
	}
	e := im.bat[im.geo.bitmapIndex(c)]
	for pg := first; pg <= last; pg++ {
		if cb.isLoaded(pg) {
			continue
		}
		end := pg // a run of pages not loaded, read at once
		for end < last && !cb.isLoaded(end+1) {
			end++
		}
		if batState(e) == bitmapPresent { // else no bit is set yet
			if err := im.readFile(cb.bits[pg*pageSize:(end+1)*pageSize], batOffset(e)+pg*pageSize); err != nil {
				return nil, err
			}
		}
		for ; pg <= end; pg++ {
			cb.loaded[pg/64].Or(1 << (pg % 64))
		}
		pg = end
	}
	return cb.bits, nil
}
