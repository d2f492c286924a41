package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"os"
	"syscall"

	"github.com/vhdkit/vhdkit/storage"
)

func createCommand() *command {
	return &command{
		name:     "create",
		synopsis: "[flags] FILE",
		summary:  "create a virtual disk: a fixed, dynamic or differencing VHDX or VHD, or a raw file",
		help: `The format follows the extension of FILE: VHDX (.vhdx, .avhdx), VHD (.vhd,
.avhd) or raw (.img, .raw, .bin), which takes only --size; --output-format
(-O) names it for a FILE of another name (not one that says another format:
a VHDX called .vhd would be refused when read). --parent makes a
differencing image (a child), which takes its size and sector sizes from
the parent. An existing FILE is never overwritten.

A fixed disk (and a raw file) gets all its space from the file system at
once, as Hyper-V's fixed disks do, so that no write to it can later fail
for lack of space: without that space the create fails and leaves no file.
--sparse makes it a sparse file instead, quick and small until written but
able to run out of space later (a file system that cannot allocate ahead,
such as ext2 or some network file systems, needs --sparse).

Examples:
  vhdkit create --size 10G disk.vhdx
  vhdkit create --type fixed --size 1G --logical-sector 4096 fixed.vhdx
  vhdkit create --size 64G --block-size 1M sparse.vhdx
  vhdkit create disk.avhdx --parent disk.vhdx
  vhdkit create --size 512M disk.img
  vhdkit create --type fixed --sparse --size 1T big.vhdx
  vhdkit create --type fixed --size 1G disk.vhd
  vhdkit create -O vhdx --size 1G disk.img
`,
		setup: func(fs *flag.FlagSet) func(context.Context, *cli, []string) error {
			var fl imageFlags
			var size sizeValue
			fs.StringVar(&fl.typ, "type", "", "image `kind`: fixed, dynamic or differencing (default dynamic; differencing with --parent)")
			fs.Var(&size, "size", "virtual size in `SIZE` (required except for a differencing image)")
			fs.Var(&fl.blockSize, "block-size", "block `SIZE`, a power of two up to 256M (VHDX default 32M, 2M for differencing, at least 1M; VHD default 2M)")
			fs.IntVar(&fl.logical, "logical-sector", 0, "logical sector size in `bytes`: 512 or 4096 (default 512; VHD: 512 only)")
			fs.IntVar(&fl.physical, "physical-sector", 0, "physical sector size in `bytes`: 512 or 4096 (VHDX default 4096; VHD: 512 only)")
			fs.StringVar(&fl.parent, "parent", "", "parent image `PATH`: create a differencing image")
			addSparseFlag(fs, &fl)
			addOutputFormat(fs, &fl, "FILE")
			return func(ctx context.Context, c *cli, args []string) error {
				if len(args) != 1 {
					return usagef("want exactly one FILE, got %d arguments", len(args))
				}
				return c.create(fl, size, args[0])
			}
		},
	}
}

func (c *cli) create(fl imageFlags, size sizeValue, path string) error {
	n, err := planImage(path, fl)
	if err != nil {
		return err
	}
	if err := checkSparse(n, fl); err != nil {
		return err
	}
	switch {
	case size.set && size.n <= 0:
		return usagef("--size must be more than 0")
	case !size.set && n.kind != "differencing":
		return usagef("--size is required")
	}
	n.size = size.n
	if size.set {
		sector, err := n.sectorSize()
		if err != nil {
			return err
		}
		if n.size%sector != 0 {
			return usagef("--size %d is not a multiple of the logical sector size %d", n.size, sector)
		}
	}
	im, err := n.create(path)
	if err != nil {
		return allocationHint(err)
	}
	virtual := im.Size()
	if err := im.Close(); err != nil {
		os.Remove(path)
		return err
	}
	fmt.Fprintf(c.stdout, "created %s: %s\n", path, n.describe(virtual))
	return nil
}

// addSparseFlag defines --sparse on fs.
func addSparseFlag(fs *flag.FlagSet, fl *imageFlags) {
	fs.BoolVar(&fl.sparse, "sparse", false, "make a fixed disk or raw file sparse: its space is not allocated now, so writes may fail for lack of it later")
}

// checkSparse refuses --sparse where it means nothing: a dynamic or
// differencing image is sparse anyway.
func checkSparse(n *newImage, fl imageFlags) error {
	if fl.sparse && n.kind != "fixed" {
		return usagef("--sparse is for fixed disks and raw files: a %s image allocates its blocks as they are written anyway", n.kind)
	}
	return nil
}

// allocationHint adds to a failure to allocate a fixed disk's space what
// --sparse does.
func allocationHint(err error) error {
	switch {
	case errors.Is(err, storage.ErrAllocateUnsupported):
		return fmt.Errorf("%w (--sparse makes the disk a sparse file, whose writes may fail for lack of space later)", err)
	case errors.Is(err, syscall.ENOSPC):
		return fmt.Errorf("%w (a fixed disk gets all its space when made; --sparse makes it a sparse file, whose writes may fail for lack of space later)", err)
	}
	return err
}
