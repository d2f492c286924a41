package host

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"time"

	"github.com/vhdkit/vhdkit/disk"
	"github.com/vhdkit/vhdkit/imagecopy"
	"github.com/vhdkit/vhdkit/internal/api"
	"github.com/vhdkit/vhdkit/storage"
	"github.com/vhdkit/vhdkit/vhdx"
)

// Checkpoints returns a machine's checkpoint tree.
func (h *Host) Checkpoints(name string) (*api.Checkpoints, error) {
	h.mu.Lock()
	defer h.mu.Unlock()
	v, err := h.lookup(name)
	if err != nil {
		return nil, err
	}
	out := &api.Checkpoints{VM: name, Checkpoints: []api.Checkpoint{}}
	for _, c := range v.st.Checkpoints {
		out.Checkpoints = append(out.Checkpoints, checkpointView(v.st, c))
		if c.ID == v.st.Current {
			out.Current = cpID(c.ID)
		}
	}
	return out, nil
}

func checkpointView(m *machineState, c *checkpointState) api.Checkpoint {
	return api.Checkpoint{ID: cpID(c.ID), Name: c.Name, Parent: cpID(c.Parent), Created: c.Created,
		Files: slices.Clone(c.Files), Current: m.Current == c.ID,
		Type: c.Kind.typeOf(), StunMS: c.Kind.StunMS, StateFile: c.Kind.State, Frozen: c.Kind.Frozen,
		AgentStatus: c.Kind.AgentStatus, Note: c.Kind.Note}
}

// checkpointable returns the machine, refusing while a job changes its
// tree or while it is failed; the caller holds mu.
func (h *Host) checkpointable(name string) (*vm, error) {
	v, err := h.working(name)
	if err != nil {
		return nil, err
	}
	if v.job != nil {
		return nil, errorf(statusConflict, "machine %s: checkpoint job %s is %s; wait for it to finish", name, v.job.st.ID, v.job.st.State)
	}
	if v.optimizing {
		return nil, errorf(statusConflict, "machine %s: its disks are being optimized; wait for it to finish", name)
	}
	if v.power() == api.PowerCheckpointing {
		return nil, errorf(statusConflict, "machine %s: a checkpoint is being taken; wait for it to finish", name)
	}
	return v, nil
}

// CreateCheckpoint freezes every disk of the machine at one instant: new
// I/O is held and in-flight I/O drained on all disks, each disk continues
// on a new differencing child, then I/O resumes. For a running machine
// the guest takes part as req.Type asks (runcheckpoint.go).
func (h *Host) CreateCheckpoint(name string, req api.CreateCheckpoint) (*api.Checkpoint, error) {
	h.mu.Lock()
	defer h.mu.Unlock()
	v, err := h.checkpointable(name)
	if err != nil {
		return nil, err
	}
	c, err := h.createCheckpoint(v, req)
	if err != nil {
		return nil, err
	}
	out := checkpointView(v.st, c)
	return &out, nil
}

// checkpoint takes a crash checkpoint; the caller holds mu.
func (h *Host) checkpoint(v *vm, name string) (*checkpointState, error) {
	id, name, err := h.newCheckpointName(v, name)
	if err != nil {
		return nil, err
	}
	return h.checkpointAs(v, id, name, checkpointKind{Type: api.CheckpointCrash})
}

// newCheckpointName hands out the ID of a new checkpoint of v and checks
// its name (a timestamp when ""); the caller holds mu.
func (h *Host) newCheckpointName(v *vm, name string) (id, checked string, err error) {
	if name == "" {
		name = fmt.Sprintf("%s - (%s)", v.st.Name, time.Now().UTC().Format("2006-01-02 15:04:05.000"))
	}
	if err := checkName(name); err != nil {
		return "", "", err
	}
	if v.st.named(name) != nil {
		return "", "", errorf(statusConflict, "machine %s already has a checkpoint named %q", v.st.Name, name)
	}
	return h.st.nextID(), name, nil
}

// checkpointAs switches every disk of v to a new child: checkpoint id,
// named name (see newCheckpointName), taken as kind says; the caller
// holds mu.
func (h *Host) checkpointAs(v *vm, id, name string, kind checkpointKind) (*checkpointState, error) {
	c := &checkpointState{ID: id, Name: name, Parent: v.st.Current, Created: time.Now().UTC(), Kind: kind}
	for _, d := range v.disks {
		d.Pause()
	}
	defer func() {
		for _, d := range v.disks {
			d.Resume()
		}
	}()
	// The state is saved after the children exist and before I/O
	// resumes: a crash before the save leaves unreferenced children,
	// removed at the next start, and frozen parents that simply reopen.
	var done []int
	undo := func() {
		for _, i := range done {
			d := v.disks[i]
			child := v.st.Disks[i].Leaf
			d.SwapPaused(func(leaf *vhdx.Image) (*vhdx.Image, error) {
				leaf.Close()
				os.Remove(leaf.Path())
				return vhdx.Open(child, h.openOptions(child))
			})
		}
	}
	for i, d := range v.disks {
		c.Files = append(c.Files, v.st.Disks[i].Leaf)
		path := filepath.Join(h.machineDir(v.st.Name), fmt.Sprintf("disk%d_%s.avhdx", i, c.ID))
		if err := d.CheckpointPaused(path); err != nil {
			undo()
			return nil, fmt.Errorf("checkpointing disk %d: %w", i, err)
		}
		done = append(done, i)
	}
	old := v.st.Current
	v.st.Checkpoints = append(v.st.Checkpoints, c)
	v.st.Current = c.ID
	for i, d := range v.disks {
		v.st.Disks[i].Leaf = d.Leaf()
	}
	if err := h.save(); err != nil {
		made := *v.st
		made.Disks = slices.Clone(v.st.Disks)
		v.st.Checkpoints = v.st.Checkpoints[:len(v.st.Checkpoints)-1]
		v.st.Current = old
		for i := range v.disks {
			v.st.Disks[i].Leaf = c.Files[i]
		}
		// The failed save may have put the new state in place (its
		// folder sync failing after the rename): the children are undone
		// only once the old state is saved for sure, or a restart would
		// find a state naming deleted files. If that fails too, the
		// machine stays on the children, which the state in memory names
		// again, to be saved with the next change.
		if rerr := h.save(); rerr != nil {
			*v.st = made
			return nil, fmt.Errorf("%w; saving the state without the checkpoint failed too (%v): the machine runs on the checkpoint's new files, recorded at the next save", err, rerr)
		}
		undo()
		return nil, err
	}
	h.log.Info("checkpoint created", "vm", v.st.Name, "checkpoint", c.Name, "id", c.ID)
	return c, nil
}

// checkName refuses checkpoint names that could be taken for an ID.
func checkName(name string) error {
	if name == "" {
		return errorf(statusBadRequest, "a checkpoint name cannot be empty")
	}
	if cpIDRE.MatchString(name) {
		return errorf(statusBadRequest, "checkpoint name %q has the form of a checkpoint ID (cp-N); choose another", name)
	}
	return nil
}

func (h *Host) findCheckpoint(v *vm, ref string) (*checkpointState, error) {
	c := v.st.findCheckpoint(ref)
	if c == nil {
		return nil, errorf(statusNotFound, "machine %s has no checkpoint %q", v.st.Name, ref)
	}
	return c, nil
}

// RenameCheckpoint renames a checkpoint.
func (h *Host) RenameCheckpoint(name, ref, newName string) (*api.Checkpoint, error) {
	h.mu.Lock()
	defer h.mu.Unlock()
	v, err := h.lookup(name)
	if err != nil {
		return nil, err
	}
	c, err := h.findCheckpoint(v, ref)
	if err != nil {
		return nil, err
	}
	if err := checkName(newName); err != nil {
		return nil, err
	}
	if o := v.st.named(newName); o != nil && o != c {
		return nil, errorf(statusConflict, "machine %s already has a checkpoint named %q", name, newName)
	}
	old := c.Name
	c.Name = newName
	if err := h.save(); err != nil {
		c.Name = old
		return nil, err
	}
	h.log.Info("checkpoint renamed", "vm", name, "checkpoint", newName, "old", old)
	out := checkpointView(v.st, c)
	return &out, nil
}

// ApplyCheckpoint reverts the machine to a checkpoint (Restore-VMSnapshot):
// each disk continues on a new child of the checkpoint's file and the
// current state is discarded, or first checkpointed when req.Save is set.
// Connected NBD clients would see their disk change under them (a guest's
// file system is then corrupt): the apply is refused while there are
// any, or with req.Force they are disconnected first.
//
// A running (or paused) machine is turned off first, as Hyper-V does (its
// --save checkpoint is taken before, of the default type, production).
// A standard checkpoint then starts the machine from its memory state:
// it runs on from the instant of the checkpoint (a machine that was off
// is left saved, as Hyper-V leaves it: vm start runs it on from there,
// vm stop --turn-off discards the state). After a production or crash
// checkpoint the machine stays off, to boot from its disks.
func (h *Host) ApplyCheckpoint(name, ref string, req api.ApplyCheckpoint) (*api.VM, error) {
	h.mu.Lock()
	v, err := h.checkpointable(name)
	if err != nil {
		h.mu.Unlock()
		return nil, err
	}
	c, err := h.findCheckpoint(v, ref)
	if err != nil {
		h.mu.Unlock()
		return nil, err
	}
	if req.Save && req.SaveName != "" {
		if err := checkName(req.SaveName); err != nil {
			h.mu.Unlock()
			return nil, err
		}
	}
	// NBD clients besides QEMU would see the disks revert under them:
	// refuse before turning the machine off rather than after.
	if p := v.power(); !req.Force && (p == api.PowerRunning || p == api.PowerPaused) {
		if n, per := h.clients(v); n > len(v.disks) {
			h.mu.Unlock()
			return nil, errorf(statusConflict, "machine %s has %d NBD %s connected besides its QEMU (%s): applying checkpoint %q would change the disks under them; disconnect them, or use --force to disconnect them first",
				name, n-len(v.disks), plural(n-len(v.disks), "client", "clients"), per, c.Name)
		}
	}
	if p := v.power(); req.Save && (p == api.PowerRunning || p == api.PowerPaused) {
		if _, err := h.createCheckpoint(v, api.CreateCheckpoint{Name: req.SaveName}); err != nil {
			h.mu.Unlock()
			return nil, err
		}
		req.Save = false
	}
	h.mu.Unlock()
	wasRunning, err := h.turnOffForApply(name)
	if err != nil {
		return nil, err
	}
	out, c, err := h.applyCheckpoint(name, ref, req)
	if err != nil {
		return nil, err
	}
	if c.Kind.Type == api.CheckpointStandard && c.Kind.State != "" {
		started, err := h.startFromCheckpoint(context.WithoutCancel(h.ctx), name, c, wasRunning)
		if err != nil {
			return nil, err
		}
		started.Disconnected = out.Disconnected
		return started, nil
	}
	return out, nil
}

// applyCheckpoint does ApplyCheckpoint's work on a machine that is off.
func (h *Host) applyCheckpoint(name, ref string, req api.ApplyCheckpoint) (*api.VM, *checkpointState, error) {
	h.mu.Lock()
	defer h.mu.Unlock()
	v, err := h.checkpointable(name)
	if err != nil {
		return nil, nil, err
	}
	c, err := h.findCheckpoint(v, ref)
	if err != nil {
		return nil, nil, err
	}
	// QEMU would reconnect to the reverted disks under the running guest
	// (--force only cuts its connection): the machine must be off (a
	// start may have come between the turn-off and here).
	if err := v.refuseRunning(fmt.Sprintf("applying checkpoint %q", c.Name)); err != nil {
		return nil, nil, err
	}
	disconnected, err := h.refuseClients(v, fmt.Sprintf("applying checkpoint %q", c.Name), req.Force)
	if err != nil {
		return nil, nil, err
	}
	if req.Save {
		if _, err := h.checkpoint(v, req.SaveName); err != nil {
			return nil, nil, err
		}
	}
	for _, d := range v.disks {
		d.Pause()
	}
	defer func() {
		for _, d := range v.disks {
			d.Resume()
		}
	}()
	id := h.st.nextID()
	var discard []string
	for i, d := range v.disks {
		path := filepath.Join(h.machineDir(v.st.Name), fmt.Sprintf("disk%d_%s.avhdx", i, id))
		err := d.SwapPaused(func(leaf *vhdx.Image) (*vhdx.Image, error) {
			// The new child is made before the old leaf closes, so a
			// failure leaves the disk as it was.
			im, err := vhdx.Create(path, vhdx.CreateOptions{Parent: c.Files[i]})
			if err != nil {
				return nil, err
			}
			discard = append(discard, leaf.Path())
			leaf.Close()
			return im, nil
		})
		if err != nil {
			return nil, nil, fmt.Errorf("reverting disk %d (disks before it are reverted already): %w", i, err)
		}
		v.st.Disks[i].Leaf = path
	}
	v.st.Current = c.ID
	if err := h.save(); err != nil {
		return nil, nil, err
	}
	// Only now may the discarded state go: the saved state no longer
	// names it. A file some checkpoint holds is never the running leaf.
	for _, f := range discard {
		if !h.referenced(f) {
			os.Remove(f)
		}
	}
	h.log.Info("checkpoint applied", "vm", name, "checkpoint", c.Name)
	out := h.view(v)
	out.Disconnected = disconnected
	return &out, c, nil
}

// referenced reports whether a disk or checkpoint uses file; the caller
// holds mu.
func (h *Host) referenced(file string) bool {
	for _, m := range h.st.Machines {
		for _, d := range m.Disks {
			if d.Leaf == file || d.Attached == file {
				return true
			}
		}
		for _, c := range m.Checkpoints {
			if slices.Contains(c.Files, file) {
				return true
			}
		}
	}
	return false
}

// ExportCheckpoint writes each disk's state at the checkpoint to a
// standalone dynamic VHDX in dir (flattened: no parent), and a standard
// checkpoint's memory state beside them (VM.vmstate).
func (h *Host) ExportCheckpoint(name, ref, dir string) (*api.Exported, error) {
	h.mu.Lock()
	v, err := h.working(name)
	if err != nil {
		h.mu.Unlock()
		return nil, err
	}
	c, err := h.findCheckpoint(v, ref)
	if err != nil {
		h.mu.Unlock()
		return nil, err
	}
	files, state := slices.Clone(c.Files), c.Kind.State
	// A job merging into the checkpoint's files changes them; exporting
	// then would read a mix.
	busy := v.job != nil
	h.mu.Unlock()
	if busy {
		return nil, errorf(statusConflict, "machine %s has a running checkpoint job; export after it finishes", name)
	}
	if dir == "" {
		return nil, errorf(statusBadRequest, "export needs a target directory")
	}
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return nil, err
	}
	out := &api.Exported{Files: []string{}}
	for i, f := range files {
		dst := filepath.Join(dir, fmt.Sprintf("%s-disk%d.vhdx", name, i))
		if _, err := os.Lstat(dst); err == nil {
			return out, errorf(statusConflict, "%s exists (vhdkit does not overwrite files)", dst)
		}
		if err := flatten(f, dst); err != nil {
			return out, fmt.Errorf("exporting disk %d: %w", i, err)
		}
		out.Files = append(out.Files, dst)
	}
	if state != "" {
		// A standard checkpoint's memory state goes with it.
		dst := filepath.Join(dir, name+stateExt)
		if err := exportState(state, dst); err != nil {
			return out, fmt.Errorf("exporting the memory state: %w", err)
		}
		out.Files = append(out.Files, dst)
	}
	h.log.Info("checkpoint exported", "vm", name, "checkpoint", ref, "dir", dir)
	return out, nil
}

// flatten copies the content of the chain at src into a new dynamic VHDX.
func flatten(src, dst string) error {
	in, err := vhdx.Open(src, vhdx.OpenOptions{ReadOnly: true})
	if err != nil {
		return err
	}
	defer in.Close()
	info := in.Info()
	tmp := dst + ".partial"
	os.Remove(tmp)
	out, err := vhdx.Create(tmp, vhdx.CreateOptions{Size: info.VirtualSize,
		LogicalSectorSize: info.LogicalSectorSize, PhysicalSectorSize: info.PhysicalSectorSize})
	if err != nil {
		return err
	}
	err = copyData(in, out)
	if cerr := out.Close(); err == nil {
		err = cerr
	}
	if err == nil {
		err = os.Rename(tmp, dst)
	}
	if err == nil {
		err = storage.SyncDir(filepath.Dir(dst))
	}
	if err != nil {
		os.Remove(tmp)
	}
	return err
}

// copyData copies what in reads into the new image out with the copy
// engine: data moved file to file (cloned where the file system can),
// ranges that read as zeros left unallocated.
func copyData(in *vhdx.Image, out *vhdx.Image) error {
	exts, err := in.Extents(0, in.Size())
	if err != nil {
		return err
	}
	_, err = imagecopy.Copy(context.Background(), out, in, exts, imagecopy.Options{Fresh: true, DetectZeros: true})
	return err
}

// DeleteCheckpoint starts the job that deletes a checkpoint, or with
// subtree the checkpoint and its descendants, by the tree rules: a
// checkpoint nothing depends on goes with its files; one with a single
// dependent has that dependent merged into its files (live, when the
// dependent is the running state); one with several dependents cannot be
// deleted alone.
func (h *Host) DeleteCheckpoint(name, ref string, subtree bool, bandwidth int64) (*api.Job, error) {
	h.mu.Lock()
	defer h.mu.Unlock()
	v, err := h.checkpointable(name)
	if err != nil {
		return nil, err
	}
	c, err := h.findCheckpoint(v, ref)
	if err != nil {
		return nil, err
	}
	if bandwidth < 0 {
		return nil, errorf(statusBadRequest, "bandwidth cannot be negative")
	}
	targets := []string{c.ID}
	if subtree {
		targets = v.st.subtree(c)
	} else if kids, now := v.st.dependents(c); len(kids)+btoi(now) > 1 {
		return nil, errorf(statusConflict, "checkpoint %q has %d dependents (child checkpoints or the running state); delete them first, or delete the subtree", c.Name, len(kids)+btoi(now))
	}
	// Space: the first merge needs room for what its top layer holds.
	if need, dir, err := h.spaceNeeded(v, c); err != nil {
		return nil, err
	} else if need > 0 {
		free, err := h.opts.FreeSpace(dir)
		if err != nil {
			return nil, err
		}
		if free < need {
			return nil, errorf(statusInsufficient, "not enough space to merge checkpoint %q: the merge needs up to %d bytes in %s, which has %d free", c.Name, need, dir, free)
		}
	}
	now := time.Now().UTC()
	js := &jobState{Job: api.Job{ID: h.st.nextJobID(), Kind: "delete-checkpoint", VM: name, Checkpoint: c.Name, CheckpointID: cpID(c.ID),
		Subtree: subtree, State: api.JobQueued, Bandwidth: bandwidth, Created: now, Updated: now}, Targets: targets}
	h.st.Jobs = append(h.st.Jobs, js)
	if err := h.save(); err != nil {
		h.st.Jobs = h.st.Jobs[:len(h.st.Jobs)-1]
		return nil, err
	}
	j := h.newJob(js)
	v.job = j
	h.startJob(j)
	h.log.Info("checkpoint delete started", "vm", name, "checkpoint", c.Name, "job", js.ID, "subtree", subtree)
	out := j.view()
	return &out, nil
}

func btoi(b bool) int {
	if b {
		return 1
	}
	return 0
}

// spaceNeeded estimates the bytes deleting c writes into its files: the
// data its single dependent holds; the caller holds mu.
func (h *Host) spaceNeeded(v *vm, c *checkpointState) (int64, string, error) {
	data, _, err := h.mergeSize(v, c)
	return data, filepath.Dir(c.Files[0]), err
}

// mergeSize measures what deleting c merges into its files, over all
// disks: the data the merged layers hold, and that plus the ranges they
// declare zero (what the copy covers). The caller holds mu.
func (h *Host) mergeSize(v *vm, c *checkpointState) (data, merged int64, err error) {
	kids, now := v.st.dependents(c)
	var layers []extenter
	switch {
	case now && len(kids) == 0:
		// The running leaves, through their disks: another handle on a
		// file being written would read it half-way through a change.
		for _, d := range v.disks {
			layers = append(layers, d)
		}
	case !now && len(kids) == 1:
		for _, f := range kids[0].Files {
			im, err := vhdx.Open(f, vhdx.OpenOptions{ReadOnly: true, FS: h.opts.FS})
			if err != nil {
				return 0, 0, err
			}
			defer im.Close()
			layers = append(layers, im)
		}
	}
	for _, l := range layers {
		exts, err := l.Extents(0, l.Size())
		if err != nil {
			return 0, 0, err
		}
		for _, e := range exts {
			if e.Depth != 0 || e.Type == disk.Hole {
				continue
			}
			merged += e.Length
			if e.Type == disk.Data {
				data += e.Length
			}
		}
	}
	return data, merged, nil
}

type extenter interface {
	Size() int64
	Extents(off, n int64) ([]disk.Extent, error)
}
