package main

import (
	"bufio"
	"context"
	"encoding/json"
	"flag"
	"fmt"
	"io"

	"github.com/vhdkit/vhdkit/disk"
	"github.com/vhdkit/vhdkit/merge"
)

func mapCommand() *command {
	return &command{
		name:     "map",
		synopsis: "[--json] [--format FORMAT] [--force-share] FILE",
		summary:  "show the allocation map through a differencing chain: data, zero, hole and depth",
		help: `Each line is a range of the virtual disk: its offset and length in bytes,
its type (data: stored; zero: stored as zeros; hole: unallocated in the whole
chain, reads as zeros) and its depth, the layer of the chain that holds it
(0: FILE itself, 1: its parent, ...; for a hole, the number of layers).
An image without an allocation map (raw) is one data extent. The image is
opened read-only. A parent found outside the child's folder through the
absolute path the child stores is named in a warning on stderr.

A file another program is writing is refused; --force-share (-U) maps it
anyway, warning that the map may be inconsistent.

Examples:
  vhdkit map disk.vhdx
  vhdkit map --json child.avhdx
  vhdkit map -U running.vhdx
`,
		setup: func(fs *flag.FlagSet) func(context.Context, *cli, []string) error {
			asJSON := fs.Bool("json", false, `print a JSON array of {"offset","length","type","depth"}`)
			var in input
			addInputFlags(fs, &in, true)
			return func(ctx context.Context, c *cli, args []string) error {
				if len(args) != 1 {
					return usagef("want exactly one FILE, got %d arguments", len(args))
				}
				return c.mapExtents(ctx, args[0], in, *asJSON)
			}
		},
	}
}

// mappedExtent is one entry of map --json.
type mappedExtent struct {
	Offset int64  `json:"offset"`
	Length int64  `json:"length"`
	Type   string `json:"type"`
	Depth  int    `json:"depth"`
}

func (c *cli) mapExtents(ctx context.Context, path string, in input, asJSON bool) error {
	im, err := in.open(c, path, true)
	if err != nil {
		return err
	}
	defer im.Close()
	warnOutside(c, chainOf(im, path))
	w := bufio.NewWriter(c.stdout)
	defer w.Flush()
	n := 0
	emit := func(e disk.Extent) error {
		m := mappedExtent{e.Offset, e.Length, e.Type.String(), e.Depth}
		if asJSON {
			sep := ",\n  "
			if n == 0 {
				sep = "[\n  "
			}
			b, err := json.Marshal(m)
			if err != nil {
				return err
			}
			_, err = fmt.Fprintf(w, "%s%s", sep, b)
			n++
			return err
		}
		if n == 0 {
			fmt.Fprintf(w, "%-16s %-16s %-5s %s\n", "OFFSET", "LENGTH", "TYPE", "DEPTH")
		}
		n++
		_, err := fmt.Fprintf(w, "%-16d %-16d %-5s %d\n", m.Offset, m.Length, m.Type, m.Depth)
		return err
	}
	if err := walkExtents(ctx, im, emit); err != nil {
		return err
	}
	if asJSON {
		if n == 0 {
			_, err = io.WriteString(w, "[]\n")
		} else {
			_, err = io.WriteString(w, "\n]\n")
		}
		if err != nil {
			return err
		}
	}
	return w.Flush()
}

// walkExtents calls fn for each extent of the whole image in order, window
// by window, merging extents that continue across windows.
func walkExtents(ctx context.Context, im disk.Image, fn func(disk.Extent) error) error {
	size := im.Size()
	var pending []disk.Extent // at most one extent not yet passed to fn
	for off := int64(0); off < size; off += extentWindow {
		if err := ctx.Err(); err != nil {
			return err
		}
		list, err := imageExtents(im, off, min(extentWindow, size-off))
		if err != nil {
			return err
		}
		for _, e := range list {
			pending = disk.AppendExtent(pending, e)
			if len(pending) == 2 {
				if err := fn(pending[0]); err != nil {
					return err
				}
				pending = pending[:copy(pending, pending[1:])]
			}
		}
	}
	for _, e := range pending {
		if err := fn(e); err != nil {
			return err
		}
	}
	return nil
}

// warnOutside warns on stderr about each link of chain resolved outside
// its child's folder through a stored absolute path.
func warnOutside(c *cli, chain []string) {
	for _, o := range merge.OutsideParents(chain) {
		fmt.Fprintf(c.stderr, "vhdkit: warning: %s\n", o)
	}
}
