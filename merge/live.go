package merge

import (
	"errors"
	"fmt"
	"math"
	"sort"
	"sync"
	"sync/atomic"

	"github.com/vhdkit/vhdkit/disk"
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
//  2. A copier walks the ranges L held when the merge started and copies
//     each from L into T under the same range lock, so a client write and
//     the copy of its range never interleave. Writes mirrored while the
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

// Disk is a running VHDX chain. It implements disk.Image, disk.Trimmer,
// disk.Zeroer, disk.Extenter and disk.SectorSizer, and is safe for
// concurrent use.
type Disk struct {
	mu   sync.RWMutex // I/O holds it shared; changing layers, exclusively
	leaf *vhdx.Image
	// leafMu also guards leaf, for Leaf and Chain, which must work while
	// the disk is paused; whoever changes leaf holds both.
	leafMu sync.Mutex
	mirror *LiveMerge // set while a live merge runs
	size   int64
	opts   vhdx.OpenOptions
}

// OpenDisk opens the chain whose leaf is path for reading and writing.
// opts.ReadOnly is ignored; opts.OpenFile is kept for the files a live
// merge opens.
func OpenDisk(path string, opts vhdx.OpenOptions) (*Disk, error) {
	opts.ReadOnly = false
	im, err := vhdx.Open(path, opts)
	if err != nil {
		return nil, err
	}
	return &Disk{leaf: im, size: im.Size(), opts: opts}, nil
}

// Size returns the virtual size.
func (d *Disk) Size() int64 { return d.size }

// Leaf returns the path of the file the disk runs on.
func (d *Disk) Leaf() string {
	d.leafMu.Lock()
	defer d.leafMu.Unlock()
	return d.leaf.Path()
}

// Chain lists the disk's files, leaf first.
func (d *Disk) Chain() []string {
	d.leafMu.Lock()
	defer d.leafMu.Unlock()
	return d.leaf.Info().Chain
}

func (d *Disk) ReadAt(p []byte, off int64) (int, error) {
	d.mu.RLock()
	defer d.mu.RUnlock()
	return d.leaf.ReadAt(p, off)
}

func (d *Disk) WriteAt(p []byte, off int64) (int, error) {
	d.mu.RLock()
	defer d.mu.RUnlock()
	m := d.mirror
	if m == nil {
		return d.leaf.WriteAt(p, off)
	}
	end := off + int64(len(p))
	m.locks.lock(off, end)
	defer m.locks.unlock(off, end)
	n, err := d.leaf.WriteAt(p, off)
	if err == nil && m.needsMirror(off, end) {
		_, merr := m.target.WriteAt(p, off)
		m.mirrorFailed(off, merr)
	}
	return n, err
}

func (d *Disk) WriteZeroes(off, n int64, mayUnmap bool) error {
	d.mu.RLock()
	defer d.mu.RUnlock()
	m := d.mirror
	if m == nil {
		return d.leaf.WriteZeroes(off, n, mayUnmap)
	}
	m.locks.lock(off, off+n)
	defer m.locks.unlock(off, off+n)
	err := d.leaf.WriteZeroes(off, n, mayUnmap)
	if err == nil && m.needsMirror(off, off+n) {
		m.mirrorFailed(off, m.target.WriteZeroes(off, n, mayUnmap))
	}
	return err
}

// Trim discards a range. During a live merge it writes zeros to both
// layers instead, so that the range reads the same before and after the
// switch.
func (d *Disk) Trim(off, n int64) error {
	d.mu.RLock()
	if d.mirror != nil {
		d.mu.RUnlock()
		return d.WriteZeroes(off, n, true)
	}
	defer d.mu.RUnlock()
	return d.leaf.Trim(off, n)
}

// Flush makes every completed write durable: in the merge target first,
// then in the leaf, which is what a restart reads.
func (d *Disk) Flush() error {
	d.mu.RLock()
	defer d.mu.RUnlock()
	if m := d.mirror; m != nil {
		m.mirrorFailed(0, m.target.Flush())
	}
	return d.leaf.Flush()
}

func (d *Disk) Extents(off, n int64) ([]disk.Extent, error) {
	d.mu.RLock()
	defer d.mu.RUnlock()
	return d.leaf.Extents(off, n)
}

func (d *Disk) LogicalSectorSize() int  { return d.leaf.LogicalSectorSize() }
func (d *Disk) PhysicalSectorSize() int { return d.leaf.PhysicalSectorSize() }

// Close flushes and closes the chain, and a live merge's target if one
// runs (the merge is then resumed by a later StartMerge with the same G).
func (d *Disk) Close() error {
	d.mu.Lock()
	defer d.mu.Unlock()
	var errs []error
	if m := d.mirror; m != nil {
		errs = append(errs, m.target.Close())
		d.mirror = nil
	}
	errs = append(errs, d.leaf.Close())
	return errors.Join(errs...)
}

// Optimize compacts the running leaf (vhdx.Image.Optimize) while I/O goes
// on: the image holds its own locks one step at a time, and the leaf
// cannot be swapped meanwhile. It is refused during a live merge, whose
// copier reads the leaf's blocks where they are.
func (d *Disk) Optimize(opts vhdx.OptimizeOptions) (vhdx.OptimizeResult, error) {
	d.mu.RLock()
	defer d.mu.RUnlock()
	if d.mirror != nil {
		return vhdx.OptimizeResult{}, errors.New("merge: a live merge is running on this disk")
	}
	return d.leaf.Optimize(opts)
}

// setLeaf changes the leaf; the caller holds mu.
func (d *Disk) setLeaf(im *vhdx.Image) {
	d.leafMu.Lock()
	d.leaf = im
	d.leafMu.Unlock()
}

// Pause drains in-flight I/O and holds new I/O until Resume: the moment
// to change layers, and to checkpoint several disks consistently.
func (d *Disk) Pause() { d.mu.Lock() }

// Resume lets I/O held by Pause proceed.
func (d *Disk) Resume() { d.mu.Unlock() }

// SwapPaused replaces the leaf with what change returns; the caller holds
// Pause. change gets the current leaf and must leave it closed or owned by
// the new one (as CreateChild does) when it succeeds, and untouched when
// it fails.
func (d *Disk) SwapPaused(change func(leaf *vhdx.Image) (*vhdx.Image, error)) error {
	if d.mirror != nil {
		return errors.New("merge: a live merge is running on this disk")
	}
	im, err := change(d.leaf)
	if err != nil {
		return err
	}
	d.setLeaf(im)
	return nil
}

// Reparent points the leaf at parent, whose DataWriteGuid is g (the
// target its old parent was merged into), under a pause: the disk reads
// through parent from then on. It makes a Disk an OpenChild.
func (d *Disk) Reparent(parent string, g vhdx.GUID) error {
	d.Pause()
	defer d.Resume()
	if d.mirror != nil {
		return errors.New("merge: a live merge is running on this disk")
	}
	return d.leaf.Reparent(parent, g, d.opts)
}

// RefreshChain reopens the files below the leaf, under a pause: after a
// merge re-pointed one of them, so that the disk reads through the chain
// as it now is on disk (and lets go of the merged-away file).
func (d *Disk) RefreshChain() error {
	d.Pause()
	defer d.Resume()
	if d.mirror != nil {
		return errors.New("merge: a live merge is running on this disk")
	}
	return d.leaf.ReopenParent(d.opts)
}

// Checkpoint freezes the leaf and continues on a new differencing child at
// path; the caller holds Pause.
func (d *Disk) CheckpointPaused(path string) error {
	return d.SwapPaused(func(leaf *vhdx.Image) (*vhdx.Image, error) {
		return leaf.CreateChild(path, vhdx.CreateOptions{})
	})
}

// LiveMerge is a running merge of a Disk's leaf into its parent.
type LiveMerge struct {
	d      *Disk
	top    string
	target *vhdx.Image
	todo   []disk.Extent // the ranges the leaf held at the start, in order
	total  int64

	locks rangeLocks
	// next is where the copier goes on from (MaxInt64 before it starts):
	// client writes wholly after it, within a range of todo, are not
	// mirrored, since the copier reads them from the leaf later.
	next atomic.Int64

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
	m := &LiveMerge{d: d, top: leaf.Path(), target: t, redoFrom: -1}
	m.next.Store(math.MaxInt64) // no copier yet: mirror everything
	for _, e := range exts {
		if e.Depth == 0 && e.Type != disk.Hole {
			m.todo = append(m.todo, e)
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

// liveChunk is the most a copy step moves: small enough that a client
// write waiting on its range lock waits briefly.
const liveChunk = 1 << 20

// CopyStep copies the next piece of the merge at or after virtual offset
// off (step 2) and returns the offset after it and the bytes it covered;
// next is -1 when nothing is left.
func (m *LiveMerge) CopyStep(off int64, buf []byte) (next, n int64, err error) {
	// From here the copier goes forward from off: a client write wholly
	// at or after it, in a data range, is the copier's to carry.
	m.next.Store(off)
	i := m.extentAfter(off)
	if i == len(m.todo) {
		return -1, 0, nil
	}
	e := m.todo[i]
	start := max(off, e.Offset)
	n = min(e.Offset+e.Length-start, liveChunk, int64(len(buf)))
	return start + n, n, m.copy(start, buf[:n])
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

// copy carries [off, off+len(buf)) from the leaf into the target. It
// reads the leaf even where the leaf declared zeros when the merge began:
// a client may have written there since, and its data must not be zeroed
// in the target behind it. What reads as zeros is written as zeros.
func (m *LiveMerge) copy(off int64, buf []byte) error {
	d := m.d
	d.mu.RLock()
	defer d.mu.RUnlock()
	if d.mirror != m {
		return errors.New("merge: the live merge was stopped")
	}
	end := off + int64(len(buf))
	m.locks.lock(off, end)
	defer m.locks.unlock(off, end)
	if _, err := d.leaf.ReadAt(buf, off); err != nil {
		return fmt.Errorf("reading %s: %w", m.top, err)
	}
	var err error
	if disk.IsZero(buf) {
		err = m.target.WriteZeroes(off, int64(len(buf)), true)
	} else {
		_, err = m.target.WriteAt(buf, off)
	}
	if err != nil {
		return err
	}
	// Before the range's lock goes: a write waiting for it must see that
	// the copier has passed.
	m.next.Store(end)
	return nil
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
	failed := m.mirrorErr != nil
	m.errMu.Unlock()
	if failed {
		d.Resume()
		return ErrNotConverged
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

// rangeLocks serialises writes to overlapping ranges.
type rangeLocks struct {
	mu     sync.Mutex
	cond   *sync.Cond
	active []span
}

type span struct{ off, end int64 }

func (r *rangeLocks) lock(off, end int64) {
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.cond == nil {
		r.cond = sync.NewCond(&r.mu)
	}
	for r.overlaps(off, end) {
		r.cond.Wait()
	}
	r.active = append(r.active, span{off, end})
}

func (r *rangeLocks) overlaps(off, end int64) bool {
	for _, s := range r.active {
		if s.off < end && off < s.end {
			return true
		}
	}
	return false
}

func (r *rangeLocks) unlock(off, end int64) {
	r.mu.Lock()
	defer r.mu.Unlock()
	for i, s := range r.active {
		if s == (span{off, end}) {
			r.active = append(r.active[:i], r.active[i+1:]...)
			break
		}
	}
	r.cond.Broadcast()
}
