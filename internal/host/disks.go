package host

import (
	"context"
	"errors"
	"fmt"
	"net/http"
	"os"
	"path/filepath"
	"strconv"
	"strings"

	"github.com/vhdkit/vhdkit/internal/api"
	"github.com/vhdkit/vhdkit/internal/vmm"
	"github.com/vhdkit/vhdkit/merge"
	"github.com/vhdkit/vhdkit/nbd"
	"github.com/vhdkit/vhdkit/vhdx"
)

// Adding and removing a machine's disks (Add-VMHardDiskDrive,
// Remove-VMHardDiskDrive). While the machine is off it is a change of its
// configuration; while it runs the disk is hot-plugged or unplugged
// through QMP (vmm.AddDisk, vmm.RemoveDisk).
//
// Disk I is export NAME/I (NAME for disk 0) and QEMU's node diskI: a
// running QEMU reaches each disk by that name, also when it reconnects
// after a daemon restart. Removing a disk renumbers those after it, so
// while the machine runs only its last disk is removed (and never disk 0,
// which it booted from); while it is off any disk but the only one.
//
// A machine with checkpoints keeps its disks as they are: each checkpoint
// holds one file per disk, and applying or deleting one works disk by
// disk. Delete the checkpoints (a merge) first.

// diskRoutes adds the routes of this file to the API.
func (h *Host) diskRoutes(handle func(pattern string, f func(r *http.Request) (any, error))) {
	handle("POST /v1/vms/{vm}/disks", func(r *http.Request) (any, error) {
		var req api.AddDisk
		if err := decode(r, &req); err != nil {
			return nil, err
		}
		return h.AddDisk(r.Context(), r.PathValue("vm"), req)
	})
	handle("DELETE /v1/vms/{vm}/disks/{disk}", func(r *http.Request) (any, error) {
		i, err := strconv.Atoi(r.PathValue("disk"))
		if err != nil {
			return nil, errorf(statusBadRequest, "disk %q: give the disk's index (vhdkit vm show lists them)", r.PathValue("disk"))
		}
		return h.RemoveDisk(r.Context(), r.PathValue("vm"), i, api.RemoveDisk{Delete: flagSet(r.URL.Query().Get("delete"))})
	})
}

// refuseDiskChange refuses a change to the set of v's disks while
// something relies on it; the caller holds mu.
func (h *Host) refuseDiskChange(v *vm, what string) error {
	name := v.st.Name
	switch {
	case v.job != nil:
		return errorf(statusConflict, "machine %s has a running job (%s): wait for it or cancel it before %s", name, v.job.st.ID, what)
	case v.optimizing:
		return errorf(statusConflict, "machine %s: its disks are being optimized; wait for it to finish before %s", name, what)
	case len(v.st.Checkpoints) > 0:
		return errorf(statusConflict, "machine %s has %d %s, each holding a file per disk: delete them (vhdkit checkpoint delete %s CP) before %s",
			name, len(v.st.Checkpoints), plural(len(v.st.Checkpoints), "checkpoint", "checkpoints"), name, what)
	case v.run != nil && v.run.unplugging:
		return errorf(statusConflict, "machine %s: a disk is being unplugged; wait for it before %s", name, what)
	}
	switch p := v.power(); {
	case p == api.PowerSaved || h.hasSaved(name):
		return errorf(statusConflict, "machine %s is saved, and its saved state holds the disks it ran with: start it (vhdkit vm start %s), or discard the saved state (vhdkit vm stop %s --turn-off), before %s", name, name, name, what)
	case p == api.PowerOff || p == api.PowerFailed || p == api.PowerRunning || p == api.PowerPaused:
		return nil
	default:
		return errorf(statusConflict, "machine %s is %s: wait for it before %s", name, p, what)
	}
}

// runs reports whether v's QEMU runs (running or paused); the caller
// holds mu.
func (v *vm) runs() bool {
	p := v.power()
	return (p == api.PowerRunning || p == api.PowerPaused) && v.run.proc != nil
}

// AddDisk adds a disk to a machine: a new dynamic VHDX (Size) in its
// folder, or an existing VHDX file (Path). A running machine gets it
// hot-plugged, and the guest sees a new virtio disk.
//
//  1. The file is made or opened, and exported as the next disk.
//  2. The state records it: from here a daemon restart serves it, and
//     a QEMU that reconnects finds it.
//  3. A running machine gets it through QMP (blockdev-add, device_add).
//     A failure there undoes 2 and 1 (a file made in 1 is removed).
func (h *Host) AddDisk(ctx context.Context, name string, req api.AddDisk) (*api.VM, error) {
	if (req.Size != 0) == (req.Path != "") {
		return nil, errorf(statusBadRequest, "give a new disk's size (--create SIZE) or an existing file (--path FILE), one of them")
	}
	if req.Path == "" && (req.Size < 1<<20 || req.Size%(1<<20) != 0 || req.Size > 64<<40) {
		return nil, errorf(statusBadRequest, "disk size %d: use a whole number of MiB between 1 MiB and 64 TiB", req.Size)
	}
	h.mu.Lock()
	defer h.mu.Unlock()
	v, err := h.working(name)
	if err != nil {
		return nil, err
	}
	if err := h.refuseDiskChange(v, "adding a disk"); err != nil {
		return nil, err
	}
	i := len(v.st.Disks)
	if i >= vmm.MaxDisks {
		return nil, errorf(statusConflict, "machine %s has %d disks, as many as a machine has", name, i)
	}

	// 1. The file.
	ds, d, created, err := h.newDisk(v, req)
	if err != nil {
		return nil, err
	}
	undoFile := func() {
		d.Close()
		if created {
			os.Remove(ds.Leaf)
		}
	}
	export := exportName(name, i)
	if err := h.opts.NBD.AddExport(nbd.Export{Name: export, Image: d, Description: fmt.Sprintf("vhdkit machine %s disk %d", name, i)}); err != nil {
		undoFile()
		return nil, errorf(http.StatusInternalServerError, "machine %s: exporting disk %d: %v", name, i, err)
	}
	undo := func() {
		h.opts.NBD.RemoveExport(export)
		undoFile()
	}

	// 2. The state.
	v.st.Disks = append(v.st.Disks, ds)
	v.disks = append(v.disks, d)
	forget := func() {
		v.st.Disks = v.st.Disks[:i]
		v.disks = v.disks[:i]
	}
	if err := h.save(); err != nil {
		forget()
		undo()
		return nil, err
	}

	// 3. The running QEMU. One short QMP exchange each, under mu, as for
	//    pause and resume.
	if v.runs() {
		cfg := h.diskConfig(v)
		if err := v.run.proc.AddDisk(context.WithoutCancel(ctx), &cfg, i, vmm.Disk{Socket: h.opts.NBDSocket, Export: export}); err != nil {
			forget()
			if serr := h.save(); serr != nil {
				h.log.Error("saving state", "err", serr)
			}
			undo()
			return nil, errorf(http.StatusInternalServerError, "machine %s: hot-plugging disk %d: %v", name, i, err)
		}
	}
	h.log.Info("disk added", "vm", name, "disk", i, "path", ds.Leaf, "created", created, "hotplug", v.runs())
	out := h.view(v)
	return &out, nil
}

// diskConfig is what vmm needs of a running machine to plug a disk into
// it: the disks' places depend on its generation, which does not change
// while it runs. The caller holds mu.
func (h *Host) diskConfig(v *vm) vmm.Config {
	gen := vmm.Gen1
	if s := v.st.Settings; s != nil && s.Generation != 0 {
		gen = s.Generation
	}
	return vmm.Config{Name: v.st.Name, Generation: gen, ReconnectDelay: reconnectDelay}
}

// newDisk makes or opens the file of a disk to add to v, as vm create
// does with --disk and --attach. An existing file must be a VHDX no
// machine uses, outside the daemon's folders but v's own (where a disk
// removed earlier is kept, and comes back as the daemon's file). The
// caller holds mu.
func (h *Host) newDisk(v *vm, req api.AddDisk) (ds *diskState, d *merge.Disk, created bool, err error) {
	mdir := h.machineDir(v.st.Name)
	if req.Path == "" {
		path, err := freeDiskName(mdir)
		if err != nil {
			return nil, nil, false, err
		}
		im, err := vhdx.Create(path, vhdx.CreateOptions{Size: uint64(req.Size)})
		if err != nil {
			return nil, nil, false, err
		}
		if err := im.Close(); err != nil {
			os.Remove(path)
			return nil, nil, false, err
		}
		d, err := merge.OpenDisk(path, h.openOptions(path))
		if err != nil {
			os.Remove(path)
			return nil, nil, false, err
		}
		return &diskState{Leaf: path, Size: d.Size()}, d, true, nil
	}
	if !filepath.IsAbs(req.Path) {
		return nil, nil, false, errorf(statusBadRequest, "%s: give an absolute path (the daemon may run elsewhere)", req.Path)
	}
	path := filepath.Clean(req.Path)
	lower := strings.ToLower(path)
	if !strings.HasSuffix(lower, ".vhdx") && !strings.HasSuffix(lower, ".avhdx") {
		return nil, nil, false, errorf(statusBadRequest, "%s: only VHDX files can be attached", req.Path)
	}
	real, err := filepath.EvalSymlinks(path)
	if err != nil {
		return nil, nil, false, errorf(statusBadRequest, "%v", err)
	}
	own := filepath.Dir(real) == filepath.Join(h.realDir(), "vms", v.st.Name)
	if within(h.realDir(), real) && !own {
		return nil, nil, false, errorf(statusBadRequest, "%s is inside the daemon's data directory %s: another machine's file (a checkpoint's, perhaps) is not attached", req.Path, h.dir)
	}
	if h.inUse(path) || h.inUse(real) {
		return nil, nil, false, errorf(statusConflict, "%s is already a disk of a machine (or the parent of one)", req.Path)
	}
	d, err = merge.OpenDisk(path, h.openOptions(path))
	if err != nil {
		return nil, nil, false, errorf(statusBadRequest, "%v", err)
	}
	ds = &diskState{Leaf: path, Size: d.Size()}
	if !own {
		ds.Attached = path
	}
	return ds, d, false, nil
}

// freeDiskName is the first diskI.vhdx no file in dir has taken.
func freeDiskName(dir string) (string, error) {
	for i := 0; ; i++ {
		p := filepath.Join(dir, fmt.Sprintf("disk%d.vhdx", i))
		if _, err := os.Lstat(p); errors.Is(err, os.ErrNotExist) {
			return p, nil
		} else if err != nil {
			return "", err
		}
	}
}

// RemoveDisk removes disk i from a machine; its file stays, unless
// req.Delete and the daemon made it. While the machine runs, the disk is
// unplugged first.
//
//  1. Under mu: the checks (see the file's comment); a running machine is
//     marked unplugging.
//  2. Without mu (the guest takes its time): QMP device_del, the wait
//     for the guest to release the device, blockdev-del.
//  3. Under mu: the disk's export goes and the disks after it move down
//     one (re-exported under their new names); the state records it;
//     then the file is deleted if asked.
func (h *Host) RemoveDisk(ctx context.Context, name string, i int, req api.RemoveDisk) (*api.RemovedDisk, error) {
	h.mu.Lock()
	defer h.mu.Unlock()
	v, err := h.working(name)
	if err != nil {
		return nil, err
	}
	n := len(v.st.Disks)
	if i < 0 || i >= n {
		return nil, errorf(statusNotFound, "machine %s has no disk %d (its disks are 0 to %d)", name, i, n-1)
	}
	if n == 1 {
		return nil, errorf(statusConflict, "disk %d is machine %s's only disk: a machine has at least one (vhdkit vm delete %s removes the machine)", i, name, name)
	}
	if err := h.refuseDiskChange(v, "removing a disk"); err != nil {
		return nil, err
	}
	ds := v.st.Disks[i]
	if req.Delete && ds.Attached != "" {
		return nil, errorf(statusConflict, "disk %d is the attached file %s, which is yours: remove the disk without --delete, then delete the file yourself", i, ds.Attached)
	}
	if v.runs() {
		switch {
		case v.power() == api.PowerPaused:
			// The guest releases the disk itself: paused, it cannot.
			return nil, errorf(statusConflict, "machine %s is paused, and its guest must release the disk to be unplugged: resume it first (vhdkit vm resume %s)", name, name)
		case i == 0:
			return nil, errorf(statusConflict, "disk 0 is the disk machine %s booted from: it is not removed while the machine runs; stop it first (vhdkit vm stop %s)", name, name)
		case i != n-1:
			return nil, errorf(statusConflict, "machine %s runs: only its last disk (%d) is removed while it runs, since the disks after disk %d would be renumbered under QEMU; stop it first (vhdkit vm stop %s)", name, n-1, i, name)
		}
	} else {
		// Clients of the disk or of those renumbered would find another
		// disk, or none, under the name they use.
		for k := i; k < n; k++ {
			if c := h.opts.NBD.Clients(exportName(name, k)); c > 0 {
				return nil, errorf(statusConflict, "machine %s: %d NBD %s connected to export %q: removing disk %d would change what it serves; disconnect them first",
					name, c, plural(c, "client is", "clients are"), exportName(name, k), i)
			}
		}
	}

	if v.runs() {
		// 2. The guest releases the disk.
		p := v.run.proc
		v.run.unplugging = true
		h.mu.Unlock()
		err := p.RemoveDisk(context.WithoutCancel(ctx), i)
		h.mu.Lock()
		if v.run != nil {
			v.run.unplugging = false
		}
		if err != nil {
			return nil, errorf(http.StatusInternalServerError, "machine %s: disk %d not removed: %v", name, i, err)
		}
		if h.vms[name] != v || len(v.st.Disks) != n || v.st.Disks[i] != ds {
			return nil, errorf(statusConflict, "machine %s changed while disk %d was unplugged; see vhdkit vm show %s", name, i, name)
		}
		if len(v.st.Checkpoints) > 0 {
			return nil, errorf(statusConflict, "machine %s: disk %d was unplugged from the guest, but a checkpoint was taken meanwhile and holds it: it stays a disk of the machine (back at its next start)", name, i)
		}
	}

	// 3. The configuration.
	for k := i; k < n; k++ {
		h.opts.NBD.RemoveExport(exportName(name, k))
	}
	d := v.disks[i]
	v.st.Disks = append(v.st.Disks[:i:i], v.st.Disks[i+1:]...)
	v.disks = append(v.disks[:i:i], v.disks[i+1:]...)
	h.exportFrom(v, i)
	if err := h.save(); err != nil {
		// The disk is out of the exports, and back in the state on disk
		// at the next start: serve it again until then.
		for k := i; k < n-1; k++ {
			h.opts.NBD.RemoveExport(exportName(name, k))
		}
		v.st.Disks = append(v.st.Disks[:i:i], append([]*diskState{ds}, v.st.Disks[i:]...)...)
		v.disks = append(v.disks[:i:i], append([]*merge.Disk{d}, v.disks[i:]...)...)
		h.exportFrom(v, i)
		return nil, err
	}
	if err := d.Close(); err != nil {
		h.log.Warn("closing a removed disk", "vm", name, "disk", i, "err", err)
	}
	out := &api.RemovedDisk{Path: ds.Leaf}
	if req.Delete {
		if err := os.Remove(ds.Leaf); err != nil && !errors.Is(err, os.ErrNotExist) {
			return nil, errorf(http.StatusInternalServerError, "machine %s: disk %d removed, but its file %s was not deleted: %v", name, i, ds.Leaf, err)
		}
		out.Deleted = true
	}
	h.log.Info("disk removed", "vm", name, "disk", i, "path", ds.Leaf, "deleted", out.Deleted)
	out.VM = h.view(v)
	return out, nil
}

// exportFrom exports v's disks from index i on; the caller holds mu.
func (h *Host) exportFrom(v *vm, i int) {
	for k := i; k < len(v.disks); k++ {
		err := h.opts.NBD.AddExport(nbd.Export{Name: exportName(v.st.Name, k), Image: v.disks[k],
			Description: fmt.Sprintf("vhdkit machine %s disk %d", v.st.Name, k)})
		if err != nil {
			h.log.Error("exporting a disk", "vm", v.st.Name, "disk", k, "err", err)
		}
	}
}
