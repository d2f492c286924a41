package host

import (
	"context"
	"errors"
	"fmt"
	"net/http"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"time"

	"github.com/vhdkit/vhdkit/internal/api"
	"github.com/vhdkit/vhdkit/internal/vmm"
	"github.com/vhdkit/vhdkit/storage"
)

// Checkpoints of running machines, as Hyper-V takes them (its checkpoint
// types):
//
//   - production (the default): the guest's file systems are frozen
//     through its agent (vmm.Agent: QEMU's guest agent on a virtio-serial
//     port), the disks switch to their new children, the file systems are
//     thawed. An agent that does not answer in time gets a standard
//     checkpoint instead, as Hyper-V's default does, unless the request
//     is production only: then it fails and nothing has changed.
//   - standard: the machine is paused, its memory and device state
//     written beside the checkpoint's disks (QEMU's migration stream:
//     DIR/vms/NAME/cpID.vmstate, as .part, synced, renamed), the disks
//     switch, the machine runs on (QEMU takes cont after a completed
//     migration). Applying it starts the machine from that state.
//   - crash: the disks switch, the guest unaware (checkpoint.go). A
//     machine that is not running (off, saved, failed) gets this kind
//     whatever was asked, with a note saying so, as Hyper-V does: no
//     guest changes its disks, there is nothing to freeze or save.
//
// The guest is stunned (frozen or paused) from the freeze or pause to the
// thaw or resume; that time is measured and kept with the checkpoint.
// The disks switch under mu, as for a crash checkpoint. The waits on the
// guest agent and on QEMU's migration stream (seconds; bounded, but an
// agent that never answers takes its timeouts) happen without mu, so
// that one machine's checkpoint does not hold the host: the machine's
// power is "checkpointing" meanwhile, which refuses whatever would
// change its power or disks (stop, save, pause, another checkpoint, a
// merge, an optimize), and a QEMU that ends meanwhile fails the
// checkpoint before the disks switch.

// checkpointKind is how a checkpoint was taken, as persisted.
type checkpointKind struct {
	Type   string  `json:"type,omitempty"` // api.Checkpoint*; "" (from before types) is crash
	StunMS float64 `json:"stun_ms,omitempty"`
	// State is a standard checkpoint's memory and device state: a file
	// that belongs to the checkpoint (deleted and exported with it).
	State string `json:"state,omitempty"`
	// Pid is the QEMU that wrote State: while that QEMU stays paused
	// after it, its next standard checkpoint copies State (see
	// standardCheckpoint).
	Pid         int    `json:"pid,omitempty"`
	Frozen      int    `json:"frozen,omitempty"`       // file systems the agent froze
	AgentStatus string `json:"agent_status,omitempty"` // the agent's freeze status during the switch
	Note        string `json:"note,omitempty"`         // why it is not the type asked for
}

// typeOf is the kind's type for the API.
func (k checkpointKind) typeOf() string {
	if k.Type == "" {
		return api.CheckpointCrash
	}
	return k.Type
}

// Bounds of a running machine's checkpoint.
const (
	// agentSyncTimeout is how long the guest agent has to answer at all:
	// what "answering in time" means for the fallback to standard.
	agentSyncTimeout = 10 * time.Second
	// freezeTimeout bounds the freeze itself: the guest syncs its file
	// systems first, which takes as long as its dirty data takes.
	freezeTimeout = 60 * time.Second
	// thawAttempts: a thaw is retried, a frozen guest is stuck.
	thawAttempts = 3
	// checkpointSaveTimeout bounds the write of a standard checkpoint's
	// memory state.
	checkpointSaveTimeout = 10 * time.Minute
)

// stateExt names a standard checkpoint's state file.
const stateExt = ".vmstate"

// checkpointStatePath is where checkpoint id's memory state goes.
func (h *Host) checkpointStatePath(machine, id string) string {
	return filepath.Join(h.machineDir(machine), "cp"+id+stateExt)
}

// createCheckpoint takes a checkpoint of the type req asks for; the
// caller holds mu and has checked that v may be checkpointed.
func (h *Host) createCheckpoint(v *vm, req api.CreateCheckpoint) (*checkpointState, error) {
	want := req.Type
	switch want {
	case "":
		want = api.CheckpointProduction
	case api.CheckpointProduction, api.CheckpointStandard, api.CheckpointCrash:
	default:
		return nil, errorf(statusBadRequest, "checkpoint type %q: use production, standard or crash", req.Type)
	}
	if req.ProductionOnly && want != api.CheckpointProduction {
		return nil, errorf(statusBadRequest, "production only applies to a production checkpoint, not %s", want)
	}
	id, name, err := h.newCheckpointName(v, req.Name)
	if err != nil {
		return nil, err
	}
	power := v.power()
	switch {
	case want == api.CheckpointCrash:
		return h.crashCheckpoint(v, id, name, "")
	case power == api.PowerStarting || power == api.PowerStopping:
		return nil, errorf(statusConflict, "machine %s is %s: take the checkpoint once it is running or off (or a crash checkpoint now: --type crash)", v.st.Name, power)
	case power != api.PowerRunning && power != api.PowerPaused:
		// Nothing runs on the disks: the crash checkpoint is as good.
		return h.crashCheckpoint(v, id, name, fmt.Sprintf("machine %s is %s: a crash checkpoint of its disks (nothing to freeze or save)", v.st.Name, power))
	}
	p := v.run.proc
	was := v.run.power
	v.run.power = api.PowerCheckpointing
	defer func() {
		if v.run != nil && v.run.proc == p && v.run.power == api.PowerCheckpointing {
			v.run.power = was
		}
	}()
	if want == api.CheckpointStandard {
		return h.standardCheckpoint(v, p, was == api.PowerPaused, id, name, "")
	}
	var note string
	switch {
	case power == api.PowerPaused:
		note = fmt.Sprintf("machine %s is paused: its guest agent cannot answer", v.st.Name)
	case p.GuestAgent() == nil:
		note = fmt.Sprintf("machine %s's QEMU has no guest agent channel (started by an older vhdkit)", v.st.Name)
	default:
		c, err := h.productionCheckpoint(v, p, id, name)
		if err == nil || !errors.Is(err, errAgent) {
			return c, err
		}
		note = err.Error()
	}
	if req.ProductionOnly {
		return nil, errorf(statusConflict, "no production checkpoint of %s: %s; nothing was changed (without --production-only a standard checkpoint is taken instead)", v.st.Name, note)
	}
	h.log.Warn("production checkpoint not possible: taking a standard one", "vm", v.st.Name, "reason", note)
	return h.standardCheckpoint(v, p, was == api.PowerPaused, id, name, note+": a standard checkpoint was taken instead")
}

// crashCheckpoint switches the disks, the guest unaware; its stun is how
// long the disks' I/O was held (the guest's CPUs ran on). The caller
// holds mu.
func (h *Host) crashCheckpoint(v *vm, id, name, note string) (*checkpointState, error) {
	start := time.Now()
	c, err := h.checkpointAs(v, id, name, checkpointKind{Type: api.CheckpointCrash, Note: note})
	if err != nil {
		return nil, err
	}
	c.Kind.StunMS = ms(time.Since(start))
	if err := h.save(); err != nil {
		h.log.Error("saving the state", "err", err)
	}
	return c, nil
}

// errAgent marks a production checkpoint that failed for want of a
// working guest agent, before anything changed: the caller may fall back.
var errAgent = errors.New("the guest agent")

// productionCheckpoint freezes the guest's file systems, switches the
// disks and thaws. The caller holds mu and has made the machine
// "checkpointing"; mu is let go while the agent works, held again on
// return.
//
//  1. Freeze (guest-fsfreeze-freeze): the agent must sync within
//     agentSyncTimeout and freeze within freezeTimeout. A failure here is
//     errAgent, after a thaw (a freeze the client gave up on may still
//     complete in the guest).
//  2. Ask the agent for its status while frozen: kept with the
//     checkpoint, what shows the freeze held during the switch.
//  3. Switch the disks (the crash checkpoint's code).
//  4. Thaw, whatever happened in 3, retried: a guest left frozen hangs
//     every writer.
func (h *Host) productionCheckpoint(v *vm, p *vmm.Process, id, name string) (*checkpointState, error) {
	agent := p.GuestAgent()
	agent.SyncTimeout = agentSyncTimeout
	ctx := context.WithoutCancel(h.ctx)
	h.mu.Unlock()
	start := time.Now()
	frozen, err := agent.Freeze(ctx, freezeTimeout)
	if err != nil {
		if !errors.Is(err, vmm.ErrNoAgent) {
			// The freeze was asked for: it may have happened.
			h.thaw(v, agent)
		}
		h.mu.Lock()
		return nil, fmt.Errorf("%w did not freeze the file systems: %v", errAgent, err)
	}
	status, err := agent.FreezeStatus(ctx)
	if err != nil {
		status = "unknown: " + err.Error()
	}
	h.mu.Lock()
	c, err := h.switchDisks(v, p, id, name, checkpointKind{Type: api.CheckpointProduction, Frozen: frozen, AgentStatus: status})
	h.mu.Unlock()
	terr := h.thaw(v, agent)
	stun := time.Since(start)
	h.mu.Lock()
	if err != nil {
		return nil, err
	}
	c.Kind.StunMS = ms(stun)
	if terr != nil {
		c.Kind.Note = fmt.Sprintf("the checkpoint is taken, but the guest's file systems may still be frozen: %v", terr)
	}
	if err := h.save(); err != nil {
		h.log.Error("saving the state", "err", err)
	}
	h.log.Info("production checkpoint", "vm", v.st.Name, "checkpoint", name, "frozen", frozen, "agent_status", status, "stun", stun)
	return c, nil
}

// thaw thaws the guest's file systems, retrying; a failure is logged and
// returned.
func (h *Host) thaw(v *vm, agent *vmm.Agent) error {
	var err error
	for range thawAttempts {
		if _, err = agent.Thaw(context.WithoutCancel(h.ctx)); err == nil {
			return nil
		}
		var ae *vmm.AgentError
		if errors.As(err, &ae) {
			// The agent answered: nothing it can thaw (or it never froze).
			return nil
		}
	}
	h.log.Error("the guest's file systems may still be frozen", "vm", v.st.Name, "err", err)
	return err
}

// standardCheckpoint pauses the machine (unless wasPaused), saves its
// memory and device state beside the checkpoint's disks, switches the
// disks and resumes. The caller holds mu and has made the machine
// "checkpointing"; mu is let go while QEMU works, held again on return.
// note says why it is standard when another type was asked for.
//
//  1. Pause (QMP stop; a paused machine stays so): the guest's I/O is
//     drained and its state is of one instant.
//  2. The migration stream to cpID.vmstate.part, synced, renamed, the
//     folder synced: a complete state or none.
//  3. Switch the disks: the state and the checkpoint's files are of the
//     same instant. The checkpoint is saved with its state file.
//  4. Resume (QMP cont), whatever happened in 2 and 3. A failure in 2 or
//     3 removes the state file: no half checkpoint, the machine runs on.
//
// QEMU refuses a second migration stream from a machine that has not run
// since its last one ("postmigrate": a paused machine's standard
// checkpoint). Its CPUs and devices have not run since, so that stream,
// kept by the checkpoint the machine runs on when this QEMU wrote it, is
// its state still: step 2 copies it. (Otherwise it is refused: resume.)
// lastStream is the checkpoint whose memory stream QEMU p last wrote, if
// the machine runs on it (a later checkpoint would be current; a deleted
// one is gone): while p stays paused after writing a stream
// ("postmigrate") QEMU writes no other, and that one is still its state.
// The caller holds mu.
func (v *vm) lastStream(p *vmm.Process) *checkpointState {
	last := v.st.checkpoint(v.st.Current)
	if last == nil || last.Kind.State == "" || last.Kind.Pid != p.Pid {
		return nil
	}
	return last
}

// writeState writes the paused machine's memory and device state into
// file, durably (file.part, synced, renamed, the folder synced): QEMU's
// migration stream or, for a machine paused since it wrote one
// (postmigrate), a copy of last's, its state still.
func (h *Host) writeState(ctx context.Context, v *vm, p *vmm.Process, wasPaused bool, last *checkpointState, file string) error {
	part := file + ".part"
	err := h.streamState(ctx, v, p, wasPaused, last, part)
	if err == nil {
		err = syncFile(part)
	}
	if err == nil {
		err = os.Rename(part, file)
	}
	if err == nil {
		err = syncFile(filepath.Dir(file))
	}
	if err != nil {
		os.Remove(part)
	}
	return err
}

// streamState writes the state into part (see writeState).
func (h *Host) streamState(ctx context.Context, v *vm, p *vmm.Process, wasPaused bool, last *checkpointState, part string) error {
	os.Remove(part)
	if wasPaused {
		st, err := p.Status(ctx)
		if err != nil {
			return err
		}
		if st == "postmigrate" {
			if last == nil {
				return fmt.Errorf("machine %s has not run since its memory state was last written, and QEMU writes no other until it runs: resume it first (vhdkit vm resume %s)", v.st.Name, v.st.Name)
			}
			h.log.Info("a paused machine's state, unchanged since a checkpoint's stream, copied", "vm", v.st.Name, "from", last.Kind.State)
			return copyFile(last.Kind.State, part)
		}
	}
	return p.SaveState(ctx, part)
}

func (h *Host) standardCheckpoint(v *vm, p *vmm.Process, wasPaused bool, id, name, note string) (*checkpointState, error) {
	ctx, cancel := context.WithTimeout(context.WithoutCancel(h.ctx), checkpointSaveTimeout)
	defer cancel()
	file := h.checkpointStatePath(v.st.Name, id)
	last := v.lastStream(p)
	h.mu.Unlock()
	start := time.Now()
	var err error
	if !wasPaused {
		err = p.Pause(ctx)
	}
	if err == nil {
		err = h.writeState(ctx, v, p, wasPaused, last, file)
	}
	var c *checkpointState
	if err == nil {
		h.mu.Lock()
		c, err = h.switchDisks(v, p, id, name, checkpointKind{Type: api.CheckpointStandard, State: file, Pid: p.Pid, Note: note})
		h.mu.Unlock()
	}
	if err != nil {
		os.Remove(file) // writeState removed the .part
	}
	var rerr error
	if !wasPaused {
		rerr = p.Resume(ctx)
	}
	stun := time.Since(start)
	h.mu.Lock()
	if err != nil {
		if rerr != nil {
			return nil, errorf(http.StatusInternalServerError, "no checkpoint of %s: %v; and the machine did not resume: %v", v.st.Name, err, rerr)
		}
		how := "the machine runs on"
		if wasPaused {
			how = "the machine stays paused"
		}
		return nil, errorf(http.StatusInternalServerError, "no checkpoint of %s (%s): %v", v.st.Name, how, err)
	}
	c.Kind.StunMS = ms(stun)
	if rerr != nil {
		c.Kind.Note = strings.TrimPrefix(c.Kind.Note+"; the machine did not resume: "+rerr.Error(), "; ")
		h.log.Error("resuming after a standard checkpoint", "vm", v.st.Name, "err", rerr)
	}
	if err := h.save(); err != nil {
		h.log.Error("saving the state", "err", err)
	}
	size := int64(0)
	if fi, err := os.Stat(file); err == nil {
		size = fi.Size()
	}
	h.log.Info("standard checkpoint", "vm", v.st.Name, "checkpoint", name, "state", file, "bytes", size, "stun", stun)
	return c, nil
}

// recoverCheckpoint undoes what a checkpoint the previous daemon died in
// may have left in a machine it re-adopts (at Open, before anything else
// runs): a guest whose CPUs were stopped for a standard checkpoint (QEMU
// "paused", or "postmigrate" once the stream was complete, while the
// state says it runs) runs again; a guest whose file systems were frozen
// is thawed. The agent is asked in the background: a guest without one
// takes agentSyncTimeout to say so.
func (h *Host) recoverCheckpoint(v *vm) {
	if v.run == nil || v.run.proc == nil || v.st.Run == nil {
		return
	}
	p, userPaused := v.run.proc, v.st.Run.Paused
	ctx, cancel := context.WithTimeout(h.ctx, 10*time.Second)
	defer cancel()
	switch st, err := p.Status(ctx); {
	case err != nil:
	case (st == "paused" || st == "postmigrate") && !userPaused:
		if err := p.Resume(ctx); err != nil {
			h.log.Error("resuming a machine a checkpoint had paused", "vm", v.st.Name, "err", err)
			break
		}
		v.run.power = api.PowerRunning
		h.log.Warn("resumed a machine an interrupted checkpoint had paused", "vm", v.st.Name, "qemu_status", st)
	case st == "postmigrate":
		v.run.power = api.PowerPaused // paused by its user, then checkpointed
	}
	agent := p.GuestAgent()
	if agent == nil {
		return
	}
	agent.SyncTimeout = agentSyncTimeout
	h.wg.Add(1)
	go func() {
		defer h.wg.Done()
		if s, err := agent.FreezeStatus(h.ctx); err == nil && s == "frozen" {
			if h.thaw(v, agent) == nil {
				h.log.Warn("thawed the file systems of a guest an interrupted checkpoint had frozen", "vm", v.st.Name)
			}
		}
	}()
}

// switchDisks switches v's disks for a checkpoint if p, the QEMU the
// checkpoint began with, still runs the machine; the caller holds mu.
func (h *Host) switchDisks(v *vm, p *vmm.Process, id, name string, kind checkpointKind) (*checkpointState, error) {
	if v.run == nil || v.run.proc != p {
		return nil, errorf(statusConflict, "machine %s's QEMU ended during the checkpoint", v.st.Name)
	}
	return h.checkpointAs(v, id, name, kind)
}

func ms(d time.Duration) float64 { return float64(d.Microseconds()) / 1000 }

// removeStaleStates removes the memory state files in a machine's folder
// that no checkpoint holds: those of deleted checkpoints, and what an
// interrupted standard checkpoint left. The caller holds mu (or owns h).
func (h *Host) removeStaleStates(m *machineState) {
	files, _ := filepath.Glob(filepath.Join(h.machineDir(m.Name), "cp*"+stateExt+"*"))
	for _, f := range files {
		if !slices.ContainsFunc(m.Checkpoints, func(c *checkpointState) bool { return c.Kind.State == f }) {
			if err := os.Remove(f); err != nil && !errors.Is(err, os.ErrNotExist) {
				h.log.Warn("removing a checkpoint's state file", "file", f, "err", err)
			}
		}
	}
}

// exportState copies a standard checkpoint's state file into dir beside
// its disks, as NAME.vmstate (written as .partial, synced, renamed).
func exportState(src, dst string) error {
	if _, err := os.Lstat(dst); err == nil {
		return errorf(statusConflict, "%s exists (vhdkit does not overwrite files)", dst)
	}
	tmp := dst + ".partial"
	err := copyFile(src, tmp)
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

// turnOffForApply turns a running or paused machine off (Stop-VM
// -TurnOff: the state being left is discarded anyway) before a
// checkpoint is applied, and waits for its QEMU's NBD connections to go.
// It reports whether it did.
func (h *Host) turnOffForApply(name string) (bool, error) {
	h.mu.Lock()
	v, err := h.lookup(name)
	if err != nil {
		h.mu.Unlock()
		return false, err
	}
	p := v.power()
	h.mu.Unlock()
	if p != api.PowerRunning && p != api.PowerPaused {
		return false, nil
	}
	if _, err := h.StopVM(context.WithoutCancel(h.ctx), name, api.StopVM{TurnOff: true}); err != nil {
		return false, fmt.Errorf("turning machine %s off before the apply: %w", name, err)
	}
	// QEMU is gone; the server notices its connections' end a moment later.
	for deadline := time.Now().Add(disconnectTimeout); time.Now().Before(deadline); time.Sleep(20 * time.Millisecond) {
		h.mu.Lock()
		n := 0
		if v, err := h.lookup(name); err == nil {
			n, _ = h.clients(v)
		}
		h.mu.Unlock()
		if n == 0 {
			break
		}
	}
	h.log.Info("machine turned off to apply a checkpoint", "vm", name)
	return true, nil
}

// startFromCheckpoint starts machine name from standard checkpoint c's
// state after c was applied: a copy of the state becomes the machine's
// saved state (the checkpoint keeps its own), which StartVM resumes and
// then deletes. Without start the machine is left saved.
func (h *Host) startFromCheckpoint(ctx context.Context, name string, c *checkpointState, start bool) (*api.VM, error) {
	h.mu.Lock()
	v, err := h.lookup(name)
	if err != nil {
		h.mu.Unlock()
		return nil, err
	}
	saved, part := h.savedFile(name), h.savedPart(name)
	state := c.Kind.State
	h.mu.Unlock()
	if err := mkdirPrivate(filepath.Join(h.dir, "run")); err != nil {
		return nil, err
	}
	if err := mkdirPrivate(h.runDir(name)); err != nil {
		return nil, err
	}
	os.Remove(part)
	err = copyFile(state, part)
	if err == nil {
		err = os.Rename(part, saved)
	}
	if err == nil {
		err = syncFile(filepath.Dir(saved))
	}
	if err != nil {
		os.Remove(part)
		return nil, errorf(http.StatusInternalServerError, "checkpoint %q applied, machine %s is off: its saved state was not copied: %v", c.Name, name, err)
	}
	h.mu.Lock()
	v.run = &vmRun{power: api.PowerSaved}
	if !start {
		defer h.mu.Unlock()
		h.log.Info("machine saved from a standard checkpoint", "vm", name, "checkpoint", c.Name)
		out := h.view(v)
		return &out, nil
	}
	h.mu.Unlock()
	out, err := h.StartVM(ctx, name)
	if err != nil {
		return nil, fmt.Errorf("checkpoint %q applied, but the machine did not start from its state: %w", c.Name, err)
	}
	return out, nil
}
