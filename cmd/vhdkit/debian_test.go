package main

import (
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"syscall"
	"testing"

	"github.com/vhdkit/vhdkit/internal/api"
	"github.com/vhdkit/vhdkit/internal/guest"
	"github.com/vhdkit/vhdkit/internal/testenv"
)

// TestServeDebian runs a real distribution: the Debian guest
// (.ci/debian-guest: systemd, udev, the QEMU guest agent and a service
// writing a numbered file every quarter second, synced, then its count)
// on a VHDX the daemon serves. While it writes:
//   - a production checkpoint freezes its file systems through the agent:
//     the frozen .vhdx holds a clean ext4 (no journal to replay, e2fsck
//     -fn passes), where a crash checkpoint taken the same way holds one
//     that needs recovery, which shows the freeze is what made it clean;
//   - both checkpoints are deleted, live merges under the writing guest,
//     and the machine runs on its .vhdx again.
//
// Then it shuts down through ACPI (systemd's shutdown), the .vhdx checks
// clean as ext4 and as VHDX, and the machine boots again from it, its
// writer going on from the count that reached the disk.
func TestServeDebian(t *testing.T) {
	e2fsck := testenv.Tool(t, "e2fsck")
	dumpe2fs := testenv.Tool(t, "dumpe2fs")
	debugfs := testenv.Tool(t, "debugfs")
	dir := shortTempDir(t)
	d := startDaemon(t, filepath.Join(dir, "d"))
	disk, v, console := bootDebian(t, d, dir)
	pid := v.Runtime.Pid
	t.Cleanup(func() { syscall.Kill(pid, syscall.SIGKILL) })
	waitCount := func(min int) {
		t.Helper()
		waitConsole(t, console, fmt.Sprintf("counted to %d", min), func(c string) bool { return lastCount(c) >= min })
	}
	waitCount(20)

	create := func(name, kind string) api.Checkpoint {
		t.Helper()
		var cp api.Checkpoint
		out := d.cli(t, "checkpoint", "create", "deb", "--name", name, "--type", kind, "--production-only="+strconv.FormatBool(kind == api.CheckpointProduction), "--json")
		if err := json.Unmarshal([]byte(out), &cp); err != nil {
			t.Fatalf("checkpoint create: %v\n%s", err, out)
		}
		t.Logf("%s checkpoint: stun %.1f ms, agent %q, %d file systems frozen", cp.Type, cp.StunMS, cp.AgentStatus, cp.Frozen)
		return cp
	}
	// ext4 reads the state of the file a checkpoint froze, as a raw image.
	ext4 := func(frozen, name string) (raw string, needsRecovery bool) {
		t.Helper()
		raw = filepath.Join(dir, name+".raw")
		d.cli(t, "convert", "-U", "--allow-parent-dir", dir, "-O", "raw", frozen, raw)
		out, err := exec.Command(dumpe2fs, "-h", raw).CombinedOutput()
		if err != nil {
			t.Fatalf("dumpe2fs -h %s: %v\n%s", name, err, out)
		}
		return raw, strings.Contains(string(out), "needs_recovery")
	}
	fsck := func(raw string) {
		t.Helper()
		if out, err := exec.Command(e2fsck, "-fn", raw).CombinedOutput(); err != nil {
			t.Fatalf("e2fsck -fn %s: %v\n%s", filepath.Base(raw), err, out)
		}
	}

	prod := create("prod", api.CheckpointProduction)
	if prod.Type != api.CheckpointProduction || prod.AgentStatus != "frozen" || prod.Frozen < 1 {
		t.Fatalf("production checkpoint: %+v", prod)
	}
	raw, recovery := ext4(prod.Files[0], "prod")
	if recovery {
		t.Fatal("the production checkpoint's ext4 needs journal recovery: the guest was not frozen")
	}
	fsck(raw)
	os.Remove(raw)
	waitCount(lastCount(console()) + 10)

	// A crash checkpoint taken the same way catches the journal open: the
	// check above can fail.
	crash := create("crash", api.CheckpointCrash)
	if crash.Type != api.CheckpointCrash {
		t.Fatalf("crash checkpoint: %+v", crash)
	}
	raw, recovery = ext4(crash.Files[0], "crash")
	os.Remove(raw)
	if !recovery {
		t.Log("the crash checkpoint's ext4 happened to be clean (the writer was between transactions)")
	}
	waitCount(lastCount(console()) + 10)

	// Both checkpoints go, live merges under the writing guest.
	for _, cp := range []string{"crash", "prod"} {
		out := d.cli(t, "checkpoint", "delete", "deb", cp, "--wait")
		if !strings.Contains(out, fmt.Sprintf("checkpoint %q of deb deleted", cp)) {
			t.Fatalf("checkpoint delete %s:\n%s", cp, out)
		}
	}
	if v := d.vm(t, "deb"); v.Disks[0].Path != disk || len(v.Disks[0].Chain) != 1 || v.Power != api.PowerRunning {
		t.Fatalf("after the merges: power %s, chain %v", v.Power, v.Disks[0].Chain)
	}
	waitCount(lastCount(console()) + 10)

	// systemd shuts down on the ACPI button; the disk is clean ext4 and
	// VHDX, and the count it holds is where the next boot goes on from.
	d.cli(t, "vm", "stop", "deb", "--timeout", "300")
	d.waitPower(t, "deb", api.PowerOff)
	if !strings.Contains(console(), "reboot: Power down") {
		t.Fatalf("the guest did not shut down through ACPI; console:\n%s", tail(console(), 3000))
	}
	d.cli(t, "check", "-U", disk) // the daemon serves it still; the machine is off
	raw, recovery = ext4(disk, "final")
	if recovery {
		t.Fatal("after a clean shutdown the ext4 needs recovery")
	}
	fsck(raw)
	out, err := exec.Command(debugfs, "-R", "cat /var/lib/vhdkit-writer/count", raw).Output()
	if err != nil {
		t.Fatalf("debugfs: %v", err)
	}
	count := strings.TrimSpace(string(out))
	if n, err := strconv.Atoi(count); err != nil || n < 40 {
		t.Fatalf("the writer's count on disk is %q", count)
	}
	os.Remove(raw)

	before := len(console())
	d.cli(t, "vm", "start", "deb")
	v = d.vm(t, "deb")
	pid = v.Runtime.Pid
	waitConsole(t, console, "booted again", func(c string) bool {
		return len(c) > before && strings.Contains(c[before:], "vhdkit-writer: start at ")
	})
	if again := console()[before:]; !strings.Contains(again, "vhdkit-writer: start at "+count+"\n") {
		t.Fatalf("the second boot's writer did not go on from %s:\n%s", count, tail(again, 3000))
	}
	d.cli(t, "vm", "stop", "deb", "--turn-off")
}

// bootDebian converts the Debian guest's root file system into
// DIR/debian.vhdx, creates machine "deb" on d with it (512 MiB, TCG) and
// starts it; it returns the disk, the machine and a reader of its console
// log. It skips (fails in CI) without the guest or QEMU.
func bootDebian(t testing.TB, d *daemon, dir string) (disk string, v api.VM, console func() string) {
	t.Helper()
	deb := guest.RequireDebian(t)
	guest.Require(t) // QEMU
	disk = filepath.Join(dir, "debian.vhdx")
	d.cli(t, "convert", "-O", "vhdx", deb.RootFS, disk)
	d.cli(t, "vm", "create", "deb", "--attach", disk, "--memory", "512M", "--accel", "tcg",
		"--kernel", deb.Vmlinuz, "--initrd", deb.Initrd, "--append", deb.Append())
	d.cli(t, "vm", "start", "deb")
	v = d.vm(t, "deb")
	return disk, v, func() string {
		b, _ := os.ReadFile(v.Runtime.Console)
		return strings.ReplaceAll(string(b), "\r", "")
	}
}

// writerCount is what the Debian guest's writer prints every 20 files.
var writerCount = regexp.MustCompile(`vhdkit-writer: (\d+)\n`)

// lastCount is the last count the Debian guest's writer printed.
func lastCount(console string) int {
	m := writerCount.FindAllStringSubmatch(console, -1)
	if len(m) == 0 {
		return 0
	}
	n, _ := strconv.Atoi(m[len(m)-1][1])
	return n
}

// tail is the end of s, at most n bytes.
func tail(s string, n int) string {
	if len(s) > n {
		return s[len(s)-n:]
	}
	return s
}
