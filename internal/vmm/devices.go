package vmm

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strings"
	"time"

	"github.com/vhdkit/vhdkit/internal/lazyregexp"
)

// A machine's hardware, as Hyper-V's two generations have it:
//
//	generation 1  BIOS (SeaBIOS)  QEMU's i440fx "pc"   disks at PCI slots 0x10+I (ACPI hot-plug),
//	                                                   DVD drive on IDE 1:0 (ide-cd, bus ide.1)
//	generation 2  UEFI (OVMF)     QEMU's q35           disks behind PCIe root ports rp0..rp7 at 0x10.0-7
//	                                                   (a root port per disk: PCIe hot-plugs per port),
//	                                                   DVD drive on the AHCI controller (ide-cd, bus ide.0)
//
// Disk I is always node diskI and device vdI at the same place, whether
// present at start or hot-plugged later: a machine saved after a hot-plug
// resumes with the same devices at the same addresses, as QEMU's
// migration stream requires. The DVD drive is there with or without an
// ISO, so that a disc can change while the machine runs.

// Machine generations.
const (
	Gen1 = 1 // BIOS, i440fx
	Gen2 = 2 // UEFI, q35
)

// MaxDisks is how many disks a machine may have: generation 2 has a PCIe
// root port per disk, made at start, and generation 1 keeps the same
// limit.
const MaxDisks = 8

// OVMF's firmware and the template of its variable store, from Debian's
// ovmf package. (Variables: tests point them elsewhere.)
var (
	OVMFCode = "/usr/share/OVMF/OVMF_CODE_4M.fd"
	OVMFVars = "/usr/share/OVMF/OVMF_VARS_4M.fd"
)

// FindOVMF checks that the UEFI firmware a generation 2 machine needs is
// there, or says which package to install.
func FindOVMF() error {
	for _, f := range []string{OVMFCode, OVMFVars} {
		if _, err := os.Stat(f); err != nil {
			return fmt.Errorf("generation 2 machines boot UEFI firmware, and %s is missing: install it (Debian and Ubuntu: apt install ovmf)", f)
		}
	}
	return nil
}

// varsPath is the machine's own copy of OVMF's variable store (boot
// entries and other UEFI variables, kept from run to run).
func (c *Config) varsPath() string { return filepath.Join(c.RunDir, "OVMF_VARS.fd") }

// prepareFirmware gives a generation 2 machine its variable store, a copy
// of OVMF's template made at its first start.
func (c *Config) prepareFirmware() error {
	if c.Generation != Gen2 {
		return nil
	}
	if err := FindOVMF(); err != nil {
		return err
	}
	if _, err := os.Stat(c.varsPath()); err == nil {
		return nil
	}
	src, err := os.Open(OVMFVars)
	if err != nil {
		return err
	}
	defer src.Close()
	// Written aside and renamed: a copy cut short is never taken for the
	// store.
	part := c.varsPath() + ".part"
	dst, err := os.OpenFile(part, os.O_WRONLY|os.O_CREATE|os.O_TRUNC, 0o600)
	if err != nil {
		return err
	}
	_, err = io.Copy(dst, src)
	if err == nil {
		err = dst.Sync()
	}
	if cerr := dst.Close(); err == nil {
		err = cerr
	}
	if err == nil {
		err = os.Rename(part, c.varsPath())
	}
	if err != nil {
		os.Remove(part)
		return fmt.Errorf("copying OVMF's variable store: %w", err)
	}
	return nil
}

// Networks.
const (
	NetworkNone = "none" // no network adapter
	NetworkUser = "user" // QEMU's user-mode NAT: the guest reaches out, nothing reaches in
	// NetworkBridge + BR: a tap device on the host's bridge BR, made by
	// qemu-bridge-helper (which /etc/qemu/bridge.conf must allow).
	NetworkBridge = "bridge="
)

// bridgeRE is a Linux interface name (at most 15 bytes) without the
// characters QEMU's option syntax or the helper would take otherwise.
var bridgeRE = lazyregexp.New(`^[A-Za-z0-9][A-Za-z0-9_.-]{0,14}$`)

// ParseNetwork checks a network setting ("" is none) and returns the
// bridge's name for "bridge=BR".
func ParseNetwork(s string) (bridge string, err error) {
	switch {
	case s == "" || s == NetworkNone || s == NetworkUser:
		return "", nil
	case strings.HasPrefix(s, NetworkBridge):
		br := strings.TrimPrefix(s, NetworkBridge)
		if !bridgeRE.MatchString(br) {
			return "", fmt.Errorf("network %q: the bridge name must be an interface name (1 to 15 letters, digits, '_', '.', '-')", s)
		}
		return br, nil
	}
	return "", fmt.Errorf("network %q: use none, user or bridge=BR", s)
}

// startHint adds to the error of a QEMU that exited at start what its
// log does not say: qemu-bridge-helper's needs.
func (c *Config) startHint() string {
	br, _ := ParseNetwork(c.Network)
	if br == "" {
		return ""
	}
	return fmt.Sprintf(" (network bridge=%s: the bridge must exist, and qemu-bridge-helper must allow it: a line \"allow %s\" in /etc/qemu/bridge.conf)", br, br)
}

// macRE is a unicast MAC address, as QEMU takes it.
var macRE = lazyregexp.New(`^[0-9a-f][02468ace](:[0-9a-f]{2}){5}$`)

// CheckMAC checks a network adapter's address ("" lets QEMU choose).
func CheckMAC(mac string) error {
	if mac != "" && !macRE.MatchString(mac) {
		return fmt.Errorf("MAC address %q: use six lower-case hex bytes, unicast (e.g. 52:54:00:12:34:56)", mac)
	}
	return nil
}

// machineArgs renders the firmware, chipset, network adapter and DVD
// drive of c.
func (c *Config) machineArgs() []string {
	var args []string
	if c.Generation == Gen2 {
		args = append(args, "-machine", "q35",
			"-drive", "if=pflash,format=raw,unit=0,readonly=on,file="+escape(OVMFCode),
			"-drive", "if=pflash,format=raw,unit=1,file="+escape(c.varsPath()))
		for i := range MaxDisks {
			port := fmt.Sprintf("pcie-root-port,id=rp%d,bus=pcie.0,chassis=%d,port=0x%x,addr=0x10.%d", i, i+1, 0x10+i, i)
			if i == 0 {
				port += ",multifunction=on"
			}
			args = append(args, "-device", port)
		}
	} else {
		args = append(args, "-machine", "pc")
	}
	nic := "none"
	switch {
	case c.Network == NetworkUser:
		nic = "user,model=virtio-net-pci"
	case strings.HasPrefix(c.Network, NetworkBridge):
		nic = "bridge,br=" + escape(strings.TrimPrefix(c.Network, NetworkBridge)) + ",model=virtio-net-pci"
	}
	if nic != "none" && c.MAC != "" {
		nic += ",mac=" + c.MAC
	}
	args = append(args, "-nic", nic)
	// The DVD drive is always there, empty without an ISO, so that a disc
	// can go in and out while the machine runs (ChangeDisc), as with
	// Hyper-V's Set-VMDvdDrive.
	bus := "ide.1"
	if c.Generation == Gen2 {
		bus = "ide.0"
	}
	if c.CDROM != "" {
		args = append(args,
			"-blockdev", "driver=raw,node-name=cd0,read-only=on,file.driver=file,file.read-only=on,file.filename="+escape(c.CDROM),
			"-device", "ide-cd,drive=cd0,id=cd0,bus="+bus)
	} else {
		args = append(args, "-device", "ide-cd,id=cd0,bus="+bus)
	}
	return args
}

// diskBlockdev and diskDevice are disk i's NBD node and its virtio-blk
// device, as QMP arguments: the command line renders them (diskArgs) and
// a hot-plug sends them (AddDisk), so both are the same.
func (c *Config) diskBlockdev(i int, d Disk) map[string]any {
	return map[string]any{
		"driver":          "nbd",
		"node-name":       fmt.Sprintf("disk%d", i),
		"server":          map[string]any{"type": "unix", "path": d.Socket},
		"export":          d.Export,
		"reconnect-delay": int64(c.ReconnectDelay / time.Second),
	}
}

func (c *Config) diskDevice(i int) map[string]any {
	dev := map[string]any{"driver": "virtio-blk-pci", "drive": fmt.Sprintf("disk%d", i), "id": fmt.Sprintf("vd%d", i)}
	if c.Generation == Gen2 {
		dev["bus"] = fmt.Sprintf("rp%d", i)
	} else {
		dev["addr"] = fmt.Sprintf("0x%x", 0x10+i)
	}
	return dev
}

// diskArgs renders the disks of c.
func (c *Config) diskArgs() []string {
	var args []string
	for i, d := range c.Disks {
		bd := c.diskBlockdev(i, d)
		server := bd["server"].(map[string]any)
		args = append(args,
			"-blockdev", fmt.Sprintf("driver=nbd,node-name=%s,server.type=unix,server.path=%s,export=%s,reconnect-delay=%d",
				bd["node-name"], escape(server["path"].(string)), escape(d.Export), bd["reconnect-delay"]),
			"-device", optionString(c.diskDevice(i)))
	}
	return args
}

// optionString renders a device's properties as QEMU's -device takes
// them: the driver first, then key=value, in a stable order.
func optionString(dev map[string]any) string {
	s := escape(fmt.Sprint(dev["driver"]))
	for _, k := range []string{"drive", "id", "bus", "addr"} {
		if v, ok := dev[k]; ok {
			s += "," + k + "=" + escape(fmt.Sprint(v))
		}
	}
	return s
}

// checkDevices refuses a configuration QEMU would start wrong or not at
// all, with the reason.
func (c *Config) checkDevices() error {
	if c.Generation != Gen1 && c.Generation != Gen2 {
		return fmt.Errorf("machine %s: generation %d: use 1 (BIOS) or 2 (UEFI)", c.Name, c.Generation)
	}
	if len(c.Disks) > MaxDisks {
		return fmt.Errorf("machine %s has %d disks: at most %d run", c.Name, len(c.Disks), MaxDisks)
	}
	if _, err := ParseNetwork(c.Network); err != nil {
		return fmt.Errorf("machine %s: %w", c.Name, err)
	}
	return CheckMAC(c.MAC)
}

// ChangeDisc puts the ISO image iso into the running machine's DVD drive
// in place of what was there (QMP blockdev-change-medium: the tray opens,
// the disc changes, the tray closes, and the guest is told of the media
// change), or with iso "" takes the disc out (QMP eject, forced: a guest
// that locked the tray does not keep it).
func (p *Process) ChangeDisc(ctx context.Context, iso string) error {
	if iso == "" {
		_, err := p.Execute(ctx, "eject", map[string]any{"id": "cd0", "force": true})
		return err
	}
	_, err := p.Execute(ctx, "blockdev-change-medium", map[string]any{"id": "cd0", "filename": iso, "format": "raw", "read-only-mode": "read-only"})
	return err
}

// hotplugTimeout bounds the wait for the guest to release a disk being
// unplugged.
const hotplugTimeout = 2 * time.Minute

// AddDisk hot-plugs disk i of a running machine started from c: the NBD
// node (blockdev-add), then its virtio-blk device (device_add), which
// the guest sees appear. A device that fails to come takes its node
// away again.
func (p *Process) AddDisk(ctx context.Context, c *Config, i int, d Disk) error {
	if i >= MaxDisks {
		return fmt.Errorf("disk %d: a machine has at most %d disks", i, MaxDisks)
	}
	if _, err := p.Execute(ctx, "blockdev-add", c.diskBlockdev(i, d)); err != nil {
		return err
	}
	if _, err := p.Execute(ctx, "device_add", c.diskDevice(i)); err != nil {
		if _, derr := p.Execute(ctx, "blockdev-del", map[string]any{"node-name": fmt.Sprintf("disk%d", i)}); derr != nil {
			return fmt.Errorf("%w (and its node stays: %v)", err, derr)
		}
		return err
	}
	return nil
}

// RemoveDisk unplugs disk i of a running machine: device_del asks the
// guest to release the device (an ACPI or PCIe eject request), QEMU
// removes it once the guest has (the DEVICE_DELETED event; here seen as
// the device gone from /machine/peripheral, polled on connections of
// their own so that the QMP socket stays free meanwhile), then
// blockdev-del closes its NBD connection. A guest that does not release
// it in time leaves the request pending and the disk in place: an error.
func (p *Process) RemoveDisk(ctx context.Context, i int) error {
	id, node := fmt.Sprintf("vd%d", i), fmt.Sprintf("disk%d", i)
	// A device already gone, or already asked to go, is waited for all
	// the same: a second remove-disk after a timeout goes on from there.
	if _, err := p.Execute(ctx, "device_del", map[string]any{"id": id}); err != nil &&
		!strings.Contains(err.Error(), "not found") && !strings.Contains(err.Error(), "in the process of unplug") {
		return err
	}
	deadline := time.Now().Add(hotplugTimeout)
	for {
		present, err := p.hasDevice(ctx, id)
		if err != nil {
			return err
		}
		if !present {
			break
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("the guest did not release disk %d (device %s) in %v: it may not handle hot-unplug, or still use it; the request stays pending", i, id, hotplugTimeout)
		}
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(100 * time.Millisecond):
		}
	}
	// The device leaves QEMU's tree before it lets go of its node (that
	// waits for the last reference to the device): a node still "in use"
	// is asked again.
	for {
		_, err := p.Execute(ctx, "blockdev-del", map[string]any{"node-name": node})
		if err == nil || strings.Contains(err.Error(), "Failed to find node") {
			return nil
		}
		if !strings.Contains(err.Error(), "in use") || time.Now().After(deadline) {
			return fmt.Errorf("disk %d unplugged from the guest, but its node stays: %w", i, err)
		}
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(100 * time.Millisecond):
		}
	}
}

// hasDevice reports whether QEMU still has the device of id.
func (p *Process) hasDevice(ctx context.Context, id string) (bool, error) {
	out, err := p.Execute(ctx, "qom-list", map[string]any{"path": "/machine/peripheral"})
	if err != nil {
		return false, err
	}
	var props []struct {
		Name string `json:"name"`
	}
	if err := json.Unmarshal(out, &props); err != nil {
		return false, fmt.Errorf("QMP qom-list: %w", err)
	}
	for _, pr := range props {
		if pr.Name == id {
			return true, nil
		}
	}
	return false, nil
}
