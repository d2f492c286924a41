package main

import (
	"context"
	"flag"
	"fmt"
	"io"
	"path/filepath"
	"text/tabwriter"
	"time"

	"github.com/vhdkit/vhdkit/internal/api"
)

func checkpointCommand() *command {
	return &command{
		name:     "checkpoint",
		synopsis: "COMMAND [flags] [arguments]",
		summary:  "checkpoints of a machine: create, list, apply, rename, export, delete (live merge)",
		help: `A checkpoint freezes every disk of a machine at one instant; the machine
goes on writing to new differencing children (.avhdx). Deleting a
checkpoint merges, live, while the machine keeps running. A running
machine's checkpoint is production (its file systems frozen through the
guest agent), standard (its memory saved too) or crash, as in Hyper-V.

CHECKPOINT is a checkpoint's name or its ID, "cp-N" as list shows it; names
of that form are refused, so "2" is always a name and cp-2 always an ID.

Examples:
  vhdkit checkpoint create web --name before-upgrade
  vhdkit checkpoint create web --name mem --type standard
  vhdkit checkpoint list web
  vhdkit checkpoint apply web mem
  vhdkit checkpoint delete web before-upgrade --wait
`,
		sub: []*command{
			checkpointCreateCommand(),
			clientVerb("checkpoint list", "VM", "show a machine's checkpoint tree and where it runs now", "", true, 1, nil,
				func(ctx context.Context, c *cli, cl *api.Client, f *clientFlags, args []string) error {
					t, err := cl.Checkpoints(ctx, args[0])
					return f.reply(c, t, err, func() error {
						printTree(c.stdout, t)
						return nil
					})
				}),
			checkpointApplyCommand(),
			clientVerb("checkpoint rename", "VM CHECKPOINT NEWNAME", "rename a checkpoint", "", true, 3, nil,
				func(ctx context.Context, c *cli, cl *api.Client, f *clientFlags, args []string) error {
					cp, err := cl.RenameCheckpoint(ctx, args[0], args[1], args[2])
					return f.reply(c, cp, err, func() error {
						fmt.Fprintf(c.stdout, "renamed checkpoint %s to %q\n", cp.ID, cp.Name)
						return nil
					})
				}),
			clientVerb("checkpoint export", "VM CHECKPOINT DIR", "write each disk's state at a checkpoint as a standalone VHDX into DIR",
				"The files are DIR/VM-diskN.vhdx, dynamic and without a parent.\n", true, 3, nil,
				func(ctx context.Context, c *cli, cl *api.Client, f *clientFlags, args []string) error {
					dir := args[2]
					if abs, err := filepath.Abs(dir); err == nil {
						dir = abs // the daemon may run elsewhere
					}
					out, err := cl.ExportCheckpoint(ctx, args[0], args[1], dir)
					return f.reply(c, out, err, func() error {
						for _, p := range out.Files {
							fmt.Fprintf(c.stdout, "exported %s\n", p)
						}
						return nil
					})
				}),
			checkpointDeleteCommand(),
		},
	}
}

func checkpointCreateCommand() *command {
	var name, kind string
	var productionOnly bool
	return clientVerb("checkpoint create", "VM [--name NAME] [--type production|standard|crash] [--production-only]",
		"checkpoint every disk of a machine at one instant (Checkpoint-VM)",
		`I/O is held and drained on all disks, each continues on a new .avhdx child,
then I/O resumes: connected clients notice nothing. For a running machine
--type says what the guest does meanwhile, as Hyper-V's checkpoint types:

  production  (the default) the guest's file systems are frozen through
              the QEMU guest agent while the disks switch, then thawed:
              the checkpoint holds them clean, as after a sync. An agent
              that does not answer in time (none installed, a paused
              machine) gets a standard checkpoint instead, unless
              --production-only: then the command fails, nothing changed.
  standard    the machine is paused, its memory and device state saved
              with the checkpoint (a .vmstate file beside its disks), the
              disks switch, it resumes. Applying it runs the machine on
              from that instant.
  crash       the disks switch, the guest unaware: as after a power cut.

A machine that is off (or saved, or failed) gets a crash checkpoint
whatever the type, with a note saying so: no guest changes its disks.
The time the guest was frozen or paused (the stun; for crash, the time
the disks' I/O was held) is printed and kept.

Examples:
  vhdkit checkpoint create web --name before-upgrade
  vhdkit checkpoint create web --name nightly --production-only
  vhdkit checkpoint create web --name mem --type standard --json
`, true, 1,
		func(fs *flag.FlagSet) {
			name, kind, productionOnly = "", "", false
			fs.StringVar(&name, "name", "", "the checkpoint's `NAME` (default: machine name and time)")
			fs.StringVar(&kind, "type", "production", "checkpoint `TYPE`: production, standard or crash")
			fs.BoolVar(&productionOnly, "production-only", false, "fail rather than take a standard checkpoint when the guest agent does not answer")
		},
		func(ctx context.Context, c *cli, cl *api.Client, f *clientFlags, args []string) error {
			cp, err := cl.CreateCheckpoint(ctx, args[0], api.CreateCheckpoint{Name: name, Type: kind, ProductionOnly: productionOnly})
			return f.reply(c, cp, err, func() error {
				fmt.Fprintf(c.stdout, "checkpoint %q (id %s) of %s: %s\n", cp.Name, cp.ID, args[0], cp.Type)
				switch cp.Type {
				case api.CheckpointProduction:
					fmt.Fprintf(c.stdout, "  guest frozen %s (%d file %s frozen; the agent said %q during the switch)\n",
						stunText(cp.StunMS), cp.Frozen, plural(cp.Frozen, "system", "systems"), cp.AgentStatus)
				case api.CheckpointStandard:
					fmt.Fprintf(c.stdout, "  guest paused %s; memory state %s\n", stunText(cp.StunMS), cp.StateFile)
				case api.CheckpointCrash:
					fmt.Fprintf(c.stdout, "  disk I/O held %s\n", stunText(cp.StunMS))
				}
				if cp.Note != "" {
					fmt.Fprintf(c.stdout, "  note: %s\n", cp.Note)
				}
				v, err := cl.VM(ctx, args[0])
				if err != nil {
					return err
				}
				for i, p := range cp.Files {
					fmt.Fprintf(c.stdout, "  disk %d: %s frozen", i, p)
					if i < len(v.Disks) {
						fmt.Fprintf(c.stdout, ", now runs on %s", v.Disks[i].Path)
					}
					fmt.Fprintln(c.stdout)
				}
				return nil
			})
		})
}

func checkpointApplyCommand() *command {
	var save, force bool
	var saveName string
	return clientVerb("checkpoint apply", "VM CHECKPOINT [--save] [--force]", "revert a machine to a checkpoint (Restore-VMSnapshot)",
		`The disks continue from the checkpoint's state on new children. The current
state is discarded, unless --save checkpoints it first. A running or
paused machine is turned off first (its --save checkpoint is taken before,
as a production one). Applying a standard checkpoint then starts the
machine from its saved memory: it runs on from the instant of the
checkpoint (a machine that was off is left saved, as Hyper-V leaves it:
vm start runs it on from there). After a production or crash checkpoint
the machine stays off; vm start boots it from the disks. While NBD clients other than the
machine are connected to its disks the apply is refused (their disk would
change under them, as a guest's file system would); --force disconnects
them first.

Examples:
  vhdkit checkpoint apply web before-upgrade
  vhdkit checkpoint apply web cp-3 --save --save-name broken
`, true, 2,
		func(fs *flag.FlagSet) {
			save, force, saveName = false, false, ""
			fs.BoolVar(&save, "save", false, "checkpoint the current state before reverting")
			fs.StringVar(&saveName, "save-name", "", "the `NAME` of the --save checkpoint")
			fs.BoolVar(&force, "force", false, "disconnect the machine's NBD clients instead of refusing")
		},
		func(ctx context.Context, c *cli, cl *api.Client, f *clientFlags, args []string) error {
			v, err := cl.ApplyCheckpoint(ctx, args[0], args[1], api.ApplyCheckpoint{Save: save, SaveName: saveName, Force: force})
			return f.reply(c, v, err, func() error {
				if v.Disconnected > 0 {
					fmt.Fprintf(c.stdout, "disconnected %d NBD %s\n", v.Disconnected, plural(v.Disconnected, "client", "clients"))
				}
				fmt.Fprintf(c.stdout, "%s now runs from checkpoint %s; the machine is %s\n", v.Name, currentOf(v), v.Power)
				return nil
			})
		})
}

func checkpointDeleteCommand() *command {
	var wait, subtree, progress bool
	var bw sizeValue
	return clientVerb("checkpoint delete", "VM CHECKPOINT [--wait] [--subtree]", "delete a checkpoint, merging live (Remove-VMSnapshot)",
		`Starts a job that deletes the checkpoint by Hyper-V's tree rules: if nothing
depends on it, its files go; if one thing does (a child checkpoint or the
running machine), that is merged into the checkpoint's files, live, while
the machine runs. --subtree deletes its descendants too. The command returns
the job at once; --wait follows it to the end with a progress bar.

Examples:
  vhdkit checkpoint delete web before-upgrade --wait
  vhdkit checkpoint delete web old --subtree --bandwidth 50M
`, true, 2,
		func(fs *flag.FlagSet) {
			wait, subtree, progress = false, false, false
			fs.BoolVar(&wait, "wait", false, "wait for the job to finish, showing progress")
			fs.BoolVar(&subtree, "subtree", false, "delete the checkpoint's descendants too")
			fs.BoolVar(&progress, "progress", false, "draw the progress bar even when stderr is not a terminal")
			fs.Var(&bw, "bandwidth", "limit the merge to `RATE` bytes per second (K, M, G suffixes)")
		},
		func(ctx context.Context, c *cli, cl *api.Client, f *clientFlags, args []string) error {
			j, err := cl.DeleteCheckpoint(ctx, args[0], args[1], subtree, bw.n)
			if err != nil || !wait {
				return f.reply(c, j, err, func() error {
					fmt.Fprintf(c.stdout, "job %s: deleting checkpoint %q of %s (%s)\n", j.ID, j.Checkpoint, j.VM, j.State)
					return nil
				})
			}
			j, err = c.follow(ctx, cl, j.ID, progress)
			return f.reply(c, j, err, func() error {
				fmt.Fprintf(c.stdout, "job %s: checkpoint %q of %s deleted, %s merged\n", j.ID, j.Checkpoint, j.VM, humanBytes(j.Done))
				return nil
			})
		})
}

// follow polls a job until it finishes, drawing its progress on stderr.
// A job that pauses on an error ends the wait with that error; so does a
// job that ends failed or canceled. Stopping the wait (Ctrl-C) leaves the
// job running and says how to follow it again.
func (c *cli) follow(ctx context.Context, cl *api.Client, id string, force bool) (*api.Job, error) {
	draw := force || isTerminal(c.stderr)
	bar := newProgressBar(io.Discard, 0, isTerminal(c.stderr))
	if draw {
		bar.w = c.stderr
	}
	tick := time.NewTicker(100 * time.Millisecond)
	defer tick.Stop()
	stopped := func() error {
		return fmt.Errorf("stopped waiting; job %s goes on in the daemon (follow it with \"vhdkit job wait %s\", stop it with \"vhdkit job cancel %s\")", id, id, id)
	}
	for {
		j, err := cl.Job(ctx, id)
		if err != nil {
			bar.abort()
			if ctx.Err() != nil {
				return nil, stopped()
			}
			return nil, err
		}
		bar.total = j.Total
		bar.add(j.Done - bar.done)
		switch {
		case j.State == api.JobDone:
			bar.finish()
			return j, nil
		case j.Finished():
			bar.abort()
			return j, fmt.Errorf("job %s %s: %s", j.ID, j.State, j.Reason)
		case j.State == api.JobPaused && j.Reason != "paused by request":
			bar.abort()
			return j, fmt.Errorf("job %s paused: %s (fix the cause, then \"vhdkit job resume %s\")", j.ID, j.Reason, j.ID)
		}
		select {
		case <-ctx.Done():
			bar.abort()
			return j, stopped()
		case <-tick.C:
		}
	}
}

// printTree draws the checkpoint tree with the running state ("Now")
// under the checkpoint it continues from.
func printTree(w io.Writer, t *api.Checkpoints) {
	kids := map[string][]api.Checkpoint{}
	for _, c := range t.Checkpoints {
		kids[c.Parent] = append(kids[c.Parent], c)
	}
	var walk func(parent, indent string)
	walk = func(parent, indent string) {
		list := kids[parent]
		n := len(list)
		if t.Current == parent {
			n++
		}
		i := 0
		branch := func() (string, string) {
			i++
			if i == n {
				return indent + "`-- ", indent + "    "
			}
			return indent + "|-- ", indent + "|   "
		}
		for _, c := range list {
			head, next := branch()
			kind := c.Type
			switch {
			case c.StunMS > 0 && c.Type == api.CheckpointCrash:
				kind += ", I/O held " + stunText(c.StunMS)
			case c.StunMS > 0:
				kind += ", stun " + stunText(c.StunMS)
			}
			fmt.Fprintf(w, "%s%s  (%s, %s, %s)\n", head, c.Name, c.ID, c.Created.Local().Format(time.DateTime), kind)
			walk(c.ID, next)
		}
		if t.Current == parent {
			head, _ := branch()
			fmt.Fprintf(w, "%sNow\n", head)
		}
	}
	fmt.Fprintf(w, "%s\n", t.VM)
	walk("", "")
}

func jobCommand() *command {
	control := func(action, summary string) *command {
		return clientVerb("job "+action, "ID", summary, "", true, 1, nil,
			func(ctx context.Context, c *cli, cl *api.Client, f *clientFlags, args []string) error {
				j, err := cl.ControlJob(ctx, args[0], action)
				return f.reply(c, j, err, func() error {
					printJob(c.stdout, j)
					return nil
				})
			})
	}
	return &command{
		name:     "job",
		synopsis: "COMMAND [flags] [arguments]",
		summary:  "list and control the daemon's jobs (checkpoint merges)",
		help: `A job survives daemon restarts: a running merge resumes where its copy was
made durable. Pausing stops the copy (writes keep being mirrored, so
nothing is lost); a job paused by an error (a full disk, an I/O error)
names the reason and resumes once it is fixed.

Examples:
  vhdkit job list
  vhdkit job pause 7
  vhdkit job set 7 --bandwidth 20M
`,
		sub: []*command{
			clientVerb("job list", "", "list jobs", "", true, 0, nil,
				func(ctx context.Context, c *cli, cl *api.Client, f *clientFlags, args []string) error {
					jobs, err := cl.Jobs(ctx)
					return f.reply(c, jobs, err, func() error {
						tw := tabwriter.NewWriter(c.stdout, 0, 4, 2, ' ', 0)
						fmt.Fprintln(tw, "ID\tVM\tCHECKPOINT\tSTATE\tPROGRESS\tREASON")
						for _, j := range jobs {
							fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%s\t%s\n", j.ID, j.VM, j.Checkpoint, j.State, jobProgress(&j), j.Reason)
						}
						return tw.Flush()
					})
				}),
			clientVerb("job show", "ID", "show a job", "", true, 1, nil,
				func(ctx context.Context, c *cli, cl *api.Client, f *clientFlags, args []string) error {
					j, err := cl.Job(ctx, args[0])
					return f.reply(c, j, err, func() error {
						printJob(c.stdout, j)
						return nil
					})
				}),
			control("pause", "pause a job"),
			control("resume", "resume a paused job"),
			jobCancelCommand(),
			jobSetCommand(),
			jobWaitCommand(),
		},
	}
}

func jobCancelCommand() *command {
	return clientVerb("job cancel", "ID", "cancel a job (between merges; a merge under way cannot be undone)",
		`A job not yet merging ends canceled at once. A merge under way has already
changed the checkpoint's file, so it completes first: the job then ends
"done" if that was all it had to delete (the cancel came too late), or
"canceled" keeping the checkpoints it had not begun. The reply says which;
"vhdkit job wait ID" follows the job to its end.
`, true, 1, nil,
		func(ctx context.Context, c *cli, cl *api.Client, f *clientFlags, args []string) error {
			j, err := cl.ControlJob(ctx, args[0], "cancel")
			return f.reply(c, j, err, func() error {
				switch {
				case j.Finished():
					fmt.Fprintf(c.stdout, "job %s %s", j.ID, j.State)
					if j.Reason != "" {
						fmt.Fprintf(c.stdout, ": %s", j.Reason)
					}
					fmt.Fprintln(c.stdout)
				default:
					fmt.Fprintf(c.stdout, "job %s: not canceled yet: the merge under way has changed checkpoint %q's file, so it completes first; the job then ends done, or canceled if checkpoints were left to delete\n", j.ID, j.Checkpoint)
					fmt.Fprintf(c.stdout, "follow it with \"vhdkit job wait %s\"\n", j.ID)
				}
				return nil
			})
		})
}

func jobWaitCommand() *command {
	var progress bool
	return clientVerb("job wait", "ID", "wait for a job to end: exit 0 when done, 1 when failed or canceled",
		`Follows the job with a progress bar on a terminal (--progress draws it
anyway). A job paused by an error ends the wait with the reason (exit 1);
one paused by request is waited for. Ctrl-C stops waiting, not the job.
`, true, 1,
		func(fs *flag.FlagSet) {
			progress = false
			fs.BoolVar(&progress, "progress", false, "draw the progress bar even when stderr is not a terminal")
		},
		func(ctx context.Context, c *cli, cl *api.Client, f *clientFlags, args []string) error {
			j, err := c.follow(ctx, cl, args[0], progress)
			if err != nil && f.json && j != nil && j.Finished() {
				// The final state in JSON, and the exit status says it failed.
				printJSON(c.stdout, j)
				return err
			}
			return f.reply(c, j, err, func() error {
				fmt.Fprintf(c.stdout, "job %s done: checkpoint %q of %s deleted, %s merged\n", j.ID, j.Checkpoint, j.VM, humanBytes(j.Done))
				if j.Reason != "" {
					fmt.Fprintf(c.stdout, "  (%s)\n", j.Reason)
				}
				return nil
			})
		})
}

func jobSetCommand() *command {
	var bw sizeValue
	return clientVerb("job set", "ID --bandwidth RATE", "change a running job's bandwidth limit", "--bandwidth 0 removes the limit.\n", true, 1,
		func(fs *flag.FlagSet) {
			bw = sizeValue{}
			fs.Var(&bw, "bandwidth", "limit the copy to `RATE` bytes per second (K, M, G suffixes; 0: no limit)")
		},
		func(ctx context.Context, c *cli, cl *api.Client, f *clientFlags, args []string) error {
			if !bw.set {
				return usagef("--bandwidth is required")
			}
			j, err := cl.SetJob(ctx, args[0], api.SetJob{Bandwidth: &bw.n})
			return f.reply(c, j, err, func() error {
				printJob(c.stdout, j)
				return nil
			})
		})
}

func jobProgress(j *api.Job) string {
	if j.Total == 0 {
		return "-"
	}
	return fmt.Sprintf("%d%% of %s", j.Done*100/j.Total, humanBytes(j.Total))
}

func printJob(w io.Writer, j *api.Job) {
	fmt.Fprintf(w, "job %s: %s of checkpoint %q (%s) of %s\n", j.ID, j.Kind, j.Checkpoint, j.CheckpointID, j.VM)
	fmt.Fprintf(w, "  state: %s", j.State)
	if j.Reason != "" {
		fmt.Fprintf(w, " (%s)", j.Reason)
	}
	fmt.Fprintln(w)
	fmt.Fprintf(w, "  progress: %s of %s", humanBytes(j.Done), humanBytes(j.Total))
	if j.ETA > 0 {
		fmt.Fprintf(w, ", about %s left", (time.Duration(j.ETA) * time.Second).Round(time.Second))
	}
	fmt.Fprintln(w)
	if j.Bandwidth > 0 {
		fmt.Fprintf(w, "  bandwidth: %s/s\n", humanBytes(j.Bandwidth))
	}
	if j.Cloned+j.KernelCopied+j.Copied > 0 {
		fmt.Fprintf(w, "  data: %s cloned, %s copied in the kernel, %s copied\n", humanBytes(j.Cloned), humanBytes(j.KernelCopied), humanBytes(j.Copied))
	}
}

// stunText renders a stun time in milliseconds.
func stunText(ms float64) string {
	return fmt.Sprintf("%.1f ms", ms)
}
