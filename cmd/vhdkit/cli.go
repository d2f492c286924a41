package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"strings"
)

// A command is one verb of the CLI.
type command struct {
	name     string
	synopsis string // arguments after the verb, e.g. "[flags] FILE"
	summary  string // one line for the command list
	help     string // description and examples, shown by --help after the flags
	// setup defines the verb's flags on fs and returns the function that
	// runs the verb once fs has been parsed; it gets the positional args.
	setup func(fs *flag.FlagSet) func(ctx context.Context, c *cli, args []string) error
	// sub, for a group such as "vm", holds its verbs, named "vm create"
	// and so on; setup is then unused.
	sub []*command
}

func commands() []*command {
	return []*command{createCommand(), infoCommand(), checkCommand(), convertCommand(), mapCommand(), resizeCommand(), optimizeCommand(), mergeCommand(), setParentCommand(), nbdCommand(),
		serveCommand(), vmCommand(), checkpointCommand(), jobCommand(), demoCommand()}
}

// cli is what a running verb writes to.
type cli struct {
	stdout, stderr io.Writer
}

// usageError is a mistake in the command line; it exits with status 2.
type usageError struct{ msg string }

func (e *usageError) Error() string { return e.msg }

func usagef(format string, args ...any) error {
	return &usageError{fmt.Sprintf(format, args...)}
}

// exitError carries an exit status other than 1 or a failure whose details
// have already been printed to stdout.
type exitError struct {
	code int
	msg  string
}

func (e *exitError) Error() string { return e.msg }

const topUsage = `vhdkit - virtual disks (VHDX, VHD, raw) on Linux

Usage:
  vhdkit COMMAND [flags] [arguments]

Commands:
%s
The format of a disk comes from its content: a VHDX or VHD signature makes it
VHDX or VHD whatever its name; a file without one is raw when named .img,
.raw or .bin (or a block device). A name that says another format than the
content (a VHDX called .vhd, a raw file called .vhdx) is refused; --format
reads a file as the format it names. A new disk's format follows its
extension (.vhdx/.avhdx, .vhd/.avhd, .img/.raw/.bin) or --output-format.
SIZE is a number of bytes, optionally followed
by K, M, G or T (powers of 1024; KiB, MiB, GiB and TiB work too).
Flags may come before or after the arguments.

Run "vhdkit COMMAND --help" for a command's flags and examples.
`

// run runs the vhdkit command line args (without the program name) and
// returns the process exit status: 0 on success, 2 for a usage error, 1
// for any other failure, which is reported as exactly one line on stderr.
func run(ctx context.Context, args []string, stdout, stderr io.Writer) int {
	return commandSet(commands()).run(ctx, args, stdout, stderr)
}

// commandSet is the verbs run dispatches to.
type commandSet []*command

func (cs commandSet) run(ctx context.Context, args []string, stdout, stderr io.Writer) (code int) {
	verb := ""
	defer func() {
		if r := recover(); r != nil {
			prefix := ""
			if cs.lookup(verb) != nil {
				prefix = verb + ": "
			}
			fmt.Fprintln(stderr, oneLine(fmt.Sprintf("vhdkit: %sinternal error: %v", prefix, r)))
			code = 1
		}
	}()
	if len(args) == 0 {
		fmt.Fprintln(stderr, `vhdkit: missing command (run "vhdkit help" for the list)`)
		return 2
	}
	verb = args[0]
	switch verb {
	case "help", "-h", "-help", "--help":
		if len(args) > 1 && args[1] != "" {
			cmd := cs.lookup(args[1])
			if cmd == nil {
				fmt.Fprintf(stderr, "vhdkit: help: unknown command %q\n", args[1])
				return 2
			}
			if cmd.sub != nil {
				return commandSet(cmd.sub).runGroup(ctx, cmd, append([]string{"--help"}, args[2:]...), stdout, stderr)
			}
			fs := newFlagSet(cmd)
			cmd.setup(fs)
			printCommandHelp(stdout, cmd, fs)
			return 0
		}
		cs.printUsage(stdout)
		return 0
	}
	cmd := cs.lookup(verb)
	if cmd == nil {
		fmt.Fprintf(stderr, "vhdkit: unknown command %q (run \"vhdkit help\" for the list)\n", oneLine(verb))
		return 2
	}
	if cmd.sub != nil {
		return commandSet(cmd.sub).runGroup(ctx, cmd, args[1:], stdout, stderr)
	}
	fs := newFlagSet(cmd)
	runVerb := cmd.setup(fs)
	positional, err := parseArgs(fs, args[1:])
	if errors.Is(err, flag.ErrHelp) {
		printCommandHelp(stdout, cmd, fs)
		return 0
	}
	if err == nil {
		err = runVerb(ctx, &cli{stdout: stdout, stderr: stderr}, positional)
	} else {
		err = &usageError{err.Error()}
	}
	if err == nil {
		return 0
	}
	code = 1
	var ue *usageError
	var ee *exitError
	switch {
	case errors.As(err, &ue):
		code = 2
		err = fmt.Errorf("%w (see \"vhdkit %s --help\")", err, cmd.name)
	case errors.As(err, &ee):
		code = ee.code
	case errors.Is(err, context.Canceled):
		err = errors.New("interrupted")
	}
	// A library error may already name the verb ("merge: ..."): say it once.
	fmt.Fprintln(stderr, oneLine("vhdkit: "+cmd.name+": "+strings.TrimPrefix(err.Error(), cmd.name+": ")))
	return code
}

// oneLine keeps a message on one line whatever the error text holds.
func oneLine(s string) string {
	return strings.Join(strings.Fields(strings.ReplaceAll(s, "\n", "; ")), " ")
}

// runGroup runs a group's verb: args start with the verb's second word.
func (cs commandSet) runGroup(ctx context.Context, group *command, args []string, stdout, stderr io.Writer) int {
	if len(args) == 0 || args[0] == "help" || args[0] == "-h" || args[0] == "--help" || args[0] == "-help" {
		fmt.Fprintf(stdout, "Usage: vhdkit %s %s\n\n%s\n\nCommands:\n", group.name, group.synopsis, group.summary)
		for _, c := range cs {
			fmt.Fprintf(stdout, "  %-18s  %s\n", c.name, c.summary)
		}
		fmt.Fprintf(stdout, "\n%s", strings.TrimLeft(group.help, "\n"))
		if len(args) == 0 {
			return 2
		}
		return 0
	}
	return cs.run(ctx, append([]string{group.name + " " + args[0]}, args[1:]...), stdout, stderr)
}

func (cs commandSet) lookup(name string) *command {
	for _, c := range cs {
		if c.name == name {
			return c
		}
	}
	return nil
}

func newFlagSet(cmd *command) *flag.FlagSet {
	fs := flag.NewFlagSet("vhdkit "+cmd.name, flag.ContinueOnError)
	fs.SetOutput(io.Discard) // run reports errors itself, in one line
	return fs
}

func (cs commandSet) printUsage(w io.Writer) {
	var list strings.Builder
	for _, c := range cs {
		fmt.Fprintf(&list, "  %-10s  %s\n", c.name, c.summary)
	}
	fmt.Fprintf(w, topUsage, list.String())
}

// printCommandHelp prints a verb's synopsis, flags (in GNU style, with two
// dashes) and examples.
func printCommandHelp(w io.Writer, cmd *command, fs *flag.FlagSet) {
	fmt.Fprintf(w, "Usage: vhdkit %s %s\n\n%s\n", cmd.name, cmd.synopsis, cmd.summary)
	type row struct{ left, usage string }
	var rows []row
	width := 0
	fs.VisitAll(func(f *flag.Flag) {
		name, usage := flag.UnquoteUsage(f)
		left := "--" + f.Name
		if len(f.Name) == 1 {
			left = "-" + f.Name // a short form: -U, -O
		}
		if !isBoolFlag(f) {
			left += " " + name
		}
		if f.DefValue != "" && f.DefValue != "false" && f.DefValue != "0" {
			usage += fmt.Sprintf(" (default %s)", f.DefValue)
		}
		rows = append(rows, row{left, usage})
		width = max(width, len(left))
	})
	if len(rows) > 0 {
		fmt.Fprintf(w, "\nFlags:\n")
		for _, r := range rows {
			fmt.Fprintf(w, "  %-*s  %s\n", width, r.left, r.usage)
		}
	}
	fmt.Fprintf(w, "\n%s", strings.TrimLeft(cmd.help, "\n"))
}

// refuseExisting returns an error when path exists: vhdkit never
// overwrites a file.
func refuseExisting(path string) error {
	if _, err := os.Lstat(path); err == nil {
		return fmt.Errorf("%s already exists (vhdkit does not overwrite files)", path)
	} else if !errors.Is(err, os.ErrNotExist) {
		return err
	}
	return nil
}
