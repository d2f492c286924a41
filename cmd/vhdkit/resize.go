package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"os"
	"strings"

	"github.com/vhdkit/vhdkit/disk"
	"github.com/vhdkit/vhdkit/merge"
	"github.com/vhdkit/vhdkit/partition"
)

func resizeCommand() *command {
	return &command{
		name:     "resize",
		synopsis: "(--size SIZE [--shrink] | --to-minimum) [--child FILE]... [--format FORMAT] FILE",
		summary:  "change a virtual disk's size (like Resize-VHD)",
		help: `Grows or shrinks the virtual disk in FILE (VHDX, VHD or raw) to SIZE. A grown
disk reads zeros in its new range; growing a differencing disk leaves its
parent as it is (a merge later grows the parent to match). Shrinking drops
everything past the new end, so it needs --shrink. The change is
crash-safe: the disk opens with its old or its new size whenever it stops.
A partition table or file system inside the disk is not touched: grow the
partition afterwards, shrink it before.

--to-minimum (Resize-VHD -ToMinimumSize) shrinks the disk to the end of its
last partition, read from its MBR or GPT, rounded up to a whole MiB (to a
whole sector for a disk that is not a whole number of MiB); a GPT's
backup header and entries move to the new end first (flushed before the
primary header points at them), so the table stays valid (sgdisk -v and
fdisk find no problem). An MBR's extended partition counts whole. A disk without a
partition table, or whose table is damaged, is refused and left as it is.

A disk other disks depend on (a parent of differencing disks: a checkpoint)
is not resized, as Hyper-V refuses to resize a disk with checkpoints: a
VHDX parent gets a new DataWriteGuid, after which its children no longer
open, and any parent's children would read through a changed disk. vhdkit
finds them in FILE's folder and among the files given with --child, and
names them; merge them first (vhdkit merge), or resize the leaf.

Examples:
  vhdkit resize --size 40G disk.vhdx
  vhdkit resize --size 8G --shrink scratch.vhd
  vhdkit resize --to-minimum disk.vhdx
  vhdkit resize --size 40G --child /elsewhere/child.avhdx base.vhdx
`,
		setup: func(fs *flag.FlagSet) func(context.Context, *cli, []string) error {
			var size sizeValue
			fs.Var(&size, "size", "the new virtual size in `SIZE` (required unless --to-minimum)")
			shrink := fs.Bool("shrink", false, "allow a smaller size, discarding what lies past it")
			toMinimum := fs.Bool("to-minimum", false, "shrink to the end of the last partition (MBR or GPT), moving a GPT's backup to the new end")
			var children stringList
			fs.Var(&children, "child", "another `FILE` that may depend on FILE, outside its folder (repeatable)")
			var in input
			addInputFlags(fs, &in, false)
			return func(ctx context.Context, c *cli, args []string) error {
				if len(args) != 1 {
					return usagef("want exactly one FILE, got %d arguments", len(args))
				}
				switch {
				case *toMinimum && size.set:
					return usagef("--to-minimum finds the size itself: give --size or --to-minimum, not both")
				case *toMinimum:
					return c.resize(args[0], in, children, 0, true)
				case !size.set || size.n <= 0:
					return usagef("--size (or --to-minimum) is required and must be more than 0")
				}
				return c.resize(args[0], in, children, size.n, *shrink)
			}
		},
	}
}

// resize resizes the disk at path to size, or with size 0 to its
// minimum (--to-minimum).
func (c *cli) resize(path string, in input, children []string, size int64, shrink bool) error {
	format, err := in.formatOf(path)
	if err != nil {
		return err
	}
	if format == "raw" && disk.IsBlockDevice(path) {
		return fmt.Errorf("%s is a block device: its size is the device's", path)
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
	var why string
	if size == 0 {
		size, why, err = prepareMinimum(path, im)
		if err != nil {
			im.Close()
			return err
		}
		if size >= old {
			if err := im.Close(); err != nil {
				return err
			}
			fmt.Fprintf(c.stdout, "%s: already at its minimum size, %s (%s)\n", path, formatSize(old), why)
			return nil
		}
	}
	if size < old && !shrink {
		im.Close()
		return fmt.Errorf("%s is %s; shrinking it to %s discards what lies past that (--shrink does it)", path, formatSize(old), formatSize(size))
	}
	if format == "raw" {
		// A raw disk is its file: the file's length is the size.
		if err := im.Close(); err != nil {
			return err
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
	if why != "" {
		why = " (" + why + ")"
	}
	fmt.Fprintf(c.stdout, "%s: resized from %s to %s%s\n", path, formatSize(old), formatSize(size), why)
	return nil
}

// minimumAlign is what --to-minimum rounds up to: a whole MiB, a multiple
// of every sector size, and a size Azure takes for a fixed VHD. A disk
// that is not a whole number of MiB itself shrinks to a whole sector.
const minimumAlign = 1 << 20

// prepareMinimum finds the smallest size of im that keeps every partition
// of its table and, when that is smaller than im, makes the table valid
// for it (a GPT's backup moves to the new end, flushed). why says what
// ends there. A disk without a readable table, or with no partitions, is
// refused untouched.
func prepareMinimum(path string, im disk.Image) (size int64, why string, err error) {
	// A raw disk does not say its sector size: the table tells.
	logical := 0
	if s, ok := im.(disk.SectorSizer); ok {
		logical = s.LogicalSectorSize()
	}
	t, err := partition.Read(im, im.Size(), logical)
	if err != nil {
		if errors.Is(err, partition.ErrNoTable) {
			return 0, "", fmt.Errorf("%s is not resized: %w (--to-minimum shrinks a disk to the end of the last partition of its MBR or GPT)", path, err)
		}
		return 0, "", fmt.Errorf("%s is not resized: %w", path, err)
	}
	last, ok := t.Last()
	if !ok {
		return 0, "", fmt.Errorf("%s is not resized: its %s holds no partitions, so --to-minimum has nothing to keep", path, t.Kind)
	}
	size = t.MinimumSize(minimumAlign)
	if size >= im.Size() && im.Size()%minimumAlign != 0 {
		size = t.MinimumSize(0) // a disk not a whole number of MiB may still shrink
	}
	why = fmt.Sprintf("%s partition %d ends at %s", t.Kind, last.Number, formatSize(last.End()))
	if t.Kind == partition.GPT {
		why += ", then the backup GPT"
	}
	if size >= im.Size() {
		return size, why, nil
	}
	if err := t.SetDiskSize(im, size); err != nil {
		return 0, "", fmt.Errorf("%s is not resized: moving the partition table's end: %w", path, err)
	}
	return size, why, nil
}
