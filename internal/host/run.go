package host

import (
	"context"
	"fmt"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"time"

	"github.com/vhdkit/vhdkit/internal/api"
	"github.com/vhdkit/vhdkit/internal/vmm"
)

// Machines run under QEMU (package vmm), their disks reaching it through
// the daemon's NBD exports with a reconnect delay: a daemon restart only
// holds the guest's I/O. QEMU runs in a session of its own, so the
// daemon's death leaves it running; its pid and sockets are in the state
// (machineState.Run) and the next daemon re-adopts it at Open.
//
// Run files live in DIR/run/NAME (sockets, QEMU's log, the console's log):
// a unix socket path must stay short, and the machine's folder holds only
// its disks, which deleting the machine removes.

// Times of a machine's run.
const (
	// reconnectDelay is how long QEMU holds a disk's I/O while the NBD
	// server is gone before failing it: a daemon restart must take less.
	reconnectDelay = 60 * time.Second
	// restoreTimeout bounds the load of a saved state at start.
	restoreTimeout = 10 * time.Minute
	// saveTimeout bounds the write of a machine's state by vm save.
	saveTimeout = 10 * time.Minute
	// defaultStopTimeout is how long stop waits for the guest to power
	// off after the ACPI power button before it turns the machine off.
	defaultStopTimeout = 60 * time.Second
	// watchInterval is how often a re-adopted QEMU (not the daemon's
	// child, so not reaped by it) is checked.
	watchInterval = 500 * time.Millisecond
)

// runRecord is a machine's QEMU as persisted.
type runRecord struct {
	vmm.Process
	Accel  string `json:"accel"`
	Paused bool   `json:"paused,omitempty"`
}

// vmRun is a machine's power state in memory; the zero value is off.
type vmRun struct {
	power  string       // api.Power*; "" is off
	proc   *vmm.Process // nil while off or failed
	reason string       // why it failed
	log    string       // the failed run's QEMU log, kept
	// unplugging is set while a disk is being unplugged (disks.go): the
	// guest has it to release, and the disks do not change meanwhile.
	unplugging bool
}

// power is a machine's power state; the caller holds mu.
func (v *vm) power() string {
	if v.run == nil || v.run.power == "" {
		return api.PowerOff
	}
	return v.run.power
}

// viewRun adds the power state, settings and QEMU to out; the caller
// holds mu.
func (v *vm) viewRun(out *api.VM) {
	out.Power = v.power()
	if v.st.Settings != nil {
		s := *v.st.Settings
		out.Settings = &s
	}
	if r := v.run; r != nil && (r.proc != nil || r.reason != "") {
		rt := &api.Runtime{Reason: r.reason, Log: r.log}
		if rec := v.st.Run; rec != nil && r.proc != nil {
			rt.Pid, rt.Accel, rt.QMP, rt.Serial, rt.Console, rt.Log = rec.Pid, rec.Accel, rec.QMP, rec.Serial, rec.Cons, rec.Log
		}
		out.Runtime = rt
	}
}

// refuseRunning refuses what needs the machine off; the caller holds mu.
func (v *vm) refuseRunning(what string) error {
	switch p := v.power(); p {
	case api.PowerOff, api.PowerFailed:
		return nil
	case api.PowerSaved:
		// The saved state holds the guest's memory, caches of its disks
		// included: disks changed under it would be corrupted when it
		// goes on.
		return errorf(statusConflict, "machine %s is saved (its memory expects its disks as they are): start it and stop it (vhdkit vm start %s), or discard the saved state (vhdkit vm stop %s --turn-off), before %s", v.st.Name, v.st.Name, v.st.Name, what)
	default:
		return errorf(statusConflict, "machine %s is %s: stop it first (vhdkit vm stop %s) before %s", v.st.Name, p, v.st.Name, what)
	}
}

func (h *Host) runDir(name string) string { return filepath.Join(h.dir, "run", name) }

// runRoutes adds the routes of this file to the API.
func (h *Host) runRoutes(handle func(pattern string, f func(r *http.Request) (any, error))) {
	handle("POST /v1/vms/{vm}/start", func(r *http.Request) (any, error) { return h.StartVM(r.Context(), r.PathValue("vm")) })
	handle("POST /v1/vms/{vm}/stop", func(r *http.Request) (any, error) {
		var req api.StopVM
		if err := decode(r, &req); err != nil {
			return nil, err
		}
		return h.StopVM(r.Context(), r.PathValue("vm"), req)
	})
	handle("POST /v1/vms/{vm}/pause", func(r *http.Request) (any, error) { return h.PauseVM(r.Context(), r.PathValue("vm")) })
	handle("POST /v1/vms/{vm}/resume", func(r *http.Request) (any, error) { return h.ResumeVM(r.Context(), r.PathValue("vm")) })
	handle("POST /v1/vms/{vm}/save", func(r *http.Request) (any, error) { return h.SaveVM(r.Context(), r.PathValue("vm")) })
	handle("POST /v1/vms/{vm}/restart", func(r *http.Request) (any, error) { return h.RestartVM(r.Context(), r.PathValue("vm")) })
	h.settingsRoutes(handle)
	h.diskRoutes(handle)
}

// StartVM starts a machine that is off (or failed) under QEMU.
//
//  1. Under mu: the machine serves its disks, is off, the NBD socket is
//     known; it becomes "starting" (no second start, no delete).
//  2. Without mu (QEMU takes a moment to answer QMP): vmm.Start.
//  3. Under mu: the pid and sockets are saved in the state before the
//     reply, so a daemon killed from then on re-adopts the QEMU; a watcher
//     notices its end.
func (h *Host) StartVM(ctx context.Context, name string) (*api.VM, error) {
	h.mu.Lock()
	v, err := h.working(name)
	if err != nil {
		h.mu.Unlock()
		return nil, err
	}
	saved := v.power() == api.PowerSaved || h.hasSaved(name)
	if p := v.power(); p != api.PowerOff && p != api.PowerFailed && !saved {
		h.mu.Unlock()
		return nil, errorf(statusConflict, "machine %s is %s", name, p)
	}
	if h.opts.NBDSocket == "" || strings.HasPrefix(h.opts.NBDSocket, "@") {
		h.mu.Unlock()
		return nil, errorf(statusConflict, "the daemon serves NBD on TCP or an abstract socket: machines run only with --nbd-socket PATH (the default)")
	}
	s, err := h.settingsOf(v.st.Settings)
	if err != nil {
		h.mu.Unlock()
		return nil, err
	}
	// Defaults a state from before them lacked (the generation, a MAC)
	// are kept from this run on.
	v.st.Settings = s
	accel, err := vmm.ChooseAccel(s.Accel)
	if err != nil {
		h.mu.Unlock()
		return nil, errorf(statusConflict, "machine %s: %v", name, err)
	}
	cfg := vmm.Config{Name: name, RunDir: h.runDir(name), Accel: accel, MemoryMiB: s.MemoryMiB, CPUs: s.CPUs,
		Kernel: s.Kernel, Initrd: s.Initrd, Append: s.Append, ReconnectDelay: reconnectDelay,
		Generation: s.Generation, CDROM: s.CDROM, Network: s.Network, MAC: s.MAC}
	if saved {
		cfg.Incoming = h.savedFile(name)
	}
	for i := range v.st.Disks {
		cfg.Disks = append(cfg.Disks, vmm.Disk{Socket: h.opts.NBDSocket, Export: exportName(name, i)})
	}
	v.run = &vmRun{power: api.PowerStarting}
	h.mu.Unlock()
	if err := mkdirPrivate(filepath.Join(h.dir, "run")); err != nil {
		return nil, h.startFailed(v, err)
	}
	// The start outlives the request: a client that gives up must not
	// leave a QEMU no state records.
	p, exited, err := vmm.Start(context.WithoutCancel(ctx), cfg)
	if err != nil && saved {
		// A state that does not load may end QEMU before QMP answers.
		err = fmt.Errorf("resuming from %s: %v (vhdkit vm stop %s --turn-off discards the saved state)", cfg.Incoming, err, name)
	}
	if err != nil {
		return nil, h.startFailed(v, err)
	}
	if saved {
		// The state is loaded before the machine counts as running; its
		// file goes only once the guest runs on from it.
		st, err := p.WaitIncoming(context.WithoutCancel(ctx), restoreTimeout)
		if err == nil && st == "paused" {
			// The stream carries the run state at the save, which paused
			// the machine first: it goes on once told.
			if err = p.Resume(context.WithoutCancel(ctx)); err == nil {
				st, err = p.Status(context.WithoutCancel(ctx))
			}
		}
		if err == nil && st != "running" {
			err = fmt.Errorf("after loading its saved state QEMU is %q", st)
		}
		if err != nil {
			p.Quit(context.Background())
			return nil, h.startFailed(v, fmt.Errorf("resuming from %s: %v; %s (vhdkit vm stop %s --turn-off discards the saved state)", cfg.Incoming, err, p.LogTail(), name))
		}
		if err := os.Remove(cfg.Incoming); err != nil {
			h.log.Warn("saved state not removed", "vm", name, "file", cfg.Incoming, "err", err)
		}
	}
	h.mu.Lock()
	defer h.mu.Unlock()
	if h.ctx.Err() != nil {
		// The daemon closed meanwhile and saved its last state: a QEMU it
		// does not record would run unseen.
		p.Quit(context.Background())
		v.run = nil
		return nil, errorf(http.StatusServiceUnavailable, "machine %s: the daemon is shutting down; start it again once it is back", name)
	}
	v.st.Run = &runRecord{Process: *p, Accel: accel}
	if err := h.save(); err != nil {
		p.Quit(context.Background())
		v.st.Run = nil
		v.run = &vmRun{power: api.PowerFailed, reason: err.Error()}
		return nil, err
	}
	v.run = &vmRun{power: api.PowerRunning, proc: p}
	h.watch(v, p, exited)
	h.log.Info("machine started", "vm", name, "pid", p.Pid, "accel", accel)
	out := h.view(v)
	return &out, nil
}

func (h *Host) startFailed(v *vm, err error) error {
	h.mu.Lock()
	defer h.mu.Unlock()
	v.run = &vmRun{power: api.PowerFailed, reason: err.Error(), log: filepath.Join(h.runDir(v.st.Name), "qemu.log")}
	h.log.Error("machine did not start", "vm", v.st.Name, "err", err)
	return errorf(http.StatusInternalServerError, "machine %s did not start: %v", v.st.Name, err)
}

// watch waits, in the background, for QEMU p to end: exited is its exit
// status when the daemon started it, nil for a re-adopted one (polled).
// An end the daemon did not ask for is "off" when QEMU exited cleanly
// (the guest powered off), "failed" otherwise.
func (h *Host) watch(v *vm, p *vmm.Process, exited <-chan error) {
	h.wg.Add(1)
	go func() {
		defer h.wg.Done()
		var werr error
		if exited != nil {
			select {
			case werr = <-exited:
			case <-h.ctx.Done():
				return // the daemon closes; QEMU runs on
			}
		} else {
			for p.Alive() {
				select {
				case <-time.After(watchInterval):
				case <-h.ctx.Done():
					return
				}
			}
		}
		h.mu.Lock()
		defer h.mu.Unlock()
		if v.run == nil || v.run.proc != p {
			return // stopped by the daemon, which recorded it
		}
		if werr != nil && v.run.power != api.PowerStopping {
			v.run = &vmRun{power: api.PowerFailed, reason: fmt.Sprintf("QEMU ended: %v; %s", werr, p.LogTail()), log: p.Log}
			h.log.Error("machine failed", "vm", v.st.Name, "err", werr)
		} else {
			v.run = nil
			h.log.Info("machine powered off", "vm", v.st.Name)
		}
		v.st.Run = nil
		if err := h.save(); err != nil {
			h.log.Error("saving state", "err", err)
		}
	}()
}

// adopt re-adopts the QEMU a previous daemon started for v, if it still
// runs; at Open, before anything else runs.
func (h *Host) adopt(v *vm) {
	rec := v.st.Run
	if rec == nil {
		if h.hasSaved(v.st.Name) {
			v.run = &vmRun{power: api.PowerSaved}
		}
		return
	}
	p := rec.Process
	if !p.Alive() {
		h.log.Info("machine's QEMU ended while no daemon ran", "vm", v.st.Name, "pid", p.Pid)
		v.st.Run = nil
		if h.hasSaved(v.st.Name) {
			// A save whose QEMU quit as the daemon died: the state is
			// complete (renamed into place only once synced).
			v.run = &vmRun{power: api.PowerSaved}
		}
		return
	}
	if h.hasSaved(v.st.Name) {
		// A save the daemon died in before QEMU quit: QEMU runs on, and
		// its disks will change, so the state must never be resumed.
		h.log.Warn("discarding the saved state of a machine whose QEMU still runs", "vm", v.st.Name)
		if err := os.Remove(h.savedFile(v.st.Name)); err != nil {
			h.log.Error("discarding a saved state", "vm", v.st.Name, "err", err)
		}
	}
	power := api.PowerRunning
	ctx, cancel := context.WithTimeout(h.ctx, 10*time.Second)
	defer cancel()
	if status, err := p.Status(ctx); err != nil {
		h.log.Warn("re-adopted QEMU does not answer QMP", "vm", v.st.Name, "pid", p.Pid, "err", err)
	} else if status == "paused" {
		power = api.PowerPaused
	}
	v.run = &vmRun{power: power, proc: &p}
	h.watch(v, &p, nil)
	h.recoverCheckpoint(v) // runcheckpoint.go
	h.log.Info("machine re-adopted", "vm", v.st.Name, "pid", p.Pid, "power", v.run.power)
}

// running returns a machine whose QEMU runs (running or paused); the
// caller holds mu.
func (h *Host) running(name string) (*vm, *vmm.Process, error) {
	v, err := h.lookup(name)
	if err != nil {
		return nil, nil, err
	}
	if p := v.power(); p != api.PowerRunning && p != api.PowerPaused {
		return nil, nil, errorf(statusConflict, "machine %s is %s", name, p)
	}
	return v, v.run.proc, nil
}

// StopVM powers a machine off: the ACPI power button, then, if the guest
// is still up after the timeout (or is paused, so cannot react), QEMU's
// quit; with TurnOff, quit at once.
func (h *Host) StopVM(ctx context.Context, name string, req api.StopVM) (*api.VM, error) {
	timeout := defaultStopTimeout
	if req.TimeoutSeconds < 0 || req.TimeoutSeconds > 3600 {
		return nil, errorf(statusBadRequest, "stop timeout %d s: use 0 to 3600", req.TimeoutSeconds)
	} else if req.TimeoutSeconds > 0 {
		timeout = time.Duration(req.TimeoutSeconds) * time.Second
	}
	h.mu.Lock()
	if v, err := h.lookup(name); err == nil && (v.power() == api.PowerSaved || v.power() == api.PowerFailed && h.hasSaved(name)) {
		defer h.mu.Unlock()
		return h.discardSaved(v, req.TurnOff)
	}
	v, p, err := h.running(name)
	if err != nil {
		h.mu.Unlock()
		return nil, err
	}
	paused := v.power() == api.PowerPaused
	v.run.power = api.PowerStopping
	h.mu.Unlock()

	ctx = context.WithoutCancel(ctx)
	how := "turned off"
	if !req.TurnOff && !paused {
		if err := p.Powerdown(ctx); err != nil {
			h.log.Warn("ACPI power-down", "vm", name, "err", err)
		} else if p.WaitGone(ctx, timeout) == nil {
			how = "powered off"
		}
	}
	var qerr error
	if how == "turned off" {
		qerr = p.Quit(ctx)
	}

	h.mu.Lock()
	defer h.mu.Unlock()
	if qerr != nil {
		v.run.power = api.PowerRunning
		return nil, errorf(http.StatusInternalServerError, "machine %s: %v", name, qerr)
	}
	v.run = nil
	v.st.Run = nil
	if err := h.save(); err != nil {
		return nil, err
	}
	h.log.Info("machine stopped", "vm", name, "how", how)
	out := h.view(v)
	return &out, nil
}

// PauseVM stops a running machine's CPUs (QMP stop).
func (h *Host) PauseVM(ctx context.Context, name string) (*api.VM, error) {
	return h.setPaused(ctx, name, true)
}

// ResumeVM runs a paused machine's CPUs again (QMP cont).
func (h *Host) ResumeVM(ctx context.Context, name string) (*api.VM, error) {
	return h.setPaused(ctx, name, false)
}

func (h *Host) setPaused(ctx context.Context, name string, pause bool) (*api.VM, error) {
	h.mu.Lock()
	defer h.mu.Unlock()
	v, p, err := h.running(name)
	if err != nil {
		return nil, err
	}
	from, to, do := api.PowerRunning, api.PowerPaused, p.Pause
	if !pause {
		from, to, do = api.PowerPaused, api.PowerRunning, p.Resume
	}
	if v.power() != from {
		return nil, errorf(statusConflict, "machine %s is %s, not %s", name, v.power(), from)
	}
	// One short QMP exchange, under mu: nothing else may change the
	// machine's power meanwhile.
	if err := do(ctx); err != nil {
		return nil, errorf(http.StatusInternalServerError, "machine %s: %v", name, err)
	}
	v.run.power = to
	v.st.Run.Paused = pause
	if err := h.save(); err != nil {
		return nil, err
	}
	h.log.Info("machine "+to, "vm", name)
	out := h.view(v)
	return &out, nil
}

// RestartVM resets a running or paused machine (QMP system_reset, then
// cont if it was paused): the guest reboots at once, as Restart-VM -Force
// does. An ACPI reboot request is not used: not every guest handles one
// (the busybox test guest does not), and a reset needs no guest's help.
func (h *Host) RestartVM(ctx context.Context, name string) (*api.VM, error) {
	h.mu.Lock()
	defer h.mu.Unlock()
	v, p, err := h.running(name)
	if err != nil {
		return nil, err
	}
	// Short QMP exchanges, under mu, as for pause and resume.
	if err := p.Reset(ctx); err != nil {
		return nil, errorf(http.StatusInternalServerError, "machine %s: %v", name, err)
	}
	if v.power() == api.PowerPaused {
		if err := p.Resume(ctx); err != nil {
			return nil, errorf(http.StatusInternalServerError, "machine %s: reset, but it stays paused: %v", name, err)
		}
		v.run.power = api.PowerRunning
		v.st.Run.Paused = false
		if err := h.save(); err != nil {
			return nil, err
		}
	}
	h.log.Info("machine restarted", "vm", name)
	out := h.view(v)
	return &out, nil
}

// savedFile is where vm save writes a machine's state, beside its other
// run files; savedPart while it is being written.
func (h *Host) savedFile(name string) string { return filepath.Join(h.runDir(name), "saved.state") }
func (h *Host) savedPart(name string) string { return h.savedFile(name) + ".part" }

// hasSaved reports whether the machine has a saved state (a complete one:
// the file is renamed into place only once written and synced).
func (h *Host) hasSaved(name string) bool {
	_, err := os.Stat(h.savedFile(name))
	return err == nil
}

// discardSaved turns a saved machine off for good (vm stop --turn-off,
// like Hyper-V's Delete Saved State): the state file goes, the guest
// will boot afresh. The caller holds mu.
func (h *Host) discardSaved(v *vm, turnOff bool) (*api.VM, error) {
	name := v.st.Name
	if !turnOff {
		return nil, errorf(statusConflict, "machine %s is saved: vhdkit vm start %s goes on from its saved state; vm stop --turn-off discards it", name, name)
	}
	if err := os.Remove(h.savedFile(name)); err != nil && !os.IsNotExist(err) {
		return nil, errorf(http.StatusInternalServerError, "machine %s: discarding its saved state: %v", name, err)
	}
	v.run = nil
	h.log.Info("saved state discarded", "vm", name)
	out := h.view(v)
	return &out, nil
}

// refuseDelete refuses to delete a machine that runs, or that is saved
// unless force (the saved state is then discarded with the machine's run
// files); the caller holds mu.
func (h *Host) refuseDelete(v *vm, force bool) error {
	if v.power() == api.PowerSaved && force {
		return nil
	}
	if err := v.refuseRunning("deleting it"); err != nil {
		if v.power() == api.PowerSaved {
			return fmt.Errorf("%w; or delete it with --force, which discards its saved state", err)
		}
		return err
	}
	return nil
}

// removeRunFiles removes a deleted machine's run files (logs, a saved
// state), so that a machine made later with its name starts clean.
func (h *Host) removeRunFiles(name string) {
	if err := os.RemoveAll(h.runDir(name)); err != nil {
		h.log.Warn("run files not removed", "vm", name, "err", err)
	}
}

// SaveVM saves a running or paused machine (Save-VM) and ends its QEMU;
// vm start goes on from the saved state.
//
//  1. Under mu: the machine runs; it becomes "stopping" (nothing else
//     changes its power meanwhile).
//  2. Without mu: pause its CPUs (the state is of one instant), write
//     the migration stream to saved.state.part, sync it, rename it to
//     saved.state and sync the folder: a complete state or none.
//  3. QEMU quits; the machine is "saved". A failure before the rename
//     leaves it running (resumed if it was running).
func (h *Host) SaveVM(ctx context.Context, name string) (*api.VM, error) {
	h.mu.Lock()
	v, p, err := h.running(name)
	if err != nil {
		h.mu.Unlock()
		return nil, err
	}
	wasPaused := v.power() == api.PowerPaused
	last := v.lastStream(p)
	v.run.power = api.PowerStopping
	h.mu.Unlock()

	ctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), saveTimeout)
	defer cancel()
	start := time.Now()
	err = p.Pause(ctx)
	if err == nil {
		err = h.writeState(ctx, v, p, wasPaused, last, h.savedFile(name))
	}
	if err != nil {
		if !wasPaused {
			if rerr := p.Resume(ctx); rerr != nil {
				h.log.Error("resuming after a failed save", "vm", name, "err", rerr)
			}
		}
		h.mu.Lock()
		defer h.mu.Unlock()
		if v.run != nil && v.run.proc == p {
			v.run.power = api.PowerRunning
			if wasPaused {
				v.run.power = api.PowerPaused
			}
		}
		return nil, errorf(http.StatusInternalServerError, "machine %s not saved: %v", name, err)
	}
	qerr := p.Quit(ctx)

	h.mu.Lock()
	defer h.mu.Unlock()
	if qerr != nil {
		// The state is saved but QEMU runs on: the machine must not run
		// twice, and its disks would go on changing under the state.
		os.Remove(h.savedFile(name))
		v.run.power = api.PowerPaused
		return nil, errorf(http.StatusInternalServerError, "machine %s: saved, but QEMU did not end (%v); the saved state is discarded, the machine is paused", name, qerr)
	}
	v.run = &vmRun{power: api.PowerSaved}
	v.st.Run = nil
	if err := h.save(); err != nil {
		return nil, err
	}
	size := int64(0)
	if fi, err := os.Stat(h.savedFile(name)); err == nil {
		size = fi.Size()
	}
	h.log.Info("machine saved", "vm", name, "file", h.savedFile(name), "bytes", size, "took", time.Since(start))
	out := h.view(v)
	return &out, nil
}

// syncFile syncs a file or folder to stable storage.
func syncFile(path string) error {
	f, err := os.Open(path)
	if err != nil {
		return err
	}
	defer f.Close()
	return f.Sync()
}
