package host

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"time"

	"github.com/vhdkit/vhdkit/internal/api"
	"github.com/vhdkit/vhdkit/merge"
	"github.com/vhdkit/vhdkit/storage"
	"github.com/vhdkit/vhdkit/vhdx"
)

// A job deletes checkpoints: one step at a time, each removing one
// checkpoint by the tree rules (drop, or merge its single dependent into
// it). Its state machine:
//
//	queued -> running -> (completing -> running)* -> done
//	running/queued <-> paused   (by request, or by an I/O error with its reason)
//	queued/paused/running between merges -> canceled
//
// A live merge step persists, in its mergeStep, the target's new GUID and
// the offset below which the copy is durable in the target; a restart
// re-establishes mirroring before clients reconnect and copies on from
// there. Progress (Done) is saved with it and never decreases.
type job struct {
	st   *jobState
	wake chan struct{} // pokes the runner: state or bandwidth changed

	pauseReq bool             // a pause was asked for; guarded by Host.mu
	live     *merge.LiveMerge // the live merge in progress, mirroring
	cursor   int64            // copy position, ahead of st.Step.Offset
	since    time.Time        // start of the current rate window
	base     int64            // Done at since
}

func (h *Host) newJob(js *jobState) *job {
	j := &job{st: js, wake: make(chan struct{}, 1), since: time.Now(), base: js.Done}
	j.pauseReq = js.State == api.JobPaused
	h.jobs[js.ID] = j
	return j
}

func (j *job) poke() {
	select {
	case j.wake <- struct{}{}:
	default:
	}
}

// view renders the job for the API; the caller holds mu.
func (j *job) view() api.Job {
	out := j.st.Job
	if out.State == api.JobRunning && out.Done > j.base {
		rate := float64(out.Done-j.base) / time.Since(j.since).Seconds()
		if rate > 0 {
			out.ETA = float64(out.Total-out.Done) / rate
		}
	}
	return out
}

// restart re-establishes an interrupted live merge at Open, before the
// disk is exported; the caller owns h.
func (j *job) restart(h *Host, v *vm) error {
	s := j.st.Step
	if s == nil || s.GUID == "" {
		return nil
	}
	if v.st.Disks[s.Disk].Leaf == s.Target {
		// Switched and saved; only the merged file's removal was lost.
		os.Remove(s.Top)
		j.st.Step = nil
		return nil
	}
	g, err := vhdx.ParseGUID(s.GUID)
	if err != nil {
		return err
	}
	m, err := v.disks[s.Disk].StartMerge(g)
	if err != nil {
		return err
	}
	j.live, j.cursor = m, s.Offset
	return nil
}

func (h *Host) startJob(j *job) {
	h.wg.Add(1)
	go h.run(j)
}

// run drives a job until it ends or the host closes.
func (h *Host) run(j *job) {
	defer h.wg.Done()
	for {
		if !h.waitRunnable(j) {
			return
		}
		done, err := h.advance(j)
		switch {
		case errors.Is(err, errStopped):
			return
		case err != nil:
			h.pause(j, err.Error())
		case done:
			h.finish(j, api.JobDone, "")
			return
		}
	}
}

// waitRunnable blocks while the job is paused; false means stop running.
func (h *Host) waitRunnable(j *job) bool {
	for {
		h.mu.Lock()
		state, paused := j.st.State, j.pauseReq
		h.mu.Unlock()
		if j.st.Finished() || state == api.JobCanceled {
			return false
		}
		if !paused {
			return h.ctx.Err() == nil
		}
		select {
		case <-j.wake:
		case <-h.ctx.Done():
			return false
		}
	}
}

func (h *Host) pause(j *job, reason string) {
	h.mu.Lock()
	defer h.mu.Unlock()
	j.pauseReq = true
	j.st.State, j.st.Reason, j.st.Updated = api.JobPaused, reason, time.Now().UTC()
	h.log.Warn("job paused", "job", j.st.ID, "reason", reason)
	h.saveLocked()
}

func (h *Host) finish(j *job, state, reason string) {
	h.mu.Lock()
	defer h.mu.Unlock()
	j.st.State, j.st.Reason, j.st.Updated = state, reason, time.Now().UTC()
	if v := h.vms[j.st.VM]; v != nil && v.job == j {
		v.job = nil
	}
	h.log.Info("job finished", "job", j.st.ID, "state", state)
	h.saveLocked()
}

// saveLocked saves the state, logging a failure: the change is in memory
// and the next save retries it. The caller holds mu.
func (h *Host) saveLocked() {
	if err := h.st.save(h.dir); err != nil {
		h.log.Error("saving state", "err", err)
	}
}

// advance performs the job's next step and reports whether the job is
// complete.
func (h *Host) advance(j *job) (bool, error) {
	h.mu.Lock()
	v := h.vms[j.st.VM]
	if v == nil {
		h.mu.Unlock()
		return false, fmt.Errorf("machine %s no longer exists", j.st.VM)
	}
	if j.st.State == api.JobQueued || j.st.State == api.JobPaused {
		j.st.State, j.st.Reason = api.JobRunning, ""
	}
	var c *checkpointState
	if s := j.st.Step; s != nil {
		c = v.st.checkpoint(s.Checkpoint)
	} else {
		c = h.pick(v, j)
	}
	if c == nil {
		h.mu.Unlock()
		return true, nil
	}
	kids, now := v.st.dependents(c)
	h.mu.Unlock()
	switch {
	case len(kids) == 0 && !now:
		return false, h.drop(j, v, c)
	case len(kids) == 0 && now:
		return false, h.mergeLive(j, v, c)
	case len(kids) == 1 && !now:
		return false, h.mergeOffline(j, v, c, kids[0])
	}
	return false, fmt.Errorf("checkpoint %q has %d dependents and cannot be deleted alone", c.Name, len(kids)+btoi(now))
}

// pick chooses the next checkpoint to delete among the job's targets:
// one nothing depends on first, then one the running state alone depends
// on, then one with a single child checkpoint. The caller holds mu.
func (h *Host) pick(v *vm, j *job) *checkpointState {
	j.st.Targets = slices.DeleteFunc(j.st.Targets, func(id string) bool { return v.st.checkpoint(id) == nil })
	var best *checkpointState
	rank := 3
	for _, id := range j.st.Targets {
		c := v.st.checkpoint(id)
		kids, now := v.st.dependents(c)
		r := 3
		switch {
		case len(kids) == 0 && !now:
			r = 0
		case len(kids) == 0 && now:
			r = 1
		case len(kids) == 1 && !now:
			r = 2
		}
		if r < rank {
			best, rank = c, r
		}
	}
	if best == nil && len(j.st.Targets) > 0 {
		best = v.st.checkpoint(j.st.Targets[0]) // advance reports why it cannot go
	}
	return best
}

// drop deletes a checkpoint nothing depends on, with its files.
func (h *Host) drop(j *job, v *vm, c *checkpointState) error {
	h.mu.Lock()
	v.st.removeCheckpoint(c.ID)
	if err := h.st.save(h.dir); err != nil {
		v.st.Checkpoints = append(v.st.Checkpoints, c)
		h.mu.Unlock()
		return err
	}
	var files []string
	for _, f := range c.Files {
		if !h.referenced(f) {
			files = append(files, f)
		}
	}
	h.mu.Unlock()
	h.log.Info("checkpoint dropped", "vm", v.st.Name, "checkpoint", c.Name)
	for _, f := range files {
		if err := os.Remove(f); err != nil && !errors.Is(err, os.ErrNotExist) {
			h.log.Warn("removing a checkpoint file", "file", f, "err", err)
		}
	}
	return nil
}

// mergeLive deletes the checkpoint the running state continues from:
// each disk's leaf is merged, live, into the checkpoint's file, which the
// disk then runs on.
func (h *Host) mergeLive(j *job, v *vm, c *checkpointState) error {
	for i, d := range v.disks {
		h.mu.Lock()
		if v.st.Disks[i].Leaf == c.Files[i] {
			h.mu.Unlock()
			continue // merged already
		}
		if j.st.Step == nil {
			chain := d.Chain()
			if len(chain) < 2 || chain[1] != c.Files[i] {
				h.mu.Unlock()
				return fmt.Errorf("disk %d runs on %s, which is not a child of checkpoint file %s", i, chain[0], c.Files[i])
			}
			j.st.Step = &mergeStep{Checkpoint: c.ID, Disk: i, Top: chain[0], Target: c.Files[i], GUID: vhdx.NewGUID().String()}
			// The GUID is saved before any file changes, so a restart
			// resumes with it.
			if err := h.st.save(h.dir); err != nil {
				j.st.Step = nil
				h.mu.Unlock()
				return err
			}
		}
		h.mu.Unlock()
		if err := h.copyLive(j, v, d); err != nil {
			return err
		}
	}
	h.mu.Lock()
	defer h.mu.Unlock()
	v.st.removeCheckpoint(c.ID)
	for _, k := range v.st.children(c.ID) { // none: the running state was the only dependent
		k.Parent = c.Parent
	}
	v.st.Current = c.Parent
	j.st.Step = nil
	if err := h.st.save(h.dir); err != nil {
		return err
	}
	h.log.Info("checkpoint merged", "vm", v.st.Name, "checkpoint", c.Name)
	return nil
}

// copyLive runs the job's current live merge step to its end.
func (h *Host) copyLive(j *job, v *vm, d *merge.Disk) error {
	s := j.st.Step
	if j.live == nil {
		g, err := vhdx.ParseGUID(s.GUID)
		if err != nil {
			return err
		}
		m, err := d.StartMerge(g)
		if err != nil {
			return err
		}
		h.mu.Lock()
		j.live, j.cursor = m, s.Offset
		if s.Total == 0 {
			s.Total = m.Total()
			j.st.Total += s.Total
		}
		h.mu.Unlock()
	}
	m := j.live
	buf := make([]byte, 1<<20)
	h.mu.Lock()
	j.since, j.base = time.Now(), j.st.Done
	h.mu.Unlock()
	throttle := newThrottle()
	lastSave := time.Now()
	for {
		h.mu.Lock()
		if err, redo := m.MirrorError(); err != nil {
			j.cursor = rewind(j.cursor, redo)
			s.Offset = rewind(s.Offset, redo)
			h.mu.Unlock()
			return fmt.Errorf("mirroring writes into %s: %w", s.Target, err)
		}
		stop, paused, bw := h.ctx.Err() != nil, j.pauseReq, j.st.Bandwidth
		cursor := j.cursor
		h.mu.Unlock()
		if stop || paused || time.Since(lastSave) > time.Second {
			if err := h.checkpointProgress(j, m, cursor); err != nil {
				return err
			}
			lastSave = time.Now()
			if stop {
				return errStopped
			}
			if paused {
				return nil
			}
		}
		if cursor < 0 {
			break
		}
		next, n, err := m.CopyStep(cursor, buf)
		if err != nil {
			return fmt.Errorf("copying into %s: %w", s.Target, err)
		}
		h.mu.Lock()
		j.cursor = next
		j.st.Done = min(j.st.Done+n, j.st.Total)
		h.mu.Unlock()
		throttle.wait(h.ctx, j.wake, n, bw)
	}
	// Completion: the copy is durable; the switch is brief.
	h.mu.Lock()
	j.st.State = api.JobCompleting
	h.saveLocked()
	h.mu.Unlock()
	start := time.Now()
	err := m.Complete()
	if errors.Is(err, merge.ErrNotConverged) {
		h.mu.Lock()
		j.st.State = api.JobRunning
		h.mu.Unlock()
		return nil // the next round reads the mirror error and rewinds
	}
	if err != nil {
		return fmt.Errorf("switching to %s: %w", s.Target, err)
	}
	h.log.Info("disk switched to merged file", "vm", v.st.Name, "disk", s.Disk, "file", s.Target, "stall", time.Since(start))
	h.mu.Lock()
	v.st.Disks[s.Disk].Leaf = s.Target
	j.st.Step, j.live = nil, nil
	j.st.State = api.JobRunning
	err = h.st.save(h.dir)
	h.mu.Unlock()
	if err != nil {
		return err
	}
	if err := os.Remove(s.Top); err != nil && !errors.Is(err, os.ErrNotExist) {
		h.log.Warn("removing the merged file", "file", s.Top, "err", err)
	}
	return storage.SyncDir(filepath.Dir(s.Top))
}

// checkpointProgress makes the copy below cursor durable and records it.
func (h *Host) checkpointProgress(j *job, m *merge.LiveMerge, cursor int64) error {
	if err := m.FlushTarget(); err != nil {
		return fmt.Errorf("flushing %s: %w", m.Target(), err)
	}
	h.mu.Lock()
	defer h.mu.Unlock()
	if s := j.st.Step; s != nil && (cursor < 0 || s.Offset >= 0 && cursor > s.Offset) {
		s.Offset = cursor
	}
	j.st.Updated = time.Now().UTC()
	return h.st.save(h.dir)
}

// rewind moves a copy position back to redo (a position of -1 means the
// copy had finished).
func rewind(pos, redo int64) int64 {
	if pos < 0 || redo < pos {
		return redo
	}
	return pos
}

// mergeOffline deletes checkpoint c whose single dependent is checkpoint
// k: k's files are merged into c's, k's dependents re-pointed at them,
// and k takes c's place in the tree.
func (h *Host) mergeOffline(j *job, v *vm, c, k *checkpointState) error {
	return fmt.Errorf("deleting checkpoint %q needs an offline merge of %q into it, which is not implemented yet", c.Name, k.Name)
}

// throttle paces the copy to a bandwidth.
type throttle struct {
	start time.Time
	bytes int64
	bw    int64
}

func newThrottle() *throttle { return &throttle{start: time.Now()} }

// wait accounts n bytes and sleeps as long as bw (bytes/s, 0: unlimited)
// asks; a poke on wake (a new bandwidth) ends the sleep early.
func (t *throttle) wait(ctx context.Context, wake <-chan struct{}, n, bw int64) {
	if bw != t.bw {
		t.start, t.bytes, t.bw = time.Now(), 0, bw
	}
	t.bytes += n
	if bw <= 0 {
		return
	}
	due := t.start.Add(time.Duration(float64(t.bytes) / float64(bw) * float64(time.Second)))
	d := time.Until(due)
	if d <= 0 {
		return
	}
	timer := time.NewTimer(d)
	defer timer.Stop()
	select {
	case <-timer.C:
	case <-wake:
	case <-ctx.Done():
	}
}

// Jobs lists every job, newest last.
func (h *Host) Jobs() []api.Job {
	h.mu.Lock()
	defer h.mu.Unlock()
	out := []api.Job{}
	for _, js := range h.st.Jobs {
		if j := h.jobs[js.ID]; j != nil {
			out = append(out, j.view())
		} else {
			out = append(out, js.Job)
		}
	}
	return out
}

// Job describes one job.
func (h *Host) Job(id string) (*api.Job, error) {
	h.mu.Lock()
	defer h.mu.Unlock()
	js := h.st.job(id)
	if js == nil {
		return nil, errorf(statusNotFound, "no job %q", id)
	}
	out := js.Job
	if j := h.jobs[id]; j != nil {
		out = j.view()
	}
	return &out, nil
}

// activeJob finds a job that has not finished; the caller holds mu.
func (h *Host) activeJob(id string) (*job, error) {
	js := h.st.job(id)
	if js == nil {
		return nil, errorf(statusNotFound, "no job %q", id)
	}
	j := h.jobs[id]
	if j == nil || js.Finished() {
		return nil, errorf(statusConflict, "job %s has already %s", id, js.State)
	}
	return j, nil
}

// ControlJob pauses, resumes or cancels a job. Pausing stops the copy at
// once (writes keep being mirrored); a job paused by an error resumes by
// retrying what failed. Cancelling stops the job between merges, leaving
// the checkpoints it has not deleted yet; a merge under way has already
// changed the checkpoint's files and cannot be undone, so cancelling then
// is refused.
func (h *Host) ControlJob(id, action string) (*api.Job, error) {
	h.mu.Lock()
	defer h.mu.Unlock()
	j, err := h.activeJob(id)
	if err != nil {
		return nil, err
	}
	now := time.Now().UTC()
	switch action {
	case "pause":
		if !j.pauseReq {
			j.pauseReq = true
			j.st.State, j.st.Reason = api.JobPaused, "paused by request"
		}
	case "resume":
		if j.pauseReq {
			j.pauseReq = false
			j.st.State, j.st.Reason = api.JobRunning, ""
		}
	case "cancel":
		if j.st.Step != nil {
			return nil, errorf(statusConflict, "job %s is merging into %s, which it has already changed: a merge cannot be undone; pause it, or let it finish", id, j.st.Step.Target)
		}
		j.st.State, j.st.Reason = api.JobCanceled, "canceled by request"
		if v := h.vms[j.st.VM]; v != nil && v.job == j {
			v.job = nil
		}
	default:
		return nil, errorf(statusNotFound, "unknown job action %q (pause, resume or cancel)", action)
	}
	j.st.Updated = now
	if err := h.st.save(h.dir); err != nil {
		return nil, err
	}
	j.poke()
	out := j.view()
	return &out, nil
}

// SetBandwidth changes a job's copy rate limit (bytes/s, 0: none).
func (h *Host) SetBandwidth(id string, bw int64) (*api.Job, error) {
	if bw < 0 {
		return nil, errorf(statusBadRequest, "bandwidth cannot be negative")
	}
	h.mu.Lock()
	defer h.mu.Unlock()
	j, err := h.activeJob(id)
	if err != nil {
		return nil, err
	}
	j.st.Bandwidth = bw
	if err := h.st.save(h.dir); err != nil {
		return nil, err
	}
	j.poke()
	out := j.view()
	return &out, nil
}
