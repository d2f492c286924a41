package vhdx

import (
	"errors"
	"fmt"
	"slices"
	"sync"

	"github.com/vhdkit/vhdkit/disk"
	"github.com/vhdkit/vhdkit/storage"
)

// zeros returns a shared source of zero bytes for filling blocks,
// allocated on first use rather than at every start of a program that
// links the package (most vhdkit commands never fill a block).
var zeros = sync.OnceValue(func() []byte { return make([]byte, mib) })

// WriteAt writes p at virtual offset off. Writes to blocks already in the
// file go straight to them, concurrently with other I/O; writes that
// allocate take the image's lock.
func (im *Image) WriteAt(p []byte, off int64) (int, error) {
	if err := im.writable(); err != nil {
		return 0, err
	}
	im.mu.RLock()
	if err := im.checkIO(off, int64(len(p))); err != nil || len(p) == 0 {
		im.mu.RUnlock()
		return 0, err
	}
	if im.closed {
		im.mu.RUnlock()
		return 0, errClosed
	}
	if im.writing && im.inPlace(off, int64(len(p))) {
		err := im.writeInPlace(p, off)
		im.mu.RUnlock()
		if err != nil {
			return 0, err
		}
		return len(p), nil
	}
	im.mu.RUnlock()

	im.mu.Lock()
	defer im.mu.Unlock()
	if im.closed {
		return 0, errClosed
	}
	if err := im.checkIO(off, int64(len(p))); err != nil {
		return 0, err // the disk shrank meanwhile
	}
	if err := im.beginWrite(true); err != nil {
		return 0, err
	}
	if err := im.write(p, off); err != nil {
		return 0, err
	}
	return len(p), nil
}

// writable reports ErrReadOnly for an image opened read-only or frozen.
func (im *Image) writable() error {
	if im.readOnly || im.frozen.Load() {
		return fmt.Errorf("vhdx: %s: %w", im.path, ErrReadOnly)
	}
	return nil
}

// beginWrite prepares the file for its first change since open: one header
// update gives it a new FileWriteGuid and a new DataWriteGuid (when the
// change is visible to readers of the disk). The log opens later, with the
// first entry (openLog). The caller holds mu for writing.
func (im *Image) beginWrite(dataChange bool) error {
	if im.writing {
		return nil
	}
	g := im.hdr.DataWriteGUID
	if dataChange {
		g = newGUID()
	}
	return im.startWriting(g)
}

// startWriting is the header update of beginWrite, with g as the
// DataWriteGuid; the caller holds mu for writing.
func (im *Image) startWriting(g GUID) error {
	h := im.hdr
	h.FileWriteGUID = newGUID()
	h.DataWriteGUID = g
	// No log yet: the header names one only once an entry carries it
	// (openLog). One a replay found nothing valid in is dropped.
	h.LogGUID = GUID{}
	if err := im.writeHeader(h); err != nil {
		return fmt.Errorf("vhdx: updating header: %w", err)
	}
	im.writing = true
	return nil
}

// inPlace reports whether [off, off+n) lies in blocks whose file space is
// allocated and, in a partially present block, in sectors already in this
// file, so a write needs no metadata change. The caller holds mu.
func (im *Image) inPlace(off, n int64) bool {
	g := &im.geo
	for end := off + n; off < end; {
		blk := off / g.blockSize
		segEnd := min(end, (blk+1)*g.blockSize)
		switch e := im.bat[g.payloadIndex(blk)]; batState(e) {
		case payloadFullyPresent:
		case payloadPartiallyPresent:
			cb := im.bitmaps[blk/g.chunkRatio].Load()
			if cb == nil || !cb.has(g.bitmapPages(blk)) {
				return false
			}
			first, last := im.bitIndex(off), im.bitIndex(segEnd-1)
			if set, run := bitRun(cb.bits, first, last-first+1); !set || run < last-first+1 {
				return false
			}
		default:
			return false
		}
		off = segEnd
	}
	return true
}

// writeInPlace writes p to blocks inPlace approved; the caller holds mu.
func (im *Image) writeInPlace(p []byte, off int64) error {
	g := &im.geo
	for len(p) > 0 {
		blk, in := off/g.blockSize, off%g.blockSize
		n := min(int64(len(p)), g.blockSize-in)
		if err := im.writeFile(p[:n], batOffset(im.bat[g.payloadIndex(blk)])+in); err != nil {
			return err
		}
		p, off = p[n:], off+n
	}
	return nil
}

// maxWrite caps one write to the file: on Linux (ext4, 6.x kernels seen
// here) a page-cache write above 1 MiB costs several times the kernel time
// of the same bytes in 1 MiB writes (dd: 0.07 s vs 0.6 s of system time for
// 256 MiB).
const maxWrite = 1 * mib

func (im *Image) writeFile(p []byte, off int64) error {
	for len(p) > 0 {
		n := min(len(p), maxWrite)
		if _, err := im.f.WriteAt(p[:n], off); err != nil {
			return fmt.Errorf("vhdx: writing payload at file offset %#x: %w", off, err)
		}
		p, off = p[n:], off+int64(n)
	}
	return nil
}

// write writes p at off, allocating as needed; the caller holds mu for
// writing and has called beginWrite.
func (im *Image) write(p []byte, off int64) error {
	g := &im.geo
	for len(p) > 0 {
		blk, in := off/g.blockSize, off%g.blockSize
		n := min(int64(len(p)), g.blockSize-in)
		if err := im.writeBlock(p[:n], off, blk, in); err != nil {
			return err
		}
		p, off = p[n:], off+n
	}
	return nil
}

// writeBlock writes p, which lies within block blk at offset in.
func (im *Image) writeBlock(p []byte, off, blk, in int64) error {
	g := &im.geo
	idx := g.payloadIndex(blk)
	e := im.bat[idx]
	switch st := batState(e); {
	case st == payloadFullyPresent:
		return im.writeFile(p, batOffset(e)+in)
	case st == payloadPartiallyPresent:
		return im.writePartial(p, off, blk, batOffset(e))
	case st == payloadNotPresent && im.parent != nil:
		if in == 0 && int64(len(p)) == g.blockSize {
			return im.fillBlock(idx, p, in)
		}
		// The sectors p does not cover read from the parent whatever the
		// space holds.
		blockOff, _, err := im.allocateBlock(g.blockSize)
		if err != nil {
			return err
		}
		if err := im.writePartial(p, off, blk, blockOff); err != nil {
			return err
		}
		im.setBAT(idx, batEntry(payloadPartiallyPresent, blockOff))
		return nil
	default:
		// The block reads as zeros (in a differencing image too: ZERO,
		// UNMAPPED and UNDEFINED do not fall through to the parent).
		// Such an entry names no space (its FileOffsetMB is reserved):
		// the block gets new space.
		if disk.IsZero(p) {
			return nil
		}
		return im.fillBlock(idx, p, in)
	}
}

// fillBlock makes payload entry idx FULLY_PRESENT holding p at offset in and
// zeros elsewhere, in newly allocated space: where that space does not
// read as zeros already (a released block's), the zeros are written.
func (im *Image) fillBlock(idx int64, p []byte, in int64) error {
	bs := im.geo.blockSize
	blockOff, zero, err := im.allocateBlock(bs)
	if err != nil {
		return err
	}
	if !zero {
		if err := im.writeZeros(blockOff, in); err != nil {
			return err
		}
		if err := im.writeZeros(blockOff+in+int64(len(p)), bs-in-int64(len(p))); err != nil {
			return err
		}
	}
	if err := im.writeFile(p, blockOff+in); err != nil {
		return err
	}
	im.setBAT(idx, batEntry(payloadFullyPresent, blockOff))
	return nil
}

func (im *Image) writeZeros(off, n int64) error {
	zeros := zeros()
	for n > 0 {
		k := min(n, int64(len(zeros)))
		if err := im.writeFile(zeros[:k], off); err != nil {
			return err
		}
		off, n = off+k, n-k
	}
	return nil
}

// writePartial writes p at off into partially present block blk stored at
// blockOff, then marks its sectors present. A sector only partly covered by
// p is first completed from where it is now (this file or the parent).
func (im *Image) writePartial(p []byte, off, blk, blockOff int64) error {
	bm, err := im.presentBitmap(blk)
	if err != nil {
		return err
	}
	ss := im.geo.sectorSize
	blockStart := blk * im.geo.blockSize
	a0, a1 := off/ss*ss, alignUp(off+int64(len(p)), ss)
	buf := p
	if a0 != off || a1 != off+int64(len(p)) {
		buf = make([]byte, a1-a0)
		if err := im.readSectorInto(buf[:ss], a0, bm, blockOff-blockStart); err != nil {
			return err
		}
		if a1-ss > a0 {
			if err := im.readSectorInto(buf[len(buf)-int(ss):], a1-ss, bm, blockOff-blockStart); err != nil {
				return err
			}
		}
		copy(buf[off-a0:], p)
	}
	if err := im.writeFile(buf, blockOff+a0-blockStart); err != nil {
		return err
	}
	first := im.bitIndex(a0)
	setBits(bm, first, (a1-a0)/ss)
	im.markBits(blk/im.geo.chunkRatio, first, (a1-a0)/ss)
	return nil
}

// markBits marks for the log the pages of chunk c's sector bitmap holding
// bits [first, first+n).
func (im *Image) markBits(c, first, n int64) {
	sb := batOffset(im.bat[im.geo.bitmapIndex(c)])
	for pg := first / 8 / pageSize; pg <= (first+n-1)/8/pageSize; pg++ {
		im.dirty[sb+pg*pageSize] = struct{}{}
	}
}

// readSectorInto reads the sector at virtual offset off of a partially
// present block: from this file (delta = file offset - virtual offset) when
// its bit is set, else from the parent.
func (im *Image) readSectorInto(p []byte, off int64, bm []byte, delta int64) error {
	if set, _ := bitRun(bm, im.bitIndex(off), 1); set {
		return im.readFile(p, off+delta)
	}
	return im.readParent(p, off)
}

// presentBitmap returns the sector bitmap of block blk's chunk, with blk's
// bits loaded, allocating the bitmap block in the file first if the chunk
// has none.
func (im *Image) presentBitmap(blk int64) ([]byte, error) {
	bm, err := im.bitmap(blk)
	if err != nil {
		return nil, err
	}
	idx := im.geo.bitmapIndex(blk / im.geo.chunkRatio)
	if batState(im.bat[idx]) != bitmapPresent {
		// The new block must read as zeros but for the bits set later,
		// whose pages go through the log: space that does not already is
		// zeroed in place, as payload is, durable at the flush's first
		// sync, before any entry names the block.
		off, zero, err := im.allocateBlock(bitmapBlockSize)
		if err != nil {
			return nil, err
		}
		if !zero {
			if err := im.writeZeros(off, bitmapBlockSize); err != nil {
				return nil, err
			}
		}
		im.setBAT(idx, batEntry(bitmapPresent, off))
	}
	return bm, nil
}

// setBAT changes entry idx in memory and marks its page for the log.
func (im *Image) setBAT(idx int64, e uint64) {
	im.bat[idx] = e
	im.dirty[int64(im.regs.BAT.Offset)+idx*8/pageSize*pageSize] = struct{}{}
}

// WriteZeroes makes [off, off+n) read as zeros. Whole blocks change state
// (ZERO) without writing, unless the image keeps its blocks allocated
// (fixed) or mayUnmap is false and the block is allocated: then zeros are
// written. A block changing state gives up its file space (the entry's
// FileOffsetMB is 0 in that state), free for other blocks once the change
// is durable, and punched out of the host file then (see freespace.go).
func (im *Image) WriteZeroes(off, n int64, mayUnmap bool) error {
	return im.zeroRange(off, n, mayUnmap, payloadZero)
}

// Trim discards [off, off+n): whole blocks become UNMAPPED and give up
// their space as WriteZeroes's do; partial ones are zeroed, whole MiB of
// the file punched where the file system can, so the range reads as zeros
// afterwards.
func (im *Image) Trim(off, n int64) error {
	return im.zeroRange(off, n, true, payloadUnmapped)
}

func (im *Image) zeroRange(off, n int64, mayUnmap bool, state uint8) error {
	if err := im.writable(); err != nil {
		return err
	}
	im.mu.Lock()
	defer im.mu.Unlock()
	if err := im.checkIO(off, n); err != nil {
		return err
	}
	if im.closed {
		return errClosed
	}
	if n == 0 {
		return nil
	}
	if err := im.beginWrite(true); err != nil {
		return err
	}
	g := &im.geo
	keep := im.p.LeaveAllocated && im.parent == nil
	for end := off + n; off < end; {
		blk, in := off/g.blockSize, off%g.blockSize
		seg := min(end-off, g.blockSize-in)
		idx := g.payloadIndex(blk)
		e := im.bat[idx]
		st := batState(e)
		whole := in == 0 && (seg == g.blockSize || off+seg == g.virtualSize)
		allocated := st == payloadFullyPresent || st == payloadPartiallyPresent
		var err error
		switch {
		case whole && !keep && (mayUnmap || !allocated):
			if allocated {
				err = im.releaseBlock(batOffset(e), g.blockSize)
			}
			if err == nil && (st != payloadNotPresent || im.parent != nil) {
				im.setBAT(idx, batEntry(state, 0))
			}
		case st == payloadFullyPresent && mayUnmap && !keep:
			err = im.discardFile(batOffset(e)+in, seg)
		case st == payloadFullyPresent:
			err = im.writeZeros(batOffset(e)+in, seg)
		case st == payloadPartiallyPresent && mayUnmap:
			err = im.discardPartial(off, seg, blk, batOffset(e))
		default:
			err = im.writeZeroRange(off, seg)
		}
		if err != nil {
			return err
		}
		off += seg
	}
	return nil
}

// discardFile makes [off, off+n) of the file read as zeros: the whole MiB
// inside it are punched out of the host file where the file system can,
// the rest is written.
func (im *Image) discardFile(off, n int64) error {
	lo, hi := alignUp(off, mib), (off+n)/mib*mib
	if lo < hi {
		err := storage.Punch(im.f, lo, hi-lo)
		if err == nil {
			if err := im.writeZeros(off, lo-off); err != nil {
				return err
			}
			return im.writeZeros(hi, off+n-hi)
		}
		if !errors.Is(err, storage.ErrPunchUnsupported) {
			return fmt.Errorf("vhdx: discarding file range [%#x, +%#x): %w", lo, hi-lo, err)
		}
	}
	return im.writeZeros(off, n)
}

// discardPartial makes [off, off+n), inside partially present block blk
// stored at blockOff, read as zeros in this image (not the parent's data):
// its sectors become present, and the whole MiB of the file under them are
// punched where the file system can instead of written.
func (im *Image) discardPartial(off, n, blk, blockOff int64) error {
	delta := blockOff - blk*im.geo.blockSize // file offset - virtual offset, MiB-aligned
	lo, hi := alignUp(off+delta, mib)-delta, (off+n+delta)/mib*mib-delta
	if lo >= hi {
		return im.writeZeroRange(off, n)
	}
	if err := storage.Punch(im.f, lo+delta, hi-lo); err != nil {
		if errors.Is(err, storage.ErrPunchUnsupported) {
			return im.writeZeroRange(off, n)
		}
		return fmt.Errorf("vhdx: discarding file range [%#x, +%#x): %w", lo+delta, hi-lo, err)
	}
	c := blk / im.geo.chunkRatio
	bm, err := im.presentBitmap(blk)
	if err != nil {
		return err
	}
	first, count := im.bitIndex(lo), (hi-lo)/im.geo.sectorSize
	setBits(bm, first, count)
	im.markBits(c, first, count)
	if err := im.writeZeroRange(off, lo-off); err != nil {
		return err
	}
	return im.writeZeroRange(hi, off+n-hi)
}

// writeZeroRange writes zeros through the ordinary write path, in pieces.
func (im *Image) writeZeroRange(off, n int64) error {
	zeros := zeros()
	for n > 0 {
		k := min(n, int64(len(zeros)))
		if err := im.write(zeros[:k], off); err != nil {
			return err
		}
		off, n = off+k, n-k
	}
	return nil
}

// dirtyPages returns the content of every dirty metadata page, sorted by
// file offset, and clears the dirty set. The caller holds mu.
func (im *Image) dirtyPages() []page {
	offs := make([]int64, 0, len(im.dirty))
	for off := range im.dirty {
		offs = append(offs, off)
	}
	slices.Sort(offs)
	pages := im.render(offs)
	clear(im.dirty)
	return pages
}

// pageContent renders the 4 KiB page at file offset off from memory: a
// page of the BAT, of a region table copy, of the metadata region or of a
// sector bitmap block.
func (im *Image) pageContent(off int64) []byte {
	b := make([]byte, pageSize)
	batOff := int64(im.regs.BAT.Offset)
	if off >= batOff && off < batOff+int64(im.regs.BAT.Length) {
		first := (off - batOff) / 8
		for i := int64(0); i < pageSize/8 && first+i < int64(len(im.bat)); i++ {
			e := im.bat[first+i]
			for k := 0; k < 8; k++ {
				b[8*i+int64(k)] = byte(e >> (8 * k))
			}
		}
		return b
	}
	for _, rt := range []int64{region1Offset, region2Offset} {
		if off >= rt && off < rt+regionTableSize && im.regionBuf != nil {
			copy(b, im.regionBuf[off-rt:])
			return b
		}
	}
	metaOff := int64(im.regs.Metadata.Offset)
	if off >= metaOff && off < metaOff+int64(im.regs.Metadata.Length) {
		if rel := off - metaOff; rel < int64(len(im.metaBuf)) {
			copy(b, im.metaBuf[rel:])
		}
		return b
	}
	for c := range im.bitmaps {
		e := im.bat[im.geo.bitmapIndex(int64(c))]
		if batState(e) != bitmapPresent || off < batOffset(e) || off >= batOffset(e)+bitmapBlockSize {
			continue
		}
		// A dirty page was changed, so loaded (see chunkBitmap).
		if cb := im.bitmaps[c].Load(); cb != nil {
			copy(b, cb.bits[off-batOffset(e):])
		}
		return b
	}
	panic(fmt.Sprintf("vhdx: dirty page %#x belongs to no metadata structure", off))
}
