package main

import (
	"context"
	"flag"
	"path/filepath"
	"strings"

	"github.com/vhdkit/vhdkit/internal/api"
)

func vmImportCommand() *command {
	var name string
	var copyFiles bool
	return clientVerb("vm import", "DIR [--name NAME] [--copy]", "make a machine of a Hyper-V VM folder, its checkpoints included",
		`DIR is a Hyper-V VM folder, exported or copied: its .vhdx and .avhdx files
(in DIR/Virtual Hard Disks, or in DIR itself) become the machine's disks and
checkpoint tree. Which file is whose parent is read from the files' parent
links (a child records its parent's DataWriteGuid), not from their names.
Each file without a parent (a .vhdx, as a rule) is a disk; every file but
the one each disk runs on becomes a checkpoint, named after the file
(disk_6A1F....avhdx: "disk_6A1F..."), dated by its modification time. The file a disk runs on is its leaf
modified last (Hyper-V records it in the binary .vmcx, which is not read).

The files are used in place, and from then on belong to the daemon:
deleting a checkpoint merges and removes its file. --copy copies them into
the daemon's folder for the machine and links the copies to each other,
leaving the originals untouched.

A folder whose files do not form a tree is refused with the reason, and
nothing is left behind: a child whose parent is missing, two copies of one
file, parent links that loop, or disks whose checkpoint trees differ.

Examples:
  vhdkit vm import "/mnt/export/Web Server"
  vhdkit vm import /srv/hyperv/db --name db --copy
`, true, 1,
		func(fs *flag.FlagSet) {
			name, copyFiles = "", false
			fs.StringVar(&name, "name", "", "the machine's `NAME` (default: DIR's name, made a valid name)")
			fs.BoolVar(&copyFiles, "copy", false, "copy the files into the daemon's folder instead of using them in place")
		},
		func(ctx context.Context, c *cli, cl *api.Client, f *clientFlags, args []string) error {
			dir, err := filepath.Abs(args[0]) // the daemon may run elsewhere
			if err != nil {
				return err
			}
			if name == "" {
				name = machineNameOf(filepath.Base(dir))
			}
			v, err := cl.ImportVM(ctx, api.ImportVM{Name: name, Dir: dir, Copy: copyFiles})
			return f.reply(c, v, err, func() error {
				printVM(c.stdout, v)
				return nil
			})
		})
}

// machineNameOf makes a folder's name a machine name: Hyper-V names
// machines freely ("Web Server 1"), the daemon takes letters, digits,
// '.', '_' and '-'.
func machineNameOf(s string) string {
	out := strings.Map(func(r rune) rune {
		switch {
		case r >= 'a' && r <= 'z', r >= 'A' && r <= 'Z', r >= '0' && r <= '9', r == '.', r == '_', r == '-':
			return r
		}
		return '-'
	}, s)
	out = strings.TrimLeft(out, "._-")
	if len(out) > 64 {
		out = out[:64]
	}
	return out
}
