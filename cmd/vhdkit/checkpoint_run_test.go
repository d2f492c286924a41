package main

import (
	"context"
	"encoding/json"
	"fmt"
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
	"github.com/vhdkit/vhdkit/internal/vmm"
	"golang.org/x/sys/unix"
)

// Checkpoints of running machines: production (frozen through the guest
// agent), standard (memory saved), their fallbacks and failures, and
// apply on a running machine.

// runGuest creates machine name on d with a 64 MiB disk and the busybox
// guest of o (its script, the agent, ...), lets prepare write the disk
// through NBD before the first boot, starts it and returns it with a
// reader of its console log.
func runGuest(t *testing.T, d *daemon, dir, name string, o guest.Options, prepare func(uri string)) (api.VM, func() string) {
	t.Helper()
	env := guest.Require(t)
	if o.Agent {
		guest.RequireAgent(t)
	}
	o.Disks = []guest.Disk{{}}
	boot, err := env.WriteBoot(dir, o)
	if err != nil {
		t.Fatal(err)
	}
	d.cli(t, "vm", "create", name, "--disk", "64M", "--memory", "128M", "--accel", "tcg",
		"--kernel", boot.Kernel, "--initrd", boot.Initrd, "--append", boot.Append)
	if prepare != nil {
		prepare(d.uri(name))
	}
	d.cli(t, "vm", "start", name)
	v := d.vm(t, name)
	pid, consoleLog := v.Runtime.Pid, v.Runtime.Console
	t.Cleanup(func() { syscall.Kill(pid, syscall.SIGKILL) })
	return v, func() string { b, _ := os.ReadFile(consoleLog); return strings.ReplaceAll(string(b), "\r", "") }
}

// createCheckpoint runs checkpoint create with args and --json.
func (d *daemon) createCheckpoint(t testing.TB, args ...string) api.Checkpoint {
	t.Helper()
	var cp api.Checkpoint
	out := d.cli(t, append([]string{"checkpoint", "create"}, append(args, "--json")...)...)
	if err := json.Unmarshal([]byte(out), &cp); err != nil {
		t.Fatalf("checkpoint create: %v: %s", err, out)
	}
	return cp
}

// counts are the values of the guest's "COUNT n" lines.
func counts(c string) []int {
	var out []int
	for _, line := range strings.Split(c, "\n") {
		var n int
		if _, err := fmt.Sscanf(line, "COUNT %d", &n); err == nil {
			out = append(out, n)
		}
	}
	return out
}

// e2fsckClean copies the disk state of file (a checkpoint's frozen file,
// read through its chain by vhdkit) to a raw image and checks the ext4
// file system on it read-only, forced: it must be clean, and its journal
// too. (A crash checkpoint of a mounted ext4 file system passes e2fsck
// -fn as well, skipping the journal's recovery: the journal is what makes
// it consistent. Only a frozen one has its journal flushed and
// needs_recovery cleared, as after a clean unmount.)
func e2fsckClean(t *testing.T, file string) {
	t.Helper()
	raw := filepath.Join(t.TempDir(), "state.img")
	var stdout, stderr strings.Builder
	if code := run(context.Background(), []string{"convert", "-U", file, raw}, &stdout, &stderr); code != 0 {
		t.Fatalf("vhdkit convert %s: exit %d: %s%s", file, code, stdout.String(), stderr.String())
	}
	out, err := exec.Command("e2fsck", "-fn", raw).CombinedOutput()
	if err != nil || strings.Contains(string(out), "journal recovery") {
		t.Fatalf("e2fsck -fn of the checkpoint's state: %v\n%s", err, out)
	}
	out, err = exec.Command("dumpe2fs", "-h", raw).CombinedOutput()
	if err != nil || !strings.Contains(string(out), "has_journal") || strings.Contains(string(out), "needs_recovery") {
		t.Fatalf("the checkpoint's file system needs its journal replayed (not frozen): %v\n%s", err, out)
	}
}

// TestServeCheckpointProduction: the guest mounts an ext4 file system on
// its disk and writes, renames and removes files throughout. A production
// checkpoint (the default type) freezes it through the guest agent: the
// agent reports one or more file systems frozen and, asked while the
// disks switch, "frozen"; after the command it reports "thawed" (asked
// here through the agent's socket) and the guest writes on. The
// checkpoint's state, read through vhdkit, is a clean ext4 file system
// (e2fsck -fn) whose journal needs no recovery (a crash checkpoint's
// does), twice. A guest left frozen and paused by a daemon killed in a
// checkpoint is resumed and thawed by the next daemon. apply --save on
// the running machine keeps its state as a production checkpoint (clean
// too) and leaves the machine off, as a production checkpoint applied. A standard checkpoint's state file is listed with
// it and exported with it.
func TestServeCheckpointProduction(t *testing.T) {
	testenv.Tool(t, "mkfs.ext4")
	testenv.Tool(t, "e2fsck")
	testenv.Tool(t, "dumpe2fs")
	testenv.Tool(t, "qemu-img")
	dir := shortTempDir(t)
	data := filepath.Join(dir, "d")
	d := startDaemon(t, data)
	fs := filepath.Join(dir, "fs.img")
	if out, err := exec.Command("truncate", "-s", "64M", fs).CombinedOutput(); err != nil {
		t.Fatalf("truncate: %v: %s", err, out)
	}
	if out, err := exec.Command("mkfs.ext4", "-q", "-F", fs).CombinedOutput(); err != nil {
		t.Fatalf("mkfs.ext4: %v: %s", err, out)
	}
	_, console := runGuest(t, d, dir, "g", guest.Options{Agent: true, Ext4: true, Script: `mkdir -p /mnt
mount -t ext4 /dev/vda /mnt || echo GUEST-MOUNT-FAILED
echo VHDKIT-MOUNTED
i=0
while true; do
  dd if=/dev/urandom of=/mnt/tmp bs=4k count=8 status=none || echo GUEST-IO-ERROR
  mv /mnt/tmp /mnt/f$(( i % 20 )) || echo GUEST-IO-ERROR
  mkdir -p /mnt/d$(( i % 7 ))
  echo $i > /mnt/d$(( i % 7 ))/n$i || echo GUEST-IO-ERROR
  rm -f /mnt/d$(( (i + 3) % 7 ))/n$(( i - 25 ))
  echo "WROTE $i"
  i=$(( i + 1 ))
done
`}, func(uri string) {
		if out, err := exec.Command("qemu-img", "convert", "-n", "-f", "raw", "-O", "raw", fs, uri).CombinedOutput(); err != nil {
			t.Fatalf("writing the file system through NBD: %v: %s", err, out)
		}
	})
	wrote := func(c string) int { return strings.Count(c, "WROTE ") }
	waitConsole(t, console, "wrote files", func(c string) bool {
		if strings.Contains(c, "GUEST-") {
			t.Fatalf("the guest failed; console:\n%s", c)
		}
		return strings.Contains(c, "agent started") && wrote(c) > 20
	})
	agent := &vmm.Agent{Socket: filepath.Join(data, "run", "g", "qga.sock"), SyncTimeout: time.Minute}
	for i, name := range []string{"p1", "p2"} {
		cp := d.createCheckpoint(t, "g", "--name", name)
		if cp.Type != api.CheckpointProduction || cp.Frozen < 1 || cp.AgentStatus != "frozen" || cp.StunMS <= 0 || cp.Note != "" {
			t.Fatalf("production checkpoint %s: type %q, %d frozen, agent said %q, stun %v ms, note %q", name, cp.Type, cp.Frozen, cp.AgentStatus, cp.StunMS, cp.Note)
		}
		t.Logf("production checkpoint %s: stun %.1f ms, %d file systems frozen", name, cp.StunMS, cp.Frozen)
		if s, err := agent.FreezeStatus(context.Background()); err != nil || s != "thawed" {
			t.Fatalf("after the checkpoint the agent says %q, %v; want thawed", s, err)
		}
		n := wrote(console())
		waitConsole(t, console, "wrote on after the thaw", func(c string) bool { return wrote(c) > n+5 })
		e2fsckClean(t, cp.Files[0])
		if i == 0 && cp.Files[0] != filepath.Join(data, "vms", "g", "disk0.vhdx") {
			t.Fatalf("the first checkpoint froze %s", cp.Files[0])
		}
	}
	if c := console(); strings.Contains(c, "GUEST-") {
		t.Fatalf("the guest failed; console:\n%s", c)
	}
	out := d.cli(t, "checkpoint", "list", "g")
	if !strings.Contains(out, "production, stun ") {
		t.Fatalf("checkpoint list:\n%s", out)
	}

	// A daemon killed in a checkpoint leaves its guest frozen (and, in a
	// standard one, paused): the next daemon re-adopts the machine,
	// resumes it and thaws it.
	// (The freeze syncs the guest's file systems and the pause drains its
	// I/O: both need the daemon, which dies after them.)
	pid := d.vm(t, "g").Runtime.Pid
	if n, err := agent.Freeze(context.Background(), time.Minute); err != nil || n < 1 {
		t.Fatalf("freezing through the agent: %d, %v", n, err)
	}
	if err := (&vmm.Process{Pid: pid, QMP: filepath.Join(data, "run", "g", "qmp.sock")}).Pause(context.Background()); err != nil {
		t.Fatal(err)
	}
	d.kill()
	d = startDaemon(t, data)
	if v := d.vm(t, "g"); v.Power != api.PowerRunning || v.Runtime == nil || v.Runtime.Pid != pid {
		t.Fatalf("re-adopted after a kill in a checkpoint: power %q, runtime %+v", v.Power, v.Runtime)
	}
	for deadline := time.Now().Add(2 * time.Minute); ; time.Sleep(200 * time.Millisecond) {
		if s, err := agent.FreezeStatus(context.Background()); err == nil && s == "thawed" {
			break
		} else if time.Now().After(deadline) {
			t.Fatalf("the guest was not thawed: %q, %v", s, err)
		}
	}
	n := wrote(console())
	waitConsole(t, console, "wrote on after the restart", func(c string) bool { return wrote(c) > n+5 })

	// A standard checkpoint of the same machine: its state file is the
	// checkpoint's, exported with it.
	cp := d.createCheckpoint(t, "g", "--name", "s1", "--type", "standard")
	if cp.Type != api.CheckpointStandard || cp.StateFile == "" || cp.StunMS <= 0 {
		t.Fatalf("standard checkpoint: %+v", cp)
	}
	t.Logf("standard checkpoint: stun %.1f ms", cp.StunMS)
	if fi, err := os.Stat(cp.StateFile); err != nil || fi.Size() < 1<<20 || filepath.Dir(cp.StateFile) != filepath.Join(data, "vms", "g") {
		t.Fatalf("state file %s: %v, %v", cp.StateFile, fi, err)
	}
	exp := filepath.Join(dir, "export")
	out = d.cli(t, "checkpoint", "export", "g", "s1", exp)
	want, _ := os.ReadFile(cp.StateFile)
	if got, err := os.ReadFile(filepath.Join(exp, "g.vmstate")); err != nil || string(got) != string(want) {
		t.Fatalf("exported state: %v (%d bytes, want %d); export said:\n%s", err, len(got), len(want), out)
	}
	// (Its file system needs the journal replayed: the rest of the
	// guest's state is in the memory state.)
	checkClean(t, filepath.Join(exp, "g-disk0.vhdx"))

	// apply --save on the running machine: the current state is kept as a
	// production checkpoint (taken before the machine is turned off, its
	// file system frozen), then the production checkpoint p1 leaves the
	// machine off.
	out = d.cli(t, "checkpoint", "apply", "g", "p1", "--save", "--save-name", "before-apply")
	if v := d.vm(t, "g"); v.Power != api.PowerOff || v.CurrentName != "p1" {
		t.Fatalf("after apply --save of a production checkpoint: power %q, current %q; apply said %s", v.Power, v.CurrentName, out)
	}
	var tree api.Checkpoints
	if err := json.Unmarshal([]byte(d.cli(t, "checkpoint", "list", "g", "--json")), &tree); err != nil {
		t.Fatal(err)
	}
	var saved *api.Checkpoint
	for i := range tree.Checkpoints {
		if tree.Checkpoints[i].Name == "before-apply" {
			saved = &tree.Checkpoints[i]
		}
	}
	if saved == nil || saved.Type != api.CheckpointProduction || saved.AgentStatus != "frozen" {
		t.Fatalf("the --save checkpoint: %+v", saved)
	}
	e2fsckClean(t, saved.Files[0])
}

// TestServeCheckpointStandard: the guest keeps a counter in its shell's
// memory only. A standard checkpoint saves it; the counter goes on; apply
// of the checkpoint on the running machine turns it off and starts it
// from the checkpoint's state: the counter goes on from its value at the
// checkpoint, the guest did not boot again, the checkpoint keeps its
// state file (the machine's copy is gone once it runs). Apply of a crash
// checkpoint leaves the machine off; a checkpoint of a machine that is
// off is crash, saying so; the standard checkpoint applied to the machine
// that is off leaves it saved, and vm start runs it on from the
// checkpoint; deleting the standard checkpoint (live, the machine running
// on it) deletes its state file. A paused machine gets a standard
// checkpoint for a production one and stays paused; a second standard
// one copies the first's state (QEMU writes none before the machine
// runs), which applied runs it on from the pause; after a crash
// checkpoint between, it is refused with the way out.
func TestServeCheckpointStandard(t *testing.T) {
	dir := shortTempDir(t)
	data := filepath.Join(dir, "d")
	d := startDaemon(t, data)
	_, console := runGuest(t, d, dir, "g", guest.Options{Script: `echo VHDKIT-BOOTED
i=0
while true; do echo "COUNT $i"; i=$(( i + 1 )); usleep 200000; done
`}, nil)
	waitConsole(t, console, "counted to 3", func(c string) bool { return len(counts(c)) > 3 })
	c0 := d.createCheckpoint(t, "g", "--name", "c0", "--type", "crash")
	if c0.Type != api.CheckpointCrash || c0.StunMS <= 0 || c0.Note != "" {
		t.Fatalf("crash checkpoint: %+v", c0)
	}
	before := counts(console())
	cp := d.createCheckpoint(t, "g", "--name", "s1", "--type", "standard")
	after := counts(console())
	if cp.Type != api.CheckpointStandard || cp.StateFile == "" {
		t.Fatalf("standard checkpoint: %+v", cp)
	}
	// The guest's memory is its owner's only.
	if fi, err := os.Stat(cp.StateFile); err != nil {
		t.Fatal(err)
	} else if fi.Mode().Perm() != 0o600 {
		t.Fatalf("the state file's mode is %v, want 0600", fi.Mode())
	}
	// The counter at the checkpoint lies between what was printed before
	// the command and what was printed when it returned.
	lo, hi := before[len(before)-1], after[len(after)-1]
	waitConsole(t, console, "counted on", func(c string) bool { return counts(c)[len(counts(c))-1] > hi+8 })
	mark := len(counts(console()))
	// Another NBD client than QEMU would see the disk revert under it:
	// apply refuses before it turns the machine off, not after.
	other := dialNBD(t, d.nbd, "g")
	if _, stderr, err := d.try("checkpoint", "apply", "g", "s1"); err == nil || !strings.Contains(stderr, "besides its QEMU") {
		t.Fatalf("apply with another NBD client connected: err %v, %s", err, stderr)
	}
	if p := d.vm(t, "g").Power; p != api.PowerRunning {
		t.Fatalf("a refused apply left the machine %s", p)
	}
	other.Close()
	out := d.cli(t, "checkpoint", "apply", "g", "s1")
	if !strings.Contains(out, "now runs from checkpoint s1") || !strings.Contains(out, "is running") {
		t.Fatalf("checkpoint apply: %s", out)
	}
	w := d.vm(t, "g")
	if w.Power != api.PowerRunning || w.Runtime == nil {
		t.Fatalf("after applying a standard checkpoint: power %q, runtime %+v", w.Power, w.Runtime)
	}
	t.Cleanup(func() { syscall.Kill(w.Runtime.Pid, syscall.SIGKILL) })
	// The old run counted on until it was turned off; the new one goes
	// on from the checkpoint: where the count drops.
	resumedAt := func(got []int) int {
		for i := max(mark, 1); i < len(got); i++ {
			if got[i] < got[i-1] {
				return i
			}
		}
		return -1
	}
	waitConsole(t, console, "counted after the apply", func(c string) bool {
		got := counts(c)
		i := resumedAt(got)
		return i > 0 && len(got) > i+2
	})
	got := counts(console())
	i := resumedAt(got)
	if resumed := got[i]; resumed < lo+1 || resumed > hi+1 || got[i+1] != resumed+1 {
		t.Fatalf("after the apply the counter went on from %d; at the checkpoint it was %d to %d (counts since the apply: %v)", resumed, lo, hi, got[mark:])
	}
	if n := strings.Count(console(), "VHDKIT-BOOTED"); n != 1 {
		t.Fatalf("the guest booted %d times, want once", n)
	}
	if _, err := os.Stat(cp.StateFile); err != nil {
		t.Fatalf("the checkpoint lost its state file to the apply: %v", err)
	}
	if _, err := os.Stat(filepath.Join(data, "run", "g", "saved.state")); !os.IsNotExist(err) {
		t.Fatalf("the copy of the state is still there once the machine runs: %v", err)
	}

	// A crash checkpoint applied to the running machine leaves it off.
	out = d.cli(t, "checkpoint", "apply", "g", "c0")
	if v := d.vm(t, "g"); v.Power != api.PowerOff || v.CurrentName != "c0" {
		t.Fatalf("after applying a crash checkpoint: power %q, current %q; apply said %s", v.Power, v.CurrentName, out)
	}
	off := d.createCheckpoint(t, "g", "--name", "off", "--type", "standard")
	if off.Type != api.CheckpointCrash || !strings.Contains(off.Note, "is off") || off.StateFile != "" {
		t.Fatalf("a standard checkpoint of a machine that is off: %+v", off)
	}

	// Applied to the machine that is off, the standard checkpoint leaves
	// it saved (as Hyper-V does); vm start runs it on from the checkpoint
	// again.
	out = d.cli(t, "checkpoint", "apply", "g", "s1")
	if v := d.vm(t, "g"); v.Power != api.PowerSaved || v.CurrentName != "s1" {
		t.Fatalf("after applying a standard checkpoint to a machine that is off: power %q, current %q; apply said %s", v.Power, v.CurrentName, out)
	}
	mark = len(counts(console()))
	d.cli(t, "vm", "start", "g")
	w = d.vm(t, "g")
	t.Cleanup(func() { syscall.Kill(w.Runtime.Pid, syscall.SIGKILL) })
	waitConsole(t, console, "counted after the start", func(c string) bool { return len(counts(c)) > mark+2 })
	got = counts(console())
	if resumed := got[mark]; resumed < lo+1 || resumed > hi+1 || got[mark+1] != resumed+1 {
		t.Fatalf("after the start the counter went on from %d; at the checkpoint it was %d to %d", resumed, lo, hi)
	}
	if n := strings.Count(console(), "VHDKIT-BOOTED"); n != 1 {
		t.Fatalf("the guest booted %d times, want once", n)
	}

	// Deleted while the machine runs on it (a live merge), the checkpoint
	// takes its state file along.
	d.cli(t, "checkpoint", "delete", "g", "s1", "--wait")
	if _, err := os.Stat(cp.StateFile); !os.IsNotExist(err) {
		t.Fatalf("the deleted checkpoint's state file is still there: %v", err)
	}

	// A paused machine: its agent cannot answer, so a production
	// checkpoint is standard at once, saying why; it stays paused
	// (QEMU is "postmigrate" after the stream) and resumes on request.
	d.cli(t, "vm", "pause", "g")
	pp := d.createCheckpoint(t, "g", "--name", "pp")
	if pp.Type != api.CheckpointStandard || !strings.Contains(pp.Note, "is paused") || pp.StateFile == "" {
		t.Fatalf("a production checkpoint of a paused machine: %+v", pp)
	}
	if p := d.vm(t, "g").Power; p != api.PowerPaused {
		t.Fatalf("after a checkpoint of a paused machine: %q", p)
	}
	// QEMU writes no second stream before the machine runs: the first,
	// still its state, is copied; after a crash checkpoint (the machine
	// no longer runs on pp) the request is refused, nothing changed.
	pp2 := d.createCheckpoint(t, "g", "--name", "pp2", "--type", "standard")
	first, _ := os.ReadFile(pp.StateFile)
	if second, err := os.ReadFile(pp2.StateFile); err != nil || len(first) < 1<<20 || string(first) != string(second) {
		t.Fatalf("the second state of a machine paused throughout: %v, %d and %d bytes", err, len(first), len(second))
	}
	d.createCheckpoint(t, "g", "--name", "pc", "--type", "crash")
	d.fails(t, []string{"resume it first", "stays paused"}, "checkpoint", "create", "g", "--name", "pp3", "--type", "standard")
	if v := d.vm(t, "g"); v.Power != api.PowerPaused || v.CurrentName != "pc" {
		t.Fatalf("after a refused checkpoint: power %q, current %q", v.Power, v.CurrentName)
	}
	n := len(counts(console()))
	d.cli(t, "vm", "resume", "g")
	waitConsole(t, console, "counted on after the resume", func(c string) bool { return len(counts(c)) > n+3 })
	got = counts(console())
	if got[n] != got[n-1]+1 {
		t.Fatalf("after the resume the counter went from %d to %d", got[n-1], got[n])
	}
	// The copied state is the machine's: applied, it runs on from the
	// pause.
	mark = len(got)
	d.cli(t, "checkpoint", "apply", "g", "pp2")
	w = d.vm(t, "g")
	t.Cleanup(func() { syscall.Kill(w.Runtime.Pid, syscall.SIGKILL) })
	waitConsole(t, console, "counted after applying pp2", func(c string) bool {
		got := counts(c)
		i := resumedAt(got)
		return i > 0 && len(got) > i+2
	})
	got = counts(console())
	if i := resumedAt(got); got[i] != got[n-1]+1 {
		t.Fatalf("after applying pp2 the counter went on from %d; paused at %d", got[i], got[n-1])
	}
}

// TestServeCheckpointFallbacks: a guest without the agent. A production
// checkpoint with --production-only fails once the agent's wait is over,
// and nothing changed (no checkpoint, the disk on its file); during the
// wait the host answers, the machine is "checkpointing", and vm stop and
// another checkpoint are refused. A standard
// checkpoint whose memory state cannot be written (the file size limit
// of QEMU, inherited by the cat writing the stream, stands in for a full
// disk) fails cleanly: no state file, no .part, no checkpoint, the disk
// on its file, the machine runs on. Then a production checkpoint falls
// back to standard and says why.
func TestServeCheckpointFallbacks(t *testing.T) {
	dir := shortTempDir(t)
	data := filepath.Join(dir, "d")
	d := startDaemon(t, data)
	v, console := runGuest(t, d, dir, "g", guest.Options{Script: `i=0
while true; do echo "COUNT $i"; i=$(( i + 1 )); usleep 200000; done
`}, nil)
	waitConsole(t, console, "counted to 3", func(c string) bool { return len(counts(c)) > 3 })
	leaf := filepath.Join(data, "vms", "g", "disk0.vhdx")
	unchanged := func(what string) {
		t.Helper()
		w := d.vm(t, "g")
		if w.Checkpoints != 0 || w.Disks[0].Path != leaf || w.Power != api.PowerRunning {
			t.Fatalf("after %s: %d checkpoints, disk on %s, power %q", what, w.Checkpoints, w.Disks[0].Path, w.Power)
		}
		files, _ := filepath.Glob(filepath.Join(data, "vms", "g", "*"))
		if len(files) != 1 {
			t.Fatalf("after %s the machine's folder holds %v", what, files)
		}
		n := len(counts(console()))
		waitConsole(t, console, "counted on after "+what, func(c string) bool { return len(counts(c)) > n+2 })
	}
	// While the host waits for the agent it answers for the machine,
	// which is "checkpointing": what would change its power or disks is
	// refused meanwhile.
	type result struct {
		stderr string
		err    error
	}
	done := make(chan result, 1)
	go func() {
		_, stderr, err := d.try("checkpoint", "create", "g", "--name", "p", "--production-only")
		done <- result{stderr, err}
	}()
	for deadline := time.Now().Add(time.Minute); d.vm(t, "g").Power != api.PowerCheckpointing; time.Sleep(50 * time.Millisecond) {
		if time.Now().After(deadline) {
			t.Fatal("the machine was never seen checkpointing")
		}
	}
	d.fails(t, []string{"is checkpointing"}, "vm", "stop", "g", "--turn-off")
	d.fails(t, []string{"a checkpoint is being taken"}, "checkpoint", "create", "g", "--type", "crash")
	r := <-done
	if r.err == nil || !strings.Contains(r.stderr, "guest agent") || !strings.Contains(r.stderr, "nothing was changed") {
		t.Fatalf("a production-only checkpoint without an agent: %v: %s", r.err, r.stderr)
	}
	unchanged("a production-only checkpoint without an agent")

	// The soft limit only: it is what the cat inherits, and it can be
	// raised again.
	var was unix.Rlimit
	if err := unix.Prlimit(v.Runtime.Pid, unix.RLIMIT_FSIZE, nil, &was); err != nil {
		t.Fatal(err)
	}
	limit := unix.Rlimit{Cur: 256 << 10, Max: was.Max}
	if err := unix.Prlimit(v.Runtime.Pid, unix.RLIMIT_FSIZE, &limit, nil); err != nil {
		t.Skipf("cannot limit QEMU's file size: %v", err)
	}
	d.fails(t, []string{"no checkpoint", "runs on", "migration failed"}, "checkpoint", "create", "g", "--name", "s", "--type", "standard")
	unchanged("a standard checkpoint whose state could not be written")

	if err := unix.Prlimit(v.Runtime.Pid, unix.RLIMIT_FSIZE, &was, nil); err != nil {
		t.Fatal(err)
	}
	cp := d.createCheckpoint(t, "g", "--name", "p")
	if cp.Type != api.CheckpointStandard || !strings.Contains(cp.Note, "guest agent") || !strings.Contains(cp.Note, "standard checkpoint was taken") || cp.StateFile == "" {
		t.Fatalf("production without an agent: %+v", cp)
	}
	n := len(counts(console()))
	waitConsole(t, console, "counted on after the fallback", func(c string) bool { return len(counts(c)) > n+2 })
	d.cli(t, "vm", "stop", "g", "--turn-off")
}

// BenchmarkCheckpointStun measures how long each kind of checkpoint
// stuns a 512 MiB TCG guest (frozen, paused, or its disk I/O held) that
// writes files on ext4 throughout, as the stun-ms metric; ns/op is the
// whole command. Run it on an idle machine:
//
//	go test ./cmd/vhdkit -run '^$' -bench CheckpointStun -benchtime 5x
func BenchmarkCheckpointStun(b *testing.B) {
	env := guest.Require(b)
	guest.RequireAgent(b)
	testenv.Tool(b, "mkfs.ext4")
	testenv.Tool(b, "qemu-img")
	dir := shortTempDir(b)
	d := startDaemon(b, filepath.Join(dir, "d"))
	fs := filepath.Join(dir, "fs.img")
	for _, c := range [][]string{{"truncate", "-s", "256M", fs}, {"mkfs.ext4", "-q", "-F", fs}} {
		if out, err := exec.Command(c[0], c[1:]...).CombinedOutput(); err != nil {
			b.Fatalf("%s: %v: %s", c[0], err, out)
		}
	}
	boot, err := env.WriteBoot(dir, guest.Options{Disks: []guest.Disk{{}}, Agent: true, Ext4: true, Script: `mkdir -p /mnt
mount -t ext4 /dev/vda /mnt || echo GUEST-MOUNT-FAILED
i=0
while true; do
  dd if=/dev/urandom of=/mnt/f$(( i % 20 )) bs=64k count=4 status=none || echo GUEST-IO-ERROR
  echo "WROTE $i"
  i=$(( i + 1 ))
done
`})
	if err != nil {
		b.Fatal(err)
	}
	d.cli(b, "vm", "create", "g", "--disk", "256M", "--memory", "512M", "--accel", "tcg",
		"--kernel", boot.Kernel, "--initrd", boot.Initrd, "--append", boot.Append)
	if out, err := exec.Command("qemu-img", "convert", "-n", "-f", "raw", "-O", "raw", fs, d.uri("g")).CombinedOutput(); err != nil {
		b.Fatalf("writing the file system through NBD: %v: %s", err, out)
	}
	d.cli(b, "vm", "start", "g")
	v := d.vm(b, "g")
	b.Cleanup(func() { syscall.Kill(v.Runtime.Pid, syscall.SIGKILL) })
	for deadline := time.Now().Add(10 * time.Minute); ; time.Sleep(100 * time.Millisecond) {
		c, _ := os.ReadFile(v.Runtime.Console)
		if strings.Contains(string(c), "GUEST-") {
			b.Fatalf("the guest failed:\n%s", c)
		}
		if strings.Count(string(c), "WROTE ") > 20 {
			break
		}
		if time.Now().After(deadline) {
			b.Fatalf("the guest never wrote:\n%s", c)
		}
	}
	for _, kind := range []string{api.CheckpointProduction, api.CheckpointStandard, api.CheckpointCrash} {
		b.Run(kind, func(b *testing.B) {
			var stun float64
			for b.Loop() {
				cp := d.createCheckpoint(b, "g", "--type", kind, "--production-only="+fmt.Sprint(kind == api.CheckpointProduction))
				if cp.Type != kind {
					b.Fatalf("asked for %s, got %+v", kind, cp)
				}
				stun += cp.StunMS
			}
			b.ReportMetric(stun/float64(b.N), "stun-ms")
		})
	}
}

// TestServeVMSaveAfterCheckpoint: a machine paused, then given a
// standard checkpoint, stays paused with QEMU in "postmigrate", which
// writes no second stream until the guest runs; vm save then takes the
// checkpoint's stream, its state still (QEMU refused it before: "paused
// due to a previous migration"), and vm start runs the guest on from the
// pause.
func TestServeVMSaveAfterCheckpoint(t *testing.T) {
	dir := shortTempDir(t)
	d := startDaemon(t, filepath.Join(dir, "d"))
	_, console := bootGuest(t, d, dir, "g", `i=0
while true; do echo "COUNT $i"; i=$(( i + 1 )); usleep 200000; done
`)
	waitConsole(t, console, "counted", func(c string) bool { return len(counts(c)) > 5 })
	d.cli(t, "vm", "pause", "g")
	paused := counts(console())
	last := paused[len(paused)-1]
	if cp := d.createCheckpoint(t, "g", "--name", "s", "--type", "standard"); cp.Type != api.CheckpointStandard {
		t.Fatalf("standard checkpoint of a paused machine: %+v", cp)
	}
	if out := d.cli(t, "vm", "save", "g"); !strings.Contains(out, "saved") {
		t.Fatalf("vm save: %s", out)
	}
	n := len(counts(console()))
	if n != len(paused) {
		t.Fatalf("the paused guest counted on: %d lines, then %d", len(paused), n)
	}
	d.cli(t, "vm", "start", "g")
	w := d.vm(t, "g")
	t.Cleanup(func() { syscall.Kill(w.Runtime.Pid, syscall.SIGKILL) })
	waitConsole(t, console, "counted after the start", func(c string) bool { return len(counts(c)) > n+2 })
	if got := counts(console()); got[n] != last+1 {
		t.Fatalf("after vm start the counter went on from %d; paused at %d", got[n], last)
	}
	d.cli(t, "vm", "stop", "g", "--turn-off")
}
