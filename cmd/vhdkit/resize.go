package main

import (
	"context"
	"flag"
	"fmt"
	"os"
	"strings"

	"github.com/vhdkit/vhdkit/disk"
	"github.com/vhdkit/vhdkit/merge"
)

func resizeCommand() *command {
	return &command{
		name:     "resize",
		synopsis: "--size SIZE [--shrink] [--child FILE]... [--format FORMAT] FILE",
		summary:  "change a virtual disk's size (like Resize-VHD)",
		help: `Grows or shrinks the virtual disk in FILE (VHDX, VHD or raw) to SIZE. A grown
disk reads zeros in its new range; growing a differencing disk leaves its
parent as it is (a merge later grows the parent to match). Shrinking drops
everything past the new end, so it needs --shrink. The change is
crash-safe: the disk opens with its old or its new size whenever it stops.
A partition table or file system inside the disk is not touched: grow the
partition afterwards, shrink it before.

A disk other disks depend on (a parent of differencing disks: a checkpoint)
is not resized, as Hyper-V refuses to resize a disk with checkpoints: a
VHDX parent gets a new DataWriteGuid, after which its children no longer
open, and any parent's children would read through a changed disk. vhdkit
finds them in FILE's folder and among the files given with --child, and
names them; merge them first (vhdkit merge), or resize the leaf.

Examples:
  vhdkit resize --size 40G disk.vhdx
  vhdkit resize --size 8G --shrink scratch.vhd
  vhdkit resize --size 40G --child /elsewhere/child.avhdx base.vhdx
`,
		setup: func(fs *flag.FlagSet) func(context.Context, *cli, []string) error {
			var size sizeValue
			fs.Var(&size, "size", "the new virtual size in `SIZE` (required)")
			shrink := fs.Bool("shrink", false, "allow a smaller size, discarding what lies past it")
			var children stringList
			fs.Var(&children, "child", "another `FILE` that may depend on FILE, outside its folder (repeatable)")
			var in input
			addInputFlags(fs, &in, false)
			return func(ctx context.Context, c *cli, args []string) error {
				if len(args) != 1 {
					return usagef("want exactly one FILE, got %d arguments", len(args))
				}
				if !size.set || size.n <= 0 {
					return usagef("--size is required and must be more than 0")
				}
				return c.resize(args[0], in, children, size.n, *shrink)
			}
		},
	}
}

func (c *cli) resize(path string, in input, children []string, size int64, shrink bool) error {
	format, err := in.formatOf(path)
	if err != nil {
		return err
	}
	im, err := in.open(c, path, false)
	if err != nil {
		return err
	}
	// Looked for while FILE is held for writing: no one can open it as a
	// parent of a new child meanwhile.
	if deps := merge.Dependents(path, merge.Options{Children: children}); len(deps) > 0 {
		im.Close()
		noun := "disk depends"
		if len(deps) > 1 {
			noun = "disks depend"
		}
		return fmt.Errorf("%s is not resized: %d %s on it, which a resize would break: %s (merge them into it first, or resize the leaf)",
			path, len(deps), noun, strings.Join(deps, ", "))
	}
	old := im.Size()
	if size < old && !shrink {
		im.Close()
		return fmt.Errorf("%s is %s; shrinking it to %s discards what lies past that (--shrink does it)", path, formatSize(old), formatSize(size))
	}
	if format == "raw" {
		// A raw disk is its file: the file's length is the size.
		if err := im.Close(); err != nil {
			return err
		}
		if disk.IsBlockDevice(path) {
			return fmt.Errorf("%s is a block device: its size is the device's", path)
		}
		if size%512 != 0 {
			return fmt.Errorf("%s: the size must be a multiple of 512 bytes", path)
		}
		if err := os.Truncate(path, size); err != nil {
			return err
		}
	} else {
		r, ok := im.(interface{ Resize(int64) error })
		if !ok {
			im.Close()
			return fmt.Errorf("%s: %s images cannot be resized", path, format)
		}
		err := r.Resize(size)
		if cerr := im.Close(); err == nil {
			err = cerr
		}
		if err != nil {
			return err
		}
	}
	fmt.Fprintf(c.stdout, "%s: resized from %s to %s\n", path, formatSize(old), formatSize(size))
	return nil
}
