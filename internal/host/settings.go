package host

import (
	"context"
	"crypto/rand"
	"fmt"
	"net/http"
	"os"
	"path/filepath"
	"runtime"
	"strings"

	"github.com/vhdkit/vhdkit/internal/api"
	"github.com/vhdkit/vhdkit/internal/vmm"
)

// A machine's settings (api.Settings) are what vm create sets and vm set
// changes: memory, CPUs, generation, direct kernel boot, the DVD drive's
// ISO, the network, the accelerator. They change only while the machine
// is off, as Hyper-V's Set-VM has it for memory and processors (and
// generation, which Hyper-V never changes): QEMU's memory, CPUs, chipset
// and firmware are fixed for a run, and a saved state holds the devices
// it was saved with. A request is checked whole before anything changes.

// Defaults of a machine's settings.
const (
	defaultMemoryMiB = 512
	defaultCPUs      = 1
)

// settingsOf validates req and fills in the defaults (a zero field takes
// its default).
func settingsOf(req *api.Settings) (*api.Settings, error) {
	s := api.Settings{MemoryMiB: defaultMemoryMiB, CPUs: defaultCPUs, Accel: vmm.AccelAuto, Generation: vmm.Gen1, Network: vmm.NetworkNone}
	if req != nil {
		if req.MemoryMiB != 0 {
			s.MemoryMiB = req.MemoryMiB
		}
		if req.CPUs != 0 {
			s.CPUs = req.CPUs
		}
		if req.Accel != "" {
			s.Accel = req.Accel
		}
		if req.Generation != 0 {
			s.Generation = req.Generation
		}
		if req.Network != "" {
			s.Network = req.Network
		}
		s.Kernel, s.Initrd, s.Append, s.CDROM, s.MAC = req.Kernel, req.Initrd, req.Append, req.CDROM, req.MAC
	}
	if s.MAC == "" {
		s.MAC = randomMAC()
	}
	if err := checkSettings(&s); err != nil {
		return nil, err
	}
	return &s, nil
}

// settingsOf is settingsOf with the files the settings name confined to
// what a machine may read (confineSettings).
func (h *Host) settingsOf(req *api.Settings) (*api.Settings, error) {
	s, err := settingsOf(req)
	if err != nil {
		return nil, err
	}
	if err := h.confineSettings(s); err != nil {
		return nil, err
	}
	return s, nil
}

// checkSettings refuses a setting out of range, with the range.
func checkSettings(s *api.Settings) error {
	if s.MemoryMiB < 16 || s.MemoryMiB > 1<<20 {
		return errorf(statusBadRequest, "memory %d MiB: use 16 MiB to 1 TiB", s.MemoryMiB)
	}
	// Hyper-V gives a machine at most as many virtual processors as the
	// host has logical ones; more would only make them wait for each
	// other.
	if host := runtime.NumCPU(); s.CPUs < 1 || s.CPUs > host {
		return errorf(statusBadRequest, "%d CPUs: use 1 to %d (the host's logical processors)", s.CPUs, host)
	}
	if s.Generation != vmm.Gen1 && s.Generation != vmm.Gen2 {
		return errorf(statusBadRequest, "generation %d: use 1 (BIOS) or 2 (UEFI)", s.Generation)
	}
	switch s.Accel {
	case vmm.AccelAuto, vmm.AccelKVM, vmm.AccelTCG:
	default:
		return errorf(statusBadRequest, "accelerator %q: use auto, kvm or tcg", s.Accel)
	}
	if _, err := vmm.ParseNetwork(s.Network); err != nil {
		return errorf(statusBadRequest, "%v", err)
	}
	if err := vmm.CheckMAC(s.MAC); err != nil {
		return errorf(statusBadRequest, "%v", err)
	}
	if s.Kernel == "" && (s.Initrd != "" || s.Append != "") {
		return errorf(statusBadRequest, "an initrd or kernel command line needs a kernel (--kernel FILE)")
	}
	for _, f := range []struct{ what, path string }{{"kernel", s.Kernel}, {"initrd", s.Initrd}, {"ISO", s.CDROM}} {
		if f.path == "" {
			continue
		}
		if err := checkReadable(f.what, f.path); err != nil {
			return err
		}
	}
	return nil
}

// checkReadable checks that a file a machine boots or reads is an
// absolute path to a regular file this daemon can read.
func checkReadable(what, path string) error {
	if !filepath.IsAbs(path) {
		return errorf(statusBadRequest, "%s %s: give an absolute path (the daemon may run elsewhere)", what, path)
	}
	fi, err := os.Stat(path)
	if err != nil {
		return errorf(statusBadRequest, "%s: %v", what, err)
	}
	if !fi.Mode().IsRegular() {
		return errorf(statusBadRequest, "%s %s is not a regular file", what, path)
	}
	f, err := os.Open(path)
	if err != nil {
		return errorf(statusBadRequest, "%s: %v", what, err)
	}
	f.Close()
	return nil
}

// confineSettings refuses an ISO inside the data directory: the guest
// would read the daemon's own files (its state, other machines' disks)
// through its DVD drive. Symbolic links are followed first.
func (h *Host) confineSettings(s *api.Settings) error {
	if s.CDROM == "" {
		return nil
	}
	real, err := filepath.EvalSymlinks(s.CDROM)
	if err != nil {
		return errorf(statusBadRequest, "ISO: %v", err)
	}
	if within(h.realDir(), real) {
		return errorf(statusBadRequest, "ISO %s is inside the daemon's data directory %s: a machine reads no file of the daemon's own", s.CDROM, h.dir)
	}
	return nil
}

// realDir is the data directory with symbolic links resolved, to
// compare resolved paths with.
func (h *Host) realDir() string {
	if d, err := filepath.EvalSymlinks(h.dir); err == nil {
		return d
	}
	return h.dir
}

// within reports whether path is dir or below it.
func within(dir, path string) bool {
	rel, err := filepath.Rel(dir, path)
	return err == nil && rel != ".." && !strings.HasPrefix(rel, "../")
}

// randomMAC is a network adapter's address in QEMU's range (52:54:00,
// the prefix libvirt uses too), its last three bytes random.
func randomMAC() string {
	var b [3]byte
	rand.Read(b[:])
	return fmt.Sprintf("52:54:00:%02x:%02x:%02x", b[0], b[1], b[2])
}

// SetVM changes a machine's settings (Set-VM). The machine must be off
// (or failed); the request is checked whole, and a refusal changes
// nothing.
func (h *Host) SetVM(ctx context.Context, name string, req api.SetVM) (*api.VM, error) {
	h.mu.Lock()
	defer h.mu.Unlock()
	v, err := h.lookup(name)
	if err != nil {
		return nil, err
	}
	if req.CDROM != nil && req == (api.SetVM{CDROM: req.CDROM}) && v.runs() && !h.hasSaved(name) {
		return h.changeDisc(ctx, v, *req.CDROM)
	}
	if p := v.power(); p != api.PowerOff && p != api.PowerFailed || h.hasSaved(name) {
		if p == api.PowerSaved || h.hasSaved(name) {
			return nil, errorf(statusConflict, "machine %s is saved, and its saved state holds the hardware it ran on: start it and stop it (vhdkit vm start %s), or discard the saved state (vhdkit vm stop %s --turn-off), before changing its settings", name, name, name)
		}
		return nil, errorf(statusConflict, "machine %s is %s: settings change only while it is off, as with Hyper-V's Set-VM (the DVD drive's disc alone changes while it runs: --cdrom by itself); stop it first (vhdkit vm stop %s)", name, p, name)
	}
	cur, err := settingsOf(v.st.Settings)
	if err != nil {
		// A setting that no longer holds (a kernel since removed) is what
		// this request may be about to fix: start from the stored ones.
		cur = &api.Settings{}
		if v.st.Settings != nil {
			*cur = *v.st.Settings
		}
	}
	s := *cur
	changed := false
	setInt := func(dst *int, src *int) {
		if src != nil {
			*dst, changed = *src, true
		}
	}
	setString := func(dst *string, src *string) {
		if src != nil {
			*dst, changed = *src, true
		}
	}
	setInt(&s.MemoryMiB, req.MemoryMiB)
	setInt(&s.CPUs, req.CPUs)
	setInt(&s.Generation, req.Generation)
	setString(&s.Accel, req.Accel)
	setString(&s.Kernel, req.Kernel)
	setString(&s.Initrd, req.Initrd)
	setString(&s.Append, req.Append)
	setString(&s.CDROM, req.CDROM)
	setString(&s.Network, req.Network)
	if !changed {
		return nil, errorf(statusBadRequest, "no setting to change: give one or more of memory, cpus, generation, accel, kernel, initrd, append, cdrom, network")
	}
	if s.Accel == "" {
		s.Accel = vmm.AccelAuto
	}
	if s.Network == "" {
		s.Network = vmm.NetworkNone
	}
	if s.MAC == "" {
		s.MAC = randomMAC()
	}
	if err := checkSettings(&s); err != nil {
		return nil, err
	}
	if err := h.confineSettings(&s); err != nil {
		return nil, err
	}
	old := v.st.Settings
	v.st.Settings = &s
	if err := h.save(); err != nil {
		v.st.Settings = old
		return nil, err
	}
	h.log.Info("machine settings changed", "vm", name, "memory_mib", s.MemoryMiB, "cpus", s.CPUs, "generation", s.Generation, "network", s.Network, "cdrom", s.CDROM)
	out := h.view(v)
	return &out, nil
}

// changeDisc changes the disc in a running machine's DVD drive (the one
// setting that changes while it runs, as Hyper-V's Set-VMDvdDrive does):
// the ISO is checked as at create, QEMU changes the disc, then the
// setting is saved. The caller holds mu (one short QMP exchange).
func (h *Host) changeDisc(ctx context.Context, v *vm, iso string) (*api.VM, error) {
	name := v.st.Name
	s, err := settingsOf(v.st.Settings)
	if err != nil {
		s = &api.Settings{}
		*s = *v.st.Settings
	}
	s.CDROM = iso
	if iso != "" {
		if err := checkReadable("ISO", iso); err != nil {
			return nil, err
		}
		if err := h.confineSettings(s); err != nil {
			return nil, err
		}
	}
	if err := v.run.proc.ChangeDisc(context.WithoutCancel(ctx), iso); err != nil {
		if strings.Contains(err.Error(), "not found") {
			return nil, errorf(statusConflict, "machine %s: its QEMU has no DVD drive (it was started before machines had one): stop it, set --cdrom, start it (%v)", name, err)
		}
		return nil, errorf(http.StatusInternalServerError, "machine %s: changing the disc: %v", name, err)
	}
	old := v.st.Settings
	v.st.Settings = s
	if err := h.save(); err != nil {
		v.st.Settings = old
		return nil, err
	}
	h.log.Info("machine's disc changed", "vm", name, "cdrom", iso)
	out := h.view(v)
	return &out, nil
}

// settingsRoutes adds the routes of this file to the API.
func (h *Host) settingsRoutes(handle func(pattern string, f func(r *http.Request) (any, error))) {
	handle("PATCH /v1/vms/{vm}", func(r *http.Request) (any, error) {
		var req api.SetVM
		if err := decode(r, &req); err != nil {
			return nil, err
		}
		return h.SetVM(r.Context(), r.PathValue("vm"), req)
	})
}
