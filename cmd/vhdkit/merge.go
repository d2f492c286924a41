package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"path/filepath"

	"github.com/vhdkit/vhdkit/disk"
	"github.com/vhdkit/vhdkit/merge"
)

func mergeCommand() *command {
	return &command{
		name:     "merge",
		synopsis: "[--into ANCESTOR] [--relink] [--child FILE]... [--allow-parent-dir DIR]... [--progress] TOP",
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

Parents are followed only within TOP's folder: a layer whose parent lies
elsewhere (say, found through the absolute path it stores after the child
was copied away from its parent) would have the merge write into a far
file, maybe another chain's, so the chain does not open unless
--allow-parent-dir names that parent's folder; the merge then names each
such link.

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
			var dirs stringList
			addParentDirFlag(fs, &dirs)
			return func(ctx context.Context, c *cli, args []string) error {
				if len(args) != 1 {
					return usagef("want exactly one TOP, got %d arguments", len(args))
				}
				// A misnamed TOP is refused here, clearly; a missing one may
				// be a merge to finish from its journal.
				if _, err := formatOf(args[0]); errors.Is(err, disk.ErrFormatMismatch) {
					return err
				}
				opts := merge.Options{Into: *into, Relink: *relink, Children: children, ParentDirs: parentDirs(args[0], dirs),
					Outside: func(o merge.OutsideParent) { fmt.Fprintf(c.stdout, "warning: %s\n", o) }}
				return c.merge(ctx, args[0], opts, *progress)
			}
		},
	}
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
		return outsideHint(err)
	}
	fmt.Fprintf(c.stdout, "merged into %s: %s of data (%s cloned, %s copied in the kernel, %s copied), %s declared zero\n", res.Target,
		humanBytes(res.Copied), humanBytes(res.Moved.Cloned), humanBytes(res.Moved.KernelCopied), humanBytes(res.Moved.Copied), humanBytes(res.Zeroed))
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
		synopsis: "--parent NEW [--ignore-id-mismatch] [--allow-parent-dir DIR]... CHILD",
		summary:  "point a differencing disk at a moved or renamed parent (like Set-VHD -ParentPath)",
		help: `Rewrites CHILD's parent locator so it finds its parent at NEW. NEW must be
the disk CHILD was made from: for a VHDX child, its DataWriteGuid must match
CHILD's parent_linkage (or parent_linkage2); for a VHD child over a VHD, its
unique id must match the one CHILD records. --ignore-id-mismatch links it
anyway (CHILD will then read through NEW whatever NEW holds). The change is
crash-safe: CHILD opens with its old or its new parent link. NEW's own
parents, if it has any, are followed only in its folder and the folders
named with --allow-parent-dir.

Examples:
  vhdkit set-parent --parent /vms/base.vhdx child.avhdx
`,
		setup: func(fs *flag.FlagSet) func(context.Context, *cli, []string) error {
			parent := fs.String("parent", "", "the parent's new `PATH`")
			ignore := fs.Bool("ignore-id-mismatch", false, "link even when NEW's DataWriteGuid matches neither linkage")
			var dirs stringList
			addParentDirFlag(fs, &dirs)
			return func(ctx context.Context, c *cli, args []string) error {
				if len(args) != 1 {
					return usagef("want exactly one CHILD, got %d arguments", len(args))
				}
				if *parent == "" {
					return usagef("--parent is required")
				}
				return c.setParent(args[0], *parent, *ignore, parentDirs(*parent, dirs))
			}
		},
	}
}

// setParent links child to parentPath, whose own parents are looked for
// in dirs.
func (c *cli) setParent(child, parentPath string, ignore bool, dirs []string) error {
	if err := merge.SetParent(child, parentPath, ignore, merge.Options{ParentDirs: dirs}); err != nil {
		if errors.Is(err, disk.ErrParentMismatch) && !ignore {
			return fmt.Errorf("%w (--ignore-id-mismatch links it anyway)", err)
		}
		return outsideHint(err)
	}
	fmt.Fprintf(c.stdout, "%s: parent is now %s\n", child, parentPath)
	return nil
}

// stringList is a repeatable string flag.
type stringList []string

func (s *stringList) String() string     { return fmt.Sprint(*s) }
func (s *stringList) Set(v string) error { *s = append(*s, v); return nil }
