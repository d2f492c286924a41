package main

import (
	"context"
	"flag"
	"fmt"
	"os"

	"github.com/vhdkit/vhdkit/raw"
	"github.com/vhdkit/vhdkit/vhdx"
)

func createCommand() *command {
	return &command{
		name:     "create",
		synopsis: "[flags] FILE",
		summary:  "create a virtual disk: a fixed, dynamic or differencing VHDX, or a raw file",
		help: `The format follows the extension of FILE. A raw file (.img, .raw, .bin)
takes only --size. --parent makes a differencing VHDX (a child), which takes
its size and sector sizes from the parent. An existing FILE is never
overwritten.

Examples:
  vhdkit create --size 10G disk.vhdx
  vhdkit create --type fixed --size 1G --logical-sector 4096 fixed.vhdx
  vhdkit create --size 64G --block-size 1M sparse.vhdx
  vhdkit create disk.avhdx --parent disk.vhdx
  vhdkit create --size 512M disk.img
`,
		setup: func(fs *flag.FlagSet) func(context.Context, *cli, []string) error {
			var o createOptions
			fs.StringVar(&o.typ, "type", "", "image `kind`: fixed, dynamic or differencing (default dynamic; differencing with --parent)")
			fs.Var(&o.size, "size", "virtual size in `SIZE` (required except for a differencing image)")
			fs.Var(&o.blockSize, "block-size", "VHDX block `SIZE`, a power of two from 1M to 256M (default 32M; 2M for differencing)")
			fs.IntVar(&o.logical, "logical-sector", 0, "logical sector size in `bytes`: 512 or 4096 (default 512)")
			fs.IntVar(&o.physical, "physical-sector", 0, "physical sector size in `bytes`: 512 or 4096 (default 4096)")
			fs.StringVar(&o.parent, "parent", "", "parent image `PATH`: create a differencing image")
			return func(ctx context.Context, c *cli, args []string) error {
				if len(args) != 1 {
					return usagef("want exactly one FILE, got %d arguments", len(args))
				}
				return c.create(o, args[0])
			}
		},
	}
}

type createOptions struct {
	typ               string
	size, blockSize   sizeValue
	logical, physical int
	parent            string
}

// vhdxOptions checks the flags common to create and convert and turns them
// into vhdx.CreateOptions (without the size).
func vhdxOptions(typ string, blockSize sizeValue, logical, physical int, parent string) (vhdx.CreateOptions, error) {
	var o vhdx.CreateOptions
	switch typ {
	case "", "dynamic":
		o.Type = vhdx.Dynamic
		if parent != "" {
			if typ != "" {
				return o, usagef("--parent makes a differencing image, not --type %s", typ)
			}
			o.Type = vhdx.Differencing
		}
	case "fixed":
		if parent != "" {
			return o, usagef("--parent makes a differencing image, not --type %s", typ)
		}
		o.Type = vhdx.Fixed
	case "differencing":
		if parent == "" {
			return o, usagef("--type differencing needs --parent")
		}
		o.Type = vhdx.Differencing
	default:
		return o, usagef("unknown --type %q (want fixed, dynamic or differencing)", typ)
	}
	if blockSize.set {
		n := blockSize.n
		if n < 1<<20 || n > 256<<20 || n&(n-1) != 0 {
			return o, usagef("--block-size %s: want a power of two from 1M to 256M", formatSize(n))
		}
		o.BlockSize = uint32(n)
	}
	for _, s := range []struct {
		name string
		v    int
		dst  *uint32
	}{{"logical-sector", logical, &o.LogicalSectorSize}, {"physical-sector", physical, &o.PhysicalSectorSize}} {
		switch s.v {
		case 0:
		case 512, 4096:
			*s.dst = uint32(s.v)
		default:
			return o, usagef("--%s %d: want 512 or 4096", s.name, s.v)
		}
	}
	if o.LogicalSectorSize == 4096 && o.PhysicalSectorSize == 512 {
		return o, usagef("a logical sector size of 4096 needs a physical sector size of 4096")
	}
	o.Parent = parent
	return o, nil
}

// rawOnlySize rejects the VHDX-only flags for a raw file.
func rawOnlySize(typ string, blockSize sizeValue, logical, physical int, parent string) error {
	switch {
	case typ != "" && typ != "fixed":
		return usagef("a raw image cannot be %s (raw images take only --size)", typ)
	case blockSize.set, logical != 0, physical != 0:
		return usagef("raw images have no block or sector sizes (they take only --size)")
	case parent != "":
		return usagef("a raw image cannot have a parent (use a .vhdx or .avhdx file)")
	}
	return nil
}

func (c *cli) create(o createOptions, path string) error {
	format, err := formatOf(path)
	if err != nil {
		return err
	}
	if o.size.set && o.size.n <= 0 {
		return usagef("--size must be more than 0")
	}
	switch format {
	case "raw":
		if err := rawOnlySize(o.typ, o.blockSize, o.logical, o.physical, o.parent); err != nil {
			return err
		}
		if !o.size.set {
			return usagef("--size is required")
		}
		if err := refuseExisting(path); err != nil {
			return err
		}
		im, err := raw.Create(path, o.size.n)
		if err != nil {
			os.Remove(path)
			return err
		}
		if err := im.Close(); err != nil {
			os.Remove(path)
			return err
		}
		fmt.Fprintf(c.stdout, "created %s: raw, %s\n", path, formatSize(o.size.n))
		return nil
	case "vhdx":
		opts, err := vhdxOptions(o.typ, o.blockSize, o.logical, o.physical, o.parent)
		if err != nil {
			return err
		}
		if !o.size.set && opts.Type != vhdx.Differencing {
			return usagef("--size is required")
		}
		opts.Size = uint64(o.size.n)
		if err := refuseExisting(path); err != nil {
			return err
		}
		im, err := vhdx.Create(path, opts)
		if err != nil {
			os.Remove(path)
			return err
		}
		size := im.Size()
		if err := im.Close(); err != nil {
			os.Remove(path)
			return err
		}
		desc := fmt.Sprintf("%s VHDX, %s", opts.Type, formatSize(size))
		if opts.Parent != "" {
			desc += ", parent " + opts.Parent
		}
		fmt.Fprintf(c.stdout, "created %s: %s\n", path, desc)
		return nil
	}
	return fmt.Errorf("%s: cannot create %s images", path, format)
}
