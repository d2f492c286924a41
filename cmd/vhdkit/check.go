package main

import (
	"context"
	"flag"
	"fmt"
	"runtime"
	"strings"

	"github.com/vhdkit/vhdkit/merge"
	"github.com/vhdkit/vhdkit/vhd"
	"github.com/vhdkit/vhdkit/vhdx"
)

func checkCommand() *command {
	return &command{
		name:     "check",
		synopsis: "[--repair] [--json] [--format FORMAT] [--force-share] FILE",
		summary:  "check a virtual disk's consistency (like Test-VHD and qemu-img check)",
		help: `Prints "FILE: no problems found" and exits 0 when the image is consistent
(after one line per warning: an oddity that does not affect reading, such as
a parent found outside the child's folder through the absolute path the
child stores). Otherwise prints one line per problem (bad checksums, BAT
entries beyond the end of the file or overlapping, a pending log, a parent
mismatch) and exits 1. Without --repair the image is opened read-only and
never modified. With --repair, a pending VHDX log is replayed into the
file, and a damaged VHD footer is rewritten from its intact copy.

--json prints one object instead: {"file", "format", "ok", "problems":
[{"severity": "error" or "warning", "message", "offset", "structure",
"rule", "spec"}]} (offset absent when the problem has no place in the
file; rule a stable identifier), with the same exit status.

A file another program is writing is refused; --force-share (-U) checks it
anyway (not with --repair), warning that what it finds may be inconsistent.

Examples:
  vhdkit check disk.vhdx
  vhdkit check --repair disk.vhdx    # replay a pending log into the file
  vhdkit check disk.vhd
  vhdkit check -U running.vhdx
`,
		setup: func(fs *flag.FlagSet) func(context.Context, *cli, []string) error {
			repair := fs.Bool("repair", false, "repair what can be repaired: replay a pending log")
			asJSON := fs.Bool("json", false, "print a JSON object instead of lines")
			var in input
			addInputFlags(fs, &in, true)
			return func(ctx context.Context, c *cli, args []string) error {
				if len(args) != 1 {
					return usagef("want exactly one FILE, got %d arguments", len(args))
				}
				if *repair && in.forceShare {
					return usagef("--repair writes the file, so it cannot share it (--force-share is for reading)")
				}
				return c.check(args[0], in, *repair, *asJSON)
			}
		},
	}
}

// problem is one inconsistency a format's Check found.
type problem struct {
	offset    int64  // -1: none
	structure string // what holds it: "header 1", "BAT entry 17", ...
	rule      string // the rule's stable id, "" when none applies
	spec      string // where the rule is written, "" when not said
	what      string
	warning   bool // the image reads correctly anyway
}

// checkReport is check --json's output.
type checkReport struct {
	File     string         `json:"file"`
	Format   string         `json:"format"`
	OK       bool           `json:"ok"` // no problem but warnings
	Problems []checkProblem `json:"problems"`
}

type checkProblem struct {
	Severity  string `json:"severity"` // "error" or "warning"
	Message   string `json:"message"`
	Offset    *int64 `json:"offset,omitempty"`
	Structure string `json:"structure,omitempty"`
	Rule      string `json:"rule,omitempty"`
	Spec      string `json:"spec,omitempty"`
}

func (c *cli) check(path string, in input, repair, asJSON bool) error {
	format, err := in.formatOf(path)
	if err != nil {
		return err
	}
	var problems []problem
	switch format {
	case "vhdx":
		// Parents are followed where the other verbs follow them.
		list, err := vhdx.CheckWith(path, vhdx.CheckOptions{Repair: repair, ForceShare: in.forceShare, ParentDirs: parentDirs(path, in.parentDirs)})
		if err != nil {
			return in.inUse(err)
		}
		for _, p := range list {
			problems = append(problems, problem{p.Offset, p.Structure, string(p.Rule), p.Spec, p.What, p.Warning})
		}
	case "vhd":
		list, err := vhd.CheckWith(path, vhd.CheckOptions{Repair: repair, ForceShare: in.forceShare, ParentDirs: parentDirs(path, in.parentDirs)})
		if err != nil {
			return in.inUse(err)
		}
		for _, p := range list {
			problems = append(problems, problem{p.Offset, p.Struct, p.Rule, "", p.What, p.Warning})
		}
	}
	// The chain opens (raw: a format without metadata is consistent when
	// it opens); its links are reported as warnings.
	if format != "vhdx" && format != "vhd" || !hasFailure(problems) {
		// The check's own open is garbage now; collected first, its
		// memory (a BAT can be hundreds of MiB) serves this open, which
		// would otherwise hold a second copy beside it.
		runtime.GC()
		im, err := in.open(c, path, true)
		switch {
		case err == nil:
			for _, o := range merge.OutsideParents(chainOf(im, path)) {
				problems = append(problems, problem{offset: -1, what: strings.TrimPrefix(o.String(), path+": "), warning: true})
			}
			if err := im.Close(); err != nil {
				return err
			}
		case format != "vhdx" && format != "vhd":
			return err
		}
	} else if in.forceShare {
		in.warnWriters(c, []string{path})
	}
	failures := 0
	for _, p := range problems {
		if !p.warning {
			failures++
		}
	}
	if asJSON {
		return c.checkJSON(path, format, problems, failures)
	}
	if len(problems) == 0 {
		fmt.Fprintf(c.stdout, "%s: no problems found\n", path)
		return nil
	}
	for _, p := range problems {
		line := path + ": "
		if p.warning {
			line += "warning: "
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
	return checkFailed(path, failures)
}

// checkFailed is check's exit status for failures problems found.
func checkFailed(path string, failures int) error {
	noun := "problems"
	if failures == 1 {
		noun = "problem"
	}
	return &exitError{code: 1, msg: fmt.Sprintf("%s: %d %s found", path, failures, noun)}
}

// checkJSON prints check's report as JSON.
func (c *cli) checkJSON(path, format string, problems []problem, failures int) error {
	r := checkReport{File: path, Format: format, OK: failures == 0, Problems: []checkProblem{}}
	for _, p := range problems {
		cp := checkProblem{Severity: "error", Message: oneLine(p.what), Structure: p.structure, Rule: p.rule, Spec: p.spec}
		if p.warning {
			cp.Severity = "warning"
		}
		if p.offset >= 0 {
			cp.Offset = &p.offset
		}
		r.Problems = append(r.Problems, cp)
	}
	if err := printJSON(c.stdout, r); err != nil {
		return err
	}
	if failures > 0 {
		return checkFailed(path, failures)
	}
	return nil
}

// hasFailure reports whether problems holds more than warnings.
func hasFailure(problems []problem) bool {
	for _, p := range problems {
		if !p.warning {
			return true
		}
	}
	return false
}
