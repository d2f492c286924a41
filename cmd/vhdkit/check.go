package main

import (
	"context"
	"flag"
	"fmt"
	"strings"

	"github.com/vhdkit/vhdkit/vhdx"
)

func checkCommand() *command {
	return &command{
		name:     "check",
		synopsis: "[--repair] FILE",
		summary:  "check a virtual disk's consistency (like Test-VHD and qemu-img check)",
		help: `Prints "FILE: no problems found" and exits 0 when the image is consistent. Otherwise prints
one line per problem (bad checksums, BAT entries beyond the end of the file
or overlapping, a pending log, a parent linkage mismatch) and exits 1.
Without --repair the image is opened read-only and never modified.

Examples:
  vhdkit check disk.vhdx
  vhdkit check --repair disk.vhdx    # replay a pending log into the file
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

func (c *cli) check(path string, repair bool) error {
	format, err := formatOf(path)
	if err != nil {
		return err
	}
	var problems []vhdx.Problem
	switch format {
	case "vhdx":
		problems, err = vhdx.Check(path, repair)
		if err != nil {
			return err
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
	for _, p := range problems {
		if p.Offset >= 0 && !strings.Contains(p.What, fmt.Sprintf("%#x", p.Offset)) {
			fmt.Fprintf(c.stdout, "%s: %s (at offset %#x)\n", path, oneLine(p.What), p.Offset)
		} else {
			fmt.Fprintf(c.stdout, "%s: %s\n", path, oneLine(p.What))
		}
	}
	noun := "problems"
	if len(problems) == 1 {
		noun = "problem"
	}
	return &exitError{code: 1, msg: fmt.Sprintf("%s: %d %s found", path, len(problems), noun)}
}
