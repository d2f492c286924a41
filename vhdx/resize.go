package vhdx

import (
	"bytes"
	"encoding/binary"
	"fmt"
	"slices"
	"sync/atomic"

	"github.com/vhdkit/vhdkit/storage"
)

// Resize changes the virtual size to size bytes, as Resize-VHD does, for
// fixed, dynamic and differencing images.
//
// Growing, the new range reads as zeros. A fixed image gets its new blocks
// allocated. In a differencing image the new blocks are ZERO and the old
// last block's new sectors present zeros: nothing there reads through to
// the parent, whatever it holds, and readers that stop at a smaller
// parent's end read it too. When the BAT region cannot hold the entries of
// the new size, the BAT moves to new space at the end of the file.
//
// Shrinking drops the blocks wholly past the new end; the block the new
// end cuts keeps its bytes below it (those past it read as zeros if the
// image grows again). The file does not get smaller.
//
// Resize flushes: writes made before it are durable when it starts, and
// the new size is durable when it returns (to the current size it only
// flushes). A crash at any point leaves the old size or the new one, each
// with its content (see "Resizing" in the package documentation). If
// Resize fails, the image keeps its old size in memory; a crash then
// leaves either.
func (im *Image) Resize(size int64) error {
	if err := im.writable(); err != nil {
		return err
	}
	im.flushMu.Lock()
	defer im.flushMu.Unlock()
	im.mu.Lock()
	defer im.mu.Unlock()
	if im.closed {
		return errClosed
	}
	if ss := im.geo.sectorSize; size < ss || size > MaxVirtualSize || size%ss != 0 {
		return fmt.Errorf("vhdx: %s: virtual size %d is not a multiple of the %d-byte logical sector in (0, 64 TiB]", im.path, size, ss)
	}
	if size == im.geo.virtualSize {
		return im.commitDirty() // still a flush, as documented
	}
	if err := im.beginWrite(true); err != nil {
		return err
	}
	if err := im.resize(size); err != nil {
		return fmt.Errorf("vhdx: resize %s to %d bytes: %w", im.path, size, err)
	}
	return nil
}

// resizePlan lists, by file offset, the metadata pages a resize changes,
// in the three parts it commits them in.
type resizePlan struct {
	prep   []int64 // pages the old size does not read: committed first
	sw     []int64 // the switch: one log entry
	post   []int64 // pages the new size does not read: committed last
	finish func()  // changes memory for post once the switch is durable
}

// sizeState is what planning a resize changes in memory, restored when
// the resize fails before its switch is durable. Planning never changes
// the slices and buffers it holds in place.
type sizeState struct {
	geo       geometry
	virtual   uint64
	regs      regions
	bat       []uint64
	bitmaps   []atomic.Pointer[chunkBitmap]
	meta      []metaEntry
	metaBuf   []byte
	regionBuf []byte
	regions   []regionEntry
}

func (im *Image) saveSize() sizeState {
	return sizeState{im.geo, im.p.VirtualSize, im.regs, im.bat, im.bitmaps, im.meta, im.metaBuf, im.regionBuf, im.regionTable}
}

func (im *Image) restoreSize(s sizeState) {
	im.geo, im.p.VirtualSize, im.regs, im.bat, im.bitmaps = s.geo, s.virtual, s.regs, s.bat, s.bitmaps
	im.meta, im.metaBuf, im.regionBuf, im.regionTable = s.meta, s.metaBuf, s.regionBuf, s.regions
}

// resize plans and commits a change to size; the caller holds flushMu and
// mu and has called beginWrite.
func (im *Image) resize(size int64) error {
	// Writes made before become durable first, so that a crash during the
	// resize leaves them under either size. The free-space map is built
	// before: building it may clear stale offsets in the BAT (see
	// buildSpace), which must not be among the pages a failed resize
	// forgets.
	if err := im.buildSpace(); err != nil {
		return err
	}
	if err := im.commitDirty(); err != nil {
		return err
	}
	old := im.saveSize()
	var plan resizePlan
	var err error
	if size > im.geo.virtualSize {
		plan, err = im.planGrow(size)
	} else {
		plan, err = im.planShrink(size)
	}
	if err == nil && len(plan.sw) > entryPages(im.logLen) {
		err = fmt.Errorf("%d pages must change at once, more than an entry of the %d-byte log holds: %w", len(plan.sw), im.logLen, ErrUnsupported)
	}
	if err == nil {
		err = im.commitPages(plan.prep)
	}
	if err == nil && size > old.geo.virtualSize {
		err = im.allocateGrowth(old)
	}
	if err == nil {
		err = im.syncPayload(im.fileEnd)
	}
	logged := false
	if err == nil {
		// An entry that fails is spoiled (logAndApply), so that no replay
		// brings back a size memory no longer has.
		logged, err = im.logAndApply(im.render(plan.sw), im.fileEnd)
	}
	if !logged {
		// Nothing the old size reads has changed on disk. The space
		// allocated stays allocated: the attempt may have written there.
		im.restoreSize(old)
		clear(im.dirty)
		return err
	}
	im.size.Store(size)
	if plan.finish != nil {
		plan.finish()
	}
	if err == nil {
		err = im.commitPages(plan.post)
	}
	if err != nil {
		// The new size is durable; what is left reaches the file with the
		// next flush.
		for _, off := range slices.Concat(plan.sw, plan.post) {
			im.dirty[off] = struct{}{}
		}
	}
	return err
}

// allocateGrowth gives the blocks a grown fixed image gained their space
// on disk, as Create does, when the image has all of its own (one made
// with --sparse stays sparse): a fixed disk must not run out of space
// later. The blocks are unread until the switch, so a crash or a full
// file system here leaves the old size as it was.
func (im *Image) allocateGrowth(old sizeState) error {
	if !im.p.LeaveAllocated || im.p.HasParent {
		return nil
	}
	var lo, hi int64 = -1, -1 // the new blocks' span in the file
	for b := alignUp(old.geo.virtualSize, im.geo.blockSize) / im.geo.blockSize; b < im.geo.dataBlocks; b++ {
		e := im.bat[im.geo.payloadIndex(b)]
		if batState(e) != payloadFullyPresent {
			continue
		}
		off := batOffset(e)
		if lo < 0 || off < lo {
			lo = off
		}
		hi = max(hi, off+im.geo.blockSize)
	}
	if lo < 0 || !storage.Allocated(im.f, lo) {
		return nil
	}
	return storage.Allocate(im.f, lo, hi-lo)
}

// commitDirty commits the dirty pages as Flush does; the caller holds
// flushMu and mu.
func (im *Image) commitDirty() error {
	pages := im.dirtyPages()
	if err := im.commit(pages, im.fileEnd, false); err != nil {
		for _, p := range pages {
			im.dirty[p.off] = struct{}{}
		}
		return err
	}
	return nil
}

// planGrow changes memory to size (larger), writes zeros where the old last
// block needs them, and returns the pages to commit.
func (im *Image) planGrow(size int64) (resizePlan, error) {
	var plan resizePlan
	old := im.geo
	g := newGeometry(im.p.BlockSize, im.p.LogicalSectorSize, uint64(size), im.p.HasParent)
	bat := make([]uint64, g.totalEntries)
	copy(bat, im.bat)
	bitmaps := make([]atomic.Pointer[chunkBitmap], g.bitmapBlocks)
	for c := range im.bitmaps {
		bitmaps[c].Store(im.bitmaps[c].Load())
	}
	im.geo, im.p.VirtualSize, im.bat, im.bitmaps = g, uint64(size), bat, bitmaps
	relocate := g.totalEntries*8 > int64(im.regs.BAT.Length)
	if relocate {
		n := alignUp(g.totalEntries*8, mib)
		im.regs.BAT.Offset, im.regs.BAT.Length = uint64(im.allocate(n)), uint32(n)
	}
	batOff := int64(im.regs.BAT.Offset)
	inBAT := func(off int64) bool { return off >= batOff && off < batOff+int64(im.regs.BAT.Length) }

	if old.virtualSize%g.blockSize != 0 {
		if err := im.clearTail(old.virtualSize, min(alignUp(old.virtualSize, g.blockSize), size)); err != nil {
			return plan, err
		}
	}
	// BAT pages changed so far hold the old last block's entries, which
	// the old size reads: they switch with it. A moved BAT is read by
	// nothing before the switch.
	visible := map[int64]bool{}
	for off := range im.dirty {
		visible[off] = !relocate && inBAT(off)
	}

	fixed := im.p.LeaveAllocated && !im.p.HasParent
	first := alignUp(old.virtualSize, g.blockSize) / g.blockSize
	for b := first; g.payloadIndex(b) < g.totalEntries; b++ {
		var e uint64
		switch {
		case b >= g.dataBlocks: // past the end, in a differencing BAT's last chunk
		case fixed:
			e = batEntry(payloadFullyPresent, im.allocate(g.blockSize))
		case im.p.HasParent:
			// Zeros in the child itself, not the parent's data nor a read
			// past its end, which some readers (7-Zip) cannot do.
			e = batEntry(payloadZero, 0)
		}
		im.bat[g.payloadIndex(b)] = e
	}
	if relocate {
		// New space reads as zeros: only pages holding entries are written.
		for i, e := range im.bat {
			if e != 0 {
				im.dirty[batOff+int64(i)*8/pageSize*pageSize] = struct{}{}
			}
		}
	} else {
		// Entries past the old ones may hold anything a shrink left.
		lo := min(g.payloadIndex(first), old.totalEntries) * 8 / pageSize * pageSize
		for off := lo; off < g.totalEntries*8; off += pageSize {
			im.dirty[batOff+off] = struct{}{}
		}
	}
	if relocate {
		buf, entries, pages, err := im.renderRegions()
		if err != nil {
			return plan, err
		}
		im.regionBuf, im.regionTable = buf, entries
		plan.sw = append(plan.sw, pages...)
	}
	if err := im.resizeMetadata(size, &plan); err != nil {
		return plan, err
	}
	for off := range im.dirty {
		if visible[off] {
			plan.sw = append(plan.sw, off)
		} else {
			plan.prep = append(plan.prep, off)
		}
	}
	clear(im.dirty)
	slices.Sort(plan.prep)
	slices.Sort(plan.sw)
	return plan, nil
}

// clearTail makes [from, to), the part of the old last block that growing
// adds, read as zeros: a shrink may have left bytes there, and in a
// differencing image the sectors must not read through to the parent
// (see planGrow). Payload is written in place, past the old end where
// nothing reads it yet.
func (im *Image) clearTail(from, to int64) error {
	g := &im.geo
	blk := from / g.blockSize
	idx := g.payloadIndex(blk)
	e := im.bat[idx]
	in := from - blk*g.blockSize
	switch batState(e) {
	case payloadFullyPresent:
		return im.writeZeros(batOffset(e)+in, to-from)
	case payloadPartiallyPresent:
		if err := im.writeZeros(batOffset(e)+in, to-from); err != nil {
			return err
		}
		return im.markPresent(blk, from, to)
	case payloadNotPresent:
		if im.parent == nil {
			return nil
		}
		blockOff := im.allocate(g.blockSize) // reads as zeros
		if err := im.markPresent(blk, from, to); err != nil {
			return err
		}
		im.setBAT(idx, batEntry(payloadPartiallyPresent, blockOff))
	}
	return nil // ZERO, UNMAPPED, UNDEFINED read as zeros
}

// markPresent sets the sector bits of [from, to) in block blk's chunk
// bitmap. It changes a copy, so that the bitmap before the resize stays
// intact for a restore.
func (im *Image) markPresent(blk, from, to int64) error {
	c := blk / im.geo.chunkRatio
	if _, err := im.presentBitmap(blk); err != nil {
		return err
	}
	own := im.bitmaps[c].Load().clone()
	first, n := im.bitIndex(from), (to-from)/im.geo.sectorSize
	setBits(own.bits, first, n)
	im.bitmaps[c].Store(own)
	im.markBits(c, first, n)
	return nil
}

// planShrink changes memory to size (smaller) and returns the pages to
// commit: only the size switches; dropping the entries past the new end
// follows it, since the new size does not read them.
func (im *Image) planShrink(size int64) (resizePlan, error) {
	var plan resizePlan
	old := im.geo
	g := newGeometry(im.p.BlockSize, im.p.LogicalSectorSize, uint64(size), im.p.HasParent)
	// The blocks dropped give their space to the free-space map once the
	// drop is durable (after the next flush); the map is built from the
	// BAT before it loses them, or it would take their space for free at
	// once (see releaseBlock).
	dropped := im.droppedBlocks(g)
	if len(dropped) > 0 {
		if err := im.buildSpace(); err != nil {
			return plan, err
		}
	}
	im.geo, im.p.VirtualSize = g, uint64(size)
	im.bat, im.bitmaps = im.bat[:g.totalEntries], im.bitmaps[:g.bitmapBlocks]
	if err := im.resizeMetadata(size, &plan); err != nil {
		return plan, err
	}
	batOff := int64(im.regs.BAT.Offset)
	lo := g.payloadIndex(g.dataBlocks) * 8 / pageSize * pageSize
	for off := lo; off < old.totalEntries*8; off += pageSize {
		plan.post = append(plan.post, batOff+off)
	}
	plan.finish = func() {
		// A differencing BAT keeps whole chunks: drop the payload entries
		// past the end in the last one (its bitmap entry stays).
		for b := g.dataBlocks; g.payloadIndex(b) < g.totalEntries; b++ {
			im.bat[g.payloadIndex(b)] = 0
		}
		im.space.release(dropped...)
	}
	slices.Sort(plan.sw)
	return plan, nil
}

// droppedBlocks lists the space of the allocated blocks a shrink to
// geometry g drops: payload blocks past its end, and the sector bitmap
// blocks of whole chunks past it.
func (im *Image) droppedBlocks(g geometry) []fileRange {
	var out []fileRange
	for i := g.payloadIndex(g.dataBlocks); i < int64(len(im.bat)); i++ {
		e := im.bat[i]
		st, off := batState(e), batOffset(e)
		if (i+1)%(g.chunkRatio+1) == 0 {
			if i >= g.totalEntries && st == bitmapPresent && im.p.HasParent {
				out = append(out, fileRange{off: off, end: off + bitmapBlockSize})
			}
			continue
		}
		if st == payloadFullyPresent || st == payloadPartiallyPresent {
			out = append(out, fileRange{off: off, end: off + g.blockSize})
		}
	}
	return out
}

// resizeMetadata renders the metadata region with the new virtual disk
// size and adds its pages to the switch.
func (im *Image) resizeMetadata(size int64, plan *resizePlan) error {
	buf, entries, pages, err := im.renderMetadata(itemVirtualDiskSize, binary.LittleEndian.AppendUint64(nil, uint64(size)))
	if err != nil {
		return err
	}
	im.metaBuf, im.meta = buf, entries
	plan.sw = append(plan.sw, pages...)
	return nil
}

// renderRegions renders the region table naming im.regs.BAT, keeping the
// table's other entries, and returns it, its entries, and the file offsets
// of the pages of either copy that differ from it: both copies change in
// one entry.
func (im *Image) renderRegions() ([]byte, []regionEntry, []int64, error) {
	entries := slices.Clone(im.regionTable)
	for i := range entries {
		if entries[i].GUID == regionBAT {
			entries[i].Offset, entries[i].Length = im.regs.BAT.Offset, im.regs.BAT.Length
		}
	}
	if _, err := validateRegions(entries, "new region table", region1Offset, im.fileEnd); err != nil {
		return nil, nil, nil, err
	}
	buf := marshalRegionTable(entries)
	var pages []int64
	old := make([]byte, regionTableSize)
	for i, off := range []int64{region1Offset, region2Offset} {
		if err := im.readAt(old, off, fmt.Sprintf("region table %d", i+1)); err != nil {
			return nil, nil, nil, err
		}
		for pg := 0; pg < regionTableSize; pg += pageSize {
			if !bytes.Equal(old[pg:pg+pageSize], buf[pg:pg+pageSize]) {
				pages = append(pages, off+int64(pg))
			}
		}
	}
	return buf, entries, pages, nil
}

// render returns the content of the metadata pages at offs, from memory.
func (im *Image) render(offs []int64) []page {
	pages := make([]page, len(offs))
	for i, off := range offs {
		pages[i] = page{off: off, data: im.pageContent(off)}
	}
	return pages
}

// commitPages commits the pages at offs an entry at a time, rendering each
// batch when it is due so a large BAT is not held twice in memory.
func (im *Image) commitPages(offs []int64) error {
	per := entryPages(im.logLen)
	for len(offs) > 0 {
		batch := offs[:min(per, len(offs))]
		offs = offs[len(batch):]
		if err := im.commit(im.render(batch), im.fileEnd, false); err != nil {
			return err
		}
	}
	return nil
}
