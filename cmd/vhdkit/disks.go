package main

import (
	"context"
	"flag"
	"fmt"
	"path/filepath"
	"strconv"

	"github.com/vhdkit/vhdkit/internal/api"
)

// vm add-disk and vm remove-disk: Add-VMHardDiskDrive and
// Remove-VMHardDiskDrive.

func vmAddDiskCommand() *command {
	var path, create string
	return clientVerb("vm add-disk", "NAME (--path FILE | --create SIZE)", "add a disk to a machine, hot-plugged if it runs (Add-VMHardDiskDrive)",
		`--create SIZE makes a new dynamic VHDX in the machine's folder (as vm
create --disk); --path FILE adds an existing VHDX file (as vm create
--attach: it is kept when the machine is deleted; a file in the machine's
own folder, a disk removed before, comes back as the daemon's). The disk
comes last: export NAME/I, where I is its index.

While the machine is off this changes its configuration. While it runs
(or is paused) the disk is hot-plugged: the guest sees a new virtio disk
(/dev/vdX on Linux) at once. A machine has at most 8 disks. A machine with
checkpoints keeps its disks as they are (each checkpoint holds a file per
disk): delete its checkpoints first. A saved machine is refused too.

Examples:
  vhdkit vm add-disk web --create 10G
  vhdkit vm add-disk web --path /srv/data.vhdx
`, true, 1,
		func(fs *flag.FlagSet) {
			path, create = "", ""
			fs.StringVar(&path, "path", "", "add the existing VHDX `FILE`")
			fs.StringVar(&create, "create", "", "add a new dynamic VHDX disk of `SIZE`")
		},
		func(ctx context.Context, c *cli, cl *api.Client, f *clientFlags, args []string) error {
			if (path == "") == (create == "") {
				return usagef("give --path FILE or --create SIZE, one of them")
			}
			var req api.AddDisk
			if create != "" {
				n, err := parseSize(create)
				if err != nil {
					return usagef("--create: %v", err)
				}
				req.Size = n
			} else {
				abs, err := filepath.Abs(path)
				if err != nil {
					return err
				}
				req.Path = abs // the daemon may run elsewhere
			}
			v, err := cl.AddDisk(ctx, args[0], req)
			return f.reply(c, v, err, func() error {
				d := v.Disks[len(v.Disks)-1]
				how := "added"
				if v.Power == api.PowerRunning || v.Power == api.PowerPaused {
					how = "hot-plugged"
				}
				fmt.Fprintf(c.stdout, "disk %d %s: export %q, %s, %s\n", d.Index, how, d.Export, formatSize(d.Size), d.Path)
				return nil
			})
		})
}

func vmRemoveDiskCommand() *command {
	var del bool
	return clientVerb("vm remove-disk", "NAME INDEX [--delete]", "remove a disk from a machine, unplugged if it runs (Remove-VMHardDiskDrive)",
		`INDEX is the disk's index (vm show lists them). The file stays where it is
unless --delete, which deletes a file the daemon made (an attached file is
yours: it is never deleted). A file the daemon made stays in the machine's
folder: vm add-disk --path brings it back, vm delete --delete-disks
removes it with the others. The disks after it move down one: disk I+1
becomes disk I, export NAME/I.

While the machine runs the disk is unplugged: the guest is asked to
release it and the command waits until it has (up to two minutes; a
paused machine is refused, its guest cannot answer); only the last disk is unplugged while it runs (the others would
be renumbered under it), and never disk 0, which it booted from. A
machine's only disk is not removed, nor a disk of a machine with
checkpoints (delete them first) or a saved one. While it is off, NBD
clients connected to the disk or to those after it must disconnect first.

Examples:
  vhdkit vm remove-disk web 1
  vhdkit vm remove-disk web 2 --delete
`, true, 2,
		func(fs *flag.FlagSet) {
			del = false
			fs.BoolVar(&del, "delete", false, "delete the disk's file (one the daemon made)")
		},
		func(ctx context.Context, c *cli, cl *api.Client, f *clientFlags, args []string) error {
			i, err := strconv.Atoi(args[1])
			if err != nil || i < 0 {
				return usagef("INDEX %q: give the disk's index, 0 for the first (vhdkit vm show %s lists them)", args[1], args[0])
			}
			out, err := cl.RemoveDisk(ctx, args[0], i, api.RemoveDisk{Delete: del})
			return f.reply(c, out, err, func() error {
				what := "kept"
				if out.Deleted {
					what = "deleted"
				}
				fmt.Fprintf(c.stdout, "disk %d removed from machine %s; its file %s %s\n", i, out.VM.Name, what, out.Path)
				return nil
			})
		})
}
