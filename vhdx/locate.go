package vhdx

import (
	"fmt"
	"io"

	"github.com/vhdkit/vhdkit/storage"
)

// Where data lives. A copy between images (merge, convert, export) can
// move file ranges instead of bytes: Locate tells which file of the chain
// holds a range of the disk, and at what offset; WriteFromFile takes a
// range of the disk from a file range, allocating what it needs, and
// moves it with storage.CopyRange (a clone where the file system can).
// Payload blocks sit at MiB-aligned file offsets, so a block of one image
// lines up with a block of another for a clone whatever their sizes.

// fileLocator is what Locate asks of a parent of another format.
type fileLocator interface {
	Locate(off, n int64) (f storage.File, fileOff, m int64, err error)
}

// Locate reports where the bytes of [off, off+n) starting at off are
// stored: in f at fileOff, contiguously, for the first m bytes (0 < m <=
// n). f is nil for a first m bytes stored in no file as they read (zeros,
// a parent that cannot tell): those are read and written as bytes. Runs
// end at block boundaries and, in a partially present block, where the
// sector bitmap changes.
func (im *Image) Locate(off, n int64) (f storage.File, fileOff, m int64, err error) {
	im.mu.RLock()
	defer im.mu.RUnlock()
	if err := im.checkIO(off, n); err != nil {
		return nil, 0, 0, err
	}
	if im.closed {
		return nil, 0, 0, errClosed
	}
	if n == 0 {
		return nil, 0, 0, nil
	}
	return im.locateFile(off, n)
}

// locateFile is Locate with mu held (parents are read-only: their BATs
// do not change).
func (im *Image) locateFile(off, n int64) (storage.File, int64, int64, error) {
	layer, e, m, foreign := im.locate(off, n)
	switch {
	case foreign != nil:
		if l, ok := foreign.(fileLocator); ok {
			return l.Locate(off, m)
		}
		return nil, 0, m, nil
	case layer == nil:
		return nil, 0, m, nil
	}
	g := &layer.geo
	blk := off / g.blockSize
	switch batState(e) {
	case payloadFullyPresent:
		return layer.f, batOffset(e) + off%g.blockSize, m, nil
	case payloadPartiallyPresent:
		bm, err := layer.bitmap(blk)
		if err != nil {
			return nil, 0, 0, err
		}
		ss := g.sectorSize
		blockStart := blk * g.blockSize
		limit := m
		present, run := bitRun(bm, layer.bitIndex(off), (blockStart+g.blockSize)/ss-off/ss)
		m = min(m, (off/ss+run)*ss-off)
		if present {
			fileOff := batOffset(e) + off - blockStart
			m, err := layer.acrossZeroGaps(bm, off, m, limit, fileOff)
			return layer.f, fileOff, m, err
		}
		if off >= layer.parent.Size() {
			return nil, 0, m, nil
		}
		m = min(m, layer.parent.Size()-off)
		switch p := layer.parent.(type) {
		case *Image:
			return p.Locate(off, m)
		case fileLocator:
			return p.Locate(off, m)
		}
		return nil, 0, m, nil
	}
	return nil, 0, m, nil // ZERO, UNMAPPED, UNDEFINED
}

// acrossZeroGaps lengthens a run of present sectors [off, off+m) of a
// partially present block, stored at fileOff, over the gaps of sectors
// not present that follow it, up to limit bytes from off: a gap is taken
// when the chain below reads zeros there and the file holds a hole there,
// so that the file range reads as the disk does and one clone carries the
// runs on both sides. (A child written sector by sector has many short
// runs; each clone costs about as much as remapping a whole block's
// extents.) The caller holds mu; parents are read-only.
func (im *Image) acrossZeroGaps(bm []byte, off, m, limit, fileOff int64) (int64, error) {
	ss := im.geo.sectorSize
	for m < limit {
		gapOff := off + m
		present, gap := bitRun(bm, im.bitIndex(gapOff), (off+limit-gapOff)/ss)
		dataOff := gapOff + gap*ss
		if present || gap == 0 || dataOff >= off+limit {
			break // not a gap, or nothing after it to join
		}
		if !storage.IsHole(im.f, fileOff+m, gap*ss) {
			break
		}
		if zero, err := im.parentReadsZeros(gapOff, gap*ss); err != nil || !zero {
			return m, err
		}
		_, run := bitRun(bm, im.bitIndex(dataOff), (off+limit-dataOff)/ss)
		m = dataOff + run*ss - off
	}
	return m, nil
}

// parentReadsZeros reports whether [off, off+n) reads as zeros in the
// parent chain, as its BATs and sector bitmaps say (no payload is read).
func (im *Image) parentReadsZeros(off, n int64) (bool, error) {
	if im.parent == nil || off >= im.parent.Size() {
		return true, nil
	}
	p, ok := im.parent.(*Image)
	if !ok {
		return false, nil
	}
	if end := p.Size(); off+n > end {
		n = end - off // past the parent's end: zeros
	}
	p.mu.RLock()
	defer p.mu.RUnlock()
	return p.readsZeros(off, n)
}

// readsZeros reports whether [off, off+n) of the disk reads as zeros by
// the chain's BATs and sector bitmaps alone; the caller holds mu.
func (im *Image) readsZeros(off, n int64) (bool, error) {
	for end := off + n; off < end; {
		layer, e, m, foreign := im.locate(off, end-off)
		switch {
		case foreign != nil:
			return false, nil
		case layer == nil: // in no layer
		case batState(e) == payloadFullyPresent:
			return false, nil
		case batState(e) == payloadPartiallyPresent:
			g := &layer.geo
			bm, err := layer.bitmap(off / g.blockSize)
			if err != nil {
				return false, err
			}
			ss := g.sectorSize
			present, run := bitRun(bm, layer.bitIndex(off), (off+m+ss-1)/ss-off/ss)
			if present {
				return false, nil
			}
			m = min(m, (off/ss+run)*ss-off)
			if zero, err := layer.parentReadsZeros(off, m); err != nil || !zero {
				return false, err
			}
		default: // ZERO, UNMAPPED, UNDEFINED read as zeros
		}
		off += m
	}
	return true, nil
}

// WriteFromFile writes [off, off+n) of the disk with the n bytes of src
// at srcOff, as WriteAt would with those bytes, moving them file to file
// (storage.CopyRange: cloned, copied in the kernel, or copied) into the
// block's space. A block not yet allocated gets space for the whole of
// it, so that a source block lined up with it is cloned whole; a range
// that is not whole sectors of a partially present block (the sectors
// around it would need reading) is copied through WriteAt.
func (im *Image) WriteFromFile(off, n int64, src storage.File, srcOff int64) (storage.Moved, error) {
	if err := im.writable(); err != nil {
		return storage.Moved{}, err
	}
	im.mu.Lock()
	defer im.mu.Unlock()
	if err := im.checkIO(off, n); err != nil {
		return storage.Moved{}, err
	}
	if im.closed {
		return storage.Moved{}, errClosed
	}
	if n == 0 {
		return storage.Moved{}, nil
	}
	if err := im.beginWrite(true); err != nil {
		return storage.Moved{}, err
	}
	var moved storage.Moved
	g := &im.geo
	for n > 0 {
		blk, in := off/g.blockSize, off%g.blockSize
		seg := min(n, g.blockSize-in)
		m, err := im.blockFromFile(off, seg, blk, in, src, srcOff)
		moved = moved.Add(m)
		if err != nil {
			return moved, err
		}
		off, n, srcOff = off+seg, n-seg, srcOff+seg
	}
	return moved, nil
}

// blockFromFile writes seg bytes at off, within block blk at offset in,
// from src at srcOff; the caller holds mu and has called beginWrite.
func (im *Image) blockFromFile(off, seg, blk, in int64, src storage.File, srcOff int64) (storage.Moved, error) {
	g := &im.geo
	idx := g.payloadIndex(blk)
	e := im.bat[idx]
	whole := in == 0 && seg == g.blockSize
	sectors := off%g.sectorSize == 0 && seg%g.sectorSize == 0
	st := batState(e)
	switch {
	case st == payloadFullyPresent && im.p.LeaveAllocated && im.parent == nil:
		// A fixed image's blocks were allocated so that no write fails
		// for space: blocks shared by a clone would need new space at
		// the next write, so the bytes are copied.
		return im.copyThrough(off, seg, src, srcOff)
	case st == payloadFullyPresent:
		return im.copyIn(batOffset(e)+in, src, srcOff, seg)
	case st == payloadPartiallyPresent || st == payloadNotPresent && im.parent != nil && !whole:
		if !sectors {
			return im.copyThrough(off, seg, src, srcOff)
		}
		blockOff := batOffset(e)
		if st == payloadNotPresent {
			// The sectors not written read from the parent whatever
			// the space holds.
			var err error
			if blockOff, _, err = im.allocateBlock(g.blockSize); err != nil {
				return storage.Moved{}, err
			}
		}
		c := blk / g.chunkRatio
		bm, err := im.presentBitmap(blk)
		if err != nil {
			return storage.Moved{}, err
		}
		moved, err := im.copyIn(blockOff+in, src, srcOff, seg)
		if err != nil {
			return moved, err
		}
		first := im.bitIndex(off)
		setBits(bm, first, seg/g.sectorSize)
		im.markBits(c, first, seg/g.sectorSize)
		if st == payloadNotPresent {
			im.setBAT(idx, batEntry(payloadPartiallyPresent, blockOff))
		}
		return moved, nil
	default:
		// Unallocated (or the whole block of a differencing image): new
		// space for the whole block, zeros around the range where the
		// space does not read as zeros already.
		blockOff, zero, err := im.allocateBlock(g.blockSize)
		if err != nil {
			return storage.Moved{}, err
		}
		if !zero {
			if err := im.writeZeros(blockOff, in); err != nil {
				return storage.Moved{}, err
			}
			if err := im.writeZeros(blockOff+in+seg, g.blockSize-in-seg); err != nil {
				return storage.Moved{}, err
			}
		}
		moved, err := im.copyIn(blockOff+in, src, srcOff, seg)
		if err != nil {
			return moved, err
		}
		im.setBAT(idx, batEntry(payloadFullyPresent, blockOff))
		return moved, nil
	}
}

// copyIn moves n bytes of src at srcOff to the file at fileOff.
func (im *Image) copyIn(fileOff int64, src storage.File, srcOff, n int64) (storage.Moved, error) {
	m, err := storage.CopyRange(im.f, fileOff, src, srcOff, n)
	if err != nil {
		return m, fmt.Errorf("vhdx: moving %d bytes to payload at file offset %#x: %w", n, fileOff, err)
	}
	return m, nil
}

// copyThrough reads n bytes of src at srcOff and writes them at off
// through the write path, a piece at a time; the caller holds mu and has
// called beginWrite.
func (im *Image) copyThrough(off, n int64, src storage.File, srcOff int64) (storage.Moved, error) {
	buf := make([]byte, min(n, maxWrite))
	var moved storage.Moved
	for n > 0 {
		p := buf[:min(n, int64(len(buf)))]
		if k, err := src.ReadAt(p, srcOff); err == io.EOF {
			clear(p[k:]) // past the end of the file: zeros
		} else if err != nil {
			return moved, fmt.Errorf("vhdx: reading %d bytes at source file offset %#x: %w", len(p), srcOff, err)
		}
		if err := im.write(p, off); err != nil {
			return moved, err
		}
		moved.Copied += int64(len(p))
		off, n, srcOff = off+int64(len(p)), n-int64(len(p)), srcOff+int64(len(p))
	}
	return moved, nil
}
