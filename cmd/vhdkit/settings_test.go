package main

import (
	"context"
	"crypto/md5"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/vhdkit/vhdkit/internal/api"
	"github.com/vhdkit/vhdkit/internal/guest"
	"github.com/vhdkit/vhdkit/internal/testenv"
)

// makeISO makes an ISO 9660 image of the files with xorriso.
func makeISO(t *testing.T, dir string, files map[string][]byte) string {
	t.Helper()
	xorriso := testenv.Tool(t, "xorriso")
	src := filepath.Join(dir, "iso-src")
	if err := os.MkdirAll(src, 0o755); err != nil {
		t.Fatal(err)
	}
	for name, data := range files {
		if err := os.WriteFile(filepath.Join(src, name), data, 0o644); err != nil {
			t.Fatal(err)
		}
	}
	iso := filepath.Join(dir, "test.iso")
	if out, err := exec.Command(xorriso, "-as", "mkisofs", "-quiet", "-V", "VHDKIT", "-o", iso, src).CombinedOutput(); err != nil {
		t.Fatalf("xorriso: %v\n%s", err, out)
	}
	return iso
}

func md5Hex(b []byte) string {
	s := md5.Sum(b)
	return hex.EncodeToString(s[:])
}

// settingsOf is what vm show --json says of a machine's settings.
func (d *daemon) settingsOf(t *testing.T, name string) api.Settings {
	t.Helper()
	v := d.vm(t, name)
	if v.Settings == nil {
		t.Fatalf("machine %s has no settings", name)
	}
	return *v.Settings
}

// TestServeVMSettings: vm create takes the generation, DVD drive and
// network; vm set changes any setting of a machine that is off and keeps
// the others; bad values (memory 0, more CPUs than the host has,
// generation 3, a missing kernel or ISO, an ISO inside the data
// directory, an unknown network or setting) are refused with the reason
// and change nothing; a running machine's settings are refused, as
// Hyper-V's Set-VM refuses memory and processors; the API refuses an
// unknown setting; a bridge that does not exist fails the start with
// QEMU's reason.
func TestServeVMSettings(t *testing.T) {
	testenv.Tool(t, "qemu-system-x86_64")
	dir := shortTempDir(t)
	data := filepath.Join(dir, "d")
	d := startDaemon(t, data)
	iso := makeISO(t, dir, map[string][]byte{"hello.txt": []byte("hello\n")})

	d.cli(t, "vm", "create", "g", "--disk", "16M", "--generation", "2", "--cdrom", iso, "--network", "user", "--memory", "128M")
	s := d.settingsOf(t, "g")
	if s.Generation != 2 || s.CDROM != iso || s.Network != "user" || s.MemoryMiB != 128 || s.CPUs != 1 || s.Accel != "auto" || !strings.HasPrefix(s.MAC, "52:54:00:") {
		t.Fatalf("after create: %+v", s)
	}
	if out := d.cli(t, "vm", "show", "g"); !strings.Contains(out, "generation 2") || !strings.Contains(out, "network user") || !strings.Contains(out, "DVD "+iso) {
		t.Fatalf("vm show:\n%s", out)
	}
	// A default machine: generation 1, no network, its own MAC.
	d.cli(t, "vm", "create", "plain", "--disk", "16M")
	if p := d.settingsOf(t, "plain"); p.Generation != 1 || p.Network != "none" || p.CDROM != "" || p.MAC == "" || p.MAC == s.MAC {
		t.Fatalf("defaults: %+v (the other machine's MAC %s)", p, s.MAC)
	}

	inData := filepath.Join(data, "stolen.iso")
	if err := os.WriteFile(inData, make([]byte, 2048), 0o600); err != nil {
		t.Fatal(err)
	}
	kernel := filepath.Join(dir, "vmlinuz")
	if err := os.WriteFile(kernel, []byte("not really a kernel"), 0o644); err != nil {
		t.Fatal(err)
	}
	tooMany := fmt.Sprint(runtime.NumCPU() + 1)
	for _, c := range []struct {
		args  []string
		words []string
	}{
		{[]string{"--generation", "3"}, []string{"generation 3", "1 (BIOS) or 2 (UEFI)"}},
		{[]string{"--generation", "0", "--memory", "0"}, nil}, // refused by the CLI (exit 2): below
		{[]string{"--cpus", tooMany}, []string{tooMany + " CPUs", "host's logical processors"}},
		{[]string{"--cdrom", filepath.Join(dir, "missing.iso")}, []string{"ISO", "missing.iso", "no such file"}},
		{[]string{"--cdrom", dir}, []string{"is not a regular file"}},
		{[]string{"--cdrom", inData}, []string{"inside the daemon's data directory"}},
		{[]string{"--kernel", filepath.Join(dir, "missing")}, []string{"kernel", "no such file"}},
		{[]string{"--initrd", kernel}, []string{"needs a kernel"}},
		{[]string{"--network", "tap"}, []string{`network "tap"`, "none, user or bridge=BR"}},
		{[]string{"--network", "bridge=a,b"}, []string{"bridge name"}},
		{[]string{"--accel", "xen"}, []string{"accelerator", "xen"}},
	} {
		if c.words == nil {
			continue
		}
		d.fails(t, c.words, append([]string{"vm", "set", "g"}, c.args...)...)
		d.fails(t, c.words, append([]string{"vm", "create", "bad", "--disk", "16M"}, c.args...)...)
		if got := d.settingsOf(t, "g"); got != s {
			t.Fatalf("vm set %v changed the settings: %+v, were %+v", c.args, got, s)
		}
	}
	if out := d.cli(t, "vm", "list"); strings.Contains(out, "bad") {
		t.Fatalf("a refused machine was made:\n%s", out)
	}
	for _, args := range [][]string{{"--memory", "0"}, {"--colour", "red"}, {}} {
		_, errOut, err := d.try(append([]string{"vm", "set", "g"}, args...)...)
		if ee, ok := err.(*exec.ExitError); !ok || ee.ExitCode() != 2 {
			t.Fatalf("vm set g %v: %v (want a usage error, exit 2): %s", args, err, errOut)
		}
	}
	if got := d.settingsOf(t, "g"); got != s {
		t.Fatalf("refused requests changed the settings: %+v, were %+v", got, s)
	}
	// The API refuses what the CLI cannot send.
	cl := &api.Client{DataDir: data}
	zero, three := 0, 3
	for _, req := range []api.SetVM{{MemoryMiB: &zero}, {Generation: &three}, {}} {
		if _, err := cl.SetVM(t.Context(), "g", req); err == nil {
			t.Fatalf("API set %+v accepted", req)
		}
	}
	hc := &http.Client{Transport: &http.Transport{DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
		return (&net.Dialer{}).DialContext(ctx, "unix", filepath.Join(data, api.SocketName))
	}}}
	req, err := http.NewRequest("PATCH", "http://vhdkit/v1/vms/g", strings.NewReader(`{"memory_mib": 256, "colour": "red"}`))
	if err != nil {
		t.Fatal(err)
	}
	resp, err := hc.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	body, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	if resp.StatusCode != http.StatusBadRequest || !strings.Contains(string(body), `unknown field \"colour\"`) {
		t.Fatalf("an unknown setting through the API: %s %s", resp.Status, body)
	}

	// Changes, each kept with the rest.
	d.cli(t, "vm", "set", "g", "--memory", "256M", "--cpus", "1")
	s.MemoryMiB = 256
	if got := d.settingsOf(t, "g"); got != s {
		t.Fatalf("after vm set --memory: %+v, want %+v", got, s)
	}
	d.cli(t, "vm", "set", "g", "--generation", "1", "--cdrom", "", "--network", "bridge=br0", "--kernel", kernel, "--append", "console=ttyS0")
	s.Generation, s.CDROM, s.Network, s.Kernel, s.Append = 1, "", "bridge=br0", kernel, "console=ttyS0"
	if got := d.settingsOf(t, "g"); got != s {
		t.Fatalf("after vm set: %+v, want %+v", got, s)
	}
	d.fails(t, []string{"needs a kernel"}, "vm", "set", "g", "--kernel", "")
	d.cli(t, "vm", "set", "g", "--kernel", "", "--append", "", "--network", "", "--accel", "tcg")
	s.Kernel, s.Append, s.Network, s.Accel = "", "", "none", "tcg"
	if got := d.settingsOf(t, "g"); got != s {
		t.Fatalf("after clearing: %+v, want %+v", got, s)
	}

	// Kept across a daemon restart.
	d.stop(t)
	d = startDaemon(t, data)
	if got := d.settingsOf(t, "g"); got != s {
		t.Fatalf("after a restart: %+v, want %+v", got, s)
	}

	// A running machine (no kernel: SeaBIOS finds nothing to boot and
	// waits) keeps its settings.
	d.cli(t, "vm", "start", "g")
	pid := d.vm(t, "g").Runtime.Pid
	t.Cleanup(func() { syscall.Kill(pid, syscall.SIGKILL) })
	d.fails(t, []string{"is running", "only while it is off", "vhdkit vm stop g"}, "vm", "set", "g", "--memory", "512M")
	d.cli(t, "vm", "pause", "g")
	d.fails(t, []string{"is paused", "only while it is off"}, "vm", "set", "g", "--cpus", "1")
	d.cli(t, "vm", "stop", "g", "--turn-off")
	if got := d.settingsOf(t, "g"); got != s {
		t.Fatalf("refused while running, yet changed: %+v, want %+v", got, s)
	}

	// A bridge that is not there: QEMU's reason, the machine failed, the
	// host fine.
	d.cli(t, "vm", "set", "g", "--network", "bridge=vhdkitnone0")
	errOut := d.fails(t, []string{"did not start", "bridge helper failed", `"allow vhdkitnone0" in /etc/qemu/bridge.conf`}, "vm", "start", "g")
	if v := d.vm(t, "g"); v.Power != api.PowerFailed || v.Runtime == nil || !strings.Contains(v.Runtime.Reason, "bridge") {
		t.Fatalf("after a start on a missing bridge: power %q, runtime %+v (stderr %s)", v.Power, v.Runtime, errOut)
	}
	d.cli(t, "vm", "set", "g", "--network", "none")
	d.cli(t, "vm", "start", "g")
	pid = d.vm(t, "g").Runtime.Pid
	t.Cleanup(func() { syscall.Kill(pid, syscall.SIGKILL) })
	d.cli(t, "vm", "stop", "g", "--turn-off")

	// An ISO removed after it was set: the start is refused, saying so.
	gone := makeISO(t, filepath.Join(dir, "gone"), map[string][]byte{"a": []byte("a")})
	d.cli(t, "vm", "set", "g", "--cdrom", gone)
	os.Remove(gone)
	d.fails(t, []string{"ISO", "no such file"}, "vm", "start", "g")
	if p := d.vm(t, "g").Power; p != api.PowerOff {
		t.Fatalf("after a refused start: %q", p)
	}
}

// lastDisks is the guest's last report of its virtio disks (VHDKIT-DISKS
// vda vdb ...).
func lastDisks(console string) string {
	last := ""
	for _, line := range strings.Split(console, "\n") {
		if rest, ok := strings.CutPrefix(line, "VHDKIT-DISKS "); ok {
			last = rest
		}
	}
	return last
}

// hotplugScript reports the guest's virtio disks whenever they change,
// and the MD5 of /dev/vdb's first MiB, read around the page cache,
// whenever that changes.
const hotplugScript = `echo VHDKIT-READY
last=; sum=
while true; do
  now=$(cd /sys/block && echo vd*)
  if [ "$now" != "$last" ]; then echo "VHDKIT-DISKS $now."; last=$now; fi
  if [ -b /dev/vdb ]; then
    s=$(dd if=/dev/vdb bs=1M count=1 iflag=direct status=none | md5sum | cut -d' ' -f1)
    if [ "$s" != "$sum" ]; then echo "VHDKIT-VDB $s"; sum=$s; fi
  else
    sum=
  fi
  usleep 300000
done
`

// TestServeVMHotplug: vm add-disk hot-plugs a disk into a running
// machine, and the guest sees /dev/vdb appear and reads what is written
// to it through the daemon's NBD export; a third disk too; remove-disk
// refuses the boot disk and a disk in the middle while the machine runs,
// unplugs the last one (the guest sees it go) and keeps or deletes its
// file as told; a disk removed is attached again by its path. Off, the
// changes are configuration only, and renumber the disks. A machine
// with checkpoints, or saved, keeps its disks.
func TestServeVMHotplug(t *testing.T) {
	dir := shortTempDir(t)
	data := filepath.Join(dir, "d")
	d := startDaemon(t, data)
	_, console := bootGuest(t, d, dir, "g", hotplugScript)
	waitConsole(t, console, "listed its disk", func(c string) bool { return lastDisks(c) == "vda." })

	start := time.Now()
	out := d.cli(t, "vm", "add-disk", "g", "--create", "16M")
	if !strings.Contains(out, "disk 1 hot-plugged") {
		t.Fatalf("vm add-disk: %s", out)
	}
	took := time.Since(start)
	waitConsole(t, console, "saw the new disk", func(c string) bool { return lastDisks(c) == "vda vdb." })
	t.Logf("add-disk took %v, the guest listed the disk %v after the command began (TCG; the script looks every 0.3 s)", took, time.Since(start))
	zeros := md5Hex(make([]byte, 1<<20))
	waitConsole(t, console, "read zeros from it", func(c string) bool { return strings.Contains(c, "VHDKIT-VDB "+zeros) })
	pattern := make([]byte, 1<<20)
	fillPattern(pattern, 0, 0x6b)
	d.writeMiB(t, "g/1", 0, 1, 0x6b)
	waitConsole(t, console, "read the pattern written through NBD", func(c string) bool { return strings.Contains(c, "VHDKIT-VDB "+md5Hex(pattern)) })

	// The hot-plugged disk is in the state: a daemon killed and restarted
	// serves it again under its name, QEMU reconnects, and the guest
	// reads on. (The pattern goes back after a detour.)
	d.kill()
	d = startDaemon(t, data)
	detour := make([]byte, 1<<20)
	fillPattern(detour, 0, 0x7c)
	d.writeMiB(t, "g/1", 0, 1, 0x7c)
	waitConsole(t, console, "read through the restarted daemon", func(c string) bool { return strings.Contains(c, "VHDKIT-VDB "+md5Hex(detour)) })
	d.writeMiB(t, "g/1", 0, 1, 0x6b)
	waitConsole(t, console, "read the pattern back", func(c string) bool {
		return strings.Count(c, "VHDKIT-VDB "+md5Hex(pattern)) == 2
	})

	d.cli(t, "vm", "add-disk", "g", "--create", "8M")
	waitConsole(t, console, "saw the third disk", func(c string) bool { return lastDisks(c) == "vda vdb vdc." })
	v := d.vm(t, "g")
	if len(v.Disks) != 3 || v.Disks[2].Export != "g/2" || v.Disks[2].Size != 8<<20 {
		t.Fatalf("disks after two hot-plugs: %+v", v.Disks)
	}
	d.fails(t, []string{"disk 0", "booted from"}, "vm", "remove-disk", "g", "0")
	d.fails(t, []string{"only its last disk (2)"}, "vm", "remove-disk", "g", "1")
	d.fails(t, []string{"no disk 3"}, "vm", "remove-disk", "g", "3")
	d.cli(t, "vm", "pause", "g")
	d.fails(t, []string{"is paused", "vm resume g"}, "vm", "remove-disk", "g", "2")
	d.cli(t, "vm", "resume", "g")
	third := v.Disks[2].Path
	start = time.Now()
	if out := d.cli(t, "vm", "remove-disk", "g", "2", "--delete"); !strings.Contains(out, "deleted") {
		t.Fatalf("vm remove-disk --delete: %s", out)
	}
	t.Logf("remove-disk (device_del, the guest's release, blockdev-del) took %v", time.Since(start))
	waitConsole(t, console, "saw the third disk go", func(c string) bool { return lastDisks(c) == "vda vdb." })
	if _, err := os.Stat(third); !os.IsNotExist(err) {
		t.Fatalf("the deleted disk's file: %v", err)
	}
	second := v.Disks[1].Path
	if out := d.cli(t, "vm", "remove-disk", "g", "1"); !strings.Contains(out, "kept") {
		t.Fatalf("vm remove-disk: %s", out)
	}
	waitConsole(t, console, "saw the second disk go", func(c string) bool { return lastDisks(c) == "vda." })
	if len(d.vm(t, "g").Disks) != 1 {
		t.Fatalf("disks after the unplugs: %+v", d.vm(t, "g").Disks)
	}
	d.fails(t, []string{"only disk"}, "vm", "remove-disk", "g", "0")
	// The kept file comes back, data and all, as the daemon's own.
	sums := strings.Count(console(), "VHDKIT-VDB "+md5Hex(pattern))
	d.cli(t, "vm", "add-disk", "g", "--path", second)
	waitConsole(t, console, "saw the disk again", func(c string) bool { return lastDisks(c) == "vda vdb." })
	if w := d.vm(t, "g"); w.Disks[1].Path != second || w.Disks[1].Attached {
		t.Fatalf("the disk added again: %+v", w.Disks[1])
	}
	waitConsole(t, console, "read the pattern again", func(c string) bool { return strings.Count(c, "VHDKIT-VDB "+md5Hex(pattern)) > sums })
	// (A read of /dev/vdb racing its unplug may fail: the script reads it
	// all the time. The kernel itself must not complain.)
	if c := console(); strings.Contains(c, "Call Trace") || strings.Contains(c, "BUG") {
		t.Fatalf("the guest complained:\n%s", c)
	}

	// Off: configuration only. Removing disk 0 renumbers: the pattern's
	// disk is disk 0 now, export "g".
	d.cli(t, "vm", "stop", "g", "--turn-off")
	d.cli(t, "vm", "remove-disk", "g", "0")
	w := d.vm(t, "g")
	if len(w.Disks) != 1 || w.Disks[0].Path != second || w.Disks[0].Export != "g" {
		t.Fatalf("after removing disk 0 while off: %+v", w.Disks)
	}
	c := dialNBD(t, d.nbd, "g")
	got := make([]byte, 1<<20)
	if _, err := c.ReadAt(got, 0); err != nil {
		t.Fatal(err)
	}
	c.Close()
	wantPattern(t, got, 0, 0x6b, "disk 0 after the renumbering")
	// Off, a disk whose export (or a later one's) has an NBD client is
	// kept: the client would find another disk under its name.
	d.cli(t, "vm", "add-disk", "g", "--create", "4M")
	held := dialNBD(t, d.nbd, "g/1")
	d.fails(t, []string{"NBD client", `"g/1"`, "disconnect"}, "vm", "remove-disk", "g", "0")
	held.Close()
	d.cli(t, "vm", "remove-disk", "g", "1", "--delete")
	// At most 8 disks.
	for i := 1; i < 8; i++ {
		d.cli(t, "vm", "add-disk", "g", "--create", "1M")
	}
	d.fails(t, []string{"8 disks", "as many as"}, "vm", "add-disk", "g", "--create", "1M")
	for i := 7; i > 0; i-- {
		d.cli(t, "vm", "remove-disk", "g", fmt.Sprint(i), "--delete")
	}
	// A disk of another machine, or inside the data directory, is not
	// attached.
	d.cli(t, "vm", "create", "other", "--disk", "8M")
	d.fails(t, []string{"inside the daemon's data directory"}, "vm", "add-disk", "g", "--path", d.vm(t, "other").Disks[0].Path)
	outside := filepath.Join(dir, "outside.vhdx")
	createImage(t, outside, "--size", "8M")
	d.cli(t, "vm", "add-disk", "other", "--path", outside)
	d.fails(t, []string{"already a disk"}, "vm", "add-disk", "g", "--path", outside)
	if _, errOut, err := d.try("vm", "add-disk", "g", "--path", second, "--create", "1M"); !strings.Contains(errOut, "one of them") {
		t.Fatalf("add-disk with --path and --create: %v %s", err, errOut)
	}

	d.cli(t, "checkpoint", "create", "g", "--name", "c1")
	d.fails(t, []string{"1 checkpoint", "delete them"}, "vm", "add-disk", "g", "--create", "8M")
	d.fails(t, []string{"only disk"}, "vm", "remove-disk", "g", "0")
	d.fails(t, []string{"attached file", "yours"}, "vm", "remove-disk", "other", "1", "--delete")
	d.cli(t, "vm", "remove-disk", "other", "1")
	if _, err := os.Stat(outside); err != nil {
		t.Fatalf("the attached file after remove-disk: %v", err)
	}

	var vms []api.VM
	if err := json.Unmarshal([]byte(d.cli(t, "vm", "list", "--json")), &vms); err != nil {
		t.Fatal(err)
	}
	d.stop(t)
	checkClean(t, second)
}

// devicesScript loads the modules of the DVD drive (IDE) and the virtio
// network adapter, then reports what the guest found: /dev/sr0's MD5,
// eth0's MAC address, and whether it booted through UEFI.
const devicesScript = `for m in $MODULES; do insmod /lib/modules/extra/$m.ko || echo "insmod $m failed"; done
i=0
while [ ! -b /dev/sr0 ] && [ $i -lt 600 ] && [ -n "$WANT_SR0" ]; do usleep 100000; i=$((i+1)); done
[ -b /dev/sr0 ] && echo "VHDKIT-SR0 $(md5sum /dev/sr0 | cut -d' ' -f1)"
i=0
while [ ! -e /sys/class/net/eth0 ] && [ $i -lt 600 ]; do usleep 100000; i=$((i+1)); done
echo "VHDKIT-ETH0 $(cat /sys/class/net/eth0/address 2>/dev/null)"
if [ -d /sys/firmware/efi ]; then echo VHDKIT-EFI yes; else echo VHDKIT-EFI no; fi
echo VHDKIT-DONE
last=
while true; do
  now=$(md5sum /dev/sr0 2>/dev/null | cut -d' ' -f1)
  [ -n "$now" ] || now=none
  if [ "$now" != "$last" ]; then echo "VHDKIT-DISC $now"; last=$now; fi
  usleep 500000
done
`

// TestServeVMDevices: a generation 1 machine with an ISO in its DVD drive
// and user networking: the guest reads the ISO's bytes from /dev/sr0
// (ata_piix, sr_mod) and has eth0 with the machine's MAC address
// (virtio_net); it booted through the BIOS. The same guest on a
// generation 2 machine boots through OVMF (the kernel's EFI stub:
// /sys/firmware/efi exists) and has its network adapter on q35 too.
func TestServeVMDevices(t *testing.T) {
	env := guest.Require(t)
	dir := shortTempDir(t)
	d := startDaemon(t, filepath.Join(dir, "d"))
	payload := make([]byte, 300<<10)
	fillPattern(payload, 0, 0x2c)
	iso := makeISO(t, dir, map[string][]byte{"payload.bin": payload})
	isoBytes, err := os.ReadFile(iso)
	if err != nil {
		t.Fatal(err)
	}
	boot := func(name, modules string, wantSR0 bool, args ...string) (api.VM, func() string) {
		t.Helper()
		files := map[string]guest.File{}
		for _, m := range strings.Fields(modules) {
			f, err := env.ModuleFile(m)
			if err != nil {
				t.Fatal(err)
			}
			files["/lib/modules/extra/"+m+".ko"] = f
		}
		want := ""
		if wantSR0 {
			want = "1"
		}
		bdir := filepath.Join(dir, name)
		if err := os.MkdirAll(bdir, 0o755); err != nil {
			t.Fatal(err)
		}
		b, err := env.WriteBoot(bdir, guest.Options{Disks: []guest.Disk{{}}, Files: files,
			Script: "MODULES='" + modules + "'\nWANT_SR0=" + want + "\n" + devicesScript})
		if err != nil {
			t.Fatal(err)
		}
		d.cli(t, append([]string{"vm", "create", name, "--disk", "16M", "--memory", "256M", "--accel", "tcg",
			"--kernel", b.Kernel, "--initrd", b.Initrd, "--append", b.Append}, args...)...)
		d.cli(t, "vm", "start", name)
		v := d.vm(t, name)
		pid, consoleLog := v.Runtime.Pid, v.Runtime.Console
		t.Cleanup(func() { syscall.Kill(pid, syscall.SIGKILL) })
		console := func() string { b, _ := os.ReadFile(consoleLog); return strings.ReplaceAll(string(b), "\r", "") }
		waitConsole(t, console, "reported its devices", func(c string) bool { return strings.Contains(c, "VHDKIT-DONE") })
		return v, console
	}

	net := "failover net_failover virtio_net"
	v, console := boot("bios", "scsi_common scsi_mod libata ata_piix cdrom sr_mod "+net, true, "--cdrom", iso, "--network", "user")
	c := console()
	if !strings.Contains(c, "VHDKIT-SR0 "+md5Hex(isoBytes)) {
		t.Fatalf("the guest did not read the ISO (md5 %s) from its DVD drive; console:\n%s", md5Hex(isoBytes), c)
	}
	if !strings.Contains(c, "VHDKIT-ETH0 "+v.Settings.MAC+"\n") {
		t.Fatalf("the guest has no eth0 with the machine's MAC %s; console:\n%s", v.Settings.MAC, c)
	}
	if !strings.Contains(c, "VHDKIT-EFI no") {
		t.Fatalf("a generation 1 machine booted through UEFI; console:\n%s", c)
	}
	// The disc changes while the machine runs (Set-VMDvdDrive), alone.
	other := make([]byte, 100<<10)
	fillPattern(other, 0, 0x3d)
	iso2 := makeISO(t, filepath.Join(dir, "second"), map[string][]byte{"other.bin": other})
	iso2Bytes, err := os.ReadFile(iso2)
	if err != nil {
		t.Fatal(err)
	}
	d.fails(t, []string{"is running", "--cdrom by itself"}, "vm", "set", "bios", "--cdrom", iso2, "--memory", "128M")
	d.cli(t, "vm", "set", "bios", "--cdrom", iso2)
	waitConsole(t, console, "read the second disc", func(c string) bool { return strings.Contains(c, "VHDKIT-DISC "+md5Hex(iso2Bytes)) })
	if s := d.settingsOf(t, "bios"); s.CDROM != iso2 || s.MemoryMiB != 256 {
		t.Fatalf("settings after the disc change: %+v", s)
	}
	d.cli(t, "vm", "set", "bios", "--cdrom", "")
	waitConsole(t, console, "found the drive empty", func(c string) bool { return strings.HasSuffix(c, "VHDKIT-DISC none\n") })
	d.fails(t, []string{"ISO", "no such file"}, "vm", "set", "bios", "--cdrom", filepath.Join(dir, "missing.iso"))
	d.cli(t, "vm", "set", "bios", "--cdrom", iso)
	waitConsole(t, console, "read the first disc again", func(c string) bool {
		return strings.HasSuffix(c, "VHDKIT-DISC "+md5Hex(isoBytes)+"\n")
	})
	d.cli(t, "vm", "stop", "bios", "--turn-off")

	v, console = boot("uefi", net, false, "--generation", "2", "--network", "user")
	c = console()
	if !strings.Contains(c, "VHDKIT-EFI yes") {
		t.Fatalf("a generation 2 machine did not boot through UEFI; console:\n%s", c)
	}
	if !strings.Contains(c, "VHDKIT-ETH0 "+v.Settings.MAC+"\n") {
		t.Fatalf("the generation 2 guest has no eth0 with the machine's MAC %s; console:\n%s", v.Settings.MAC, c)
	}
	d.cli(t, "vm", "stop", "uefi", "--turn-off")
}

// TestServeVMHotplugSaved: on a generation 2 machine (q35: a disk is
// hot-plugged into a PCIe root port) the guest sees a disk added while it
// runs and reads what is written to it through NBD; the machine is saved
// with it and started again from the saved state (the disk is then on
// QEMU's command line, at the place it was plugged, as the migration
// stream needs): the guest goes on without a reboot and reads new data
// from it; then it is unplugged and the guest sees it go.
func TestServeVMHotplugSaved(t *testing.T) {
	dir := shortTempDir(t)
	d := startDaemon(t, filepath.Join(dir, "d"))
	env := guest.Require(t)
	b, err := env.WriteBoot(dir, guest.Options{Disks: []guest.Disk{{}}, Script: hotplugScript})
	if err != nil {
		t.Fatal(err)
	}
	d.cli(t, "vm", "create", "g", "--disk", "16M", "--memory", "256M", "--accel", "tcg", "--generation", "2",
		"--kernel", b.Kernel, "--initrd", b.Initrd, "--append", b.Append)
	d.cli(t, "vm", "start", "g")
	v := d.vm(t, "g")
	t.Cleanup(func() { syscall.Kill(v.Runtime.Pid, syscall.SIGKILL) })
	consoleLog := v.Runtime.Console
	console := func() string { b, _ := os.ReadFile(consoleLog); return strings.ReplaceAll(string(b), "\r", "") }
	waitConsole(t, console, "listed its disk", func(c string) bool { return lastDisks(c) == "vda." })

	d.cli(t, "vm", "add-disk", "g", "--create", "16M")
	waitConsole(t, console, "saw the new disk", func(c string) bool { return lastDisks(c) == "vda vdb." })
	one := make([]byte, 1<<20)
	fillPattern(one, 0, 0x11)
	d.writeMiB(t, "g/1", 0, 1, 0x11)
	waitConsole(t, console, "read the first pattern", func(c string) bool { return strings.Contains(c, "VHDKIT-VDB "+md5Hex(one)) })

	if out := d.cli(t, "vm", "save", "g"); !strings.Contains(out, "is saved") {
		t.Fatalf("vm save: %s", out)
	}
	// The saved state holds the hardware and disks it was saved with.
	d.fails(t, []string{"is saved", "before adding a disk"}, "vm", "add-disk", "g", "--create", "8M")
	d.fails(t, []string{"is saved", "before removing a disk"}, "vm", "remove-disk", "g", "1")
	d.fails(t, []string{"is saved", "before changing its settings"}, "vm", "set", "g", "--memory", "128M")
	d.cli(t, "vm", "start", "g")
	w := d.vm(t, "g")
	t.Cleanup(func() { syscall.Kill(w.Runtime.Pid, syscall.SIGKILL) })
	if w.Power != api.PowerRunning {
		t.Fatalf("after start from the saved state: %q", w.Power)
	}
	two := make([]byte, 1<<20)
	fillPattern(two, 0, 0x22)
	d.writeMiB(t, "g/1", 0, 1, 0x22)
	waitConsole(t, console, "read the second pattern after the restore", func(c string) bool { return strings.Contains(c, "VHDKIT-VDB "+md5Hex(two)) })
	if n := strings.Count(console(), "VHDKIT-READY"); n != 1 {
		t.Fatalf("the guest booted %d times, want once; console:\n%s", n, console())
	}

	d.cli(t, "vm", "remove-disk", "g", "1", "--delete")
	waitConsole(t, console, "saw the disk go", func(c string) bool { return lastDisks(c) == "vda." })
	if c := console(); strings.Contains(c, "Call Trace") || strings.Contains(c, "BUG") {
		t.Fatalf("the guest complained:\n%s", c)
	}
	d.cli(t, "vm", "stop", "g", "--turn-off")
}
