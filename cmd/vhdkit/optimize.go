package main

import (
	"context"
	"flag"
	"fmt"

	"github.com/vhdkit/vhdkit/vhd"
	"github.com/vhdkit/vhdkit/vhdx"
)

func optimizeCommand() *command {
	return &command{
		name:     "optimize",
		synopsis: "[--full] [--progress] [--json] [--format FORMAT] FILE",
		summary:  "give a dynamic or differencing disk's unused space back (like Optimize-VHD)",
		help: `Compacts the VHDX or VHD in FILE without changing what it reads (its
identity stays, so its children stay linked). Without --full (Optimize-VHD
-Mode Quick) space already released is given back to the file system:
blocks trimmed or zeroed by the guest, ranges discarded inside blocks.
With --full (-Mode Full) every block is read too: blocks that read as zeros
are released (a differencing disk's keep reading zeros, not the parent),
blocks at the end of the file move into the free space below them, and
the file is cut after the last one.

The work is crash-safe: interrupted at any point, the disk opens and reads
as before, and running the command again finishes it. A fixed disk has no
blocks to release and is left as it is. A disk another program uses is
refused; a disk the daemon serves is optimized by it, while it runs:
vhdkit vm optimize NAME.

A progress bar goes to stderr when it is a terminal, or with --progress.

Examples:
  vhdkit optimize disk.vhdx
  vhdkit optimize --full disk.vhdx
`,
		setup: func(fs *flag.FlagSet) func(context.Context, *cli, []string) error {
			full := fs.Bool("full", false, "also release blocks of zeros, move blocks down and cut the file")
			progress := fs.Bool("progress", false, "show progress on stderr even when it is not a terminal")
			asJSON := fs.Bool("json", false, "print a JSON object instead of a line")
			var in input
			addInputFlags(fs, &in, false)
			return func(ctx context.Context, c *cli, args []string) error {
				if len(args) != 1 {
					return usagef("want exactly one FILE, got %d arguments", len(args))
				}
				return c.optimize(args[0], in, *full, *progress, *asJSON)
			}
		},
	}
}

// optimized is optimize's report (--json).
type optimized struct {
	File       string `json:"file"`
	Format     string `json:"format"`
	Mode       string `json:"mode"` // "quick" or "full"
	SizeBefore int64  `json:"size_before"`
	SizeAfter  int64  `json:"size_after"`
	Released   int    `json:"blocks_released"`
	Moved      int    `json:"blocks_moved"`
}

func (c *cli) optimize(path string, in input, full, progress, asJSON bool) error {
	im, err := in.open(c, path, false)
	if err != nil {
		return err
	}
	r := optimized{File: path, Mode: "quick"}
	if full {
		r.Mode = "full"
	}
	// Progress comes in steps (a block read, a block moved); the bar
	// shows them as the bytes of the blocks they handle.
	var bar *progressBar
	var blockSize int64
	report := func(done, total int64) {
		if bar == nil {
			bar = newProgressBar(c.stderr, total*blockSize, isTerminal(c.stderr))
		}
		bar.total = total * blockSize
		bar.add(done*blockSize - bar.done)
	}
	if !progress && !isTerminal(c.stderr) {
		report = nil
	}
	switch im := im.(type) {
	case *vhdx.Image:
		r.Format, blockSize = "vhdx", int64(im.Info().BlockSize)
		var res vhdx.OptimizeResult
		res, err = im.Optimize(vhdx.OptimizeOptions{Full: full, Progress: report})
		r.SizeBefore, r.SizeAfter, r.Released, r.Moved = res.SizeBefore, res.SizeAfter, res.Released, res.Moved
	case *vhd.Image:
		r.Format, blockSize = "vhd", int64(im.Info().BlockSize)
		var res vhd.OptimizeResult
		res, err = im.Optimize(vhd.OptimizeOptions{Full: full, Progress: report})
		r.SizeBefore, r.SizeAfter, r.Released, r.Moved = res.SizeBefore, res.SizeAfter, res.Released, res.Moved
	default:
		err = fmt.Errorf("%s: a raw disk has no blocks to release (fallocate --dig-holes punches its zeros)", path)
	}
	if cerr := im.Close(); err == nil {
		err = cerr
	}
	if bar != nil {
		if err != nil {
			bar.abort()
		} else {
			bar.finish()
		}
	}
	if err != nil {
		return err
	}
	if asJSON {
		return printJSON(c.stdout, r)
	}
	fmt.Fprintf(c.stdout, "%s: %s -> %s (%d %s released, %d moved)\n", path, humanBytes(r.SizeBefore), humanBytes(r.SizeAfter),
		r.Released, plural(r.Released, "block", "blocks"), r.Moved)
	return nil
}
