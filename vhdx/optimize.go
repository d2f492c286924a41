package vhdx

import (
	"cmp"
	"errors"
	"fmt"
	"slices"

	"github.com/vhdkit/vhdkit/disk"
	"github.com/vhdkit/vhdkit/storage"
)

// OptimizeOptions control Optimize.
type OptimizeOptions struct {
	// Full also reads every block: a block that reads as zeros is
	// released (NOT_PRESENT in a dynamic image, ZERO in a differencing
	// one, which must not read its parent there), whole MiB of zeros
	// inside the others are punched; then blocks at the end of the file
	// move into free space below them and the file is cut after the last
	// one, as Optimize-VHD -Mode Full does.
	Full bool
	// Progress, when set, is called after each step with the steps done
	// and the steps known so far (a block read, a block moved).
	Progress func(done, total int64)
}

// OptimizeResult says what Optimize did.
type OptimizeResult struct {
	SizeBefore, SizeAfter int64 // the file's size
	Released              int   // blocks released because they read as zeros
	Moved                 int   // blocks moved down the file
}

// Optimize compacts the image at path, which no one may be using (it is
// opened for writing, which the file's lock refuses otherwise). See
// Image.Optimize.
func Optimize(path string, opts OptimizeOptions) (OptimizeResult, error) {
	im, err := Open(path, OpenOptions{})
	if err != nil {
		return OptimizeResult{}, err
	}
	res, err := im.Optimize(opts)
	if cerr := im.Close(); err == nil {
		err = cerr
	}
	return res, err
}

// Optimize gives the file's unused space back to the host, as
// Optimize-VHD does, without changing what the disk reads (its
// DataWriteGuid stays, so children stay linked). Quick mode (the zero
// options) commits pending releases and punches every free range of the
// file out of the host file. Full mode (opts.Full) first releases blocks
// that read as zeros and punches whole MiB of zeros inside the others,
// then moves the blocks at the end of the file into the free space below
// them and truncates the file after the last block or region. A fixed
// image keeps its blocks: Optimize does nothing to it.
//
// Every step is crash-safe: a block moves by copying it into free space,
// syncing, and switching its BAT entry through the log; its old space is
// freed only once the switch is durable. Before the file is cut the log is
// closed (every entry applied and synced), so no entry names a file size
// the cut file no longer has.
//
// The image stays in use meanwhile: Optimize holds its locks for one step
// at a time (a block read, a batch of moves), so reads, writes and flushes
// wait for a step, not for the whole run.
func (im *Image) Optimize(opts OptimizeOptions) (OptimizeResult, error) {
	var res OptimizeResult
	if err := im.writable(); err != nil {
		return res, err
	}
	o := optimizer{im: im, opts: opts}
	skip := false
	err := o.locked(func() error {
		size, err := im.f.Size()
		if err != nil {
			return err
		}
		res.SizeBefore = size
		if im.p.LeaveAllocated && !im.p.HasParent {
			skip = true // a fixed image keeps its blocks
			return nil
		}
		if err := im.beginWrite(false); err != nil {
			return err
		}
		if err := im.buildSpace(); err != nil {
			return err
		}
		return o.commit(nil)
	})
	if err == nil && !skip && opts.Full {
		err = o.releaseZeros(&res)
	}
	if err == nil && !skip {
		err = o.locked(o.punchFree)
	}
	if err == nil && !skip && opts.Full {
		err = o.compact(&res)
	}
	if err == nil && !skip && opts.Full {
		err = o.locked(o.truncate)
	}
	if err == nil {
		err = o.locked(func() error {
			res.SizeAfter, err = im.f.Size()
			return err
		})
	}
	if err != nil {
		return res, fmt.Errorf("vhdx: optimize %s: %w", im.path, err)
	}
	return res, nil
}

// optimizer runs Optimize's steps.
type optimizer struct {
	im          *Image
	opts        OptimizeOptions
	done, total int64
}

// locked runs one step holding the image's flushMu and mu.
func (o *optimizer) locked(step func() error) error {
	im := o.im
	im.flushMu.Lock()
	defer im.flushMu.Unlock()
	im.mu.Lock()
	defer im.mu.Unlock()
	if im.closed {
		return errClosed
	}
	return step()
}

func (o *optimizer) step() {
	o.done++
	if o.opts.Progress != nil {
		o.opts.Progress(o.done, max(o.total, o.done))
	}
}

// commit makes the dirty pages durable as Flush does, then frees the space
// they released and freed (punched out of the host file). The locks are
// held.
func (o *optimizer) commit(freed []fileRange) error {
	im := o.im
	released := append(im.space.takePending(), freed...)
	if err := im.commitDirty(); err != nil {
		im.space.release(released...)
		return err
	}
	for _, r := range released {
		r.zero = storage.Punch(im.f, r.off, r.end-r.off) == nil
		im.space.add(r)
	}
	return nil
}

// releaseZeros reads every fully present block, one step each: one that
// reads as zeros is released, whole MiB of zeros in the others are
// punched.
func (o *optimizer) releaseZeros(res *OptimizeResult) error {
	im := o.im
	err := o.locked(func() error {
		g := &im.geo
		for b := int64(0); b < g.dataBlocks; b++ {
			if batState(im.bat[g.payloadIndex(b)]) == payloadFullyPresent {
				o.total++
			}
		}
		return nil
	})
	if err != nil {
		return err
	}
	buf := make([]byte, mib)
	for b := int64(0); ; b++ {
		more := false
		err := o.locked(func() error {
			g := &im.geo
			if b >= g.dataBlocks { // the disk may have shrunk meanwhile
				return nil
			}
			more = true
			idx := g.payloadIndex(b)
			if batState(im.bat[idx]) != payloadFullyPresent {
				return nil
			}
			released, err := im.releaseIfZero(idx, b, buf)
			if released {
				res.Released++
			}
			o.step()
			return err
		})
		if err != nil {
			return err
		}
		if !more {
			break
		}
	}
	return o.locked(func() error { return o.commit(nil) })
}

// releaseIfZero reads fully present block b (entry idx): if it reads as
// zeros it is released (NOT_PRESENT, or ZERO over a parent), else its
// whole MiB of zeros are punched. The caller holds mu for writing.
func (im *Image) releaseIfZero(idx, b int64, buf []byte) (bool, error) {
	g := &im.geo
	e := im.bat[idx]
	// The last block may end past the disk: what lies there is not read,
	// whatever it holds.
	n := min(g.blockSize, g.virtualSize-b*g.blockSize)
	var zeroMiB []int64
	for in := int64(0); in < n; in += mib {
		k := min(mib, n-in)
		if err := im.readFile(buf[:k], batOffset(e)+in); err != nil {
			return false, err
		}
		if disk.IsZero(buf[:k]) {
			zeroMiB = append(zeroMiB, in)
		}
	}
	if int64(len(zeroMiB)) == (n+mib-1)/mib {
		state := uint8(payloadNotPresent)
		if im.parent != nil {
			state = payloadZero
		}
		if err := im.releaseBlock(batOffset(e), g.blockSize); err != nil {
			return false, err
		}
		im.setBAT(idx, batEntry(state, 0))
		return true, nil
	}
	for _, in := range zeroMiB {
		if n-in >= mib {
			if err := storage.Punch(im.f, batOffset(e)+in, mib); err != nil && !errors.Is(err, storage.ErrPunchUnsupported) {
				return false, err
			}
		}
	}
	return false, nil
}

// punchFree punches every free range not known to read as zeros. The
// locks are held.
func (o *optimizer) punchFree() error {
	im := o.im
	for i := range im.space.free {
		r := &im.space.free[i]
		if r.zero {
			continue
		}
		err := storage.Punch(im.f, r.off, r.end-r.off)
		if errors.Is(err, storage.ErrPunchUnsupported) {
			return nil
		}
		if err != nil {
			return err
		}
		r.zero = true
	}
	// Neighbours that now both read as zeros become one range.
	free := im.space.free
	im.space.free = nil
	for _, r := range free {
		im.space.add(r)
	}
	return nil
}

// liveBlock is a block the BAT names: entry idx, at [off, off+n).
type liveBlock struct{ idx, off, n int64 }

// liveBlocks lists the allocated payload and sector bitmap blocks, by
// offset.
func (im *Image) liveBlocks() []liveBlock {
	g := &im.geo
	var out []liveBlock
	for i, e := range im.bat {
		st := batState(e)
		switch {
		case (int64(i)+1)%(g.chunkRatio+1) == 0:
			if st == bitmapPresent {
				out = append(out, liveBlock{int64(i), batOffset(e), bitmapBlockSize})
			}
		case st == payloadFullyPresent || st == payloadPartiallyPresent:
			out = append(out, liveBlock{int64(i), batOffset(e), g.blockSize})
		}
	}
	slices.SortFunc(out, func(a, b liveBlock) int { return cmp.Compare(a.off, b.off) })
	return out
}

// compact moves blocks from the end of the file into the lowest free
// space below them, a batch at a time, one step each: a batch's copies are
// synced and its entries switched in one commit, then the space they left
// is freed.
func (o *optimizer) compact(res *OptimizeResult) error {
	im := o.im
	const batch = 64
	first := true
	for moved := true; moved; {
		moved = false
		err := o.locked(func() error {
			blocks := im.liveBlocks()
			if first {
				// Moves planned, for the progress: as many of the last
				// blocks as the free space below them holds.
				free := im.space.bytes()
				for i := len(blocks) - 1; i >= 0 && free >= blocks[i].n; i-- {
					o.total++
					free -= blocks[i].n
				}
				first = false
			}
			var left []fileRange
			for len(left) < batch && len(blocks) > 0 {
				b := blocks[len(blocks)-1]
				off, zero, ok := im.space.takeBelow(b.n, b.off)
				if !ok {
					break
				}
				if err := o.copyBlock(b.off, off, b.n, zero); err != nil {
					im.space.add(fileRange{off: off, end: off + b.n, zero: zero})
					return err
				}
				im.setBAT(b.idx, batEntry(batState(im.bat[b.idx]), off))
				left = append(left, fileRange{off: b.off, end: b.off + b.n})
				blocks = blocks[:len(blocks)-1]
				res.Moved++
				moved = true
				o.step()
			}
			return o.commit(left)
		})
		if err != nil {
			return err
		}
	}
	return nil
}

// copyBlock copies n bytes of the file from off to to; runs of zeros are
// not written where the destination reads as zeros already.
func (o *optimizer) copyBlock(from, to, n int64, zero bool) error {
	im := o.im
	buf := make([]byte, min(n, mib))
	for in := int64(0); in < n; in += int64(len(buf)) {
		if err := im.readFile(buf, from+in); err != nil {
			return err
		}
		if zero && disk.IsZero(buf) {
			continue
		}
		if err := im.writeFile(buf, to+in); err != nil {
			return err
		}
	}
	return nil
}

// truncate cuts the file after the last block or structure it holds. The
// log is closed first: its entries name the file's size at their time,
// which replay would find the cut file shorter than.
func (o *optimizer) truncate() error {
	im := o.im
	// Space released since the last step (by writes beside Optimize) is
	// still named by entries on disk: commit it first, so that nothing
	// the cut removes is named by an entry, in memory or on disk.
	if err := o.commit(nil); err != nil {
		return err
	}
	end := im.logOff + im.logLen
	for _, r := range im.regionTable {
		end = max(end, int64(r.Offset)+int64(r.Length))
	}
	if blocks := im.liveBlocks(); len(blocks) > 0 {
		b := blocks[len(blocks)-1]
		end = max(end, b.off+b.n)
	}
	size, err := im.f.Size()
	if err != nil {
		return err
	}
	if end >= size {
		return nil
	}
	if err := im.f.Sync(); err != nil {
		return err
	}
	if err := im.closeLog(); err != nil {
		return err
	}
	if err := im.f.Truncate(end); err != nil {
		return err
	}
	if err := im.f.Sync(); err != nil {
		return err
	}
	im.fileEnd = end
	im.space.cut(end)
	return nil
}

// takeBelow is take for a range that ends at or before limit.
func (s *freeSpace) takeBelow(n, limit int64) (off int64, zero, ok bool) {
	for i, e := range s.free {
		if e.off+n > limit {
			break
		}
		if e.end-e.off < n {
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

// cut forgets the free space at and past end.
func (s *freeSpace) cut(end int64) {
	i := 0
	for ; i < len(s.free) && s.free[i].off < end; i++ {
		s.free[i].end = min(s.free[i].end, end)
	}
	s.free = s.free[:i]
}
