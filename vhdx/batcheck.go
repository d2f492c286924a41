package vhdx

import (
	"cmp"
	"slices"
)

// fileExtent is a range of the file a structure takes.
type fileExtent struct {
	off, end int64
	what     string // names it in errors: "the log", "BAT entry 17", ...
	entry    int64  // the BAT entry of a block, -1 for other structures
}

// reservedExtents lists what no block may overlap: the header section, the
// log and every region of the region table, unknown ones included.
func (im *Image) reservedExtents() []fileExtent {
	out := []fileExtent{{0, mib, "the header section", -1}, {im.logOff, im.logOff + im.logLen, "the log", -1}}
	for _, r := range im.regs.all() {
		what := "region " + r.GUID.String()
		switch r.GUID {
		case regionBAT:
			what = "the BAT region"
		case regionMetadata:
			what = "the metadata region"
		}
		out = append(out, fileExtent{int64(r.Offset), int64(r.Offset) + int64(r.Length), what, -1})
	}
	return out
}

// batPlacement checks where the blocks of a BAT lie (MS-VHDX 2.5.1: a
// block resides after the header section, overlaps no other structure,
// and no two entries share a FileOffsetMB): every allocated payload block
// (FULLY or PARTIALLY_PRESENT) and, in a differencing image, every present
// sector bitmap block must
//
//   - start past the header section and inside the file, and hold inside
//     it every byte the disk reads of it (the last block of a disk whose
//     size is not a multiple of the block size may end past the file's
//     end, as some writers leave it, but no byte the disk reads);
//   - overlap none of reserved (see reservedExtents) nor another block.
//
// It also checks each entry's state (geometry.checkEntry) and that a
// PARTIALLY_PRESENT block's chunk has its sector bitmap: without it the
// block would read its parent's data as its own.
//
// It reports each problem found as a *FormatError to report, and stops
// when report returns false. Time is O(n log n) for n entries, and memory
// the smaller of a bit per MiB of the file and a few words per allocated
// block: never a second BAT.
func batPlacement(bat []uint64, g *geometry, hasParent bool, batOff, fileSize int64, reserved []fileExtent, report func(error) bool) {
	chunk := g.chunkRatio + 1
	isBitmap := func(i int64) bool { return (i+1)%chunk == 0 }
	// extent returns the space entry i takes and how much of it the disk
	// reads; ok is false when it takes none.
	extent := func(i int64, e uint64) (off, length, read int64, ok bool) {
		st := batState(e)
		if isBitmap(i) {
			if st != bitmapPresent || !hasParent {
				return 0, 0, 0, false // ignored without a parent
			}
			c := i / chunk
			sectors := min(sectorsPerBitmap, (g.virtualSize-c*g.chunkRatio*g.blockSize+g.sectorSize-1)/g.sectorSize)
			return batOffset(e), bitmapBlockSize, max(0, (sectors+7)/8), true
		}
		if st != payloadFullyPresent && st != payloadPartiallyPresent {
			return 0, 0, 0, false
		}
		b := i - i/chunk
		return batOffset(e), g.blockSize, max(0, min(g.blockSize, g.virtualSize-b*g.blockSize)), true
	}
	allocated := 0
	for i, e := range bat {
		idx := int64(i)
		if err := g.checkEntry(idx, e, fileSize, hasParent, batOff); err != nil {
			if !report(err) {
				return
			}
			continue
		}
		off, length, read, ok := extent(idx, e)
		if !ok {
			continue
		}
		allocated++
		switch {
		case off < mib || off >= fileSize:
			if !report(formatErr(entryName(idx), batOff+8*idx, "block [%#x, +%#x) outside the file (%d bytes)", off, length, fileSize)) {
				return
			}
		case off+read > fileSize:
			if !report(formatErr(entryName(idx), batOff+8*idx, "block [%#x, +%#x) cut off by the end of the file (%d bytes): the disk reads %d bytes of it", off, length, fileSize, read)) {
				return
			}
		}
		if hasParent && batState(e) == payloadPartiallyPresent && !isBitmap(idx) {
			bi := (idx/chunk)*chunk + g.chunkRatio
			if bi >= int64(len(bat)) || batState(bat[bi]) != bitmapPresent {
				if !report(formatErr(entryName(idx), batOff+8*idx, "PARTIALLY_PRESENT block without a sector bitmap (BAT entry %d is not present)", bi)) {
					return
				}
			}
		}
	}
	// Overlaps: a bitmap of the file's MiB when that is smaller than a
	// sorted list of the extents.
	units := fileSize/mib + maxBlockSize/mib + 1 // blocks start inside the file
	if units/8 < int64(24*(allocated+len(reserved))) {
		overlapsByBitmap(bat, units, batOff, reserved, extent, report)
		return
	}
	exts := slices.Clone(reserved)
	for i, e := range bat {
		if off, length, _, ok := extent(int64(i), e); ok && off >= mib && off < fileSize {
			exts = append(exts, blockExtent(int64(i), off, length))
		}
	}
	slices.SortFunc(exts, func(a, b fileExtent) int {
		return cmp.Or(cmp.Compare(a.off, b.off), cmp.Compare(a.end, b.end), cmp.Compare(a.entry, b.entry))
	})
	reach := fileExtent{end: -1}
	for _, x := range exts {
		if x.off < reach.end {
			if !report(overlapErr(x, reach, batOff)) {
				return
			}
		}
		if x.end > reach.end {
			reach = x
		}
	}
}

// overlapsByBitmap is batPlacement's overlap check with a bit per MiB of
// the file: the reserved extents are marked, then each block; a block
// finding a bit set overlaps something, which a second look finds.
func overlapsByBitmap(bat []uint64, units, batOff int64, reserved []fileExtent, extent func(int64, uint64) (int64, int64, int64, bool), report func(error) bool) {
	used := make([]uint64, (units+63)/64)
	mark := func(off, end int64) (clash int64) {
		clash = -1
		for u := off / mib; u < (end+mib-1)/mib && u < units; u++ {
			if used[u/64]&(1<<(u%64)) != 0 && clash < 0 {
				clash = u
			}
			used[u/64] |= 1 << (u % 64)
		}
		return clash
	}
	for _, r := range reserved {
		mark(r.off, r.end)
	}
	for i, e := range bat {
		off, length, _, ok := extent(int64(i), e)
		if !ok || off < mib || off/mib >= units {
			continue
		}
		u := mark(off, off+length)
		if u < 0 {
			continue
		}
		// Find what else holds unit u: a reserved extent, or the first
		// block before this one that does.
		x := blockExtent(int64(i), off, length)
		other := fileExtent{what: "another block", entry: -1}
		for _, r := range reserved {
			if r.off <= u*mib && u*mib < r.end {
				other = r
			}
		}
		for j, f := range bat[:i] {
			if o, n, _, ok := extent(int64(j), f); ok && o <= u*mib && u*mib < o+n {
				other = blockExtent(int64(j), o, n)
				break
			}
		}
		if !report(overlapErr(x, other, batOff)) {
			return
		}
	}
}

func blockExtent(i, off, length int64) fileExtent {
	return fileExtent{off, off + length, entryName(i), i}
}

// overlapErr reports that x and other overlap, at the BAT entry of the
// block among them (x when both are blocks).
func overlapErr(x, other fileExtent, batOff int64) error {
	if x.entry < 0 {
		x, other = other, x
	}
	at := x.off
	if x.entry >= 0 {
		at = batOff + 8*x.entry
	}
	return formatErr(x.what, at, "[%#x, +%#x) overlaps %s [%#x, +%#x)", x.off, x.end-x.off, other.what, other.off, other.end-other.off)
}
