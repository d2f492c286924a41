package vmm

import (
	"bytes"
	"context"
	"encoding/json"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

func needQEMU(t *testing.T) {
	t.Helper()
	if _, err := exec.LookPath(QEMUBinary); err != nil {
		if os.Getenv("CI") != "" {
			t.Fatal(err)
		}
		t.Skip(err)
	}
}

// shortDir is a temporary folder with a short path: unix socket paths
// are limited.
func shortDir(t *testing.T) string {
	dir, err := os.MkdirTemp("", "vmm")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	return dir
}

// machineType asks QEMU which machine it emulates (QOM's type of
// /machine, e.g. "pc-q35-7.2-machine").
func machineType(t *testing.T, p *Process) string {
	t.Helper()
	out, err := p.Execute(context.Background(), "qom-get", map[string]any{"path": "/machine", "property": "type"})
	if err != nil {
		t.Fatal(err)
	}
	var typ string
	if err := json.Unmarshal(out, &typ); err != nil {
		t.Fatal(err)
	}
	return typ
}

// TestGenerations: a generation 2 machine runs OVMF on q35 — with no disk
// to boot, its boot manager (BdsDxe) says so on the serial console and
// the UEFI shell starts — from its own copy of OVMF's variable store; a
// generation 1 machine stays on i440fx.
func TestGenerations(t *testing.T) {
	needQEMU(t)
	if err := FindOVMF(); err != nil {
		if os.Getenv("CI") != "" {
			t.Fatal(err)
		}
		t.Skip(err)
	}
	ctx := context.Background()
	dir := shortDir(t)
	p, _, err := Start(ctx, Config{Name: "uefi", RunDir: dir, Accel: AccelTCG, MemoryMiB: 128, CPUs: 1, Generation: Gen2})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { p.Quit(ctx) })
	if typ := machineType(t, p); !strings.Contains(typ, "q35") {
		t.Fatalf("generation 2 runs on %q, want q35", typ)
	}
	vars, err := os.ReadFile(filepath.Join(dir, "OVMF_VARS.fd"))
	if err != nil {
		t.Fatal(err)
	}
	template, err := os.ReadFile(OVMFVars)
	if err != nil {
		t.Fatal(err)
	}
	if len(vars) != len(template) {
		t.Fatalf("the machine's variable store has %d bytes, OVMF's template %d", len(vars), len(template))
	}
	var console []byte
	for deadline := time.Now().Add(10 * time.Minute); ; time.Sleep(200 * time.Millisecond) {
		console, _ = os.ReadFile(p.Cons)
		if bytes.Contains(console, []byte("BdsDxe")) && bytes.Contains(console, []byte("UEFI Interactive Shell")) {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("no UEFI boot manager and shell on the console:\n%q", console)
		}
	}
	if err := p.Quit(ctx); err != nil {
		t.Fatal(err)
	}

	dir1 := shortDir(t)
	p1, _, err := Start(ctx, Config{Name: "bios", RunDir: dir1, Accel: AccelTCG, MemoryMiB: 64, CPUs: 1, Generation: Gen1})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { p1.Quit(ctx) })
	if typ := machineType(t, p1); !strings.Contains(typ, "i440fx") {
		t.Fatalf("generation 1 runs on %q, want i440fx", typ)
	}
	if _, err := os.Stat(filepath.Join(dir1, "OVMF_VARS.fd")); !os.IsNotExist(err) {
		t.Fatalf("a generation 1 machine has a UEFI variable store: %v", err)
	}
}

// TestMissingOVMF: without the ovmf package a generation 2 machine does
// not start, and the error names the package; nothing is left running.
func TestMissingOVMF(t *testing.T) {
	needQEMU(t)
	missing := filepath.Join(t.TempDir(), "OVMF_CODE_4M.fd")
	old := OVMFCode
	OVMFCode = missing
	t.Cleanup(func() { OVMFCode = old })
	_, _, err := Start(context.Background(), Config{Name: "t", RunDir: shortDir(t), Accel: AccelTCG, MemoryMiB: 64, CPUs: 1, Generation: Gen2})
	if err == nil || !strings.Contains(err.Error(), "apt install ovmf") || !strings.Contains(err.Error(), missing) {
		t.Fatalf("a start without OVMF: %v", err)
	}
}

// TestDeviceArgs: the command line of each network, DVD drive and
// generation, and the refusals of bad ones.
func TestDeviceArgs(t *testing.T) {
	args := func(c Config) string { return strings.Join(c.Args(), " ") }
	for _, c := range []struct {
		cfg  Config
		want []string
	}{
		{Config{}, []string{"-machine pc", "-nic none", "-device ide-cd,id=cd0,bus=ide.1"}},
		{Config{Network: NetworkUser, MAC: "52:54:00:aa:bb:cc"}, []string{"-nic user,model=virtio-net-pci,mac=52:54:00:aa:bb:cc"}},
		{Config{Network: "bridge=br0"}, []string{"-nic bridge,br=br0,model=virtio-net-pci"}},
		{Config{CDROM: "/srv/a,b.iso"}, []string{"file.filename=/srv/a,,b.iso", "ide-cd,drive=cd0,id=cd0,bus=ide.1"}},
		{Config{Generation: Gen2, RunDir: "/r", CDROM: "/x.iso", Disks: []Disk{{Socket: "/s", Export: "e"}}},
			[]string{"-machine q35", "if=pflash,format=raw,unit=0,readonly=on,file=" + OVMFCode, "unit=1,file=/r/OVMF_VARS.fd",
				"pcie-root-port,id=rp7,", "virtio-blk-pci,drive=disk0,id=vd0,bus=rp0", "bus=ide.0"}},
		{Config{Disks: []Disk{{Socket: "/s", Export: "e"}, {Socket: "/s", Export: "e/1"}}},
			[]string{"virtio-blk-pci,drive=disk1,id=vd1,addr=0x11", "export=e/1,reconnect-delay=0"}},
	} {
		got := args(c.cfg)
		for _, w := range c.want {
			if !strings.Contains(got, w) {
				t.Errorf("%+v: no %q in %s", c.cfg, w, got)
			}
		}
	}
	for _, c := range []struct {
		cfg  Config
		want string
	}{
		{Config{Generation: 3}, "generation 3"},
		{Config{Generation: Gen1, Network: "bridge=a,b"}, "bridge name"},
		{Config{Generation: Gen1, Network: "tap"}, "use none, user or bridge=BR"},
		{Config{Generation: Gen1, MAC: "01:00:00:00:00:00"}, "unicast"},
		{Config{Generation: Gen1, Disks: make([]Disk, MaxDisks+1)}, "at most 8"},
	} {
		if err := c.cfg.checkDevices(); err == nil || !strings.Contains(err.Error(), c.want) {
			t.Errorf("%+v: %v, want %q", c.cfg, err, c.want)
		}
	}
}
