package main

import (
	"context"
	"flag"
	"fmt"
	"strings"

	"github.com/vhdkit/vhdkit/vhd"
	"github.com/vhdkit/vhdkit/vhdx"
)

func checkCommand() *command {
	return &command{
		name:     "check",
		synopsis: "[--repair] FILE",
		summary:  "check a virtual disk's consistency (like Test-VHD and qemu-img check)",
		help: `Prints "FILE: no problems found" and exits 0 when the image is consistent
(after one line per warning: an oddity that does not affect reading).
Otherwise prints one line per problem (bad checksums, BAT entries beyond the
end of the file or overlapping, a pending log, a parent mismatch) and exits
1. Without --repair the image is opened read-only and never modified. With
--repair, a pending VHDX log is replayed into the file, and a damaged VHD
footer is rewritten from its intact copy.

Examples:
  vhdkit check disk.vhdx
  vhdkit check --repair disk.vhdx    # replay a pending log into the file
  vhdkit check disk.vhd
`,
		setup: func(fs *flag.FlagSet) func(context.Context, *cli, []string) error {
			repair := fs.Bool("repair", false, "repair what can be repaired: replay a pending log")
			return func(ctx context.Context, c *cli, args []string) error {
				if len(args) != 1 {
					return usagef("want exactly one FILE, got %d arguments", len(args))
				}
				return c.check(args[0], *repair)
			}
		},
	}
}

// problem is one inconsistency a format's Check found.
type problem struct {
	offset  int64 // -1: none
	what    string
	warning bool // the image reads correctly anyway
}

func (c *cli) check(path string, repair bool) error {
	format, err := formatOf(path)
	if err != nil {
		return err
	}
	var problems []problem
	switch format {
	case "vhdx":
		list, err := vhdx.Check(path, repair)
		if err != nil {
			return err
		}
		for _, p := range list {
			problems = append(problems, problem{p.Offset, p.What, false})
		}
	case "vhd":
		list, err := vhd.Check(path, repair)
		if err != nil {
			return err
		}
		for _, p := range list {
			problems = append(problems, problem{p.Offset, p.What, p.Warning})
		}
	default:
		// Formats without metadata are consistent when they open.
		im, err := openImage(path, true)
		if err != nil {
			return err
		}
		if err := im.Close(); err != nil {
			return err
		}
	}
	if len(problems) == 0 {
		fmt.Fprintf(c.stdout, "%s: no problems found\n", path)
		return nil
	}
	failures := 0
	for _, p := range problems {
		line := path + ": "
		if p.warning {
			line += "warning: "
		} else {
			failures++
		}
		line += oneLine(p.what)
		if p.offset >= 0 && !strings.Contains(p.what, fmt.Sprintf("%#x", p.offset)) {
			line += fmt.Sprintf(" (at offset %#x)", p.offset)
		}
		fmt.Fprintln(c.stdout, line)
	}
	if failures == 0 { // warnings only: the image is usable
		fmt.Fprintf(c.stdout, "%s: no problems found\n", path)
		return nil
	}
	noun := "problems"
	if failures == 1 {
		noun = "problem"
	}
	return &exitError{code: 1, msg: fmt.Sprintf("%s: %d %s found", path, failures, noun)}
}
