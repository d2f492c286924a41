package main

import (
	"bytes"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/vhdkit/vhdkit/internal/api"
	"github.com/vhdkit/vhdkit/internal/guest"
	"github.com/vhdkit/vhdkit/internal/testenv"
	"golang.org/x/sys/unix"
)

// TestServeVMRun runs a machine under QEMU started by the daemon: vm
// create with the busybox guest's kernel and initramfs, vm start; the
// guest writes a pattern to its disk through the daemon's NBD export, then
// writes and reads back a slot in a loop. The machine is paused and
// resumed; the daemon is killed with SIGKILL and restarted: it re-adopts
// the same QEMU, running, and the guest goes on without an I/O error
// (reconnect-delay held its I/O). vm stop (the busybox guest ignores the
// ACPI button, so the timeout turns it off) ends QEMU; the pattern is in
// the VHDX file, which checks clean.
func TestServeVMRun(t *testing.T) {
	env := guest.Require(t)
	testenv.Tool(t, "qemu-img")
	dir := shortTempDir(t)
	pattern := make([]byte, 4<<20)
	fillPattern(pattern, 8<<20, 0x5a)
	slot := make([]byte, 1<<20)
	fillPattern(slot, 0, 0x33)
	boot, err := env.WriteBoot(dir, guest.Options{
		Disks: []guest.Disk{{}},
		Files: map[string]guest.File{"/pattern": {Data: pattern}, "/slot": {Data: slot}},
		Script: `dd if=/pattern of=/dev/vda bs=1M seek=8 oflag=direct conv=fsync,notrunc status=none || echo GUEST-IO-ERROR
echo VHDKIT-RUN-WROTE
i=0
while true; do
  s=$(( 16 + i % 4 ))
  dd if=/slot of=/dev/vda bs=1M seek=$s oflag=direct conv=fsync,notrunc status=none || echo GUEST-IO-ERROR
  dd if=/dev/vda of=/tmp/back bs=1M skip=$s count=1 iflag=direct status=none || echo GUEST-IO-ERROR
  cmp /slot /tmp/back || echo GUEST-IO-ERROR
  echo "ITER $i"
  i=$(( i + 1 ))
  usleep 100000
done
`,
	})
	if err != nil {
		t.Fatal(err)
	}
	data := filepath.Join(dir, "d")
	d := startDaemon(t, data)
	d.cli(t, "vm", "create", "g", "--disk", "64M", "--memory", "256M", "--cpus", "1", "--accel", "tcg",
		"--kernel", boot.Kernel, "--initrd", boot.Initrd, "--append", boot.Append)
	if v := d.vm(t, "g"); v.Power != api.PowerOff || v.Settings == nil || v.Settings.MemoryMiB != 256 {
		t.Fatalf("after create: power %q, settings %+v", v.Power, v.Settings)
	}
	d.cli(t, "vm", "start", "g")
	v := d.vm(t, "g")
	if v.Power != api.PowerRunning || v.Runtime == nil || v.Runtime.Pid == 0 || v.Runtime.Accel != "tcg" {
		t.Fatalf("after start: power %q, runtime %+v", v.Power, v.Runtime)
	}
	pid := v.Runtime.Pid
	// QEMU runs in its own session: it outlives a killed daemon, and so
	// must be ended here whatever the test does.
	t.Cleanup(func() { syscall.Kill(pid, syscall.SIGKILL) })
	consoleLog := v.Runtime.Console
	console := func() string {
		b, _ := os.ReadFile(consoleLog)
		return strings.ReplaceAll(string(b), "\r", "")
	}
	waitFor := func(marker string) {
		t.Helper()
		for deadline := time.Now().Add(10 * time.Minute); time.Now().Before(deadline); time.Sleep(50 * time.Millisecond) {
			c := console()
			if strings.Contains(c, "GUEST-IO-ERROR") {
				t.Fatalf("the guest saw an I/O error; console:\n%s", c)
			}
			if strings.Contains(c, marker) {
				return
			}
		}
		t.Fatalf("the guest never printed %q; console:\n%s\ndaemon:\n%s", marker, console(), d.stderr)
	}
	waitFor("VHDKIT-RUN-WROTE\n")
	waitFor("ITER 2\n")
	if out := d.cli(t, "vm", "list"); !strings.Contains(out, "running") {
		t.Fatalf("vm list:\n%s", out)
	}

	d.cli(t, "vm", "pause", "g")
	if p := d.vm(t, "g").Power; p != api.PowerPaused {
		t.Fatalf("after pause: %q", p)
	}
	d.cli(t, "vm", "resume", "g")
	if p := d.vm(t, "g").Power; p != api.PowerRunning {
		t.Fatalf("after resume: %q", p)
	}

	// SIGKILL: nothing of the daemon runs on but QEMU.
	d.kill()
	if err := syscall.Kill(pid, 0); err != nil {
		t.Fatalf("QEMU died with the daemon: %v", err)
	}
	before := strings.Count(console(), "ITER ")
	d = startDaemon(t, data)
	v = d.vm(t, "g")
	if v.Power != api.PowerRunning || v.Runtime == nil || v.Runtime.Pid != pid {
		t.Fatalf("after the restart: power %q, runtime %+v, want running pid %d", v.Power, v.Runtime, pid)
	}
	waitFor(fmt.Sprintf("ITER %d\n", before+3))

	out := d.cli(t, "vm", "stop", "g", "--timeout", "2")
	if !strings.Contains(out, "off") {
		t.Fatalf("vm stop: %s", out)
	}
	if v := d.vm(t, "g"); v.Power != api.PowerOff || v.Runtime != nil {
		t.Fatalf("after stop: power %q, runtime %+v", v.Power, v.Runtime)
	}
	if syscall.Kill(pid, 0) == nil {
		if b, _ := os.ReadFile(fmt.Sprintf("/proc/%d/cmdline", pid)); strings.Contains(string(b), "qemu") {
			t.Fatalf("QEMU (pid %d) still runs after vm stop", pid)
		}
	}
	if c := console(); strings.Contains(c, "GUEST-IO-ERROR") {
		t.Fatalf("the guest saw an I/O error; console:\n%s", c)
	}
	d.stop(t)
	img := filepath.Join(data, "vms", "g", "disk0.vhdx")
	if !bytes.Equal(readImage(t, img, 8<<20, int64(len(pattern))), pattern) {
		t.Fatal("the pattern the guest wrote is not in the VHDX file")
	}
	if !bytes.Equal(readImage(t, img, 16<<20, 1<<20), slot) {
		t.Fatal("the slot the guest wrote is not in the VHDX file")
	}
	checkClean(t, img)
}

// waitPower polls vm show until the machine's power is want.
func (d *daemon) waitPower(t *testing.T, name, want string) api.VM {
	t.Helper()
	var v api.VM
	for deadline := time.Now().Add(10 * time.Minute); time.Now().Before(deadline); time.Sleep(100 * time.Millisecond) {
		if v = d.vm(t, name); v.Power == want {
			return v
		}
	}
	t.Fatalf("machine %s stayed %s (runtime %+v), want %s", name, v.Power, v.Runtime, want)
	return v
}

// TestServeVMRunEnds: a guest that powers itself off leaves the machine
// off; a QEMU that dies (SIGKILL from outside) leaves it failed with the
// reason and QEMU's log named, and it starts again from there. A running
// machine is not deleted (checkpoint apply turns it off first:
// checkpoint_run_test.go); bad settings are refused at create.
func TestServeVMRunEnds(t *testing.T) {
	env := guest.Require(t)
	dir := shortTempDir(t)
	boot, err := env.WriteBoot(dir, guest.Options{Disks: []guest.Disk{{}},
		Script: "echo VHDKIT-GUEST-UP\n[ -e /proc/cmdline ] && grep -q stay /proc/cmdline && while true; do sleep 1; done\n"})
	if err != nil {
		t.Fatal(err)
	}
	d := startDaemon(t, filepath.Join(dir, "d"))
	for _, c := range []struct {
		args  []string
		words []string
	}{
		{[]string{"--accel", "xen"}, []string{"accelerator", "xen"}},
		{[]string{"--kernel", filepath.Join(dir, "missing")}, []string{"missing", "no such file"}},
		{[]string{"--initrd", boot.Initrd}, []string{"needs a kernel"}},
		{[]string{"--memory", "8M"}, []string{"memory 8 MiB"}},
		{[]string{"--cpus", "-1"}, []string{"CPUs"}},
	} {
		d.fails(t, c.words, append([]string{"vm", "create", "bad", "--disk", "16M"}, c.args...)...)
	}
	if out := d.cli(t, "vm", "list"); strings.Contains(out, "bad") {
		t.Fatalf("a refused machine was made:\n%s", out)
	}

	d.cli(t, "vm", "create", "once", "--disk", "16M", "--memory", "128M", "--accel", "tcg",
		"--kernel", boot.Kernel, "--initrd", boot.Initrd, "--append", boot.Append)
	v := d.vm(t, "once")
	d.cli(t, "vm", "start", "once")
	pid := d.vm(t, "once").Runtime.Pid
	t.Cleanup(func() { syscall.Kill(pid, syscall.SIGKILL) })
	v = d.waitPower(t, "once", api.PowerOff)
	if v.Runtime != nil {
		t.Fatalf("a machine that powered off keeps a runtime: %+v", v.Runtime)
	}

	d.cli(t, "vm", "create", "stay", "--disk", "16M", "--memory", "128M", "--accel", "tcg",
		"--kernel", boot.Kernel, "--initrd", boot.Initrd, "--append", boot.Append+" stay")
	d.cli(t, "checkpoint", "create", "stay", "--name", "c1")
	d.cli(t, "vm", "start", "stay")
	pid = d.vm(t, "stay").Runtime.Pid
	t.Cleanup(func() { syscall.Kill(pid, syscall.SIGKILL) })
	d.fails(t, []string{"running", "stop it first"}, "vm", "delete", "stay", "--delete-disks", "--force")
	d.fails(t, []string{"is running"}, "vm", "start", "stay")

	syscall.Kill(pid, syscall.SIGKILL)
	v = d.waitPower(t, "stay", api.PowerFailed)
	if v.Runtime == nil || !strings.Contains(v.Runtime.Reason, "QEMU ended") || v.Runtime.Log == "" {
		t.Fatalf("failed machine's runtime: %+v", v.Runtime)
	}
	if _, err := os.Stat(v.Runtime.Log); err != nil {
		t.Fatalf("QEMU's log is not kept: %v", err)
	}
	if out := d.cli(t, "vm", "show", "stay"); !strings.Contains(out, "failed: QEMU ended") {
		t.Fatalf("vm show of a failed machine:\n%s", out)
	}
	d.cli(t, "vm", "start", "stay")
	pid = d.vm(t, "stay").Runtime.Pid
	t.Cleanup(func() { syscall.Kill(pid, syscall.SIGKILL) })
	if out := d.cli(t, "vm", "stop", "stay", "--turn-off"); !strings.Contains(out, "is off") {
		t.Fatalf("vm stop --turn-off: %s", out)
	}
	d.cli(t, "vm", "delete", "stay", "--delete-disks")
}

// TestServeVMStartNoQEMU: without qemu-system-x86_64 on the daemon's
// $PATH, vm start says which package to install and the machine stays
// startable.
func TestServeVMStartNoQEMU(t *testing.T) {
	vhdkitBinary(t) // built with the real $PATH
	t.Setenv("PATH", t.TempDir())
	d := startDaemon(t, filepath.Join(shortTempDir(t), "d"))
	d.cli(t, "vm", "create", "g", "--disk", "16M", "--accel", "tcg")
	d.fails(t, []string{"qemu-system-x86_64", "qemu-system-x86"}, "vm", "start", "g")
	if v := d.vm(t, "g"); v.Power != api.PowerFailed || v.Runtime == nil || !strings.Contains(v.Runtime.Reason, "qemu-system-x86") {
		t.Fatalf("after a start without QEMU: power %q, runtime %+v", v.Power, v.Runtime)
	}
}

// TestServeVMStopACPI: vm stop presses the ACPI power button; a guest
// that handles it (here: the button and evdev modules, a read of the
// Power Button's event device, then poweroff) powers off by itself before
// the timeout, and the machine is off.
func TestServeVMStopACPI(t *testing.T) {
	env := guest.Require(t)
	dir := shortTempDir(t)
	files := map[string]guest.File{}
	for _, m := range []string{"evdev", "button"} {
		f, err := env.ModuleFile(m)
		if err != nil {
			t.Fatal(err)
		}
		files["/lib/modules/extra/"+m+".ko"] = f
	}
	boot, err := env.WriteBoot(dir, guest.Options{Disks: []guest.Disk{{}}, Files: files, Script: `insmod /lib/modules/extra/evdev.ko
insmod /lib/modules/extra/button.ko
dev=
for e in /sys/class/input/event*; do
  grep -q "Power Button" $e/device/name && dev=/dev/input/${e##*/}
done
echo "VHDKIT-ACPI-READY $dev"
dd if=$dev bs=24 count=1 status=none > /dev/null
echo VHDKIT-ACPI-PRESSED
`})
	if err != nil {
		t.Fatal(err)
	}
	d := startDaemon(t, filepath.Join(dir, "d"))
	d.cli(t, "vm", "create", "g", "--disk", "16M", "--memory", "128M", "--accel", "tcg",
		"--kernel", boot.Kernel, "--initrd", boot.Initrd, "--append", boot.Append)
	d.cli(t, "vm", "start", "g")
	v := d.vm(t, "g")
	pid, consoleLog := v.Runtime.Pid, v.Runtime.Console
	t.Cleanup(func() { syscall.Kill(pid, syscall.SIGKILL) })
	console := func() string { b, _ := os.ReadFile(consoleLog); return strings.ReplaceAll(string(b), "\r", "") }
	for deadline := time.Now().Add(10 * time.Minute); !strings.Contains(console(), "VHDKIT-ACPI-READY /dev/input/"); time.Sleep(50 * time.Millisecond) {
		if time.Now().After(deadline) {
			t.Fatalf("the guest never found its power button; console:\n%s", console())
		}
	}
	// A long timeout: only the guest's own power-off ends QEMU in time.
	if out := d.cli(t, "vm", "stop", "g", "--timeout", "600"); !strings.Contains(out, "is off") {
		t.Fatalf("vm stop: %s", out)
	}
	if c := console(); !strings.Contains(c, "VHDKIT-ACPI-PRESSED") || !strings.Contains(c, "reboot: Power down") {
		t.Fatalf("the guest did not power itself off; console:\n%s", c)
	}
	if !strings.Contains(d.stderr.String(), "how=\"powered off\"") {
		t.Fatalf("the daemon did not log a power-off by the guest:\n%s", d.stderr)
	}
}

// bootGuest creates and starts machine name on d with the busybox guest
// running script; it returns the machine and a reader of its console log.
func bootGuest(t testing.TB, d *daemon, dir, name, script string) (api.VM, func() string) {
	t.Helper()
	env := guest.Require(t)
	boot, err := env.WriteBoot(dir, guest.Options{Disks: []guest.Disk{{}}, Script: script})
	if err != nil {
		t.Fatal(err)
	}
	d.cli(t, "vm", "create", name, "--disk", "16M", "--memory", "128M", "--accel", "tcg",
		"--kernel", boot.Kernel, "--initrd", boot.Initrd, "--append", boot.Append)
	d.cli(t, "vm", "start", name)
	v := d.vm(t, name)
	pid, consoleLog := v.Runtime.Pid, v.Runtime.Console
	t.Cleanup(func() { syscall.Kill(pid, syscall.SIGKILL) })
	return v, func() string { b, _ := os.ReadFile(consoleLog); return strings.ReplaceAll(string(b), "\r", "") }
}

// waitConsole waits until ok(console()) holds.
func waitConsole(t testing.TB, console func() string, what string, ok func(string) bool) {
	t.Helper()
	for deadline := time.Now().Add(10 * time.Minute); !ok(console()); time.Sleep(50 * time.Millisecond) {
		if time.Now().After(deadline) {
			t.Fatalf("the guest never %s; console:\n%s", what, console())
		}
	}
}

// TestServeVMRestart: vm restart resets the machine (system_reset): the
// same QEMU runs on and the guest boots a second time, which the console
// shows (the script, which prints its marker once and then loops, prints
// it twice; the kernel boots "quiet"); a paused
// machine restarts and runs.
func TestServeVMRestart(t *testing.T) {
	dir := shortTempDir(t)
	d := startDaemon(t, filepath.Join(dir, "d"))
	v, console := bootGuest(t, d, dir, "g", "echo VHDKIT-BOOTED\nwhile true; do sleep 1; done\n")
	boots := func(n int) func(string) bool {
		return func(c string) bool { return strings.Count(c, "VHDKIT-BOOTED") >= n }
	}
	waitConsole(t, console, "booted", boots(1))
	if out := d.cli(t, "vm", "restart", "g"); !strings.Contains(out, "restarted") {
		t.Fatalf("vm restart: %s", out)
	}
	waitConsole(t, console, "booted again", boots(2))
	w := d.vm(t, "g")
	if w.Power != api.PowerRunning || w.Runtime == nil || w.Runtime.Pid != v.Runtime.Pid {
		t.Fatalf("after restart: power %q, runtime %+v, want running pid %d", w.Power, w.Runtime, v.Runtime.Pid)
	}
	d.cli(t, "vm", "pause", "g")
	d.cli(t, "vm", "restart", "g")
	if p := d.vm(t, "g").Power; p != api.PowerRunning {
		t.Fatalf("a paused machine after restart: %q", p)
	}
	waitConsole(t, console, "booted a third time", boots(3))
	d.cli(t, "vm", "stop", "g", "--turn-off")
	d.fails(t, []string{"is off"}, "vm", "restart", "g")
}

// TestServeVMConsole: vm console with stdin a pipe sends a command line
// to the shell the busybox guest runs on its serial console and prints
// the answer; the command returns after stdin ends (and --linger). On a
// terminal (a pty here) what is typed reaches the guest and Ctrl-]
// detaches, the terminal's settings restored, the machine still running.
func TestServeVMConsole(t *testing.T) {
	dir := shortTempDir(t)
	d := startDaemon(t, filepath.Join(dir, "d"))
	_, console := bootGuest(t, d, dir, "g", `echo VHDKIT-SHELL-READY
while read -r line; do eval "$line"; done
`)
	waitConsole(t, console, "started its shell", func(c string) bool { return strings.Contains(c, "VHDKIT-SHELL-READY") })

	cmd := exec.Command(d.bin, "vm", "console", "g", "--linger", "0.5")
	cmd.Env = append(os.Environ(), "VHDKIT_DATA="+d.data)
	stdin, err := cmd.StdinPipe()
	if err != nil {
		t.Fatal(err)
	}
	out := &lockedBuffer{}
	cmd.Stdout, cmd.Stderr = out, out
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	fmt.Fprintf(stdin, "echo ANSWER-$((6*7))\n")
	waitConsole(t, out.String, "answered on the console client", func(c string) bool { return strings.Contains(c, "ANSWER-42") })
	stdin.Close()
	if err := cmd.Wait(); err != nil {
		t.Fatalf("vm console after stdin ended: %v\n%s", err, out)
	}
	if !strings.Contains(console(), "ANSWER-42") {
		t.Fatalf("the console log lacks the answer:\n%s", console())
	}

	// A terminal: the pty's master plays the user.
	master, slave := openPTY(t)
	before, err := unix.IoctlGetTermios(int(slave.Fd()), unix.TCGETS)
	if err != nil {
		t.Fatal(err)
	}
	cmd = exec.Command(d.bin, "vm", "console", "g")
	cmd.Env = append(os.Environ(), "VHDKIT_DATA="+d.data)
	cmd.Stdin, cmd.Stdout, cmd.Stderr = slave, slave, slave
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	term := &lockedBuffer{}
	go io.Copy(term, master)
	waitConsole(t, term.String, "attached", func(c string) bool { return strings.Contains(c, "detach with Ctrl-]") })
	fmt.Fprintf(master, "echo TYPED-$((6*8))\r")
	waitConsole(t, term.String, "answered on the terminal", func(c string) bool { return strings.Contains(c, "TYPED-48") })
	master.Write([]byte{0x1d})
	if err := cmd.Wait(); err != nil {
		t.Fatalf("vm console after Ctrl-]: %v\n%s", err, term)
	}
	if !strings.Contains(term.String(), "detached") {
		t.Fatalf("no word of the detach:\n%s", term)
	}
	after, err := unix.IoctlGetTermios(int(slave.Fd()), unix.TCGETS)
	if err != nil {
		t.Fatal(err)
	}
	if *after != *before {
		t.Fatalf("the terminal's settings were not restored: %+v, were %+v", *after, *before)
	}
	if p := d.vm(t, "g").Power; p != api.PowerRunning {
		t.Fatalf("after detaching: %q", p)
	}

	// The machine ends under an attached console: the command ends too,
	// saying so, rather than waiting on its stdin.
	cmd = exec.Command(d.bin, "vm", "console", "g")
	cmd.Env = append(os.Environ(), "VHDKIT_DATA="+d.data)
	held, err := cmd.StdinPipe()
	if err != nil {
		t.Fatal(err)
	}
	defer held.Close()
	out = &lockedBuffer{}
	cmd.Stdout, cmd.Stderr = out, out
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	fmt.Fprintf(held, "echo STILL-$((2*21))\n")
	waitConsole(t, out.String, "answered again", func(c string) bool { return strings.Contains(c, "STILL-42") })
	d.cli(t, "vm", "stop", "g", "--turn-off")
	if err := cmd.Wait(); err == nil || !strings.Contains(out.String(), "console closed") {
		t.Fatalf("vm console as its machine ended: %v\n%s", err, out)
	}
	d.fails(t, []string{"is off", "only while it runs"}, "vm", "console", "g")
}

// openPTY opens a pseudo-terminal pair (posix_openpt, unlockpt, ptsname).
func openPTY(t *testing.T) (master, slave *os.File) {
	t.Helper()
	m, err := os.OpenFile("/dev/ptmx", os.O_RDWR|unix.O_NOCTTY, 0)
	if err != nil {
		t.Skipf("no pseudo-terminals: %v", err)
	}
	t.Cleanup(func() { m.Close() })
	if err := unix.IoctlSetPointerInt(int(m.Fd()), unix.TIOCSPTLCK, 0); err != nil {
		t.Fatal(err)
	}
	n, err := unix.IoctlGetInt(int(m.Fd()), unix.TIOCGPTN)
	if err != nil {
		t.Fatal(err)
	}
	s, err := os.OpenFile(fmt.Sprintf("/dev/pts/%d", n), os.O_RDWR|unix.O_NOCTTY, 0)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { s.Close() })
	return m, s
}

// TestServeVMSave: vm save writes the machine's memory and device state
// to a file and ends QEMU (power "saved"); the guest's counter, kept only
// in its shell's memory, goes on after vm start from where it was rather
// than from 0, and the guest did not boot again; the file goes once the
// machine runs. While saved, checkpoint apply and vm delete (without
// --force) are refused, vm stop without --turn-off too; the saved state
// survives a daemon restart; --turn-off discards it and the guest boots
// afresh.
func TestServeVMSave(t *testing.T) {
	dir := shortTempDir(t)
	data := filepath.Join(dir, "d")
	d := startDaemon(t, data)
	v, console := bootGuest(t, d, dir, "g", `echo VHDKIT-BOOTED
i=0
while true; do echo "COUNT $i"; i=$(( i + 1 )); usleep 200000; done
`)
	counts := func(c string) []int {
		var out []int
		for _, line := range strings.Split(c, "\n") {
			var n int
			if _, err := fmt.Sscanf(line, "COUNT %d", &n); err == nil {
				out = append(out, n)
			}
		}
		return out
	}
	waitConsole(t, console, "counted to 5", func(c string) bool { return len(counts(c)) > 5 })
	d.cli(t, "checkpoint", "create", "g", "--name", "c1")
	if out := d.cli(t, "vm", "save", "g"); !strings.Contains(out, "is saved") {
		t.Fatalf("vm save: %s", out)
	}
	w := d.vm(t, "g")
	if w.Power != api.PowerSaved || w.Runtime != nil {
		t.Fatalf("after save: power %q, runtime %+v", w.Power, w.Runtime)
	}
	if b, _ := os.ReadFile(fmt.Sprintf("/proc/%d/cmdline", v.Runtime.Pid)); strings.Contains(string(b), "qemu") {
		t.Fatalf("QEMU (pid %d) still runs after vm save", v.Runtime.Pid)
	}
	state := filepath.Join(data, "run", "g", "saved.state")
	if fi, err := os.Stat(state); err != nil || fi.Size() < 1<<20 {
		t.Fatalf("saved state: %v, %v", fi, err)
	}
	c := console()
	atSave := counts(c)
	last := atSave[len(atSave)-1]
	d.fails(t, []string{"is saved", "before applying"}, "checkpoint", "apply", "g", "c1", "--force")
	d.fails(t, []string{"is saved", "--force"}, "vm", "delete", "g", "--delete-disks")
	d.fails(t, []string{"is saved", "--turn-off"}, "vm", "stop", "g")

	// The saved state is in a file, not in the daemon.
	d.stop(t)
	d = startDaemon(t, data)
	if p := d.vm(t, "g").Power; p != api.PowerSaved {
		t.Fatalf("after a daemon restart: %q", p)
	}

	d.cli(t, "vm", "start", "g")
	w = d.vm(t, "g")
	if w.Power != api.PowerRunning || w.Runtime == nil {
		t.Fatalf("after start from saved: power %q, runtime %+v", w.Power, w.Runtime)
	}
	t.Cleanup(func() { syscall.Kill(w.Runtime.Pid, syscall.SIGKILL) })
	waitConsole(t, console, "counted on", func(s string) bool { return len(counts(s)) > len(atSave)+3 })
	after := counts(console()[len(c):])
	if after[0] != last+1 {
		t.Fatalf("the counter went on from %d after the restore (was %d at the save), want %d", after[0], last, last+1)
	}
	if n := strings.Count(console(), "VHDKIT-BOOTED"); n != 1 {
		t.Fatalf("the guest booted %d times, want once", n)
	}
	if _, err := os.Stat(state); !os.IsNotExist(err) {
		t.Fatalf("the saved state is still there after the resume: %v", err)
	}

	// A paused machine saves too, and runs once started (Hyper-V's Start
	// of a saved machine runs it).
	d.cli(t, "vm", "pause", "g")
	d.cli(t, "vm", "save", "g")
	n := len(counts(console()))
	d.cli(t, "vm", "start", "g")
	w = d.vm(t, "g")
	t.Cleanup(func() { syscall.Kill(w.Runtime.Pid, syscall.SIGKILL) })
	if w.Power != api.PowerRunning {
		t.Fatalf("a machine saved while paused, after start: %q", w.Power)
	}
	waitConsole(t, console, "counted on after the paused save", func(s string) bool { return len(counts(s)) > n+2 })
	if got := counts(console()); got[n] != got[n-1]+1 {
		t.Fatalf("after the paused save the counter went from %d to %d", got[n-1], got[n])
	}

	// Save again, then discard: the next start boots afresh.
	d.cli(t, "vm", "save", "g")
	if out := d.cli(t, "vm", "stop", "g", "--turn-off"); !strings.Contains(out, "is off") {
		t.Fatalf("vm stop --turn-off of a saved machine: %s", out)
	}
	if _, err := os.Stat(state); !os.IsNotExist(err) {
		t.Fatalf("the saved state is still there after it was discarded: %v", err)
	}
	d.cli(t, "vm", "start", "g")
	w = d.vm(t, "g")
	t.Cleanup(func() { syscall.Kill(w.Runtime.Pid, syscall.SIGKILL) })
	waitConsole(t, console, "booted afresh", func(s string) bool { return strings.Count(s, "VHDKIT-BOOTED") == 2 })
	d.cli(t, "vm", "save", "g")
	d.cli(t, "vm", "delete", "g", "--delete-disks", "--force")
	if _, err := os.Stat(filepath.Dir(state)); !os.IsNotExist(err) {
		t.Fatalf("the run files of a deleted machine are still there: %v", err)
	}
}

// TestServeVMSaveFails: a save that cannot be written (the file size
// limit of QEMU, inherited by the cat writing the stream, stands in for
// a full disk) fails with the reason, leaves no state file, and the
// machine runs on from where it was.
func TestServeVMSaveFails(t *testing.T) {
	dir := shortTempDir(t)
	data := filepath.Join(dir, "d")
	d := startDaemon(t, data)
	v, console := bootGuest(t, d, dir, "g", `i=0
while true; do echo "COUNT $i"; i=$(( i + 1 )); usleep 200000; done
`)
	waitConsole(t, console, "counted to 3", func(c string) bool { return strings.Contains(c, "COUNT 3\n") })
	limit := unix.Rlimit{Cur: 256 << 10, Max: 256 << 10}
	if err := unix.Prlimit(v.Runtime.Pid, unix.RLIMIT_FSIZE, &limit, nil); err != nil {
		t.Skipf("cannot limit QEMU's file size: %v", err)
	}
	d.fails(t, []string{"not saved", "migration failed"}, "vm", "save", "g")
	if p := d.vm(t, "g").Power; p != api.PowerRunning {
		t.Fatalf("after a failed save: %q", p)
	}
	run := filepath.Join(data, "run", "g")
	for _, f := range []string{"saved.state", "saved.state.part"} {
		if _, err := os.Stat(filepath.Join(run, f)); !os.IsNotExist(err) {
			t.Fatalf("%s after a failed save: %v", f, err)
		}
	}
	n := strings.Count(console(), "COUNT ")
	waitConsole(t, console, "counted on after the failed save", func(c string) bool { return strings.Count(c, "COUNT ") > n+2 })
	d.cli(t, "vm", "stop", "g", "--turn-off")
}

// TestServeVMSavedAcrossKill: what a daemon killed during vm save leaves
// is sorted out by the next one. A QEMU still running beside a state file
// (killed before QEMU quit) wins: the machine is re-adopted running and
// the file discarded, never resumed under disks that went on changing. A
// state file with its QEMU gone (killed after it quit) makes the machine
// saved; a state that does not load leaves it failed with the reason and
// the way out, and vm stop --turn-off discards it.
func TestServeVMSavedAcrossKill(t *testing.T) {
	dir := shortTempDir(t)
	data := filepath.Join(dir, "d")
	d := startDaemon(t, data)
	v, console := bootGuest(t, d, dir, "g", "echo VHDKIT-BOOTED\nwhile true; do sleep 1; done\n")
	waitConsole(t, console, "booted", func(c string) bool { return strings.Contains(c, "VHDKIT-BOOTED") })
	state := filepath.Join(data, "run", "g", "saved.state")
	if err := os.WriteFile(state, []byte("not a migration stream"), 0o600); err != nil {
		t.Fatal(err)
	}
	d.kill()
	d = startDaemon(t, data)
	if w := d.vm(t, "g"); w.Power != api.PowerRunning || w.Runtime == nil || w.Runtime.Pid != v.Runtime.Pid {
		t.Fatalf("re-adopted beside a state file: power %q, runtime %+v", w.Power, w.Runtime)
	}
	if _, err := os.Stat(state); !os.IsNotExist(err) {
		t.Fatalf("the state file beside a running QEMU was kept: %v", err)
	}

	if err := os.WriteFile(state, []byte("not a migration stream"), 0o600); err != nil {
		t.Fatal(err)
	}
	d.kill()
	syscall.Kill(v.Runtime.Pid, syscall.SIGKILL)
	for deadline := time.Now().Add(time.Minute); syscall.Kill(v.Runtime.Pid, 0) == nil; time.Sleep(50 * time.Millisecond) {
		if time.Now().After(deadline) {
			t.Fatal("QEMU outlived SIGKILL")
		}
	}
	d = startDaemon(t, data)
	if p := d.vm(t, "g").Power; p != api.PowerSaved {
		t.Fatalf("a state file and no QEMU: %q, want saved", p)
	}
	d.fails(t, []string{"did not start", "resuming from", "--turn-off"}, "vm", "start", "g")
	if p := d.vm(t, "g").Power; p != api.PowerFailed {
		t.Fatalf("after a state that did not load: %q", p)
	}
	d.cli(t, "vm", "stop", "g", "--turn-off")
	if _, err := os.Stat(state); !os.IsNotExist(err) {
		t.Fatalf("the state file was not discarded: %v", err)
	}
	d.cli(t, "vm", "start", "g")
	w := d.vm(t, "g")
	t.Cleanup(func() { syscall.Kill(w.Runtime.Pid, syscall.SIGKILL) })
	waitConsole(t, console, "booted afresh", func(c string) bool { return strings.Count(c, "VHDKIT-BOOTED") == 2 })
	d.cli(t, "vm", "stop", "g", "--turn-off")
}
