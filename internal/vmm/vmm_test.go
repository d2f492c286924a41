package vmm

import (
	"context"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
)

// TestLifecycle starts a real QEMU with no disk and no kernel (the
// firmware finds nothing to boot and waits), then drives it through QMP:
// running, paused by stop, running by cont, gone after quit.
func TestLifecycle(t *testing.T) {
	if _, err := exec.LookPath(QEMUBinary); err != nil {
		if os.Getenv("CI") != "" {
			t.Fatal(err)
		}
		t.Skip(err)
	}
	accel, err := ChooseAccel("auto")
	if err != nil {
		t.Fatal(err)
	}
	dir, err := os.MkdirTemp("", "vmm") // short: unix socket paths are limited
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	ctx := context.Background()
	p, _, err := Start(ctx, Config{Name: "t", RunDir: dir, Accel: accel, MemoryMiB: 64, CPUs: 1})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { p.Quit(ctx) })
	if !p.Alive() {
		t.Fatalf("pid %d is not a running QEMU", p.Pid)
	}
	want := func(state string) {
		t.Helper()
		if got, err := p.Status(ctx); err != nil || got != state {
			t.Fatalf("status %q (%v), want %q", got, err, state)
		}
	}
	want("running")
	if err := p.Pause(ctx); err != nil {
		t.Fatal(err)
	}
	want("paused")
	if err := p.Resume(ctx); err != nil {
		t.Fatal(err)
	}
	want("running")
	if _, err := p.Execute(ctx, "no-such-command", nil); err == nil || !strings.Contains(err.Error(), "no-such-command") {
		t.Fatalf("an unknown command: %v", err)
	}
	if err := p.Quit(ctx); err != nil {
		t.Fatal(err)
	}
	if p.Alive() {
		t.Fatal("QEMU still runs after quit")
	}
}

func TestChooseAccel(t *testing.T) {
	if a, err := ChooseAccel("tcg"); err != nil || a != AccelTCG {
		t.Fatalf("tcg: %q %v", a, err)
	}
	if _, err := ChooseAccel("xen"); err == nil {
		t.Fatal("xen accepted")
	}
	a, err := ChooseAccel("auto")
	if err != nil {
		t.Fatal(err)
	}
	if (kvmUsable() == nil) != (a == AccelKVM) {
		t.Fatalf("auto chose %s, kvmUsable: %v", a, kvmUsable())
	}
	if kvmUsable() != nil {
		if _, err := ChooseAccel("kvm"); err == nil {
			t.Fatal("kvm accepted where it is not usable")
		}
	}
}

func TestMissingQEMU(t *testing.T) {
	t.Setenv("PATH", t.TempDir())
	_, _, err := Start(context.Background(), Config{Name: "t", RunDir: t.TempDir(), Accel: AccelTCG, MemoryMiB: 64, CPUs: 1})
	if err == nil || !strings.Contains(err.Error(), "qemu-system-x86") {
		t.Fatalf("missing QEMU: %v", err)
	}
}

// TestAliveIsThisQEMU: a recorded pid that now belongs to another
// program, or to a QEMU with another QMP socket, is not taken for the
// machine's QEMU.
func TestAliveIsThisQEMU(t *testing.T) {
	self := &Process{Pid: os.Getpid(), QMP: "/nonexistent/qmp.sock"}
	if self.Alive() {
		t.Fatal("the test process was taken for a QEMU")
	}
	if _, err := exec.LookPath(QEMUBinary); err != nil {
		t.Skip(err)
	}
	dir, err := os.MkdirTemp("", "vmm")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	ctx := context.Background()
	p, _, err := Start(ctx, Config{Name: "t", RunDir: dir, Accel: AccelTCG, MemoryMiB: 64, CPUs: 1})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { p.Quit(ctx) })
	other := *p
	other.QMP = dir + "/other.sock"
	if !p.Alive() || other.Alive() {
		t.Fatalf("Alive: this QEMU %v, with another QMP socket %v", p.Alive(), other.Alive())
	}
}

// TestShellQuote: the state file's path reaches sh (QEMU runs an exec:
// migration's command with sh -c) as one word, whatever it holds.
func TestShellQuote(t *testing.T) {
	dir := t.TempDir()
	file := filepath.Join(dir, `it's a "file" $HOME; rm -rf x`)
	cmd := exec.Command("sh", "-c", "cat > "+shellQuote(file))
	cmd.Stdin = strings.NewReader("state")
	if out, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("sh: %v: %s", err, out)
	}
	if b, err := os.ReadFile(file); err != nil || string(b) != "state" {
		t.Fatalf("%q: %q, %v", file, b, err)
	}
	c := Config{Incoming: file}
	args := strings.Join(c.Args(), "\x00")
	if !strings.Contains(args, "-incoming\x00exec:cat "+shellQuote(file)) {
		t.Fatalf("no -incoming of the quoted file in %q", args)
	}
}
