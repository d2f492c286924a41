package main

import (
	"context"
	"flag"
	"fmt"
	"path/filepath"

	"github.com/vhdkit/vhdkit/internal/api"
)

// The verbs that run machines under QEMU: vm start, stop, pause, resume,
// and the settings vm create takes.

// settingsFlags are vm create's and vm set's flags for how the machine
// runs.
type settingsFlags struct {
	memory, kernel, initrd, appendLine, accel, cdrom, network string
	cpus, generation                                          int
}

func (s *settingsFlags) add(fs *flag.FlagSet) {
	*s = settingsFlags{}
	fs.StringVar(&s.memory, "memory", "", "the guest's memory `SIZE`, whole MiB (default 512M)")
	fs.IntVar(&s.cpus, "cpus", 0, "the guest's `N` virtual CPUs (default 1)")
	fs.StringVar(&s.kernel, "kernel", "", "boot this Linux kernel `FILE` directly (QEMU's -kernel)")
	fs.StringVar(&s.initrd, "initrd", "", "with --kernel: its initramfs `FILE`")
	fs.StringVar(&s.appendLine, "append", "", "with --kernel: its command `LINE`, e.g. \"console=ttyS0 root=/dev/vda1\"")
	fs.StringVar(&s.accel, "accel", "", "`auto`, kvm or tcg: auto takes KVM where /dev/kvm is usable and the CPU has vmx/svm (default auto)")
	fs.IntVar(&s.generation, "generation", 0, "`1` boots BIOS (SeaBIOS, i440fx), 2 boots UEFI (OVMF, q35; needs the ovmf package) (default 1)")
	fs.StringVar(&s.cdrom, "cdrom", "", "put the ISO image `FILE` in the machine's DVD drive (read-only)")
	fs.StringVar(&s.network, "network", "", "`none` (no adapter), user (QEMU's NAT: the guest reaches out) or bridge=BR (a tap on the host's bridge BR) (default none)")
}

// settings renders the flags for the daemon: paths absolute (it may run
// elsewhere), the memory in MiB.
func (s *settingsFlags) settings() (*api.Settings, error) {
	out := &api.Settings{CPUs: s.cpus, Accel: s.accel, Append: s.appendLine, Generation: s.generation, Network: s.network}
	if s.memory != "" {
		n, err := parseSize(s.memory)
		if err != nil {
			return nil, usagef("--memory: %v", err)
		}
		if n%(1<<20) != 0 || n == 0 {
			return nil, usagef("--memory %s: use a whole number of MiB (e.g. 512M, 2G)", s.memory)
		}
		out.MemoryMiB = int(n >> 20)
	}
	for _, f := range []struct {
		in  string
		out *string
	}{{s.kernel, &out.Kernel}, {s.initrd, &out.Initrd}, {s.cdrom, &out.CDROM}} {
		if f.in == "" {
			continue
		}
		abs, err := filepath.Abs(f.in)
		if err != nil {
			return nil, err
		}
		*f.out = abs
	}
	return out, nil
}

func vmStartCommand() *command {
	return clientVerb("vm start", "NAME", "start a machine under QEMU (Start-VM)",
		`QEMU runs the machine with its settings (vm create --memory, --cpus,
--kernel, --initrd, --append, --accel); its disks are the daemon's NBD
exports, with a reconnect delay so that a daemon restart only holds the
guest's I/O. QEMU runs in a session of its own: stopping or killing the
daemon leaves the machine running, and the next daemon re-adopts it. The
serial console is a unix socket (vm show --json: runtime.serial), what it
printed is kept in runtime.console. A saved machine (vm save) goes on
from its saved state. Needs qemu-system-x86_64 (Debian: qemu-system-x86).

Examples:
  vhdkit vm create tiny --disk 1G --memory 256M --kernel vmlinuz --initrd initrd.img --append console=ttyS0
  vhdkit vm start tiny
  socat -,raw,echo=0 UNIX-CONNECT:$(vhdkit vm show tiny --json | jq -r .runtime.serial)
`, true, 1, nil,
		func(ctx context.Context, c *cli, cl *api.Client, f *clientFlags, args []string) error {
			v, err := cl.StartVM(ctx, args[0])
			return f.reply(c, v, err, func() error {
				printVM(c.stdout, v)
				return nil
			})
		})
}

func vmStopCommand() *command {
	var turnOff bool
	var timeout int
	return clientVerb("vm stop", "NAME [--turn-off] [--timeout SECONDS]", "power a machine off (Stop-VM): ACPI power button, then off",
		`Presses the guest's ACPI power button and waits up to --timeout seconds
for it to power off; a guest still up then (or one that is paused, which
cannot react) is turned off: QEMU ends at once, as when pulling the plug,
and what the guest had not written to its disks is lost. --turn-off turns
it off without asking the guest (Stop-VM -TurnOff).

Examples:
  vhdkit vm stop web
  vhdkit vm stop web --timeout 10
  vhdkit vm stop web --turn-off
`, true, 1,
		func(fs *flag.FlagSet) {
			turnOff, timeout = false, 0
			fs.BoolVar(&turnOff, "turn-off", false, "end QEMU at once, without the ACPI power button")
			fs.IntVar(&timeout, "timeout", 0, "`SECONDS` the guest has to power off before it is turned off (default 60)")
		},
		func(ctx context.Context, c *cli, cl *api.Client, f *clientFlags, args []string) error {
			if timeout < 0 {
				return usagef("--timeout %d: use a positive number of seconds", timeout)
			}
			v, err := cl.StopVM(ctx, args[0], api.StopVM{TurnOff: turnOff, TimeoutSeconds: timeout})
			return f.reply(c, v, err, func() error {
				fmt.Fprintf(c.stdout, "machine %s is %s\n", v.Name, v.Power)
				return nil
			})
		})
}

func vmPauseResumeCommand(pause bool) *command {
	name, summary, help := "vm pause", "stop a running machine's CPUs (Suspend-VM)", `The guest stops where it is, its memory kept; vm resume runs it on.

Examples:
  vhdkit vm pause web
`
	if !pause {
		name, summary, help = "vm resume", "run a paused machine's CPUs again (Resume-VM)", `Examples:
  vhdkit vm resume web
`
	}
	return clientVerb(name, "NAME", summary, help, true, 1, nil,
		func(ctx context.Context, c *cli, cl *api.Client, f *clientFlags, args []string) error {
			do := cl.PauseVM
			if !pause {
				do = cl.ResumeVM
			}
			v, err := do(ctx, args[0])
			return f.reply(c, v, err, func() error {
				fmt.Fprintf(c.stdout, "machine %s is %s\n", v.Name, v.Power)
				return nil
			})
		})
}

func vmRestartCommand() *command {
	return clientVerb("vm restart", "NAME", "reset a running machine: the guest reboots at once (Restart-VM -Force)",
		`Resets the machine as its reset button would (QEMU's system_reset): the
guest reboots at once, without being asked, and what it had not written to
its disks is lost. An ACPI reboot request is not used because not every
guest handles one; for a clean reboot, ask the guest itself (or vm stop,
then vm start). A paused machine is reset and runs.

Examples:
  vhdkit vm restart web
`, true, 1, nil,
		func(ctx context.Context, c *cli, cl *api.Client, f *clientFlags, args []string) error {
			v, err := cl.RestartVM(ctx, args[0])
			return f.reply(c, v, err, func() error {
				fmt.Fprintf(c.stdout, "machine %s restarted; it is %s\n", v.Name, v.Power)
				return nil
			})
		})
}

func vmSaveCommand() *command {
	return clientVerb("vm save", "NAME", "save a running machine's memory and devices to a file and end its QEMU (Save-VM)",
		`Pauses the machine, writes its memory and device state (QEMU's migration
stream) to DIR/run/NAME/saved.state, and ends QEMU: the machine is
"saved". vm start goes on from that instant, the guest none the wiser (its
clock jumps), and the file is deleted once it runs. The disks are not in
the file: while a machine is saved its disks must stay as they are, so
checkpoint apply is refused and vm delete needs --force (which discards
the saved state). vm stop --turn-off discards the saved state: the next
start boots afresh.

Examples:
  vhdkit vm save web
  vhdkit vm start web
`, true, 1, nil,
		func(ctx context.Context, c *cli, cl *api.Client, f *clientFlags, args []string) error {
			v, err := cl.SaveVM(ctx, args[0])
			return f.reply(c, v, err, func() error {
				fmt.Fprintf(c.stdout, "machine %s is %s\n", v.Name, v.Power)
				return nil
			})
		})
}

// printRun adds the power state and QEMU to printVM's description.
func printRun(w interface{ Write([]byte) (int, error) }, v *api.VM) {
	fmt.Fprintf(w, "power: %s\n", orDash(v.Power))
	if s := v.Settings; s != nil {
		gen := max(s.Generation, 1)
		fmt.Fprintf(w, "settings: generation %d, %d MiB, %d %s, accel %s, network %s", gen, s.MemoryMiB, s.CPUs, plural(s.CPUs, "CPU", "CPUs"), s.Accel, orDash(s.Network))
		if s.Kernel != "" {
			fmt.Fprintf(w, ", kernel %s", s.Kernel)
		}
		if s.CDROM != "" {
			fmt.Fprintf(w, ", DVD %s", s.CDROM)
		}
		fmt.Fprintln(w)
	}
	if r := v.Runtime; r != nil {
		if r.Pid != 0 {
			fmt.Fprintf(w, "QEMU: pid %d, %s; console %s (log %s)\n", r.Pid, r.Accel, r.Serial, r.Console)
		}
		if r.Reason != "" {
			fmt.Fprintf(w, "failed: %s\n", r.Reason)
		}
		if r.Log != "" {
			fmt.Fprintf(w, "QEMU's log: %s\n", r.Log)
		}
	}
}

func vmSetCommand() *command {
	var run settingsFlags
	var set *flag.FlagSet
	return clientVerb("vm set", "NAME [--memory SIZE] [--cpus N] [--generation 1|2] [--kernel F] [--initrd F] [--append S] [--cdrom ISO] [--network none|user|bridge=BR] [--accel auto|kvm|tcg]",
		"change a machine's settings while it is off, its DVD's disc at any time (Set-VM)",
		`Changes the settings given, as vm create takes them, and keeps the others.
The machine must be off: like Hyper-V's Set-VM for memory and processors,
a running, paused or saved machine is refused (stop it first; a saved
machine's state holds the hardware it was saved with). The one exception
is the DVD drive's disc, as with Set-VMDvdDrive: --cdrom ISO alone puts a
disc in a running machine's drive in place of the one there (the guest is
told of the media change), --cdrom "" takes it out. The request is
checked whole and a refusal changes nothing: memory 16 MiB to 1 TiB, at
most as many CPUs as the host has, generation 1 or 2, files that exist
(absolute paths are sent; relative ones are taken from here), an ISO
outside the daemon's data directory. An empty value clears a setting:
--kernel "" (with --initrd "" --append "") boots from the disks again,
--cdrom "" empties the DVD drive, --network "" means none, --accel ""
auto. Changing the generation changes the firmware: a disk installed
under one may not boot under the other.

Examples:
  vhdkit vm set web --memory 2G --cpus 2
  vhdkit vm set web --cdrom /srv/iso/debian-12-netinst.iso --generation 2
  vhdkit vm set web --network bridge=br0
  vhdkit vm set web --cdrom /srv/iso/drivers.iso     (also while it runs)
  vhdkit vm set web --kernel "" --initrd "" --append "" --cdrom ""
`, true, 1,
		func(fs *flag.FlagSet) {
			run.add(fs)
			set = fs
		},
		func(ctx context.Context, c *cli, cl *api.Client, f *clientFlags, args []string) error {
			given, err := run.settings()
			if err != nil {
				return err
			}
			var req api.SetVM
			set.Visit(func(fl *flag.Flag) {
				switch fl.Name {
				case "memory":
					req.MemoryMiB = &given.MemoryMiB
				case "cpus":
					req.CPUs = &given.CPUs
				case "generation":
					req.Generation = &given.Generation
				case "accel":
					req.Accel = &given.Accel
				case "kernel":
					req.Kernel = &given.Kernel
				case "initrd":
					req.Initrd = &given.Initrd
				case "append":
					req.Append = &given.Append
				case "cdrom":
					req.CDROM = &given.CDROM
				case "network":
					req.Network = &given.Network
				}
			})
			if req == (api.SetVM{}) {
				return usagef("give a setting to change, e.g. --memory 1G (see vhdkit vm set --help)")
			}
			v, err := cl.SetVM(ctx, args[0], req)
			return f.reply(c, v, err, func() error {
				printVM(c.stdout, v)
				return nil
			})
		})
}
