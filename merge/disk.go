package merge

import (
	"errors"
	"fmt"
	"sync"

	"github.com/vhdkit/vhdkit/disk"
	"github.com/vhdkit/vhdkit/vhdx"
)

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

// CheckpointPaused makes a new child of the leaf at path and runs on it
// (the caller holds Pause). If that fails the disk runs on its leaf,
// opened afresh: CreateChild freezes the leaf (read-only) before it
// writes the child, and a guest must not find its disk read-only because
// a checkpoint could not be made.
func (d *Disk) CheckpointPaused(path string) error {
	if d.mirror != nil {
		return errors.New("merge: a live merge is running on this disk")
	}
	child, err := d.leaf.CreateChild(path, vhdx.CreateOptions{FS: d.opts.FS})
	if err == nil {
		d.setLeaf(child)
		return nil
	}
	again, rerr := vhdx.Open(d.leaf.Path(), d.opts)
	if rerr != nil {
		return errors.Join(err, fmt.Errorf("merge: reopening %s after the failed checkpoint (the disk stays read-only): %w", d.leaf.Path(), rerr))
	}
	d.leaf.Close()
	d.setLeaf(again)
	return err
}
