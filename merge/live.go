package merge

import (
	"context"
	"errors"
	"fmt"
	"math"
	"sort"
	"sync"
	"sync/atomic"

	"github.com/vhdkit/vhdkit/disk"
	"github.com/vhdkit/vhdkit/imagecopy"
	"github.com/vhdkit/vhdkit/storage"
	"github.com/vhdkit/vhdkit/vhdx"
)

// # Live merge
//
// A Disk is a VHDX chain in use: the image a server exports, whose layers
// change under it while clients keep reading and writing. A live merge
// folds the running leaf L into its parent T without stopping the disk:
//
//  1. Under a pause (in-flight I/O drained, new I/O held): T's new
//     DataWriteGuid G goes into L's parent_linkage2 and L is flushed, then
//     T is opened for writing and takes G (BeginDataChange). From here on
//     every client write is applied to L and then mirrored into T, under a
//     lock on its range — unless it lies, whole, in a range of L the
//     copier has yet to reach: the copier will read it from L then.
//  2. A copier (Run: the copy engine, imagecopy, one 1 MiB piece at a
//     time) walks the ranges L held when the merge started and copies
//     each from L into T under the same range lock, so a client write and
//     the copy of its range never interleave: from where L's file holds
//     it then, cloned where the file system can. Writes mirrored while the
//     copy runs keep T current behind the copier, so one pass converges
//     whatever the write rate.
//  3. Completion: T is flushed, then under a pause flushed again (only the
//     last moments' writes) and becomes the disk's leaf; L is closed.
//
// Reads go to L until the switch. L's chain holds its own read-only handle
// on T, whose cached BAT goes stale as T changes; that is harmless because
// L holds every sector written into T, so L never reads those from T. A
// crash at any moment leaves L openable over T (linkage2) with every
// acknowledged write in L; the caller restarts the merge with the same G.

// LiveMerge is a running merge of a Disk's leaf into its parent.
type LiveMerge struct {
	d      *Disk
	leaf   *vhdx.Image // the disk's leaf, which cannot change while the merge runs
	top    string
	target *vhdx.Image
	// todo are the ranges the leaf held at the start, in order, all as
	// data: each is copied from where the leaf holds it when the copier
	// gets there.
	todo  []disk.Extent
	total int64

	locks rangeLocks
	// next is where the copier goes on from (MaxInt64 before it starts):
	// client writes wholly after it, within a range of todo, are not
	// mirrored, since the copier reads them from the leaf later.
	next atomic.Int64

	movedMu sync.Mutex
	moved   storage.Moved

	errMu     sync.Mutex
	mirrorErr error // the first failed mirrored write since the last Err
	redoFrom  int64 // where the copy must restart to cover it
}

// StartMerge begins merging the disk's leaf into its parent, whose new
// DataWriteGuid is g (step 1). Resuming an interrupted merge passes the
// same g.
func (d *Disk) StartMerge(g vhdx.GUID) (*LiveMerge, error) {
	d.Pause()
	defer d.Resume()
	if d.mirror != nil {
		return nil, errors.New("merge: a live merge is already running on this disk")
	}
	leaf := d.leaf
	info := leaf.Info()
	if len(info.Chain) < 2 {
		return nil, fmt.Errorf("merge: %s is not a differencing image", leaf.Path())
	}
	if info.ParentLinkage2 != g {
		if err := leaf.SetParentLinkage2(g); err != nil {
			return nil, fmt.Errorf("merge: recording the target's new identity in %s: %w", leaf.Path(), err)
		}
		if err := leaf.Flush(); err != nil {
			return nil, fmt.Errorf("merge: %w", err)
		}
	}
	opts := d.opts
	opts.ParentPath, opts.ParentImage = "", nil
	t, err := vhdx.Open(info.Chain[1], opts)
	if err != nil {
		return nil, fmt.Errorf("merge: opening the target: %w", err)
	}
	if err := t.BeginDataChange(g); err != nil {
		t.Close()
		return nil, fmt.Errorf("merge: %w", err)
	}
	exts, err := leaf.Extents(0, d.size)
	if err != nil {
		t.Close()
		return nil, fmt.Errorf("merge: %w", err)
	}
	m := &LiveMerge{d: d, leaf: leaf, top: leaf.Path(), target: t, redoFrom: -1}
	m.next.Store(math.MaxInt64) // no copier yet: mirror everything
	for _, e := range exts {
		if e.Depth == 0 && e.Type != disk.Hole {
			e.Type = disk.Data
			m.todo = disk.AppendExtent(m.todo, e)
			m.total += e.Length
		}
	}
	d.mirror = m
	return m, nil
}

// Top and Target name the merged file and the one it merges into.
func (m *LiveMerge) Top() string    { return m.top }
func (m *LiveMerge) Target() string { return m.target.Path() }

// Total is the number of bytes the copy covers.
func (m *LiveMerge) Total() int64 { return m.total }

// liveChunk is the most a copy piece moves: small enough that a client
// write waiting on its range lock waits briefly.
const liveChunk = 1 << 20

// Run carries the ranges of the merge from opts.From on into the target
// (step 2), through the copy engine (imagecopy: data cloned or copied in
// the kernel from the leaf's file where the file system can), with the
// offline merge's options: Progress, Pace, From and Durable (the target
// is flushed before each report). It returns the offset below which
// everything is copied, and nil when all is, or the error that stopped it:
// ctx's, a failed I/O, or a mirrored write that failed (the copy must
// then start over: see MirrorError).
func (m *LiveMerge) Run(ctx context.Context, opts Options) (reached int64, err error) {
	reached = max(opts.From, 0)
	o := copyOptions(opts)
	o.MaxPiece = liveChunk
	o.Step = func(off, n int64, copy func() error) error {
		if err := m.step(off, n, copy); err != nil {
			return err
		}
		reached = off + n
		return nil
	}
	st, err := imagecopy.Copy(ctx, m.target, m.leaf, m.todo, o)
	m.addMoved(st.Moved)
	if err != nil {
		return reached, err
	}
	return m.d.size, nil
}

// Moved says how the data the merge carried went so far: cloned, copied
// in the kernel, copied.
func (m *LiveMerge) Moved() storage.Moved {
	m.movedMu.Lock()
	defer m.movedMu.Unlock()
	return m.moved
}

func (m *LiveMerge) addMoved(mv storage.Moved) {
	m.movedMu.Lock()
	m.moved = m.moved.Add(mv)
	m.movedMu.Unlock()
}

// CopyStep copies the next piece of the merge at or after virtual offset
// off (step 2) and returns the offset after it and the bytes it covered;
// next is -1 when nothing is left. (Run is the loop; a step at a time is
// for tests that interleave client writes with the copier.)
func (m *LiveMerge) CopyStep(off int64) (next, n int64, err error) {
	m.next.Store(off)
	i := m.extentAfter(off)
	if i == len(m.todo) {
		return -1, 0, nil
	}
	e := m.todo[i]
	start := max(off, e.Offset)
	n = min(e.Offset+e.Length-start, liveChunk)
	piece := []disk.Extent{{Offset: start, Length: n, Type: disk.Data}}
	st, err := imagecopy.Copy(context.Background(), m.target, m.leaf, piece, imagecopy.Options{Step: m.step})
	m.addMoved(st.Moved)
	return start + n, n, err
}

// step runs the engine's copy of [off, off+n) under the disk's I/O lock
// and the range's lock, so that a client write and the copy of its range
// never interleave. The engine moves the range from where the leaf holds
// it now, not where it did when the merge began: a client may have
// written there since (even where the leaf declared zeros), and its data
// must not be zeroed in the target behind it. What reads as zeros is
// written as zeros.
func (m *LiveMerge) step(off, n int64, copy func() error) error {
	if err, _ := m.MirrorError(); err != nil {
		// The copy starts over (the caller stops the merge): no need to
		// rewind here.
		return fmt.Errorf("mirroring writes into %s: %w", m.target.Path(), err)
	}
	// From here the copier goes forward from off: a client write wholly
	// at or after it, in a data range, is the copier's to carry.
	m.next.Store(off)
	d := m.d
	d.mu.RLock()
	defer d.mu.RUnlock()
	if d.mirror != m {
		return errors.New("merge: the live merge was stopped")
	}
	end := off + n
	m.locks.lock(off, end)
	defer m.locks.unlock(off, end)
	if err := copy(); err != nil {
		return err
	}
	// Before the range's lock goes: a write waiting for it must see that
	// the copier has passed.
	m.next.Store(end)
	return nil
}

// extentAfter returns the index of the first range of the copy that ends
// after off.
func (m *LiveMerge) extentAfter(off int64) int {
	return sort.Search(len(m.todo), func(i int) bool { return m.todo[i].Offset+m.todo[i].Length > off })
}

// needsMirror reports whether a client write to [off, end) must go to the
// target too: unless it lies wholly within one range of the copy at or
// after the copier's position, where the copier will read it from the
// leaf. The caller holds the range's lock, which the copier takes too, so
// the copier cannot pass the range between this answer and the write.
func (m *LiveMerge) needsMirror(off, end int64) bool {
	if off < m.next.Load() {
		return true
	}
	i := m.extentAfter(off)
	if i == len(m.todo) {
		return true
	}
	e := m.todo[i]
	return off < e.Offset || end > e.Offset+e.Length
}

// FlushTarget makes what was copied so far durable in the target, so the
// caller may record its progress.
func (m *LiveMerge) FlushTarget() error { return m.target.Flush() }

// mirrorFailed notes a failed mirrored write at off (a failed flush passes
// 0: nothing mirrored since the last good one is known durable). The
// client's write succeeded in the leaf; the copy must cover the range
// again before the merge can complete.
func (m *LiveMerge) mirrorFailed(off int64, err error) {
	if err == nil {
		return
	}
	m.errMu.Lock()
	defer m.errMu.Unlock()
	if m.mirrorErr == nil {
		m.mirrorErr = err
	}
	if m.redoFrom < 0 || off < m.redoFrom {
		m.redoFrom = off
	}
}

// MirrorError returns, and clears, the first mirrored write that failed
// since the last call, with the offset the copy must restart from.
func (m *LiveMerge) MirrorError() (err error, redoFrom int64) {
	m.errMu.Lock()
	defer m.errMu.Unlock()
	err, redoFrom = m.mirrorErr, m.redoFrom
	m.mirrorErr, m.redoFrom = nil, -1
	return err, redoFrom
}

// ErrNotConverged reports that a mirrored write failed since the copy
// finished: the copy must run again from the offset MirrorError returns.
var ErrNotConverged = errors.New("merge: a mirrored write failed; the copy must cover it again")

// Complete switches the disk to the target (step 3) once the copy is
// done. Under the pause, after the target's last flush, commit records
// the switch (the caller's state now names the target as the leaf); if it
// fails, nothing switches and mirroring goes on. The merged file is
// closed but not deleted: the caller removes it.
func (m *LiveMerge) Complete(commit func() error) error {
	if err := m.target.Flush(); err != nil {
		return err
	}
	d := m.d
	d.Pause()
	if err := m.target.Flush(); err != nil {
		d.Resume()
		return err
	}
	m.errMu.Lock()
	mirrorErr := m.mirrorErr
	m.errMu.Unlock()
	if mirrorErr != nil {
		d.Resume()
		return fmt.Errorf("%w: %w", ErrNotConverged, mirrorErr)
	}
	if commit != nil {
		if err := commit(); err != nil {
			d.Resume()
			return err
		}
	}
	old := d.leaf
	d.setLeaf(m.target)
	d.mirror = nil
	d.Resume()
	// Closing the old leaf can no longer matter to the disk, whose every
	// write is in the target now.
	old.Close()
	return nil
}

// Stop ends a live merge without switching: mirroring stops and the
// target is closed. The target has changed; the leaf still reads the
// newest data over it, and a later StartMerge with the same G resumes.
func (m *LiveMerge) Stop() error {
	d := m.d
	d.Pause()
	defer d.Resume()
	if d.mirror != m {
		return nil
	}
	d.mirror = nil
	return m.target.Close()
}
