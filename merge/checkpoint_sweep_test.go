package merge

import (
	"bytes"
	"errors"
	"fmt"
	"io/fs"
	"path/filepath"
	"testing"

	"github.com/vhdkit/vhdkit/storage"
	"github.com/vhdkit/vhdkit/storage/faulttest"
	"github.com/vhdkit/vhdkit/vhdx"
)

// checkpointRun is what a host does to checkpoint a running disk: a
// write, then under a pause the new child and the state naming it as the
// leaf, then a write on the child. When the checkpoint fails the guest
// goes on: the disk must take the write; refused records why.
func checkpointRun(fsys *storage.MemFS, leaf, child, state string, w *liveWrites, refused *error) error {
	d, err := OpenDisk(leaf, vhdx.OpenOptions{FS: fsys})
	if err != nil {
		return err
	}
	defer d.Close()
	write := func() error { return w.write(d) }
	if err := write(); err != nil {
		return err
	}
	d.Pause()
	err = d.CheckpointPaused(child)
	if err == nil {
		if err = storage.WriteFileTo(fsys, state, []byte(child), 0o600); err != nil {
			// Whether the state names the child is unknown (the rename
			// may be done and its folder sync failed): make it the old
			// state for sure, then go back to the old leaf, as the host
			// does. If even that fails, stay on the child.
			rerr := fsys.Remove(state)
			if rerr == nil || errors.Is(rerr, fs.ErrNotExist) {
				rerr = fsys.SyncDir(filepath.Dir(state))
			}
			if rerr == nil {
				d.SwapPaused(func(c *vhdx.Image) (*vhdx.Image, error) {
					c.Close()
					fsys.Remove(child)
					return vhdx.Open(leaf, vhdx.OpenOptions{FS: fsys})
				})
			}
		}
	}
	d.Resume()
	if err != nil {
		*refused = write()
		return err
	}
	return write()
}

// TestCheckpointSweep stops a checkpoint of a running disk at every
// operation. After each point: the files pass the strict check; the leaf
// the state names (the old leaf until the state names the child) reads
// every acknowledged write; a child the state does not name is an orphan
// a restarted host removes, and the checkpoint made again from there
// works. After a failed checkpoint (one I/O error, the disk working on)
// the running disk still takes writes.
func TestCheckpointSweep(t *testing.T) {
	dir := t.TempDir()
	paths, contents := buildChain(t, dir, 1)
	leaf, child := paths[1], filepath.Join(dir, "level2.avhdx")
	state := filepath.Join(dir, "leaf")
	writes := []liveWrite{
		{2 << 20, bytes.Repeat([]byte{0xa1}, 12<<10)},
		{(6 << 20) + 512, bytes.Repeat([]byte{0xb2}, 1<<20)},
	}
	var w *liveWrites
	var refused error
	all := append(paths, child)
	faulttest.Run(t, faulttest.Sweep{
		Files:     faulttest.ReadFiles(t, paths...),
		PowerCuts: map[bool]int{false: 1, true: 20}[faulttest.Long()],
		Start: func(fsys *storage.MemFS) (func() error, error) {
			placeholders(fsys, all)
			w, refused = &liveWrites{writes: writes, model: faulttest.NewModel(bytes.Clone(contents[1]), 512)}, nil
			return func() error { return checkpointRun(fsys, leaf, child, state, w, &refused) }, nil
		},
		Check: func(fsys *storage.MemFS, p faulttest.Point) error {
			if p.Mode == faulttest.IOError && refused != nil && !errors.Is(refused, storage.ErrInjected) {
				return fmt.Errorf("after the failed checkpoint the disk refused a write: %w", refused)
			}
			placeholders(fsys, all)
			if err := checkVHDX(fsys); err != nil {
				return err
			}
			current := leaf
			if b, ok := fsys.Bytes(state); ok {
				current = string(b)
			} else if _, err := fsys.Stat(child); err == nil {
				if err := fsys.Remove(child); err != nil { // the orphan
					return err
				}
				placeholders(fsys, all)
			}
			got, err := readLeaf(fsys, current)
			if err != nil {
				return fmt.Errorf("the leaf %s: %w", filepath.Base(current), err)
			}
			if err := w.model.Check(got); err != nil {
				return fmt.Errorf("the leaf %s: %w", filepath.Base(current), err)
			}
			if current == leaf {
				// The checkpoint again, as the admin retries it.
				d, err := OpenDisk(leaf, vhdx.OpenOptions{FS: fsys})
				if err != nil {
					return fmt.Errorf("reopening the disk: %w", err)
				}
				d.Pause()
				err = d.CheckpointPaused(child)
				d.Resume()
				if cerr := d.Close(); err == nil {
					err = cerr
				}
				if err != nil {
					return fmt.Errorf("checkpointing again: %w", err)
				}
				placeholders(fsys, all)
				again, err := readLeaf(fsys, child)
				if err != nil || !bytes.Equal(again, got) {
					return fmt.Errorf("the new child does not read as the leaf did (%v)", err)
				}
			}
			return checkVHDX(fsys)
		},
	})
}
