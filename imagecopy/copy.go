// Package imagecopy copies ranges of one disk image into another: the one
// copy engine under convert, checkpoint export, and the offline and live
// merges.
//
// The caller gives the extents to copy (data, and zeros); the engine
// writes them into the target, in order, piece by piece:
//
//   - Data moves file to file where it can: when the source tells where a
//     range lives (Locator: VHDX, VHD, raw) and the target can take a range
//     from a file (FileWriter: VHDX, raw), the bytes go by
//     storage.CopyRange — cloned where the file system shares blocks
//     (XFS, btrfs), copied in the kernel elsewhere — without passing
//     through the engine. Otherwise they are read and written.
//   - Zeros are written as zeros (disk.Zeroer) unless the target already
//     reads zeros there (Fresh). With DetectZeros, data is read first and
//     granules that read as zeros count as zeros; with Base, only the
//     sectors where the source differs from what the target reads
//     through (a differencing target's parent) are written.
//
// A reader goroutine reads ahead of the writer where bytes must be read;
// moves need no reading. Progress, pacing, a resume position, periodic
// durability reports and cancellation are the caller's through Options;
// Stats says how many bytes were cloned, copied in the kernel, copied,
// zeroed and skipped.
package imagecopy

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"time"

	"github.com/vhdkit/vhdkit/disk"
	"github.com/vhdkit/vhdkit/storage"
)

// A Locator tells where the bytes of a range are stored: in f at fileOff,
// contiguously, for the first m bytes of [off, off+n) (0 < m <= n); f is
// nil when those m bytes are stored in no file as they read (zeros, a
// sector bitmap's gap). vhdx, vhd and raw images are Locators.
type Locator interface {
	Locate(off, n int64) (f storage.File, fileOff, m int64, err error)
}

// A FileWriter writes a range of the disk with bytes taken from a file
// range, file to file (storage.CopyRange), allocating what the range
// needs. vhdx and raw images are FileWriters.
type FileWriter interface {
	WriteFromFile(off, n int64, src storage.File, srcOff int64) (storage.Moved, error)
}

// Options control a copy.
type Options struct {
	// Fresh says the target reads zeros wherever nothing is written (a
	// new image): ranges that read as zeros are left alone. Otherwise
	// they are written as zeros.
	Fresh bool
	// DetectZeros reads data ranges and treats granules (64 KiB) that
	// read as zeros as zeros. Without it data is moved as stored, which
	// lets a clone take whole ranges without reading them.
	DetectZeros bool
	// Base, when set, is what the target reads through (a differencing
	// target's parent): only the sectors (of Sector bytes) where the
	// source differs from it are written.
	Base   disk.Image
	Sector int
	// From resumes a copy: the ranges below this offset are already in
	// the target (Durable said so).
	From int64
	// Progress, when set, is called after each piece.
	Progress func(Progress)
	// Pace, when set, is called after each piece with its length; it may
	// sleep to limit the bandwidth.
	Pace func(n int64)
	// Durable, when set, is told every DurableEvery (default 1 s), after
	// a flush of the target, that every range below off is durable in it.
	Durable      func(off int64)
	DurableEvery time.Duration
	// Step, when set, runs each piece of [off, off+n): it must call copy
	// once and return its error (a live merge holds the range's lock and
	// the disk's I/O lock around it). Pieces are then never read ahead.
	Step func(off, n int64, copy func() error) error
	// NoMove reads and writes every byte, even where a file range could
	// be moved (for comparisons).
	NoMove bool
	// MaxPiece, when set, caps a piece below its default 4 MiB (a live
	// merge holds a client write to the piece's range while it copies).
	MaxPiece int64
	// JoinGaps says the target reads what the source reads between the
	// extents (a merge's target under the merged layers; a fresh target
	// and a source reading zeros there): where the file system clones,
	// one file range may then carry two data extents and the gap
	// between them (under joinGapMax), when the source stores the gap in
	// that file range as it reads (see vhdx's Locate), so that one clone
	// replaces two. The gaps so carried count as Skipped, and in
	// Progress. Not with Step.
	JoinGaps bool
}

// Stats counts what a copy did with the bytes of its extents.
type Stats struct {
	storage.Moved       // data bytes: cloned, copied in the kernel, copied
	Zeroed        int64 // bytes written as zeros
	Skipped       int64 // bytes left alone: zeros in a fresh target, or what Base holds already
}

// Progress is the state of a copy after a piece.
type Progress struct {
	Done, Total int64 // bytes of the extents handled, of all
	Stats
}

// Piece sizes: a read piece is large so that each costs few calls into the
// formats, and ends on a multiple of its size so that pieces line up with
// the target's blocks; written out in pieces of at most maxWrite; zero
// detection works on granules.
const (
	pieceSize     = 4 << 20
	movePieceSize = 64 << 20
	readBuffers   = 6        // read pieces in flight between reader and writer
	zeroGranule   = 64 << 10 // all-zero granules of the source are zeros
	// maxWrite caps one WriteAt: on Linux (ext4), copying a 4 MiB write
	// into the page cache costs several times the kernel time of four
	// 1 MiB writes, measured; reads show no such effect.
	maxWrite = 1 << 20
)

// span is a range [off, off+n) of a piece, relative to its start.
type span struct{ off, n int64 }

// piece is a part of one extent handed from the reader to the writer.
type piece struct {
	off, n int64
	move   bool   // data to move: located and written by the writer
	zero   bool   // zeros to write (not Fresh)
	buf    []byte // bytes read; nil for move, zero and skipped pieces
	shared bool   // buf is the engine's zero buffer, not one to recycle
	writes []span // ranges of buf to write (of zeros, if the bytes are)
}

// copier is the state of one Copy.
type copier struct {
	dst, src disk.Image
	opts     Options
	loc      Locator    // src, when it can tell
	fw       FileWriter // dst, when it can take file ranges
	stats    Stats
	done     int64
	total    int64
	// cloning: moves of bytes already read still clone (on a file system
	// that only copies, writing the buffer is cheaper than a kernel copy
	// that reads the bytes again).
	cloning bool
	// gaps are the ranges between data extents joined into one (JoinGaps),
	// in order; nextGap indexes the first not behind the copy.
	gaps       []span
	nextGap    int
	free       chan []byte
	made       int
	zeroBuf    []byte
	baseBuf    []byte
	lastReport time.Time
}

// Copy copies the extents (data, zero and hole; in order, not
// overlapping) of src into dst and returns what it did. On an error the
// target holds some of the ranges; the stats count what was done.
func Copy(ctx context.Context, dst, src disk.Image, extents []disk.Extent, opts Options) (Stats, error) {
	c := &copier{dst: dst, src: src, opts: opts, cloning: true}
	if opts.DurableEvery <= 0 {
		c.opts.DurableEvery = time.Second
	}
	if opts.Base != nil && opts.Sector <= 0 {
		c.opts.Sector = 512
	}
	if !opts.NoMove {
		c.loc, _ = src.(Locator)
		c.fw, _ = dst.(FileWriter)
	}
	todo := extents // unless a resumed copy cuts it
	if opts.From > 0 {
		todo = nil
	}
	for _, e := range extents {
		c.total += e.Length
		if opts.From <= 0 {
			continue
		}
		if end := e.Offset + e.Length; end <= opts.From {
			c.done += e.Length
			continue
		} else if e.Offset < opts.From {
			c.done += opts.From - e.Offset
			e.Length, e.Offset = end-opts.From, opts.From
		}
		todo = append(todo, e)
	}
	if opts.JoinGaps && opts.Step == nil && c.canMove() {
		todo, c.gaps = joinGaps(todo)
		for _, g := range c.gaps {
			c.total += g.n // done counts them as they pass
		}
	}
	err := c.run(ctx, todo)
	return c.stats, err
}

// canMove says whether data can go file to file without being read.
func (c *copier) canMove() bool {
	return c.loc != nil && c.fw != nil && !c.opts.DetectZeros && c.opts.Base == nil
}

func (c *copier) run(ctx context.Context, todo []disk.Extent) error {
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	c.free = make(chan []byte, readBuffers)
	c.zeroBuf = make([]byte, pieceSize)
	c.lastReport = time.Now()
	if c.opts.Progress != nil && c.done > 0 {
		c.opts.Progress(Progress{Done: c.done, Total: c.total, Stats: c.stats})
	}
	if c.opts.Step != nil {
		// No read-ahead: each piece is read inside its Step.
		for _, e := range todo {
			err := c.pieces(ctx, e, func(p piece) error {
				err := c.opts.Step(p.off, p.n, func() error {
					if err := c.fill(&p); err != nil {
						return err
					}
					defer c.recycle(p)
					return c.put(p)
				})
				if err != nil {
					return err
				}
				// Outside the Step: pacing may sleep, a durable report
				// flushes.
				return c.after(p.n, p.off+p.n)
			})
			if err != nil {
				return err
			}
		}
		return ctx.Err()
	}
	pieces := make(chan piece, readBuffers)
	readerDone := make(chan error, 1)
	go func() {
		var err error
		defer func() {
			if r := recover(); r != nil {
				err = fmt.Errorf("internal error while reading: %v", r)
			}
			close(pieces)
			readerDone <- err
		}()
		for _, e := range todo {
			err = c.pieces(ctx, e, func(p piece) error {
				if err := c.fill(&p); err != nil {
					return err
				}
				select {
				case pieces <- p:
					return nil
				case <-ctx.Done():
					c.recycle(p)
					return ctx.Err()
				}
			})
			if err != nil {
				return
			}
		}
	}()
	var werr error
	for p := range pieces {
		if werr == nil {
			if werr = ctx.Err(); werr == nil {
				werr = c.put(p)
			}
			if werr == nil {
				werr = c.after(p.n, p.off+p.n)
			}
			if werr != nil {
				cancel() // stop the reader; keep draining its pieces
			}
		}
		c.recycle(p)
	}
	rerr := <-readerDone
	if werr != nil {
		return werr
	}
	if rerr != nil {
		return rerr
	}
	return ctx.Err()
}

// pieces cuts extent e into pieces ending on multiples of pieceSize and
// hands each to fn, unfilled.
func (c *copier) pieces(ctx context.Context, e disk.Extent, fn func(piece) error) error {
	for off, end := e.Offset, e.Offset+e.Length; off < end; {
		if err := ctx.Err(); err != nil {
			return err
		}
		size := int64(pieceSize)
		if e.Type == disk.Data && c.canMove() {
			size = movePieceSize // nothing is read: larger pieces, fewer calls
		}
		next := min(end, (off/size+1)*size)
		if c.opts.MaxPiece > 0 {
			next = min(next, off+c.opts.MaxPiece)
		}
		p := piece{off: off, n: next - off}
		switch {
		case e.Type == disk.Data && c.canMove():
			p.move = true
		case e.Type == disk.Data:
			p.buf = []byte{} // to read
		case c.opts.Base != nil:
			p.buf, p.shared = c.zeroBuf[:p.n], true // zeros to compare with Base
		case !c.opts.Fresh:
			p.zero = true
		}
		if err := fn(p); err != nil {
			return err
		}
		off = next
	}
	return nil
}

// fill reads a piece's bytes, if it has any to read, and decides what of
// them to write.
func (c *copier) fill(p *piece) error {
	if p.buf == nil {
		return nil
	}
	if !p.shared {
		b, err := c.buffer()
		if err != nil {
			return err
		}
		p.buf = b[:p.n]
		if err := readFull(c.src, p.buf, p.off); err != nil {
			c.recycle(*p)
			return err
		}
	}
	switch {
	case c.opts.Base != nil:
		return c.baseDiff(p)
	case c.opts.DetectZeros:
		p.writes = nonZeroSpans(p.buf, zeroGranule)
	default:
		p.writes = []span{{0, p.n}}
	}
	return nil
}

// baseDiff keeps the runs of sectors where the piece differs from Base.
func (c *copier) baseDiff(p *piece) error {
	if c.baseBuf == nil {
		c.baseBuf = make([]byte, pieceSize)
	}
	b := c.baseBuf[:p.n]
	if err := readFull(c.opts.Base, b, p.off); err != nil {
		c.recycle(*p)
		return fmt.Errorf("reading the base: %w", err)
	}
	if !bytes.Equal(p.buf, b) {
		p.writes = diffSpans(p.buf, b, c.opts.Sector, p.off)
	}
	return nil
}

// buffer returns a free read buffer, making one while fewer than
// readBuffers exist. Only the reader takes buffers; the writer returns
// them, so one comes back as long as some are in flight.
func (c *copier) buffer() ([]byte, error) {
	select {
	case b := <-c.free:
		return b, nil
	default:
	}
	if c.made < readBuffers {
		c.made++
		return make([]byte, pieceSize), nil
	}
	return <-c.free, nil
}

func (c *copier) recycle(p piece) {
	if p.buf != nil && !p.shared && cap(p.buf) == pieceSize {
		select {
		case c.free <- p.buf[:pieceSize]:
		default:
		}
	}
}

// put writes a piece into the target.
func (c *copier) put(p piece) error {
	var err error
	switch {
	case p.move:
		err = c.move(p.off, p.n)
	case p.zero:
		err = c.zero(p.off, p.n)
	case p.buf == nil:
		c.stats.Skipped += p.n
	default:
		err = c.write(p)
	}
	return err
}

// after accounts for n bytes done, up to end: progress, durability,
// pacing.
func (c *copier) after(n, end int64) error {
	c.done += n
	if c.opts.Durable != nil && time.Since(c.lastReport) >= c.opts.DurableEvery {
		if err := c.dst.Flush(); err != nil {
			return err
		}
		c.lastReport = time.Now()
		c.opts.Durable(end)
	}
	if c.opts.Progress != nil {
		c.opts.Progress(Progress{Done: c.done, Total: c.total, Stats: c.stats})
	}
	if c.opts.Pace != nil {
		c.opts.Pace(n)
	}
	return nil
}

// joinGapMax is the longest gap between two data extents that JoinGaps
// joins: a clone of a hole costs next to nothing, but a gap as long as a
// block is worth its own pair of calls rather than a block allocated for it.
const joinGapMax = 1 << 20

// joinGaps joins data extents less than joinGapMax apart into one and
// returns the gaps so joined.
func joinGaps(todo []disk.Extent) ([]disk.Extent, []span) {
	var joined []disk.Extent
	gaps := make([]span, 0, len(todo))
	for _, e := range todo {
		if k := len(joined); k > 0 && e.Type == disk.Data && joined[k-1].Type == disk.Data {
			last := &joined[k-1]
			if gap := e.Offset - (last.Offset + last.Length); gap > 0 && gap < joinGapMax {
				gaps = append(gaps, span{last.Offset + last.Length, gap})
				last.Length = e.Offset + e.Length - last.Offset
				continue
			}
		}
		joined = append(joined, e)
	}
	return joined, gaps
}

// gapFrom returns the index of the first joined gap ending after off
// (len(c.gaps) when none does); off never goes back.
func (c *copier) gapFrom(off int64) int {
	for c.nextGap < len(c.gaps) && c.gaps[c.nextGap].off+c.gaps[c.nextGap].n <= off {
		c.nextGap++
	}
	return c.nextGap
}

// notGaps takes the bytes of the joined gaps from gap i on that lie
// before end out of what a move counts: they were carried (as holes,
// mostly) but the target read them so already; they count as skipped.
func (c *copier) notGaps(m storage.Moved, i int, end int64) storage.Moved {
	for _, g := range c.gaps[i:] {
		if g.off >= end {
			break
		}
		n := min(g.off+g.n, end) - g.off
		c.stats.Skipped += n
		for _, k := range []*int64{&m.Cloned, &m.KernelCopied, &m.Copied} {
			d := min(n, *k)
			*k -= d
			n -= d
		}
	}
	return m
}

// move carries [off, off+n) of data file to file where the source tells
// where it lives, through memory elsewhere. Runs the source reports one
// after the other (block by block, say) that lie back to back in one file
// go as one range: one clone instead of several. Joined gaps are skipped,
// unless a file range the source reports carries one between two data
// runs while the copy clones.
func (c *copier) move(off, n int64) error {
	var run struct {
		f            storage.File
		off, fileOff int64
		n            int64
		gap          int // index of the first joined gap after off
	}
	flush := func() error {
		if run.n == 0 {
			return nil
		}
		moved, err := c.fw.WriteFromFile(run.off, run.n, run.f, run.fileOff)
		c.stats.Moved = c.stats.Moved.Add(c.notGaps(moved, run.gap, run.off+run.n))
		if moved.Total() > 0 && moved.Cloned == 0 {
			c.cloning = false // these files do not clone
		}
		run.n = 0
		return err
	}
	for end := off + n; off < end; {
		i := c.gapFrom(off)
		var gap span // the next joined gap, if any
		if i < len(c.gaps) {
			gap = c.gaps[i]
		}
		if gap.n > 0 && gap.off <= off {
			if err := flush(); err != nil {
				return err
			}
			next := min(end, gap.off+gap.n)
			c.stats.Skipped += next - off // the target reads it so already
			off = next
			continue
		}
		// Data up to the next gap; further only once the copy clones (a
		// kernel copy or a copy through memory would write the gap's
		// zeros, and allocate for them).
		limit := end
		if gap.n > 0 && !(c.cloning && c.stats.Cloned > 0) {
			limit = min(end, gap.off)
		}
		f, fileOff, m, err := c.loc.Locate(off, limit-off)
		if err != nil {
			return fmt.Errorf("locating [%d, +%d) in the source: %w", off, limit-off, err)
		}
		if m <= 0 || m > limit-off {
			return fmt.Errorf("locating [%d, +%d) in the source: %d bytes reported", off, limit-off, m)
		}
		if f == nil && gap.n > 0 {
			m = min(m, gap.off-off) // read and written only where data is
		}
		for _, g := range c.gaps[i:] {
			if g.off >= off+m {
				break
			}
			if off+m <= g.off+g.n {
				m = g.off - off // a file range ending in a gap stops where it starts
				break
			}
		}
		switch {
		case f != nil && run.n > 0 && off == run.off+run.n && fileOff == run.fileOff+run.n && sameFile(f, run.f):
			run.n += m
		case f != nil:
			if err := flush(); err != nil {
				return err
			}
			run.f, run.off, run.fileOff, run.n, run.gap = f, off, fileOff, m, i
		default:
			if err := flush(); err != nil {
				return err
			}
			if err := c.through(off, m); err != nil {
				return err
			}
		}
		off += m
	}
	return flush()
}

// sameFile reports whether a and b are one File (false for kinds of File
// that cannot be compared).
func sameFile(a, b storage.File) (same bool) {
	defer func() {
		if recover() != nil {
			same = false
		}
	}()
	return a == b
}

// through copies [off, off+n) by reading it; what reads as zeros is
// written as zeros.
func (c *copier) through(off, n int64) error {
	buf := c.zeroBuf[:0:0]
	for end := off + n; off < end; {
		k := min(end-off, maxWrite)
		if cap(buf) < int(k) {
			buf = make([]byte, maxWrite)
		}
		b := buf[:k]
		if err := readFull(c.src, b, off); err != nil {
			return err
		}
		if disk.IsZero(b) {
			if err := c.zero(off, k); err != nil {
				return err
			}
		} else {
			if _, err := c.dst.WriteAt(b, off); err != nil {
				return fmt.Errorf("writing at offset %d: %w", off, err)
			}
			c.stats.Copied += k
		}
		off += k
	}
	return nil
}

// zero makes [off, off+n) of the target read as zeros, unless it does.
func (c *copier) zero(off, n int64) error {
	if c.opts.Fresh {
		c.stats.Skipped += n
		return nil
	}
	if err := zeroRange(c.dst, off, n); err != nil {
		return fmt.Errorf("zeroing at offset %d: %w", off, err)
	}
	c.stats.Zeroed += n
	return nil
}

// write writes a read piece's spans; the gaps between them read as zeros
// in the source (or as Base) and are zeroed unless the target reads them
// so already.
func (c *copier) write(p piece) error {
	at := int64(0)
	for _, s := range p.writes {
		if err := c.gap(p, at, s.off); err != nil {
			return err
		}
		if err := c.writeSpan(p, s); err != nil {
			return err
		}
		at = s.off + s.n
	}
	return c.gap(p, at, p.n)
}

// gap handles [from, to) of a piece between written spans.
func (c *copier) gap(p piece, from, to int64) error {
	if from >= to {
		return nil
	}
	if c.opts.Base != nil {
		c.stats.Skipped += to - from // the target reads it through Base
		return nil
	}
	return c.zero(p.off+from, to-from)
}

// writeSpan writes one span of a read piece: moved file to file while
// moves clone (the bytes need not be written again), else from memory.
func (c *copier) writeSpan(p piece, s span) error {
	off, data := p.off+s.off, p.buf[s.off:s.off+s.n]
	for len(data) > 0 {
		k := min(int64(len(data)), maxWrite)
		if c.cloning && c.loc != nil && c.fw != nil && !p.shared {
			f, fileOff, m, err := c.loc.Locate(off, int64(len(data)))
			if err != nil {
				return fmt.Errorf("locating [%d, +%d) in the source: %w", off, len(data), err)
			}
			k = min(m, int64(len(data)))
			if f != nil && k > 0 {
				moved, err := c.fw.WriteFromFile(off, k, f, fileOff)
				c.stats.Moved = c.stats.Moved.Add(moved)
				if err != nil {
					return err
				}
				if moved.Cloned == 0 {
					c.cloning = false // these files do not clone
				}
				data, off = data[k:], off+k
				continue
			}
			k = min(max(k, 1), maxWrite)
		}
		if _, err := c.dst.WriteAt(data[:k], off); err != nil {
			return fmt.Errorf("writing at offset %d: %w", off, err)
		}
		if p.shared {
			c.stats.Zeroed += k
		} else {
			c.stats.Copied += k
		}
		data, off = data[k:], off+k
	}
	return nil
}

func readFull(im disk.Image, p []byte, off int64) error {
	n, err := im.ReadAt(p, off)
	if n == len(p) {
		return nil
	}
	if err == nil {
		err = errors.New("short read")
	}
	return fmt.Errorf("reading at offset %d: %w", off+int64(n), err)
}

// zeroRange makes [off, off+n) of im read as zeros: with the image's own
// zeroing where it has one, else by writing zeros.
func zeroRange(im disk.Image, off, n int64) error {
	if z, ok := im.(disk.Zeroer); ok {
		return z.WriteZeroes(off, n, true)
	}
	var zeros [64 << 10]byte
	for n > 0 {
		k := min(n, int64(len(zeros)))
		if _, err := im.WriteAt(zeros[:k], off); err != nil {
			return err
		}
		off, n = off+k, n-k
	}
	return nil
}

// nonZeroSpans returns the runs of granules of data that hold a non-zero
// byte, adjacent ones merged.
func nonZeroSpans(data []byte, granule int) []span {
	var spans []span
	for i := 0; i < len(data); i += granule {
		g := data[i:min(len(data), i+granule)]
		if disk.IsZero(g) {
			continue
		}
		if n := len(spans); n > 0 && spans[n-1].off+spans[n-1].n == int64(i) {
			spans[n-1].n += int64(len(g))
		} else {
			spans = append(spans, span{int64(i), int64(len(g))})
		}
	}
	return spans
}

// diffSpans returns the runs of sectors (of sector bytes, counted from
// disk offset 0; base is a's disk offset) where a and b differ.
func diffSpans(a, b []byte, sector int, base int64) []span {
	var spans []span
	i := 0
	for i < len(a) {
		// The first sector may start before a when base is unaligned.
		j := min(len(a), i+sector-int((base+int64(i))%int64(sector)))
		if !bytes.Equal(a[i:j], b[i:j]) {
			if n := len(spans); n > 0 && spans[n-1].off+spans[n-1].n == int64(i) {
				spans[n-1].n += int64(j - i)
			} else {
				spans = append(spans, span{int64(i), int64(j - i)})
			}
		}
		i = j
	}
	return spans
}
