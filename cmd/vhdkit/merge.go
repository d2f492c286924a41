package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"os"
	"path/filepath"
	"strings"

	"github.com/vhdkit/vhdkit/disk"
	"github.com/vhdkit/vhdkit/merge"
)

func mergeCommand() *command {
	return &command{
		name:     "merge",
		synopsis: "[--into ANCESTOR] [--relink] [--child FILE]... [--allow-outside] [--progress] TOP",
		summary:  "merge a differencing disk into its parent or an ancestor (like Merge-VHD)",
		help: `Copies what TOP (and every layer between TOP and ANCESTOR) holds into
ANCESTOR — by default TOP's parent — then removes the merged-away files:
ANCESTOR becomes the leaf. Only the sectors the merged layers hold are
copied; ranges they declare zero become zero in ANCESTOR.

The merge is crash-safe: interrupted at any point (crash, kill -9, I/O
error, full disk), the chain still opens from TOP and reads the newest data,
and running the same command again completes it.

A merge changes ANCESTOR, so it is refused when another disk depends on
ANCESTOR: a file in its folder whose parent locator names it, or one given
with --child. --relink merges anyway and points those disks at the merged
ANCESTOR (they will then read its new content).

A layer whose parent was found outside its folder only through the absolute
path it stores (its relative locator leads nowhere: the child was copied
or moved away from its parent) would have the merge write into that far
parent, which may be another chain's: the merge is refused, naming the
link, unless --allow-outside is given.

A progress bar goes to stderr when it is a terminal, or with --progress.

Examples:
  vhdkit merge child.avhdx                      # into its parent
  vhdkit merge --into base.vhdx top.avhdx       # every layer down to base.vhdx
`,
		setup: func(fs *flag.FlagSet) func(context.Context, *cli, []string) error {
			into := fs.String("into", "", "the ancestor to merge into (default: TOP's parent)")
			relink := fs.Bool("relink", false, "re-link other children of the ancestor instead of refusing")
			var children stringList
			fs.Var(&children, "child", "another `FILE` that depends on the ancestor (repeatable)")
			progress := fs.Bool("progress", false, "show progress on stderr even when it is not a terminal")
			allowOutside := fs.Bool("allow-outside", false, "merge into a parent found outside its child's folder through a stored absolute path")
			return func(ctx context.Context, c *cli, args []string) error {
				if len(args) != 1 {
					return usagef("want exactly one TOP, got %d arguments", len(args))
				}
				// A misnamed TOP is refused here, clearly; a missing one may
				// be a merge to finish from its journal.
				if _, err := formatOf(args[0]); errors.Is(err, disk.ErrFormatMismatch) {
					return err
				}
				opts := merge.Options{Into: *into, Relink: *relink, Children: children}
				if err := c.checkOutside(args[0], opts.Into, *allowOutside); err != nil {
					return err
				}
				return c.merge(ctx, args[0], opts, *progress)
			}
		},
	}
}

// checkOutside refuses, unless allowed, a merge of TOP down to into (or
// TOP's parent) through a link resolved outside its child's folder by a
// stored absolute path; allowed, it names those links. A chain that does
// not open is left to the merge to report.
func (c *cli) checkOutside(top, into string, allow bool) error {
	im, err := openImage(top, true)
	if err != nil {
		return nil
	}
	chain := chainOf(im, top)
	im.Close()
	k := 1
	if into != "" {
		k = -1
		if fi, err := os.Stat(into); err == nil {
			for i, l := range chain {
				if li, err := os.Stat(l); err == nil && os.SameFile(fi, li) {
					k = i
				}
			}
		}
		if k < 0 {
			return nil // not an ancestor: the merge says so
		}
	}
	out := merge.OutsideParents(chain[:min(k+1, len(chain))])
	if len(out) == 0 {
		return nil
	}
	var names []string
	for _, o := range out {
		names = append(names, o.String())
	}
	if !allow {
		return fmt.Errorf("%s: the merge would write into a parent the child's folder does not hold (--allow-outside merges anyway)", strings.Join(names, "; "))
	}
	for _, n := range names {
		fmt.Fprintf(c.stdout, "warning: %s\n", n)
	}
	return nil
}

func (c *cli) merge(ctx context.Context, top string, opts merge.Options, progress bool) error {
	var bar *progressBar
	if progress || isTerminal(c.stderr) {
		opts.Progress = func(done, total int64) {
			if bar == nil {
				bar = newProgressBar(c.stderr, total, isTerminal(c.stderr))
			}
			bar.add(done - bar.done)
		}
	}
	res, err := merge.Merge(ctx, top, opts)
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
	fmt.Fprintf(c.stdout, "merged into %s: %s of data, %s declared zero\n", res.Target, humanBytes(res.Copied), humanBytes(res.Zeroed))
	for _, p := range res.Removed {
		fmt.Fprintf(c.stdout, "removed %s\n", p)
	}
	for _, p := range res.Relinked {
		fmt.Fprintf(c.stdout, "re-linked %s to %s\n", p, filepath.Base(res.Target))
	}
	return nil
}

func setParentCommand() *command {
	return &command{
		name:     "set-parent",
		synopsis: "--parent NEW [--ignore-id-mismatch] CHILD",
		summary:  "point a differencing disk at a moved or renamed parent (like Set-VHD -ParentPath)",
		help: `Rewrites CHILD's parent locator so it finds its parent at NEW. NEW must be
the disk CHILD was made from: for a VHDX child, its DataWriteGuid must match
CHILD's parent_linkage (or parent_linkage2); for a VHD child over a VHD, its
unique id must match the one CHILD records. --ignore-id-mismatch links it
anyway (CHILD will then read through NEW whatever NEW holds). The change is
crash-safe: CHILD opens with its old or its new parent link.

Examples:
  vhdkit set-parent --parent /vms/base.vhdx child.avhdx
`,
		setup: func(fs *flag.FlagSet) func(context.Context, *cli, []string) error {
			parent := fs.String("parent", "", "the parent's new `PATH`")
			ignore := fs.Bool("ignore-id-mismatch", false, "link even when NEW's DataWriteGuid matches neither linkage")
			return func(ctx context.Context, c *cli, args []string) error {
				if len(args) != 1 {
					return usagef("want exactly one CHILD, got %d arguments", len(args))
				}
				if *parent == "" {
					return usagef("--parent is required")
				}
				return c.setParent(args[0], *parent, *ignore)
			}
		},
	}
}

func (c *cli) setParent(child, parentPath string, ignore bool) error {
	if err := merge.SetParent(child, parentPath, ignore, merge.Options{}); err != nil {
		if errors.Is(err, disk.ErrParentMismatch) && !ignore {
			return fmt.Errorf("%w (--ignore-id-mismatch links it anyway)", err)
		}
		return err
	}
	fmt.Fprintf(c.stdout, "%s: parent is now %s\n", child, parentPath)
	return nil
}

// stringList is a repeatable string flag.
type stringList []string

func (s *stringList) String() string     { return fmt.Sprint(*s) }
func (s *stringList) Set(v string) error { *s = append(*s, v); return nil }
