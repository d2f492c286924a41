package vhd

import (
	"bytes"
	"errors"
	"fmt"
	"slices"

	"github.com/vhdkit/vhdkit/disk"
	"github.com/vhdkit/vhdkit/storage"
)

// OptimizeOptions control Optimize.
type OptimizeOptions struct {
	// Full also releases blocks whose stored sectors all read as what lies
	// below them (zeros in a dynamic image, the parent's bytes in a
	// differencing one), which needs reading every allocated block. Without
	// it (quick mode) only blocks that store no sector are released.
	Full bool
	// Progress, when set, is called with the steps done and the steps
	// known so far: a block scanned (all are), then each batch of blocks
	// moved. The numbers never decrease.
	Progress func(done, total int64)
	// ParentDirs and FS are passed to Open.
	ParentDirs []string
	FS         storage.FS
}

// OptimizeResult says what Optimize did (the fields vhdx.OptimizeResult
// has, and the holes punched).
type OptimizeResult struct {
	SizeBefore, SizeAfter int64 // the file's size
	Released              int   // blocks released: they added nothing to the disk
	Moved                 int   // blocks moved down the file
	// BytesPunched is the space inside the file given back to the file
	// system (holes punched where nothing could be moved in).
	BytesPunched int64
	// PunchUnsupported: the file system cannot punch holes, so the space
	// of gaps left inside the file stays allocated.
	PunchUnsupported bool
}

// Optimize compacts the dynamic or differencing image at path, like
// Optimize-VHD: it opens it for writing (so it is refused while another
// program uses it) and runs Image.Optimize.
func Optimize(path string, opts OptimizeOptions) (OptimizeResult, error) {
	im, err := Open(path, OpenOptions{ParentDirs: opts.ParentDirs, FS: opts.FS})
	if err != nil {
		return OptimizeResult{}, err
	}
	res, err := im.Optimize(opts)
	if cerr := im.Close(); err == nil {
		err = cerr
	}
	return res, err
}

// maxMoveBatch bounds the blocks moved between two commits of the BAT.
const maxMoveBatch = 64

// Optimize releases the blocks that add nothing to the disk (see
// OptimizeOptions.Full), moves the blocks at the end of the file down into
// the space released or leaked (by trims, by header moves, by crashes),
// cuts the file after the last structure in use, and punches holes in the
// gaps left inside it. What the disk reads is unchanged at every step:
//
//  1. flush pending writes; clear the BAT entries of the released blocks
//     and commit them as Flush does (write the BAT sectors, sync): a crash
//     leaves each entry pointing at the block or released, which read the
//     same;
//  2. when a header move (Resize, SetParent) left the header, the locator
//     data and the BAT above space they fit in, move them there as
//     "Moving the header" in the package doc does (write them, sync,
//     commit the end footer, sync, the copy at 0, sync); then move blocks
//     in batches: copy each (bitmap and data) into space no
//     structure refers to, below where it is; sync; point its BAT entry at
//     the copy; sync (the Flush protocol's steps 2-4). A crash leaves each entry at the old place or the
//     new one, both intact, since a place given up in a batch is reused
//     only in a later batch;
//  3. write the footer right after the last structure in use; sync; cut
//     the file after it; sync. Until the cut the old footer still ends
//     the file;
//  4. punch holes in the gaps left below the new end (no structure refers
//     to them); sync.
//
// A fixed image has nothing to optimize (ErrUnsupported).
func (im *Image) Optimize(opts OptimizeOptions) (OptimizeResult, error) {
	im.mu.Lock()
	defer im.mu.Unlock()
	var res OptimizeResult
	if err := im.writable(); err != nil {
		return res, err
	}
	if im.ft.DiskType == Fixed {
		return res, fmt.Errorf("vhd: %s: %w: a fixed image has no blocks to release", im.path, disk.ErrUnsupported)
	}
	size, err := im.f.Size()
	if err != nil {
		return res, err
	}
	res.SizeBefore, res.SizeAfter = size, size
	if err := im.optimize(opts, &res); err != nil {
		im.failed = err
		return res, fmt.Errorf("vhd: %s: optimize: %w", im.path, err)
	}
	if size, err = im.f.Size(); err != nil {
		return res, err
	}
	res.SizeAfter = size
	return res, nil
}

func (im *Image) optimize(opts OptimizeOptions, res *OptimizeResult) error {
	// 1. Release.
	if err := im.flush(); err != nil {
		return err
	}
	for bi := range im.bat.n {
		if opts.Progress != nil {
			opts.Progress(bi, im.bat.n)
		}
		if im.bat.entry(bi) == batUnused {
			continue
		}
		release, err := im.addsNothing(bi, opts.Full)
		if err != nil {
			return err
		}
		if release {
			im.unallocate(bi)
			res.Released++
		}
	}
	if opts.Progress != nil {
		opts.Progress(im.bat.n, im.bat.n)
	}
	if err := im.flush(); err != nil {
		return err
	}

	// 2. The header, locator data and BAT first, when a header move (Resize,
	// SetParent) left them above space they fit in.
	if err := im.lowerHeader(); err != nil {
		return err
	}
	blockSpan := im.bitmapSize + im.blockSize
	plan := im.newMovePlan(blockSpan)
	buf := make([]byte, min(blockSpan, 1<<20))
	for {
		moves := plan.next(maxMoveBatch)
		if len(moves) == 0 {
			break
		}
		for _, m := range moves {
			for done := int64(0); done < blockSpan; {
				n := min(int64(len(buf)), blockSpan-done)
				if err := readFull(im.f, buf[:n], m.from+done); err != nil {
					return err
				}
				if _, err := im.f.WriteAt(buf[:n], m.to+done); err != nil {
					return err
				}
				done += n
			}
		}
		// Flush syncs the copies before it writes the BAT sectors.
		for _, m := range moves {
			im.bat.set(m.bi, uint32(m.to/SectorSize))
			im.dirtyBAT[4*m.bi/SectorSize] = true
		}
		if err := im.flush(); err != nil {
			return err
		}
		res.Moved += len(moves)
		if opts.Progress != nil {
			steps := im.bat.n + int64(res.Moved)
			opts.Progress(steps, steps)
		}
	}

	// 3. Cut.
	end := alignUp(im.usedEnd(), SectorSize)
	if end < im.footerAt {
		if _, err := im.f.WriteAt(im.footerRaw[:], end); err != nil {
			return err
		}
		if err := im.f.Sync(); err != nil {
			return err
		}
		if err := im.f.Truncate(end + footerSize); err != nil {
			return err
		}
		if err := im.f.Sync(); err != nil {
			return err
		}
		im.footerAt, im.nextAlloc = end, end
	}

	// 4. Punch.
	for _, s := range im.freeSpans() {
		// Whole 4 KiB pages: the file system frees nothing smaller.
		lo, hi := alignUp(s.off, 4096), s.end/4096*4096
		if hi-lo < 4096 {
			continue
		}
		err := storage.Punch(im.f, lo, hi-lo)
		if errors.Is(err, storage.ErrPunchUnsupported) {
			res.PunchUnsupported = true
			break
		}
		if err != nil {
			return err
		}
		res.BytesPunched += hi - lo
	}
	return im.f.Sync()
}

// addsNothing reports whether allocated block bi adds nothing to what
// lies below it: no sector stored, or (full) every stored sector equal to
// the one below.
func (im *Image) addsNothing(bi int64, full bool) (bool, error) {
	bm, err := im.bitmap(bi)
	if err != nil {
		return false, err
	}
	sectors := im.blockSize / SectorSize
	// Sectors past the disk's end (in its last block) do not count.
	sectors = min(sectors, (im.size-bi*im.blockSize+SectorSize-1)/SectorSize)
	data := int64(im.bat.entry(bi))*SectorSize + im.bitmapSize
	var stored, below []byte
	for s := int64(0); s < sectors; {
		set, t := bitRun(bm, s, sectors)
		if set {
			if !full {
				return false, nil
			}
			for lo := s; lo < t; {
				n := min(t-lo, 2048) // 1 MiB at a time
				stored = grow(stored, n*SectorSize)
				below = grow(below, n*SectorSize)
				if err := readFull(im.f, stored, data+lo*SectorSize); err != nil {
					return false, err
				}
				off := bi*im.blockSize + lo*SectorSize
				// The disk may end inside the last sector.
				m := min(int64(len(below)), im.size-off)
				if err := im.readBelow(below[:m], off); err != nil {
					return false, err
				}
				if !bytes.Equal(stored[:m], below[:m]) {
					return false, nil
				}
				lo += n
			}
		}
		s = t
	}
	return true, nil
}

func grow(b []byte, n int64) []byte {
	if int64(cap(b)) < n {
		return make([]byte, n)
	}
	return b[:n]
}

// usedSpans lists the file's structures in use, by offset: the footer
// copy, the header, the BAT (its whole table), the locator data (with the
// space reserved for it) and the blocks.
func (im *Image) usedSpans() []span {
	blockSpan := im.bitmapSize + im.blockSize
	used := []span{{0, footerSize, "footer copy"}, {im.hdrOff, im.hdrOff + headerSize, "dynamic header"},
		{im.bat.off, im.bat.off + max(alignUp(4*int64(im.hdr.MaxTableEntries), SectorSize), int64(len(im.bat.raw))), "BAT"}}
	for _, e := range im.hdr.Locators {
		if e.Code != platformNone && e.DataLength > 0 {
			space := int64(e.DataSpace)
			if space < int64(e.DataLength) {
				space *= SectorSize
			}
			used = append(used, span{int64(e.DataOffset), int64(e.DataOffset) + max(space, int64(e.DataLength)), "parent locator"})
		}
	}
	for i := range im.bat.n {
		if e := im.bat.entry(i); e != batUnused {
			used = append(used, span{int64(e) * SectorSize, int64(e)*SectorSize + blockSpan, "block"})
		}
	}
	slices.SortFunc(used, func(a, b span) int { return int(min(max(a.off-b.off, -1), 1)) })
	return used
}

// usedEnd is the end of the last structure in use.
func (im *Image) usedEnd() int64 {
	var end int64
	for _, u := range im.usedSpans() {
		end = max(end, u.end)
	}
	return end
}

// freeSpans lists, by offset, the space before the footer no structure
// refers to.
func (im *Image) freeSpans() []span {
	var free []span
	pos := int64(0)
	for _, u := range append(im.usedSpans(), span{im.footerAt, im.footerAt, ""}) {
		if u.off > pos {
			free = append(free, span{pos, min(u.off, im.footerAt), ""})
		}
		pos = max(pos, u.end)
	}
	return free
}

// blockMove is one block to copy from one place of the file to another.
type blockMove struct{ bi, from, to int64 }

// movePlan picks the moves of step 2: the blocks from the highest down,
// each into the lowest free space below it where a block fits with its
// data on the boundary allocate uses. The free space is what nothing
// referred to when the plan was made; the places blocks leave are never
// needed as destinations (every block above them has had its turn), so
// the plan stays valid across batches without looking at them, and it
// takes O(n log n) time for n blocks in all.
type movePlan struct {
	blocks    []blockMove // by offset, highest first; to unused
	free      []span      // by offset
	cursor    int         // free[:cursor] hold no block
	blockSpan int64
	align     int64
	bitmap    int64
	done      bool
}

func (im *Image) newMovePlan(blockSpan int64) *movePlan {
	p := &movePlan{free: im.freeSpans(), blockSpan: blockSpan, align: 4096, bitmap: im.bitmapSize}
	if im.blockSize < p.align {
		p.align = SectorSize
	}
	for i := range im.bat.n {
		if e := im.bat.entry(i); e != batUnused {
			p.blocks = append(p.blocks, blockMove{bi: i, from: int64(e) * SectorSize})
		}
	}
	slices.SortFunc(p.blocks, func(a, b blockMove) int { return int(min(max(b.from-a.from, -1), 1)) })
	return p
}

// next returns up to n moves, none once the highest block left cannot
// move down (lower ones moving would not shrink the file).
func (p *movePlan) next(n int) []blockMove {
	var moves []blockMove
	for !p.done && len(moves) < n && len(p.blocks) > 0 {
		b := p.blocks[0]
		for p.cursor < len(p.free) && p.start(p.free[p.cursor])+p.blockSpan > p.free[p.cursor].end {
			p.cursor++ // too small for any block
		}
		if p.cursor == len(p.free) {
			p.done = true
			break
		}
		f := p.free[p.cursor]
		start := p.start(f)
		if start+p.blockSpan > b.from {
			p.done = true
			break
		}
		b.to = start
		moves = append(moves, b)
		p.blocks = p.blocks[1:]
		// What is left of the space, after the block; the piece before it
		// (alignment) is too small for a block.
		p.free[p.cursor].off = start + p.blockSpan
	}
	return moves
}

// start is where a block placed in f starts.
func (p *movePlan) start(f span) int64 {
	return alignUp(alignUp(f.off, SectorSize)+p.bitmap, p.align) - p.bitmap
}

// lowerHeader moves the header, its locator data and the BAT into the
// lowest space nothing refers to that lies below them and holds them all,
// if there is such space (see Optimize, step 2). Locators it cannot
// rewrite (an undecoded platform) keep everything where it is.
func (im *Image) lowerHeader() error {
	var locs []locatorData
	metaStart := min(im.hdrOff, im.bat.off)
	for _, e := range im.hdr.Locators {
		if e.Code == platformNone || e.DataLength == 0 {
			continue
		}
		if !e.known() {
			return nil
		}
		data := make([]byte, e.DataLength) // bounded by maxLocatorLength at Open
		if err := readFull(im.f, data, int64(e.DataOffset)); err != nil {
			return err
		}
		locs = append(locs, locatorData{e.Code, data})
		metaStart = min(metaStart, int64(e.DataOffset))
	}
	batRaw := im.batFor(im.bat.n)
	need := relocatedSize(locs, batRaw)
	for _, f := range im.freeSpans() {
		at := alignUp(f.off, SectorSize)
		if at+need > metaStart {
			return nil
		}
		if at+need <= f.end {
			h := im.hdr
			h.MaxTableEntries = uint32(im.bat.n)
			return im.relocateAt(h, locs, batRaw, im.ft, at)
		}
	}
	return nil
}
