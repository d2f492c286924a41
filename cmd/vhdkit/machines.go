package main

import (
	"context"
	"encoding/json"
	"flag"
	"fmt"
	"io"
	"path/filepath"
	"text/tabwriter"
	"time"

	"github.com/vhdkit/vhdkit/internal/api"
)

// The vm, checkpoint and job commands are clients of a running daemon
// ("vhdkit serve"), found through --data or $VHDKIT_DATA.

// clientFlags adds --data and --json to a client verb.
type clientFlags struct {
	data string
	json bool
}

func (f *clientFlags) add(fs *flag.FlagSet, withJSON bool) {
	fs.StringVar(&f.data, "data", "", "the daemon's data `DIR` (default $VHDKIT_DATA or ./vhdkit-data)")
	if withJSON {
		fs.BoolVar(&f.json, "json", false, "print JSON")
	}
}

func (f *clientFlags) client() *api.Client { return &api.Client{DataDir: f.data} }

// clientVerb builds a verb that talks to the daemon: args checks the
// positional arguments, do runs the request.
func clientVerb(name, synopsis, summary, help string, withJSON bool, nargs int,
	flags func(fs *flag.FlagSet), do func(ctx context.Context, c *cli, cl *api.Client, f *clientFlags, args []string) error) *command {
	return &command{name: name, synopsis: synopsis, summary: summary, help: help,
		setup: func(fs *flag.FlagSet) func(context.Context, *cli, []string) error {
			var f clientFlags
			f.add(fs, withJSON)
			if flags != nil {
				flags(fs)
			}
			return func(ctx context.Context, c *cli, args []string) error {
				if len(args) != nargs {
					return usagef("want %d arguments (%s), got %d", nargs, synopsis, len(args))
				}
				return do(ctx, c, f.client(), &f, args)
			}
		}}
}

// reply ends a client verb: the request's error, or v as JSON under
// --json, or what text prints.
func (f *clientFlags) reply(c *cli, v any, err error, text func() error) error {
	if err != nil {
		return err
	}
	if f.json {
		return printJSON(c.stdout, v)
	}
	return text()
}

func printJSON(w io.Writer, v any) error {
	enc := json.NewEncoder(w)
	enc.SetIndent("", "  ")
	return enc.Encode(v)
}

// sizeList is a repeatable size flag.
type sizeList []int64

func (s *sizeList) String() string { return fmt.Sprint(*s) }
func (s *sizeList) Set(v string) error {
	n, err := parseSize(v)
	if err != nil {
		return err
	}
	*s = append(*s, n)
	return nil
}

func vmCommand() *command {
	return &command{
		name:     "vm",
		synopsis: "COMMAND [flags] [arguments]",
		summary:  "create, list, show and delete the daemon's machines",
		help: `A machine is a set of disks the daemon serves over NBD: the first as export
NAME, the others as NAME/1, NAME/2, ... Each disk is a VHDX chain that
checkpoints extend and checkpoint deletion merges back.

Examples:
  vhdkit vm create web --disk 20G --disk 4G
  vhdkit vm show web --json
`,
		sub: []*command{
			vmCreateCommand(),
			clientVerb("vm list", "", "list machines", "", true, 0, nil,
				func(ctx context.Context, c *cli, cl *api.Client, f *clientFlags, args []string) error {
					vms, err := cl.VMs(ctx)
					return f.reply(c, vms, err, func() error {
						tw := tabwriter.NewWriter(c.stdout, 0, 4, 2, ' ', 0)
						fmt.Fprintln(tw, "NAME\tDISKS\tCHECKPOINTS\tCURRENT")
						for _, v := range vms {
							fmt.Fprintf(tw, "%s\t%d\t%d\t%s\n", v.Name, len(v.Disks), v.Checkpoints, orDash(v.Current))
						}
						return tw.Flush()
					})
				}),
			clientVerb("vm show", "NAME", "show a machine's disks and the files they run on", "", true, 1, nil,
				func(ctx context.Context, c *cli, cl *api.Client, f *clientFlags, args []string) error {
					v, err := cl.VM(ctx, args[0])
					return f.reply(c, v, err, func() error {
						printVM(c.stdout, v)
						return nil
					})
				}),
			clientVerb("vm delete", "NAME", "delete a machine and the files the daemon made for it", "", false, 1, nil,
				func(ctx context.Context, c *cli, cl *api.Client, f *clientFlags, args []string) error {
					if err := cl.DeleteVM(ctx, args[0]); err != nil {
						return err
					}
					fmt.Fprintf(c.stdout, "deleted machine %s\n", args[0])
					return nil
				}),
		},
	}
}

func vmCreateCommand() *command {
	var disks sizeList
	var attach stringList
	return clientVerb("vm create", "NAME (--disk SIZE | --attach FILE)...", "create a machine with new dynamic VHDX disks or existing files",
		`New disks are dynamic VHDX files under DIR/vms/NAME, in the order given;
--attach serves an existing VHDX file instead (it is kept when the machine
is deleted).

Examples:
  vhdkit vm create web --disk 20G
  vhdkit vm create db --attach /srv/db.vhdx --disk 1G
`, true, 1,
		func(fs *flag.FlagSet) {
			disks, attach = nil, nil
			fs.Var(&disks, "disk", "add a new disk of `SIZE` (repeatable)")
			fs.Var(&attach, "attach", "add the existing VHDX `FILE` as a disk (repeatable)")
		},
		func(ctx context.Context, c *cli, cl *api.Client, f *clientFlags, args []string) error {
			if len(disks)+len(attach) == 0 {
				return usagef("a machine needs at least one --disk SIZE or --attach FILE")
			}
			for i, a := range attach {
				if abs, err := filepath.Abs(a); err == nil {
					attach[i] = abs // the daemon may run elsewhere
				}
			}
			v, err := cl.CreateVM(ctx, api.CreateVM{Name: args[0], Disks: disks, Attach: attach})
			return f.reply(c, v, err, func() error {
				printVM(c.stdout, v)
				return nil
			})
		})
}

func orDash(s string) string {
	if s == "" {
		return "-"
	}
	return s
}

func printVM(w io.Writer, v *api.VM) {
	fmt.Fprintf(w, "machine %s (created %s)\n", v.Name, v.Created.Local().Format(time.DateTime))
	fmt.Fprintf(w, "checkpoints: %d, running from: %s\n", v.Checkpoints, orDash(v.Current))
	for _, d := range v.Disks {
		fmt.Fprintf(w, "disk %d: export %q, %s\n", d.Index, d.Export, formatSize(d.Size))
		fmt.Fprintf(w, "  runs on %s\n", d.Path)
		for _, p := range d.Chain[1:] {
			fmt.Fprintf(w, "  over    %s\n", p)
		}
	}
}
