package main

import (
	"bytes"
	"context"
	"errors"
	"flag"
	"fmt"
	"os"

	"github.com/vhdkit/vhdkit/disk"
	"github.com/vhdkit/vhdkit/raw"
)

func convertCommand() *command {
	return &command{
		name:     "convert",
		synopsis: "[flags] SRC DST",
		summary:  "copy a virtual disk into a new file of another format or kind (like qemu-img convert)",
		help: `SRC's format comes from its content (--format names it); DST's from its
extension (.vhdx/.avhdx, .vhd/.avhd, .img/.raw/.bin) or --output-format:
raw, VHD and VHDX convert to one another and to themselves,
any kind to any kind. Ranges of SRC that read as zeros are not written, so
they stay unallocated in a dynamic DST (and sparse in a raw one). A
differencing SRC is read through its whole chain: DST is the flattened disk.

With --parent, DST becomes a differencing VHDX or VHD whose parent is PATH,
holding only the sectors where SRC differs from PATH (like qemu-img convert -B).

A fixed VHD (--type fixed to a .vhd) is exactly the data followed by the
512-byte VHD footer: the form Azure takes, for a disk whose size is a whole
number of MiB. Azure rejects other sizes, so give the disk such a size before
converting (DST has SRC's size; a raw SRC grows with truncate -s). The VHD
keeps that exact size: where the CHS geometry cannot describe it, the footer
holds the maximum geometry, which makes QEMU read the size stored (only
Virtual PC, which sizes a disk by its geometry, would read it short).

A fixed DST (--type fixed, for a raw DST too) gets all its space from the
file system before the copy, so that no write to it can fail for lack of
space later; --sparse makes it a sparse file instead. A raw DST without
--type fixed is sparse, as with qemu-img convert.

DST must not exist; if the conversion fails, the partial DST is removed.
A block device is the exception: as DST it is written in place, raw (it must
be at least SRC's size; ranges of SRC that read as zeros are zeroed on it,
and what lies past SRC's size is left alone); as SRC it is read raw unless it
holds a VHDX or VHD, its size the device's.

A SRC another program is writing is refused; --force-share (-U) reads it
anyway, warning that the copy may be inconsistent.
A progress bar goes to stderr when it is a terminal, or with --progress.

Examples:
  vhdkit convert disk.img disk.vhdx
  vhdkit convert --type fixed --logical-sector 4096 disk.img disk.vhdx
  vhdkit convert --type fixed disk.vhdx azure.vhd  # a fixed VHD for Azure
  vhdkit convert child.avhdx flat.img              # flatten a chain
  vhdkit convert --parent base.vhdx new.img new.avhdx
  vhdkit convert disk.vhdx /dev/vg/lv              # onto a block device
  vhdkit convert -O vhdx disk.img backup.disk      # a VHDX of any name
`,
		setup: func(fs *flag.FlagSet) func(context.Context, *cli, []string) error {
			var fl imageFlags
			var progress bool
			var in input
			fs.StringVar(&fl.typ, "type", "", "`kind` of a VHDX or VHD DST: fixed or dynamic (default dynamic; differencing with --parent)")
			fs.Var(&fl.blockSize, "block-size", "block `SIZE` of DST, a power of two up to 256M (VHDX default 32M, 2M for differencing; VHD default 2M)")
			fs.IntVar(&fl.logical, "logical-sector", 0, "logical sector size of a VHDX DST in `bytes`: 512 or 4096 (default: SRC's, else 512)")
			fs.StringVar(&fl.parent, "parent", "", "make DST a differencing image of the parent `PATH`, holding only what differs from it")
			fs.BoolVar(&progress, "progress", false, "show progress on stderr even when it is not a terminal")
			addSparseFlag(fs, &fl)
			addInputFlags(fs, &in, true)
			addOutputFormat(fs, &fl, "DST")
			return func(ctx context.Context, c *cli, args []string) error {
				if len(args) != 2 {
					return usagef("want SRC and DST, got %d arguments", len(args))
				}
				return c.convert(ctx, in, fl, progress, args[0], args[1])
			}
		},
	}
}

func (c *cli) convert(ctx context.Context, in input, fl imageFlags, progress bool, srcPath, dstPath string) (err error) {
	plan, err := planImage(dstPath, fl)
	if err != nil {
		return err
	}
	if err := checkSparse(plan, fl); err != nil {
		return err
	}
	if plan.format == "raw" && fl.typ == "" {
		plan.sparse = true // a raw copy is sparse unless --type fixed asks for its space
	}
	device := disk.IsBlockDevice(dstPath)
	if device && fl.parent != "" {
		return usagef("%s is a block device: a differencing DST (--parent) is a VHDX or VHD file", dstPath)
	}
	src, err := in.open(c, srcPath, true)
	if err != nil {
		return err
	}
	defer src.Close()
	var parent disk.Image
	if fl.parent != "" {
		parent, err = openImage(fl.parent, true)
		if err != nil {
			return err
		}
		defer parent.Close()
		if parent.Size() != src.Size() {
			return fmt.Errorf("%s is %d bytes but the parent %s is %d: a differencing image has its parent's size",
				srcPath, src.Size(), fl.parent, parent.Size())
		}
	} else {
		plan.size = src.Size()
		// A VHDX copy of a disk keeps its sector sizes unless told.
		if plan.format == "vhdx" && plan.logical == 0 {
			if s, ok := src.(disk.SectorSizer); ok {
				plan.logical = s.LogicalSectorSize()
				if p := s.PhysicalSectorSize(); p >= plan.logical {
					plan.physical = p
				}
			}
		}
	}
	if device {
		return c.convertToDevice(ctx, src, srcPath, dstPath, progress)
	}
	if err := refuseExisting(dstPath); err != nil {
		return err
	}
	if parent == nil {
		sector, err := plan.sectorSize()
		if err != nil {
			return err
		}
		if src.Size()%sector != 0 {
			return fmt.Errorf("%s: its size %d is not a multiple of the logical sector size %d of %s", srcPath, src.Size(), sector, dstPath)
		}
	}
	dst, err := plan.create(dstPath)
	if err != nil {
		return allocationHint(err)
	}
	closed := false
	defer func() {
		if err != nil {
			if !closed {
				dst.Close()
			}
			os.Remove(dstPath)
		}
	}()

	cp := &imageCopy{src: src, dst: dst, parent: parent}
	if parent != nil {
		cp.sector, _ = sectorSizes(dst)
	}
	if err := cp.runWithProgress(ctx, c, progress); err != nil {
		return err
	}
	if err := dst.Flush(); err != nil {
		return err
	}
	closed = true
	return dst.Close()
}

// convertToDevice copies src onto the block device at dstPath in place:
// not created, not truncated, every byte of SRC's size written (zeros
// too: a device is not known to read zeros anywhere).
func (c *cli) convertToDevice(ctx context.Context, src disk.Image, srcPath, dstPath string, progress bool) error {
	if fi, err := os.Stat(srcPath); err == nil {
		if di, err := os.Stat(dstPath); err == nil && os.SameFile(fi, di) {
			return fmt.Errorf("%s and %s are the same device", srcPath, dstPath)
		}
	}
	dst, err := raw.Open(dstPath, disk.OpenOptions{})
	if err != nil {
		return err
	}
	if dst.Size() < src.Size() {
		dst.Close()
		return fmt.Errorf("%s is %d bytes (%s), smaller than %s (%d bytes, %s)",
			dstPath, dst.Size(), formatSize(dst.Size()), srcPath, src.Size(), formatSize(src.Size()))
	}
	cp := &imageCopy{src: src, dst: dst, dense: true}
	err = cp.runWithProgress(ctx, c, progress)
	if err == nil {
		err = dst.Flush()
	}
	if cerr := dst.Close(); err == nil {
		err = cerr
	}
	return err
}

// runWithProgress runs the copy with a progress bar on stderr when it is
// a terminal or progress asks for one.
func (cp *imageCopy) runWithProgress(ctx context.Context, c *cli, progress bool) error {
	if progress || isTerminal(c.stderr) {
		cp.progress = newProgressBar(c.stderr, cp.src.Size(), isTerminal(c.stderr))
	}
	if err := cp.run(ctx); err != nil {
		if cp.progress != nil {
			cp.progress.abort()
		}
		return err
	}
	if cp.progress != nil {
		cp.progress.finish()
	}
	return nil
}

// The copy runs as a pipeline: one goroutine reads SRC chunk by chunk and
// decides what has to be written, the caller's goroutine writes, so reading
// and writing overlap. A chunk is large so that each costs few calls into
// the formats; zero detection works on smaller granules inside it.
const (
	copyChunk   = 4 << 20  // bytes read at once
	copyBuffers = 6        // chunks in flight between reader and writer
	zeroGranule = 64 << 10 // all-zero granules of SRC are not written
	// maxWrite caps one WriteAt: on Linux (ext4), copying a 4 MiB write
	// into the page cache costs several times the kernel time of four
	// 1 MiB writes, measured; reads show no such effect.
	maxWrite = 1 << 20
)

// imageCopy copies src into a fresh dst.
type imageCopy struct {
	src, dst disk.Image
	// parent, when set, is what dst already reads through (a differencing
	// dst): only sectors where src differs from parent are written.
	parent disk.Image
	sector int // dst's logical sector size, with parent
	// dense says dst does not read zeros where nothing is written (a
	// block device): every range is written, zeros too.
	dense    bool
	progress *progressBar

	free       chan []byte // chunk buffers not in use
	allocated  int         // buffers made so far (at most copyBuffers)
	parentBuf  []byte      // the reader's buffer for parent data
	zeroChunk  []byte      // copyChunk zero bytes, never written to
	jobs       chan copyJob
	readerDone chan error
}

// copyJob is one chunk handed from the reader to the writer.
type copyJob struct {
	off    int64
	length int64  // bytes of the disk the job accounts for (for progress)
	buf    []byte // the chunk's bytes; nil when they are all zero or nothing is written
	writes []span // ranges of buf to write, relative to off
}

// span is a range [off, off+n).
type span struct{ off, n int64 }

func (cp *imageCopy) run(ctx context.Context) error {
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	cp.free = make(chan []byte, copyBuffers)
	cp.jobs = make(chan copyJob, copyBuffers)
	cp.readerDone = make(chan error, 1)
	cp.zeroChunk = make([]byte, copyChunk)
	go func() {
		var err error
		defer func() {
			if r := recover(); r != nil {
				err = fmt.Errorf("internal error while reading: %v", r)
			}
			close(cp.jobs)
			cp.readerDone <- err
		}()
		err = cp.read(ctx)
	}()

	var werr error
	for job := range cp.jobs {
		if werr == nil {
			werr = cp.write(ctx, job)
			if werr != nil {
				cancel() // stop the reader; keep draining its jobs
			}
		}
		if job.buf != nil {
			cp.free <- job.buf
		}
	}
	rerr := <-cp.readerDone
	if werr != nil {
		return werr
	}
	return rerr
}

// write performs one job on dst.
func (cp *imageCopy) write(ctx context.Context, job copyJob) error {
	if err := ctx.Err(); err != nil {
		return err
	}
	data := job.buf
	if data == nil {
		data = cp.zeroChunk
	}
	if cp.dense && job.buf == nil && len(job.writes) == 0 {
		if err := zeroRange(cp.dst, job.off, job.length); err != nil {
			return fmt.Errorf("zeroing at offset %d: %w", job.off, err)
		}
	}
	for _, s := range job.writes {
		for off, end := s.off, s.off+s.n; off < end; {
			n := min(end-off, maxWrite)
			if _, err := cp.dst.WriteAt(data[off:off+n], job.off+off); err != nil {
				return fmt.Errorf("writing at offset %d: %w", job.off+off, err)
			}
			off += n
		}
	}
	if cp.progress != nil {
		cp.progress.add(job.length)
	}
	return nil
}

// read walks src's allocation map and sends the writer a job per chunk.
func (cp *imageCopy) read(ctx context.Context) error {
	return walkExtents(ctx, cp.src, func(e disk.Extent) error {
		srcZero := e.Type != disk.Data
		switch {
		case !srcZero:
			return cp.copyRange(ctx, e.Offset, e.Length, false)
		case cp.parent == nil:
			return cp.send(ctx, copyJob{off: e.Offset, length: e.Length})
		}
		// SRC reads as zeros here: only the parent's data needs covering.
		list, err := imageExtents(cp.parent, e.Offset, e.Length)
		if err != nil {
			return fmt.Errorf("mapping the parent: %w", err)
		}
		for _, p := range list {
			if p.Type == disk.Data {
				err = cp.copyRange(ctx, p.Offset, p.Length, true)
			} else {
				err = cp.send(ctx, copyJob{off: p.Offset, length: p.Length})
			}
			if err != nil {
				return err
			}
		}
		return nil
	})
}

// copyRange reads [off, off+n) chunk by chunk (unless srcZero says src
// reads as zeros there) and sends the writer what differs from what dst
// already reads: zeros, or the parent's data.
func (cp *imageCopy) copyRange(ctx context.Context, off, n int64, srcZero bool) error {
	end := off + n
	for off < end {
		// Chunks end on multiples of copyChunk, so they line up with the
		// target's blocks whatever the extent boundaries.
		next := min(end, (off/copyChunk+1)*copyChunk)
		length := next - off
		job := copyJob{off: off, length: length}
		var data []byte
		if srcZero {
			data = cp.zeroChunk[:length]
		} else {
			buf, err := cp.buffer(ctx)
			if err != nil {
				return err
			}
			data = buf[:length]
			if err := readFull(cp.src, data, off); err != nil {
				cp.free <- buf
				return err
			}
			job.buf = buf
		}
		if cp.parent != nil {
			var err error
			job.writes, err = cp.parentDiff(data, off)
			if err != nil {
				if job.buf != nil {
					cp.free <- job.buf
				}
				return err
			}
		} else if cp.dense {
			job.writes = []span{{0, length}}
		} else {
			job.writes = nonZeroSpans(data, zeroGranule)
		}
		if len(job.writes) == 0 && job.buf != nil {
			cp.free <- job.buf
			job.buf = nil
		}
		if err := cp.send(ctx, job); err != nil {
			if job.buf != nil {
				cp.free <- job.buf
			}
			return err
		}
		off = next
	}
	return nil
}

// parentDiff reads the parent's bytes under data and returns the runs of
// sectors where they differ.
func (cp *imageCopy) parentDiff(data []byte, off int64) ([]span, error) {
	if cp.parentBuf == nil {
		cp.parentBuf = make([]byte, copyChunk)
	}
	p := cp.parentBuf[:len(data)]
	if err := readFull(cp.parent, p, off); err != nil {
		return nil, fmt.Errorf("reading the parent: %w", err)
	}
	if bytes.Equal(data, p) {
		return nil, nil
	}
	return diffSpans(data, p, cp.sector, off), nil
}

// buffer returns a free chunk buffer, making one while fewer than
// copyBuffers exist.
func (cp *imageCopy) buffer(ctx context.Context) ([]byte, error) {
	select {
	case b := <-cp.free:
		return b, nil
	default:
	}
	if cp.allocated < copyBuffers {
		cp.allocated++
		return make([]byte, copyChunk), nil
	}
	select {
	case b := <-cp.free:
		return b, nil
	case <-ctx.Done():
		return nil, ctx.Err()
	}
}

func (cp *imageCopy) send(ctx context.Context, job copyJob) error {
	select {
	case cp.jobs <- job:
		return nil
	case <-ctx.Done():
		return ctx.Err()
	}
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
// disk offset 0; base is data's disk offset) where a and b differ.
func diffSpans(a, b []byte, sector int, base int64) []span {
	var spans []span
	i := 0
	for i < len(a) {
		// The first sector may start before data when base is unaligned.
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

// zeroRange makes [off, off+n) of im read as zeros: with the image's own
// zeroing (a block device's BLKZEROOUT, through fallocate) where it has
// one, else by writing zeros.
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
