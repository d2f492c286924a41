package host

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"strings"

	"github.com/vhdkit/vhdkit/internal/api"
	"github.com/vhdkit/vhdkit/merge"
	"github.com/vhdkit/vhdkit/vhdx"
)

// RepairVM brings a failed machine back: it applies the change req asks
// for (a disk re-attached to a file that moved, a lost checkpoint
// dropped), then opens the disks again and exports them; with neither,
// it only retries (the cause was fixed outside, or a lock was released).
// A job the failure held resumes. A machine that still fails stays as it
// was, with the changes made so far saved, and the reply says why.
func (h *Host) RepairVM(name string, req api.RepairVM) (*api.VM, error) {
	h.mu.Lock()
	defer h.mu.Unlock()
	v, err := h.lookup(name)
	if err != nil {
		return nil, err
	}
	if (req.Path != "") != (req.Disk != nil) {
		return nil, errorf(statusBadRequest, "re-attaching a disk takes both its index (--disk) and the file (--path)")
	}
	if req.DropCheckpoint != "" {
		if err := h.dropLost(v, req.DropCheckpoint); err != nil {
			return nil, err
		}
	}
	if v.failed == "" {
		if req.Path != "" {
			return nil, errorf(statusConflict, "machine %s is not failed: its disks are open; nothing to re-attach", name)
		}
		out := h.view(v)
		return &out, nil
	}
	if req.Path != "" {
		if err := h.reattach(v, *req.Disk, req.Path); err != nil {
			return nil, err
		}
	}
	if err := h.openDisks(v); err != nil {
		v.failed = err.Error()
		h.log.Warn("machine still failed", "vm", name, "err", err)
		return nil, errorf(statusConflict, "machine %s is still failed: %v", name, err)
	}
	v.failed = ""
	if j := v.job; j != nil {
		// Mirroring again before the export, as at Open.
		if err := j.restart(h, v); err != nil {
			h.log.Error("resuming a merge", "job", j.st.ID, "err", err)
		}
	}
	h.export(v)
	if j := v.job; j != nil {
		j.unhold()
		h.saveLocked()
	}
	h.log.Info("machine repaired", "vm", name)
	out := h.view(v)
	return &out, nil
}

// reattach points disk i of a failed machine at path, the file its
// running state moved to, after checking that the file is that disk:
// its chain opens, its size is the disk's, and, when the machine runs
// from a checkpoint, its parent is the checkpoint's file for the disk.
// The caller holds mu.
func (h *Host) reattach(v *vm, i int, path string) error {
	if i < 0 || i >= len(v.st.Disks) {
		return errorf(statusBadRequest, "machine %s has no disk %d (it has %d)", v.st.Name, i, len(v.st.Disks))
	}
	abs, err := filepath.Abs(path)
	if err != nil {
		return err
	}
	if lower := strings.ToLower(abs); !strings.HasSuffix(lower, ".vhdx") && !strings.HasSuffix(lower, ".avhdx") {
		return errorf(statusBadRequest, "%s: only VHDX files can be attached", path)
	}
	ds := v.st.Disks[i]
	if abs != ds.Leaf && h.referenced(abs) {
		return errorf(statusConflict, "%s is already a disk or checkpoint file of a machine", abs)
	}
	// Opened to check, and closed before openDisks opens it for good: the
	// host never holds an image file twice.
	d, err := merge.OpenDisk(abs, h.openOptions(abs))
	if err != nil {
		return errorf(statusBadRequest, "%s does not open as disk %d of machine %s: %v", abs, i, v.st.Name, err)
	}
	size, chain := d.Size(), d.Chain()
	if err := d.Close(); err != nil {
		return err
	}
	if size != ds.Size {
		return errorf(statusBadRequest, "%s is not disk %d of machine %s: its size is %d bytes, the disk's %d", abs, i, v.st.Name, size, ds.Size)
	}
	if c := v.st.checkpoint(v.st.Current); c != nil && (len(chain) < 2 || chain[1] != c.Files[i]) {
		parent := "none"
		if len(chain) > 1 {
			parent = chain[1]
		}
		return errorf(statusBadRequest, "%s is not disk %d of machine %s: the disk runs on a child of checkpoint %q's file %s, and this file's parent is %s",
			abs, i, v.st.Name, c.Name, c.Files[i], parent)
	}
	old, oldAttached := ds.Leaf, ds.Attached
	ds.Leaf = abs
	if ds.Attached == old {
		ds.Attached = abs
	}
	if err := h.save(); err != nil {
		ds.Leaf, ds.Attached = old, oldAttached
		return err
	}
	h.log.Info("disk re-attached", "vm", v.st.Name, "disk", i, "old", old, "file", abs)
	return nil
}

// dropLost removes a checkpoint whose files are lost from the tree, with
// its descendants (their files depend on the lost ones). A failed machine
// that ran from one of them continues from the lost checkpoint's parent
// on new children: what it wrote since is lost with the files. The caller
// holds mu.
func (h *Host) dropLost(v *vm, ref string) error {
	c, err := h.findCheckpoint(v, ref)
	if err != nil {
		return err
	}
	if v.job != nil {
		return errorf(statusConflict, "machine %s has job %s; it may need checkpoint %q: delete the machine, or restore the files so that the job can finish", v.st.Name, v.job.st.ID, c.Name)
	}
	var missing []string
	for _, f := range c.Files {
		if _, err := os.Stat(f); errors.Is(err, os.ErrNotExist) {
			missing = append(missing, f)
		}
	}
	if len(missing) == 0 {
		return errorf(statusConflict, "checkpoint %q is not lost: its files are there; delete it with \"vhdkit checkpoint delete %s %s\"", c.Name, v.st.Name, cpID(c.ID))
	}
	ids := v.st.subtree(c)
	runsFrom := slices.Contains(ids, v.st.Current)
	parent := v.st.checkpoint(c.Parent)
	switch {
	case runsFrom && v.failed == "":
		return errorf(statusConflict, "machine %s runs on checkpoint %q's files, which it still holds open; it cannot drop them", v.st.Name, c.Name)
	case runsFrom && parent == nil:
		return errorf(statusConflict, "checkpoint %q holds the base files of the disks (%s missing): the machine has no disk without them; restore them, or delete the machine",
			c.Name, strings.Join(missing, ", "))
	}
	var discard, made []string
	var leaves []string
	if runsFrom {
		id := h.st.nextID()
		for i, ds := range v.st.Disks {
			path := filepath.Join(h.machineDir(v.st.Name), fmt.Sprintf("disk%d_%s.avhdx", i, id))
			im, err := vhdx.Create(path, vhdx.CreateOptions{Parent: parent.Files[i]})
			if err == nil {
				err = im.Close()
			}
			if err != nil {
				for _, f := range made {
					os.Remove(f)
				}
				return fmt.Errorf("disk %d: a new child of %s: %w", i, parent.Files[i], err)
			}
			made = append(made, path)
			discard = append(discard, ds.Leaf)
			leaves = append(leaves, ds.Leaf)
			ds.Leaf = path
		}
	}
	old := slices.Clone(v.st.Checkpoints)
	oldCurrent := v.st.Current
	for _, id := range ids {
		if d := v.st.checkpoint(id); d != nil {
			discard = append(discard, d.Files...)
		}
		v.st.removeCheckpoint(id)
	}
	if runsFrom {
		v.st.Current = parent.ID
	}
	if err := h.save(); err != nil {
		v.st.Checkpoints, v.st.Current = old, oldCurrent
		for i, f := range leaves {
			v.st.Disks[i].Leaf = f
		}
		for _, f := range made {
			os.Remove(f)
		}
		return err
	}
	h.removeStaleStates(v.st)
	h.log.Warn("lost checkpoint dropped", "vm", v.st.Name, "checkpoint", c.Name, "descendants", len(ids)-1, "running_state_lost", runsFrom)
	for _, f := range discard {
		if !h.referenced(f) && filepath.Dir(f) == h.machineDir(v.st.Name) {
			if err := os.Remove(f); err != nil && !errors.Is(err, os.ErrNotExist) {
				h.log.Warn("removing a dropped checkpoint's file", "file", f, "err", err)
			}
		}
	}
	return nil
}
