package main

import (
	"fmt"
	"math/rand/v2"
	"os"
	"regexp"
	"strconv"
	"strings"
	"time"

	"github.com/vhdkit/vhdkit/internal/api"
	"github.com/vhdkit/vhdkit/internal/guest"
)

// The machine story's guest: the test kit's kernel and a busybox
// initramfs whose script writes demoSlots slots of 1 MiB at the start of
// its disk, round after round, slot s of round r holding pattern
// (r+s) mod demoPatterns, each write direct and synced and read back.
// The ACPI power button (vm stop) makes it finish the write in flight,
// say where it stopped and power off: from that line the demo knows
// every byte the disk must hold.
const (
	demoSlots    = 32
	demoPatterns = 8
	demoGuestMiB = 256
)

const demoGuestScript = `insmod /lib/modules/extra/evdev.ko
insmod /lib/modules/extra/button.ko
button=
for e in /sys/class/input/event*; do
  grep -q "Power Button" $e/device/name && button=/dev/input/${e##*/}
done
writer() {
  r=0
  while :; do
    s=0
    while [ $s -lt %[1]d ]; do
      if [ -e /tmp/stop ]; then echo "demo-guest: stopped at round $r slot $s"; return; fi
      p=$(( (r + s) %% %[2]d ))
      dd if=/p$p of=/dev/vda bs=1M seek=$s oflag=direct conv=fsync,notrunc status=none || echo "demo-guest: write error"
      dd if=/dev/vda of=/tmp/back bs=1M skip=$s count=1 iflag=direct status=none
      cmp -s /p$p /tmp/back && echo "demo-guest: wrote slot $s" || echo "demo-guest: read-back mismatch in slot $s"
      s=$(( s + 1 ))
    done
    echo "demo-guest: round $r written"
    r=$(( r + 1 ))
  done
}
writer &
writer_pid=$!
echo "demo-guest: writing"
dd if=$button bs=24 count=1 status=none > /dev/null
echo "demo-guest: power button pressed: finishing the write in flight"
touch /tmp/stop
wait $writer_pid
sync
`

var (
	demoRound   = regexp.MustCompile(`demo-guest: round (\d+) written`)
	demoStopped = regexp.MustCompile(`demo-guest: stopped at round (\d+) slot (\d+)`)
)

// machineStory is the demo with a real guest: the host runs the machine
// under QEMU, it writes while a checkpoint is taken and deleted.
func (s *demoSession) machineStory(kit *guest.Env, dir string) error {
	c := s.c
	rng := rand.New(rand.NewPCG(1, 2))
	files := map[string]guest.File{}
	patterns := make([][]byte, demoPatterns)
	for i := range patterns {
		patterns[i] = make([]byte, 1<<20)
		for j := 0; j < len(patterns[i]); j += 8 {
			v := rng.Uint64() | 1 // no zero block: a lost write cannot pass for an unwritten slot
			for k := range 8 {
				patterns[i][j+k] = byte(v >> (8 * k))
			}
		}
		files[fmt.Sprintf("/p%d", i)] = guest.File{Data: patterns[i]}
	}
	for _, m := range []string{"evdev", "button"} {
		f, err := kit.ModuleFile(m)
		if err != nil {
			return err
		}
		files["/lib/modules/extra/"+m+".ko"] = f
	}
	boot, err := kit.WriteBoot(dir, guest.Options{
		Disks:  []guest.Disk{{}},
		Files:  files,
		Script: fmt.Sprintf(demoGuestScript, demoSlots, demoPatterns),
	})
	if err != nil {
		return err
	}

	s.say("Create a machine: a 256 MiB disk (a dynamic VHDX) and a small Linux guest")
	fmt.Fprintf(c.stdout, "  (the guest writes %d MiB at the start of its disk over and over, each write synced and read back)\n", demoSlots)
	if err := s.vhdkit(nil, "vm", "create", "demo", "--disk", "256M", "--memory", fmt.Sprintf("%dM", demoGuestMiB),
		"--kernel", boot.Kernel, "--initrd", boot.Initrd, "--append", boot.Append); err != nil {
		return err
	}

	s.say("Start it: QEMU runs the guest, its disk reaches it through the host's NBD export")
	if err := s.vhdkit(nil, "vm", "start", "demo"); err != nil {
		return err
	}
	v, err := (&api.Client{DataDir: s.data}).VM(s.ctx, "demo")
	if err != nil {
		return err
	}
	console := func() string { b, _ := os.ReadFile(v.Runtime.Console); return strings.ReplaceAll(string(b), "\r", "") }
	rounds := func() int { return len(demoRound.FindAllString(console(), -1)) }
	writes := func() int { return strings.Count(console(), "demo-guest: wrote slot") }
	waitRounds := func(n int) error {
		for deadline := time.Now().Add(5 * time.Minute); rounds() < n; time.Sleep(100 * time.Millisecond) {
			if time.Now().After(deadline) {
				return fmt.Errorf("the guest did not write %d rounds in 5 minutes; its console:\n%s", n, console())
			}
		}
		fmt.Fprintf(c.stdout, "  guest console: %s\n", lastLine(console(), "demo-guest: round"))
		return nil
	}
	if err := waitRounds(1); err != nil {
		return err
	}

	s.say("Take a standard checkpoint: the guest pauses, its memory is saved, its disk moves to an .avhdx")
	if err := s.vhdkit(nil, "checkpoint", "create", "demo", "--name", "before-upgrade", "--type", "standard"); err != nil {
		return err
	}
	s.listFiles()

	s.say("The guest runs on: its writes land in the .avhdx")
	if err := waitRounds(rounds() + 2); err != nil {
		return err
	}
	s.listFiles()

	s.say("Delete the checkpoint while the guest runs: a live merge")
	before := writes()
	mergeStart := time.Now()
	if err := s.vhdkit(c.stderr, "checkpoint", "delete", "demo", "before-upgrade", "--wait", "--progress", "--bandwidth", "16M"); err != nil {
		return err
	}
	mergeTime := time.Since(mergeStart)
	job, err := s.lastJob()
	if err != nil {
		return err
	}
	fmt.Fprintf(c.stdout, "  merged %s in %.1fs while the guest made %d writes of 1 MiB; I/O was held %.1f ms at the switch\n",
		humanBytes(job.Done), mergeTime.Seconds(), writes()-before, job.StallMS)

	s.say("The machine runs on its .vhdx again; the .avhdx and the saved memory are gone")
	if err := s.vhdkit(nil, "vm", "show", "demo"); err != nil {
		return err
	}
	s.listFiles()
	if err := waitRounds(rounds() + 1); err != nil {
		return err
	}

	s.say("Stop it: the ACPI power button; the guest finishes its write and powers off")
	if err := s.vhdkit(nil, "vm", "stop", "demo", "--timeout", "300"); err != nil {
		return err
	}
	out := console()
	m := demoStopped.FindStringSubmatch(out)
	if m == nil {
		return fmt.Errorf("the guest did not say where it stopped; its console:\n%s", out)
	}
	if strings.Contains(out, "demo-guest: write error") || strings.Contains(out, "demo-guest: read-back mismatch") {
		return fmt.Errorf("the guest saw an I/O error; its console:\n%s", out)
	}
	round, _ := strconv.Atoi(m[1])
	slot, _ := strconv.Atoi(m[2])
	fmt.Fprintf(c.stdout, "  guest console: %s\n", m[0])

	s.say("Verify every byte")
	want := make([]byte, demoDiskSize)
	for sl := range demoSlots {
		r := round
		if sl >= slot {
			r-- // not yet written in the last round
		}
		if r >= 0 {
			copy(want[sl<<20:], patterns[(r+sl)%demoPatterns])
		}
	}
	total := round*demoSlots + slot
	if n := writes(); n != total {
		return fmt.Errorf("the guest stopped after write %d but read back %d", total, n)
	}
	fmt.Fprintf(c.stdout, "  the guest made %d writes of 1 MiB, each read back without an error\n", total)
	if err := s.verifyFile(want); err != nil {
		return err
	}
	fmt.Fprintf(c.stdout, "\nDemo finished in %.1fs: a running machine checkpointed and merged back live under %d writes, no write lost.\n",
		time.Since(s.started).Seconds(), total)
	return nil
}

// lastLine is the last line of text that starts with prefix.
func lastLine(text, prefix string) string {
	lines := strings.Split(text, "\n")
	for i := len(lines) - 1; i >= 0; i-- {
		if l := strings.TrimSpace(lines[i]); strings.HasPrefix(l, prefix) {
			return l
		}
	}
	return ""
}
