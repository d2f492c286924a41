package main

import (
	"context"
	"flag"
	"fmt"
	"os"

	"github.com/vhdkit/vhdkit/disk"
	"github.com/vhdkit/vhdkit/imagecopy"
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

	opts := imagecopy.Options{Fresh: true, DetectZeros: true}
	if parent != nil {
		sector, _ := sectorSizes(dst)
		opts = imagecopy.Options{Fresh: true, Base: parent, Sector: sector}
	}
	if plan.format == "raw" && !plan.sparse {
		// A fixed raw file keeps blocks of its own, so that no write to
		// it fails for space: a clone would share them. (A fixed VHDX
		// copies rather than clones by itself.)
		opts.NoMove = true
	}
	if err := c.copyImage(ctx, src, dst, opts, progress); err != nil {
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
	// A device does not read zeros where nothing is written: every range
	// is written, zeros as zeros.
	err = c.copyImage(ctx, src, dst, imagecopy.Options{DetectZeros: true}, progress)
	if err == nil {
		err = dst.Flush()
	}
	if cerr := dst.Close(); err == nil {
		err = cerr
	}
	return err
}

// copyImage copies every range of src into dst with the copy engine
// (imagecopy: data moved file to file where the formats and the file
// system allow, cloned on XFS and btrfs), with a progress bar on stderr
// when it is a terminal or progress asks for one, which ends with what
// was cloned, copied in the kernel and copied.
func (c *cli) copyImage(ctx context.Context, src, dst disk.Image, opts imagecopy.Options, progress bool) error {
	var exts []disk.Extent
	if err := walkExtents(ctx, src, func(e disk.Extent) error {
		exts = append(exts, e)
		return nil
	}); err != nil {
		return fmt.Errorf("mapping the source: %w", err)
	}
	var bar *progressBar
	if progress || isTerminal(c.stderr) {
		bar = newProgressBar(c.stderr, src.Size(), isTerminal(c.stderr))
		var last int64
		opts.Progress = func(p imagecopy.Progress) {
			bar.add(p.Done - last)
			last = p.Done
		}
	}
	st, err := imagecopy.Copy(ctx, dst, src, exts, opts)
	if bar == nil {
		return err
	}
	if err != nil {
		bar.abort()
		return err
	}
	bar.finish()
	fmt.Fprintf(c.stderr, "data: %s cloned, %s copied in the kernel, %s copied; %s written as zeros\n",
		humanBytes(st.Cloned), humanBytes(st.KernelCopied), humanBytes(st.Copied), humanBytes(st.Zeroed))
	return nil
}
