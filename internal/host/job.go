package host

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"time"

	"github.com/vhdkit/vhdkit/internal/api"
	"github.com/vhdkit/vhdkit/merge"
	"github.com/vhdkit/vhdkit/storage"
	"github.com/vhdkit/vhdkit/vhdx"
)

// A job deletes checkpoints: one at a time, each by the tree rules (drop
// it, or merge its single dependent into it), each merge one disk at a
// time. Its states:
//
//	queued -> running -> (completing -> running)* -> done
//	queued/running <-> paused   (by request, or by an error, with its reason)
//	any unfinished state -> canceled   (at once between merges; a merge
//	                                    under way finishes first, since it
//	                                    has changed the checkpoint's file:
//	                                    if nothing else was left to delete,
//	                                    the job is then done, not canceled)
//	any unfinished state -> failed     (the tree no longer allows the deletion)
//	running -> paused                  (its machine is failed: until repaired)
//
// Each merge step is persisted in jobState.Step before it changes a file,
// so a restart resumes it: a live step re-establishes mirroring before the
// disk is exported again; an offline step re-runs merge.Merge, which
// finishes from its own journal. Done only grows: what the API reports of
// it is saved first (see Host.Job), so a crash cannot take it back, and a
// copy that starts over after one counts from there (max).
type job struct {
	st   *jobState
	wake chan struct{} // pokes the runner: state or bandwidth changed

	// Guarded by Host.mu.
	pauseReq bool               // a pause was asked for (or an error paused it)
	stopStep context.CancelFunc // stops an offline merge in progress
	live     *merge.LiveMerge   // the live merge in progress, mirroring
	cursor   int64              // live copy position, ahead of st.Step.Offset
	held     bool               // paused because its machine is failed
	// pos is where the copy really is, in the job's bytes: below Done
	// while a copy that started over catches up. The ETA counts from it.
	pos       int64
	meter     rateMeter
	savedDone int64 // st.Done as last saved
}

func (h *Host) newJob(js *jobState) *job {
	j := &job{st: js, wake: make(chan struct{}, 1), pos: js.Done, savedDone: js.Done}
	j.pauseReq = js.State == api.JobPaused
	h.jobs[js.ID] = j
	return j
}

// hold pauses a failed machine's job until the machine is repaired; a
// job paused by request stays so. The caller holds mu (or owns h).
func (j *job) hold(v *vm) {
	if j.pauseReq && !j.held {
		return
	}
	j.pauseReq, j.held = true, true
	j.st.State = api.JobPaused
	j.st.Reason = fmt.Sprintf("machine %s is failed; the job waits for its repair (vhdkit vm repair %s)", v.st.Name, v.st.Name)
}

// unhold resumes a job hold paused, once its machine serves again.
func (j *job) unhold() {
	if !j.held {
		return
	}
	j.held, j.pauseReq = false, false
	j.st.State, j.st.Reason = api.JobQueued, ""
	j.poke()
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
	if out.State == api.JobRunning || out.State == api.JobCompleting {
		if rate := j.meter.rate(time.Now()); rate > 0 {
			out.ETA = float64(max(out.Total-j.pos, 0)) / rate
		}
	}
	return out
}

// progress records that the copy reached pos, having just copied n
// bytes; Done follows it, never down. The caller holds mu.
func (j *job) progress(pos, n int64) {
	j.pos = min(pos, j.st.Total)
	j.st.Done = max(j.st.Done, j.pos)
	j.meter.add(time.Now(), n)
}

// moved adds how a merge's data went to the job's counts; the caller
// holds mu.
func (j *job) moved(m storage.Moved) {
	j.st.Cloned += m.Cloned
	j.st.KernelCopied += m.KernelCopied
	j.st.Copied += m.Copied
}

// rateMeter measures a copy's rate over its last few seconds, so the
// time left follows a bandwidth change or a slower disk.
type rateMeter struct {
	samples []rateSample // oldest first; one may be older than the window
}

type rateSample struct {
	t time.Time
	n int64 // bytes copied in all, at t
}

const rateWindow = 3 * time.Second

func (m *rateMeter) reset() { m.samples = m.samples[:0] }

func (m *rateMeter) add(now time.Time, n int64) {
	total := n
	if k := len(m.samples); k > 0 {
		total += m.samples[k-1].n
		if k > 1 && now.Sub(m.samples[k-2].t) < 100*time.Millisecond {
			m.samples[k-1] = rateSample{now, total} // one sample per 100 ms
			return
		}
	}
	m.samples = append(m.samples, rateSample{now, total})
	// Keep the newest sample older than the window as the base.
	i := 0
	for i+1 < len(m.samples) && now.Sub(m.samples[i+1].t) >= rateWindow {
		i++
	}
	m.samples = append(m.samples[:0], m.samples[i:]...)
}

// rate is bytes per second over the window up to now (a copy that
// stalls slows it down), 0 when too little was measured.
func (m *rateMeter) rate(now time.Time) float64 {
	if len(m.samples) < 2 {
		return 0
	}
	first, last := m.samples[0], m.samples[len(m.samples)-1]
	d := now.Sub(first.t).Seconds()
	if d < 0.5 {
		return 0
	}
	return float64(last.n-first.n) / d
}

// errPaused stops a step when the job is paused or the host closes.
var errPaused = errors.New("paused")

// errFatal marks an error that fails the job instead of pausing it.
type errFatal struct{ error }

// restart re-establishes an interrupted live merge at Open, before the
// disk is exported; the caller owns h.
func (j *job) restart(h *Host, v *vm) error {
	s := j.st.Step
	if s == nil || s.Kind != stepLive {
		return nil
	}
	if v.st.Disks[s.Disk].Leaf == s.Target {
		// Switched and saved; only the merged file's removal was lost.
		os.Remove(s.Top)
		j.st.Step = nil
		return nil
	}
	if !s.Clean {
		s.Offset = 0
	}
	s.Clean = false
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
		var fatal errFatal
		switch {
		case h.ctx.Err() != nil:
			return
		case errors.As(err, &fatal):
			h.finish(j, api.JobFailed, err.Error())
			return
		case errors.Is(err, errPaused) || errors.Is(err, context.Canceled):
			// A pause stopped the merge; waitRunnable waits.
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
		finished, paused := j.st.Finished(), j.pauseReq
		h.mu.Unlock()
		if finished {
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

// pause records that an error paused the job; resuming retries.
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
	h.finishLocked(j, state, reason)
}

func (h *Host) finishLocked(j *job, state, reason string) {
	j.st.State, j.st.Reason, j.st.Updated = state, reason, time.Now().UTC()
	if state == api.JobDone {
		j.st.Done = j.st.Total
	}
	if v := h.vms[j.st.VM]; v != nil && v.job == j {
		v.job = nil
	}
	h.log.Info("job finished", "job", j.st.ID, "state", state, "reason", reason)
	h.saveLocked()
}

// saveLocked saves the state, logging a failure: the change is in memory
// and the next save retries it. The caller holds mu.
func (h *Host) saveLocked() {
	if err := h.save(); err != nil {
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
		return false, errFatal{fmt.Errorf("machine %s no longer exists", j.st.VM)}
	}
	if v.failed != "" {
		// Resumed while its machine is failed: wait for the repair.
		j.hold(v)
		h.saveLocked()
		h.mu.Unlock()
		return false, errPaused
	}
	if j.st.State == api.JobQueued || j.st.State == api.JobPaused {
		j.st.State, j.st.Reason = api.JobRunning, ""
		if j.st.Cancel {
			j.st.Reason = cancelReason
		}
	}
	var c *checkpointState
	if s := j.st.Step; s != nil {
		c = v.st.checkpoint(s.Checkpoint)
	} else if c = j.merging(v); c != nil {
		// Between the disks of one checkpoint's merges: go on with it.
	} else if j.st.Cancel {
		h.endCanceled(j, v)
		h.mu.Unlock()
		return false, nil
	} else {
		c = h.pick(v, j)
	}
	if c == nil {
		h.mu.Unlock()
		return true, nil
	}
	kids, now := v.st.dependents(c)
	if (len(kids) > 0 || now) && !slices.Contains(j.st.Counted, c.ID) {
		// The whole checkpoint's merges count in Total from the start, so
		// that the share done only grows while it is deleted.
		if err := h.count(j, v, c); err != nil {
			h.mu.Unlock()
			return false, err
		}
	}
	h.mu.Unlock()
	switch {
	case len(kids) == 0 && !now:
		return false, h.drop(j, v, c)
	case len(kids) == 0 && now:
		return false, h.mergeLive(j, v, c)
	case len(kids) == 1 && !now:
		return false, h.mergeOffline(j, v, c, kids[0])
	}
	return false, errFatal{fmt.Errorf("checkpoint %q has %d dependents and cannot be deleted alone", c.Name, len(kids)+btoi(now))}
}

// merging returns the checkpoint whose merges the job has begun and not
// finished (some of its disks may be merged already), or nil; the caller
// holds mu.
func (j *job) merging(v *vm) *checkpointState {
	for _, id := range j.st.Counted {
		if c := v.st.checkpoint(id); c != nil {
			return c
		}
	}
	return nil
}

const cancelReason = "cancel requested: the merge under way has changed the checkpoint's file, so it completes first; then the job ends"

// endCanceled ends a job whose cancel waited for the merge under way:
// done when nothing else was left to delete (the cancel came too late to
// change anything), canceled when it kept checkpoints from deletion.
// The caller holds mu.
func (h *Host) endCanceled(j *job, v *vm) {
	var kept []string
	for _, id := range j.st.Targets {
		if c := v.st.checkpoint(id); c != nil {
			kept = append(kept, fmt.Sprintf("%q", c.Name))
		}
	}
	if len(kept) == 0 {
		h.finishLocked(j, api.JobDone, "cancel came after the merge had begun; the merge completed and the checkpoint is deleted")
		return
	}
	h.finishLocked(j, api.JobCanceled, fmt.Sprintf("canceled by request after the merge under way completed; kept %s", strings.Join(kept, ", ")))
}

// count adds the bytes deleting c merges to the job's Total; the caller
// holds mu.
func (h *Host) count(j *job, v *vm, c *checkpointState) error {
	_, merged, err := h.mergeSize(v, c)
	if err != nil {
		return err
	}
	j.st.Total += merged
	j.st.Counted = append(j.st.Counted, c.ID)
	return h.save()
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
	if j.st.Finished() {
		h.mu.Unlock() // canceled since advance chose c
		return nil
	}
	v.st.removeCheckpoint(c.ID)
	if err := h.save(); err != nil {
		v.st.Checkpoints = append(v.st.Checkpoints, c)
		h.mu.Unlock()
		return err
	}
	h.removeStaleStates(v.st)
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

// checkpointDeleted updates the tree once c's merges are done; the caller
// holds mu.
func (h *Host) checkpointDeleted(j *job, v *vm, c *checkpointState) error {
	j.st.Step = nil
	j.st.Done = max(j.st.Done, j.st.Total)
	j.pos = j.st.Done
	if err := h.save(); err != nil {
		return err
	}
	h.removeStaleStates(v.st)
	h.log.Info("checkpoint merged", "vm", v.st.Name, "checkpoint", c.Name)
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
				return errFatal{fmt.Errorf("disk %d runs on %s, which is not a child of checkpoint file %s", i, chain[0], c.Files[i])}
			}
			j.st.Step = &mergeStep{Kind: stepLive, Checkpoint: c.ID, Disk: i, Top: chain[0], Target: c.Files[i],
				GUID: vhdx.NewGUID().String(), Base: j.st.Done}
			// The GUID is saved before any file changes, so a restart
			// resumes with it.
			if err := h.save(); err != nil {
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
	v.st.Current = c.Parent
	return h.checkpointDeleted(j, v, c)
}

// copyLive runs the job's current live merge step to its end. After an
// error the live merge stops (mirroring too) and starts over on resume:
// the target's handle may hold a failed state, and the leaf then takes
// writes the target does not see, so the copy must cover it all again.
func (h *Host) copyLive(j *job, v *vm, d *merge.Disk) error {
	err := h.runLive(j, v, d)
	if err == nil || errors.Is(err, errPaused) {
		return err
	}
	h.mu.Lock()
	m := j.live
	j.live = nil
	if s := j.st.Step; s != nil && s.Kind == stepLive {
		s.Offset = 0
	}
	h.mu.Unlock()
	if m != nil {
		if serr := m.Stop(); serr != nil {
			h.log.Warn("stopping a failed live merge", "err", serr)
		}
	}
	return err
}

func (h *Host) runLive(j *job, v *vm, d *merge.Disk) error {
	h.mu.Lock()
	s := j.st.Step
	m := j.live
	h.mu.Unlock()
	if m == nil {
		g, err := vhdx.ParseGUID(s.GUID)
		if err != nil {
			return errFatal{err}
		}
		if m, err = d.StartMerge(g); err != nil {
			return err
		}
		h.mu.Lock()
		j.live, j.cursor = m, s.Offset
		h.mu.Unlock()
	}
	if err, _ := m.MirrorError(); err != nil {
		// copyLive starts the merge over: no need to rewind.
		return fmt.Errorf("mirroring writes into %s: %w", s.Target, err)
	}
	// The copy runs in the merge (LiveMerge.Run); the job persists where
	// it got, paces it and reports its progress. A copy that starts over
	// counts again from the step's base: Done stays where it was until
	// the copy passes it.
	ctx, cancel := context.WithCancel(h.ctx)
	defer cancel()
	h.mu.Lock()
	j.meter.reset()
	j.stopStep = cancel
	paused, bw, from := j.pauseReq, j.st.Bandwidth, j.cursor
	if from >= 0 {
		j.pos = s.Base
		if s.Offset > 0 {
			j.pos = j.st.Done
		}
	}
	h.mu.Unlock()
	if paused {
		cancel()
	}
	throttle := newThrottle()
	last := int64(-1) // the first report includes what an earlier run copied
	opts := merge.Options{From: from,
		Progress: func(done, total int64) {
			h.mu.Lock()
			if last < 0 {
				last = done
			}
			j.progress(s.Base+done, max(done-last, 0))
			last = done
			bw = j.st.Bandwidth
			h.mu.Unlock()
			h.events.touch()
		},
		Pace: func(n int64) { throttle.wait(ctx, j.wake, n, bw) },
		// The target is flushed before each report.
		Durable: func(off int64) {
			h.mu.Lock()
			j.cursor = off
			if off > s.Offset {
				s.Offset = off
			}
			j.st.Updated = time.Now().UTC()
			h.saveLocked()
			h.mu.Unlock()
		},
	}
	if from >= 0 {
		reached, err := m.Run(ctx, opts)
		h.mu.Lock()
		j.stopStep = nil
		j.cursor = reached
		h.mu.Unlock()
		if err != nil && ctx.Err() != nil && !errors.Is(err, context.Canceled) {
			err = context.Canceled
		}
		if errors.Is(err, context.Canceled) {
			// Paused, or the host closes: what was copied is made
			// durable and recorded, and the copy goes on from there.
			if err := h.saveProgress(j, m, reached); err != nil {
				return err
			}
			return errPaused
		}
		if err != nil {
			return fmt.Errorf("copying into %s: %w", s.Target, err)
		}
		h.mu.Lock()
		j.cursor = -1 // copied: a restart after a clean stop completes at once
		h.mu.Unlock()
		if err := h.saveProgress(j, m, -1); err != nil {
			return err
		}
	}
	// Completion: the copy is durable; the switch is brief. The target's
	// flush outside the pause leaves little for the one inside it.
	h.mu.Lock()
	j.st.State = api.JobCompleting
	h.saveLocked()
	h.mu.Unlock()
	if err := m.FlushTarget(); err != nil {
		return fmt.Errorf("flushing %s: %w", s.Target, err)
	}
	// mu before the disk's pause: the order CreateCheckpoint takes them in.
	h.mu.Lock()
	start := time.Now()
	err := m.Complete(func() error {
		// The switch is saved before I/O resumes on the target: a restart
		// must not go back to the leaf, which lacks what comes next.
		v.st.Disks[s.Disk].Leaf = s.Target
		j.st.Step = nil
		if err := h.save(); err != nil {
			v.st.Disks[s.Disk].Leaf, j.st.Step = s.Top, s
			return err
		}
		return nil
	})
	stall := time.Since(start)
	if err == nil {
		j.live = nil
		j.st.StallMS = max(j.st.StallMS, float64(stall.Microseconds())/1000)
	}
	j.st.State = api.JobRunning
	if j.st.Cancel {
		j.st.Reason = cancelReason
	}
	h.mu.Unlock()
	if errors.Is(err, merge.ErrNotConverged) {
		return nil // the next round reads the mirror error and starts over
	}
	if err != nil {
		return fmt.Errorf("switching to %s: %w", s.Target, err)
	}
	mv := m.Moved()
	h.mu.Lock()
	j.moved(mv)
	h.mu.Unlock()
	h.log.Info("disk switched to merged file", "vm", v.st.Name, "disk", s.Disk, "file", s.Target, "stall", stall,
		"cloned", mv.Cloned, "kernel_copied", mv.KernelCopied, "copied", mv.Copied)
	if err := os.Remove(s.Top); err != nil && !errors.Is(err, os.ErrNotExist) {
		h.log.Warn("removing the merged file", "file", s.Top, "err", err)
	}
	return storage.SyncDir(filepath.Dir(s.Top))
}

// saveProgress makes the copy below cursor durable and records it.
func (h *Host) saveProgress(j *job, m *merge.LiveMerge, cursor int64) error {
	if err := m.FlushTarget(); err != nil {
		return fmt.Errorf("flushing %s: %w", m.Target(), err)
	}
	h.mu.Lock()
	defer h.mu.Unlock()
	if s := j.st.Step; s != nil && (cursor < 0 || s.Offset >= 0 && cursor > s.Offset) {
		s.Offset = cursor
	}
	j.st.Updated = time.Now().UTC()
	return h.save()
}

// mergeOffline deletes checkpoint c whose single dependent is checkpoint
// k: k's files, which nothing writes, are merged into c's; what depends
// on k's files (its child checkpoints' files, and the running disk when
// the machine runs from k) is re-pointed at c's; k takes c's place in the
// tree, with c's files.
func (h *Host) mergeOffline(j *job, v *vm, c, k *checkpointState) error {
	for i, d := range v.disks {
		h.mu.Lock()
		s := j.st.Step
		if s != nil && s.Disk > i {
			h.mu.Unlock()
			continue // merged already
		}
		if s == nil {
			s = offlineStep(c, k, i, j.st.Done)
			j.st.Step = s
			if err := h.save(); err != nil {
				j.st.Step = nil
				h.mu.Unlock()
				return err
			}
		}
		opts := merge.Options{Into: s.Target, NoScan: true, FS: h.opts.FS, ParentDirs: h.parentDirs(s.Top), From: s.Offset}
		for _, kk := range v.st.children(k.ID) {
			opts.Children = append(opts.Children, kk.Files[i])
		}
		if v.st.Current == k.ID {
			opts.Open = []merge.OpenChild{d}
		}
		ctx, cancel := context.WithCancel(h.ctx)
		j.stopStep = cancel
		paused, bw := j.pauseReq, j.st.Bandwidth
		j.meter.reset()
		last := int64(-1) // the first report may include what an earlier run copied
		h.mu.Unlock()
		if paused {
			cancel()
		}
		throttle := newThrottle()
		opts.Progress = func(done, total int64) {
			h.mu.Lock()
			if last < 0 {
				last = done
			}
			j.progress(s.Base+done, max(done-last, 0))
			last = done
			bw = j.st.Bandwidth
			h.mu.Unlock()
			h.events.touch()
		}
		opts.Pace = func(n int64) { throttle.wait(ctx, j.wake, n, bw) }
		opts.Durable = func(off int64) {
			h.mu.Lock()
			s.Offset = off
			j.st.Updated = time.Now().UTC()
			h.saveLocked()
			h.mu.Unlock()
		}
		err := h.mergeFile(ctx, j, s, opts)
		cancel()
		if err == nil && opts.Open == nil && slices.Contains(d.Chain(), s.Top) {
			// The disk reads through a file the merge re-pointed.
			err = d.RefreshChain()
		}
		h.mu.Lock()
		j.stopStep = nil
		if err == nil {
			if i+1 < len(v.disks) {
				j.st.Step = offlineStep(c, k, i+1, j.st.Done)
			}
			err = h.save()
		}
		h.mu.Unlock()
		if err != nil {
			return err
		}
	}
	h.mu.Lock()
	defer h.mu.Unlock()
	k.Files, k.Parent = slices.Clone(c.Files), c.Parent
	v.st.removeCheckpoint(c.ID)
	return h.checkpointDeleted(j, v, c)
}

// offlineStep is the merge of disk i of checkpoint k's files into c's.
func offlineStep(c, k *checkpointState, i int, base int64) *mergeStep {
	return &mergeStep{Kind: stepOffline, Checkpoint: c.ID, Dependent: k.ID, Disk: i, Top: k.Files[i], Target: c.Files[i], Base: base}
}

// mergeFile runs one offline merge step; a step whose merged file is gone
// and left no journal finished before a restart.
func (h *Host) mergeFile(ctx context.Context, j *job, s *mergeStep, opts merge.Options) error {
	if _, err := os.Stat(s.Top); errors.Is(err, os.ErrNotExist) && !merge.Pending(s.Top) {
		return nil
	}
	res, err := merge.Merge(ctx, s.Top, opts)
	if err != nil {
		return err
	}
	h.mu.Lock()
	j.moved(res.Moved)
	h.mu.Unlock()
	h.log.Info("checkpoint file merged", "top", s.Top, "target", res.Target, "copied", res.Copied,
		"cloned", res.Moved.Cloned, "kernel_copied", res.Moved.KernelCopied, "relinked", res.Relinked)
	return nil
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

// saveReported makes what is about to be reported of the jobs' progress
// durable, so that a crash cannot report less afterwards. (The copies
// save their position every second; this covers the time between.) The
// caller holds mu.
func (h *Host) saveReported() {
	for _, j := range h.jobs {
		if j.st.Done > j.savedDone {
			h.saveLocked()
			return
		}
	}
}

// Jobs lists every job, newest last.
func (h *Host) Jobs() []api.Job {
	h.mu.Lock()
	defer h.mu.Unlock()
	h.saveReported()
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
	h.saveReported()
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
		return nil, errorf(statusConflict, "job %s has already ended (%s)", id, js.State)
	}
	return j, nil
}

// ControlJob pauses, resumes or cancels a job. Pausing stops the copy at
// once (a live merge keeps mirroring writes, so nothing is lost); a job
// paused by an error resumes by retrying what failed. Cancelling ends the
// job between merges, leaving the checkpoints it has not deleted; a merge
// under way has already changed the checkpoint's file, so it finishes
// first (when resumed, if paused), and the job then ends canceled.
func (h *Host) ControlJob(id, action string) (*api.Job, error) {
	h.mu.Lock()
	defer h.mu.Unlock()
	j, err := h.activeJob(id)
	if err != nil {
		return nil, err
	}
	switch action {
	case "pause":
		if !j.pauseReq || j.held {
			j.pauseReq, j.held = true, false
			j.st.State, j.st.Reason = api.JobPaused, "paused by request"
			if j.stopStep != nil {
				j.stopStep()
			}
		}
	case "resume":
		if j.pauseReq {
			j.pauseReq = false
			j.st.State, j.st.Reason = api.JobRunning, ""
			if j.st.Cancel {
				j.st.Reason = cancelReason
			}
		}
	case "cancel":
		j.st.Cancel = true
		v := h.vms[j.st.VM]
		if j.st.Step == nil && (v == nil || j.merging(v) == nil) {
			h.finishLocked(j, api.JobCanceled, "canceled by request")
		} else if !j.pauseReq {
			j.st.Reason = cancelReason
		}
	default:
		return nil, errorf(statusBadRequest, "unknown job action %q (pause, resume or cancel)", action)
	}
	j.st.Updated = time.Now().UTC()
	if err := h.save(); err != nil {
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
	if err := h.save(); err != nil {
		return nil, err
	}
	j.poke()
	out := j.view()
	return &out, nil
}
