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
// ("vhdkit serve"), found through --data, then $VHDKIT_DATA, then the
// default serve uses too (api.DataDir), whatever the current directory.

// clientFlags adds --data and --json to a client verb.
type clientFlags struct {
	data string
	json bool
}

func (f *clientFlags) add(fs *flag.FlagSet, withJSON bool) {
	fs.StringVar(&f.data, "data", "", "the daemon's data `DIR` (default $VHDKIT_DATA, else "+dataDirDefault+")")
	if withJSON {
		fs.BoolVar(&f.json, "json", false, "print JSON")
	}
}

// dataDirDefault describes the system default data directory.
const dataDirDefault = api.RootDataDir + " for root, $XDG_STATE_HOME/vhdkit (~/.local/state/vhdkit) for others"

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
		summary:  "create, list, show, set, run, delete, repair and optimize the daemon's machines, add and remove their disks",
		help: `A machine is a set of disks the daemon serves over NBD: the first as export
NAME, the others as NAME/1, NAME/2, ... Each disk is a VHDX chain that
checkpoints extend and checkpoint deletion merges back.

A machine whose files are missing, damaged or locked by another program is
"failed": vm list and vm show say why, its disks are not exported, the
other machines serve as usual; vm repair brings it back.

Examples:
  vhdkit vm create web --disk 20G --disk 4G
  vhdkit vm show web --json
  vhdkit vm set web --memory 2G --generation 2 --cdrom /srv/iso/install.iso
  vhdkit vm add-disk web --create 10G
  vhdkit vm repair web --disk 0 --path /srv/moved/disk0.vhdx
`,
		sub: []*command{
			vmCreateCommand(),
			vmImportCommand(),
			clientVerb("vm list", "", "list machines", "", true, 0, nil,
				func(ctx context.Context, c *cli, cl *api.Client, f *clientFlags, args []string) error {
					vms, err := cl.VMs(ctx)
					return f.reply(c, vms, err, func() error {
						tw := tabwriter.NewWriter(c.stdout, 0, 4, 2, ' ', 0)
						fmt.Fprintln(tw, "NAME\tSTATE\tPOWER\tDISKS\tCHECKPOINTS\tCURRENT\tERROR")
						for _, v := range vms {
							fmt.Fprintf(tw, "%s\t%s\t%s\t%d\t%d\t%s\t%s\n", v.Name, v.State, orDash(v.Power), len(v.Disks), v.Checkpoints, currentOf(&v), v.Error)
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
			vmDeleteCommand(),
			vmSetCommand(),
			vmAddDiskCommand(),
			vmRemoveDiskCommand(),
			vmStartCommand(),
			vmStopCommand(),
			vmPauseResumeCommand(true),
			vmPauseResumeCommand(false),
			vmRestartCommand(),
			vmConsoleCommand(),
			vmSaveCommand(),
			vmRepairCommand(),
			vmOptimizeCommand(),
		},
	}
}

func vmDeleteCommand() *command {
	var force, deleteDisks bool
	return clientVerb("vm delete", "NAME [--delete-disks] [--force]", "delete a machine; with --delete-disks, the disk files the daemon made for it",
		`Attached files (vm create --attach) are always kept. A machine that has
disk files the daemon created is deleted only with --delete-disks, which
removes them (and its checkpoints' files); without it the command lists
them and changes nothing. A machine with NBD clients connected is not
deleted unless --force disconnects them first. A saved machine (vm save)
is deleted only with --force, which discards its saved state.

Examples:
  vhdkit vm delete web --delete-disks
  vhdkit vm delete db            (only attached disks: nothing to remove)
`, true, 1,
		func(fs *flag.FlagSet) {
			force, deleteDisks = false, false
			fs.BoolVar(&deleteDisks, "delete-disks", false, "remove the disk and checkpoint files the daemon created for the machine")
			fs.BoolVar(&force, "force", false, "disconnect the machine's NBD clients, discard a saved state, instead of refusing")
		},
		func(ctx context.Context, c *cli, cl *api.Client, f *clientFlags, args []string) error {
			out, err := cl.DeleteVM(ctx, args[0], api.DeleteVM{Force: force, DeleteDisks: deleteDisks})
			return f.reply(c, out, err, func() error {
				if out.Disconnected > 0 {
					fmt.Fprintf(c.stdout, "disconnected %d NBD %s\n", out.Disconnected, plural(out.Disconnected, "client", "clients"))
				}
				fmt.Fprintf(c.stdout, "deleted machine %s\n", out.Name)
				for _, p := range out.Removed {
					fmt.Fprintf(c.stdout, "  removed %s\n", p)
				}
				for _, p := range out.Kept {
					fmt.Fprintf(c.stdout, "  kept    %s\n", p)
				}
				return nil
			})
		})
}

func vmOptimizeCommand() *command {
	var full bool
	return clientVerb("vm optimize", "NAME [--full]", "give the unused space of a running machine's disk files back (Optimize-VHD)",
		`Compacts the files the machine's disks run on while it runs; Hyper-V
needs the disk detached for that, but the daemon owns the I/O path, so the
guest's I/O only waits for one step at a time. Without --full, space
already released (trimmed or zeroed blocks, discarded ranges) is given back
to the host's file system; with --full, blocks that read as zeros are
released too, blocks at the end of each file move into the free space
below them and the file is cut. What the disks read does not change, nor
do the frozen files of checkpoints. Checkpoint changes wait until it ends;
it is refused while a checkpoint job runs. See vhdkit optimize for a disk
no daemon serves.

Examples:
  vhdkit vm optimize web
  vhdkit vm optimize web --full
`, true, 1,
		func(fs *flag.FlagSet) {
			full = false
			fs.BoolVar(&full, "full", false, "also release blocks of zeros, move blocks down and cut the files")
		},
		func(ctx context.Context, c *cli, cl *api.Client, f *clientFlags, args []string) error {
			o, err := cl.OptimizeVM(ctx, args[0], api.OptimizeVM{Full: full})
			return f.reply(c, o, err, func() error {
				for _, d := range o.Disks {
					fmt.Fprintf(c.stdout, "disk %d: %s: %s -> %s (%d %s released, %d moved)\n", d.Disk, d.Path,
						humanBytes(d.SizeBefore), humanBytes(d.SizeAfter), d.Released, plural(d.Released, "block", "blocks"), d.Moved)
				}
				return nil
			})
		})
}

func vmRepairCommand() *command {
	var disk int
	var path, drop string
	return clientVerb("vm repair", "NAME [--disk I --path FILE] [--drop-checkpoint CP]", "bring a failed machine back: retry, re-attach a moved file, drop a lost checkpoint",
		`Without flags, opens the machine's disks again (after the cause was fixed:
a file restored, a lock released). --disk I --path FILE re-attaches disk I
to the file it runs on, moved to FILE: the file must open with its chain,
be the disk's size and, when the machine runs from a checkpoint, be a child
of that checkpoint's file (a moved checkpoint file is repaired with
"vhdkit set-parent" on its child). --drop-checkpoint removes a checkpoint
whose files are lost, with its descendants; a machine that ran from it
continues from its parent, losing what it wrote since. A job the failure
held resumes once the machine serves again.

Examples:
  vhdkit vm repair web
  vhdkit vm repair web --disk 0 --path /srv/moved/disk0_3.avhdx
  vhdkit vm repair web --drop-checkpoint cp-3
`, true, 1,
		func(fs *flag.FlagSet) {
			disk, path, drop = -1, "", ""
			fs.IntVar(&disk, "disk", -1, "the `INDEX` of the disk to re-attach (with --path)")
			fs.StringVar(&path, "path", "", "the `FILE` disk --disk runs on now")
			fs.StringVar(&drop, "drop-checkpoint", "", "remove the lost checkpoint `CP` (name or ID) and its descendants")
		},
		func(ctx context.Context, c *cli, cl *api.Client, f *clientFlags, args []string) error {
			req := api.RepairVM{DropCheckpoint: drop}
			if (disk >= 0) != (path != "") {
				return usagef("--disk and --path go together")
			}
			if path != "" {
				abs, err := filepath.Abs(path)
				if err != nil {
					return err
				}
				req.Disk, req.Path = &disk, abs // the daemon may run elsewhere
			}
			v, err := cl.RepairVM(ctx, args[0], req)
			return f.reply(c, v, err, func() error {
				printVM(c.stdout, v)
				return nil
			})
		})
}

func plural(n int, one, many string) string {
	if n == 1 {
		return one
	}
	return many
}

// currentOf names the checkpoint a machine runs from: name (ID).
func currentOf(v *api.VM) string {
	if v.Current == "" {
		return "-"
	}
	return fmt.Sprintf("%s (%s)", v.CurrentName, v.Current)
}

func vmCreateCommand() *command {
	var disks sizeList
	var attach stringList
	var run settingsFlags
	return clientVerb("vm create", "NAME (--disk SIZE | --attach FILE)... [--memory SIZE] [--cpus N] [--generation 1|2] [--kernel F [--initrd F] [--append S]] [--cdrom ISO] [--network none|user|bridge=BR] [--accel auto|kvm|tcg]", "create a machine with new dynamic VHDX disks or existing files",
		`New disks are dynamic VHDX files under DIR/vms/NAME, in the order given;
--attach serves an existing VHDX file instead (it is kept when the machine
is deleted).

The other flags say how it runs (vm set changes them while it is off).
Generation 1 boots BIOS (SeaBIOS on QEMU's i440fx), generation 2 UEFI
(OVMF on q35, from Debian's ovmf package; its UEFI variables are kept
per machine). Every machine has a DVD drive (IDE on generation 1, AHCI on
2); --cdrom puts an ISO image in it, read-only (vm set --cdrom changes the
disc, also while the machine runs). --network user gives a virtio network adapter
on QEMU's user-mode NAT (the guest reaches out, nothing reaches in);
bridge=BR a tap on the host's bridge BR through qemu-bridge-helper, which
/etc/qemu/bridge.conf must allow ("allow BR"); each machine gets its own
MAC address.

Examples:
  vhdkit vm create web --disk 20G
  vhdkit vm create db --attach /srv/db.vhdx --disk 1G
  vhdkit vm create tiny --disk 1G --memory 256M --cpus 2 --kernel /boot/vmlinuz --initrd /boot/initrd.img --append console=ttyS0
  vhdkit vm create win --disk 64G --memory 4G --cpus 2 --generation 2 --cdrom /srv/iso/install.iso --network user
  vhdkit vm create lan --disk 20G --network bridge=br0
`, true, 1,
		func(fs *flag.FlagSet) {
			disks, attach = nil, nil
			fs.Var(&disks, "disk", "add a new disk of `SIZE` (repeatable)")
			fs.Var(&attach, "attach", "add the existing VHDX `FILE` as a disk (repeatable)")
			run.add(fs)
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
			settings, err := run.settings()
			if err != nil {
				return err
			}
			v, err := cl.CreateVM(ctx, api.CreateVM{Name: args[0], Disks: disks, Attach: attach, Settings: settings})
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
	fmt.Fprintf(w, "machine %s (created %s): %s\n", v.Name, v.Created.Local().Format(time.DateTime), v.State)
	if v.Error != "" {
		fmt.Fprintf(w, "error: %s\n", v.Error)
		fmt.Fprintf(w, "  (its disks are not exported; see \"vhdkit vm repair --help\")\n")
	}
	printRun(w, v)
	fmt.Fprintf(w, "checkpoints: %d, running from: %s\n", v.Checkpoints, currentOf(v))
	for _, d := range v.Disks {
		if d.Export != "" {
			fmt.Fprintf(w, "disk %d: export %q, %s\n", d.Index, d.Export, formatSize(d.Size))
		} else {
			fmt.Fprintf(w, "disk %d: not exported, %s\n", d.Index, formatSize(d.Size))
		}
		fmt.Fprintf(w, "  runs on %s\n", d.Path)
		for _, p := range d.Chain[min(1, len(d.Chain)):] {
			fmt.Fprintf(w, "  over    %s\n", p)
		}
	}
}
