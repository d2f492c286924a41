package vhdx

import (
	"cmp"
	"slices"

	"github.com/vhdkit/vhdkit/storage"
)

// The free-space map of an open image: the ranges of its file, below
// fileEnd, that hold no live block nor any structure. It is built from the
// BAT and the region table the first time the image allocates, and never
// stored: the BAT is the truth, and a crash loses nothing but the map.
//
// Allocation takes the lowest free range that fits before growing the
// file. Space a change releases (a block made ZERO or UNMAPPED) is not free
// at once: until the change is durable a crash leaves the old entry naming
// it, with its data. It waits as pending until the flush that commits the
// change, which then punches it out of the host file (so it reads as zeros
// and costs no disk space) and makes it free.

// fileRange is a range [off, end) of the file, in whole MiB.
type fileRange struct {
	off, end int64
	zero     bool // reads as zeros: past the data ever written, or punched
}

// freeSpace is the map; the image's mu guards it.
type freeSpace struct {
	built   bool
	free    []fileRange // sorted by offset, disjoint
	pending []fileRange // released by changes not yet durable
}

// add makes e free, joining it to its neighbours when they read alike.
func (s *freeSpace) add(e fileRange) {
	if e.end <= e.off {
		return
	}
	i, _ := slices.BinarySearchFunc(s.free, e.off, func(x fileRange, off int64) int { return cmp.Compare(x.off, off) })
	s.free = slices.Insert(s.free, i, e)
	if i+1 < len(s.free) && s.free[i+1].off == e.end && s.free[i+1].zero == e.zero {
		s.free[i].end = s.free[i+1].end
		s.free = slices.Delete(s.free, i+1, i+2)
	}
	if i > 0 && s.free[i-1].end == e.off && s.free[i-1].zero == e.zero {
		s.free[i-1].end = s.free[i].end
		s.free = slices.Delete(s.free, i, i+1)
	}
}

// take removes n bytes from the lowest free range that holds them, and
// reads as zeros when zero is asked; ok is false when none does.
func (s *freeSpace) take(n int64, zero bool) (off int64, isZero, ok bool) {
	for i, e := range s.free {
		if e.end-e.off < n || zero && !e.zero {
			continue
		}
		s.free[i].off += n
		if s.free[i].off == e.end {
			s.free = slices.Delete(s.free, i, i+1)
		}
		return e.off, e.zero, true
	}
	return 0, false, false
}

// release adds space a change frees to pending.
func (s *freeSpace) release(es ...fileRange) { s.pending = append(s.pending, es...) }

// takePending returns the pending space and forgets it: the caller commits
// the changes that released it, then gives it to reclaim (or back to
// release when the commit fails).
func (s *freeSpace) takePending() []fileRange {
	p := s.pending
	s.pending = nil
	return p
}

// bytes returns how much of the file the map holds free. The caller holds
// mu.
func (s *freeSpace) bytes() int64 {
	var n int64
	for _, e := range s.free {
		n += e.end - e.off
	}
	return n
}

// buildSpace builds the map, if it is not built: everything below fileEnd
// that neither the first MiB, the log, a region of the region table nor a
// live block (FULLY or PARTIALLY_PRESENT, a present sector bitmap) holds.
// Space past the file's current size reads as zeros. A stale offset in an
// entry whose state reserves the field (ZERO or UNMAPPED as an older
// vhdkit left them, or another tool's) is set to zero, and the space only
// such entries name is released: pending, since until that change is
// durable the entry still names it on disk.
// The caller holds mu for writing and has called beginWrite.
func (im *Image) buildSpace() error {
	if im.space.built {
		return nil
	}
	size, err := im.f.Size()
	if err != nil {
		return err
	}
	// One bit per MiB of the file says it is used: bounded memory (8 MiB
	// for a 64 TiB file), whatever the number of blocks.
	units := im.fileEnd / mib
	used := make([]uint64, (units+63)/64)
	mark := func(off, end int64) {
		for u := max(off/mib, 0); u < min(alignUp(end, mib)/mib, units); u++ {
			used[u/64] |= 1 << (u % 64)
		}
	}
	mark(0, mib)
	mark(im.logOff, im.logOff+im.logLen)
	for _, r := range im.regionTable {
		mark(int64(r.Offset), int64(r.Offset)+int64(r.Length))
	}
	g := &im.geo
	var stale []fileRange
	for i, e := range im.bat {
		st, off := batState(e), batOffset(e)
		if off == 0 {
			continue
		}
		n := g.blockSize
		live := st == payloadFullyPresent || st == payloadPartiallyPresent
		if (int64(i)+1)%(g.chunkRatio+1) == 0 {
			n, live = bitmapBlockSize, st == bitmapPresent
		}
		if live {
			mark(off, off+n)
			continue
		}
		im.setBAT(int64(i), batEntry(st, 0))
		stale = append(stale, fileRange{off: off, end: off + n})
	}
	// What only stale entries name is released: free once the change
	// clearing them is durable. Each MiB once, and none a live block holds.
	for _, r := range stale {
		for u := max(r.off/mib, 0); u < min(alignUp(r.end, mib)/mib, units); u++ {
			if used[u/64]&(1<<(u%64)) != 0 {
				continue
			}
			used[u/64] |= 1 << (u % 64)
			if p := im.space.pending; len(p) > 0 && p[len(p)-1].end == u*mib {
				p[len(p)-1].end += mib
			} else {
				im.space.pending = append(p, fileRange{off: u * mib, end: (u + 1) * mib})
			}
		}
	}
	for u := int64(1); u < units; {
		if used[u/64] == ^uint64(0) && u%64 == 0 {
			u += 64
			continue
		}
		if used[u/64]&(1<<(u%64)) != 0 {
			u++
			continue
		}
		start := u
		for u < units && used[u/64]&(1<<(u%64)) == 0 {
			u++
		}
		im.freeGap(start*mib, u*mib, size)
	}
	im.space.built = true
	return nil
}

// freeGap adds [from, to), whole MiB, to the map; what lies past size reads
// as zeros.
func (im *Image) freeGap(from, to, size int64) {
	split := min(max(alignUp(size, mib), from), to)
	im.space.add(fileRange{off: from, end: split})
	im.space.add(fileRange{off: split, end: to, zero: true})
}

// allocateBlock reserves n bytes (a multiple of 1 MiB) for a block: the
// lowest free range that fits, else the end of the file. zero reports that
// the space reads as zeros; otherwise it holds a released block's old
// bytes. The caller holds mu for writing.
func (im *Image) allocateBlock(n int64) (off int64, zero bool, err error) {
	if err := im.buildSpace(); err != nil {
		return 0, false, err
	}
	if off, zero, ok := im.space.take(alignUp(n, mib), false); ok {
		return off, zero, nil
	}
	return im.allocateEnd(n), true, nil
}

// allocate reserves n bytes (a multiple of 1 MiB) that read as zeros: free
// space known to be zero, else the end of the file. The caller holds mu
// for writing.
func (im *Image) allocate(n int64) int64 {
	if im.buildSpace() == nil {
		if off, _, ok := im.space.take(alignUp(n, mib), true); ok {
			return off
		}
	}
	return im.allocateEnd(n)
}

// allocateEnd reserves n bytes at the end of the file, past every byte
// ever written, so they read as zeros.
func (im *Image) allocateEnd(n int64) int64 {
	off := im.fileEnd
	im.fileEnd += alignUp(n, mib)
	return off
}

// releaseBlock hands the n bytes at off, which the caller's change to the
// BAT is about to stop naming, to the map as pending. The map is built
// first if it is not: built after the change, it would take the space
// for free at once. The caller holds mu for writing and has called
// beginWrite.
func (im *Image) releaseBlock(off, n int64) error {
	if err := im.buildSpace(); err != nil {
		return err
	}
	im.space.release(fileRange{off: off, end: off + n})
	return nil
}

// reclaim makes space released by a commit that is now durable free: it is
// punched out of the host file first, so it reads as zeros and costs no
// disk space (a file system that cannot punch keeps the bytes, and the
// space is reused with them overwritten). Nothing names the space, so no
// lock is needed to punch it; mu is taken to add it to the map.
func (im *Image) reclaim(released []fileRange) {
	if len(released) == 0 {
		return
	}
	for i := range released {
		// On an error (ErrPunchUnsupported, or I/O) the space is free all
		// the same, with its bytes; a block placed there overwrites them.
		released[i].zero = storage.Punch(im.f, released[i].off, released[i].end-released[i].off) == nil
	}
	im.mu.Lock()
	for _, e := range released {
		im.space.add(e)
	}
	im.mu.Unlock()
}
