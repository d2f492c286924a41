package merge

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"path/filepath"
	"testing"

	"github.com/vhdkit/vhdkit/storage"
	"github.com/vhdkit/vhdkit/storage/faulttest"
	"github.com/vhdkit/vhdkit/vhdx"
)

// liveWrite is a client write of the live-merge sweep, at its phase.
type liveWrite struct {
	off  int64
	data []byte
}

// liveWrites issues writes of a sweep in order, each flushed, keeping the
// byte model.
type liveWrites struct {
	writes []liveWrite
	next   int
	model  *faulttest.Model
}

// write issues the next write and flushes it.
func (w *liveWrites) write(d *Disk) error {
	x := w.writes[w.next]
	w.next++
	w.model.Write(x.off, x.data)
	if _, err := d.WriteAt(x.data, x.off); err != nil {
		return err
	}
	if err := d.Flush(); err != nil {
		return err
	}
	w.model.Flushed()
	return nil
}

// liveRun is the operation a host performs to delete a checkpoint of a
// running disk: writes before, during and after the copy, the switch
// (commit records the leaf in a state file, as the host's state does),
// the merged file's removal, and writes on the target alone.
func liveRun(fsys *storage.MemFS, top, state string, g vhdx.GUID, w *liveWrites) error {
	d, err := OpenDisk(top, vhdx.OpenOptions{FS: fsys})
	if err != nil {
		return err
	}
	defer d.Close()
	write := func() error { return w.write(d) }
	if err := write(); err != nil {
		return err
	}
	lm, err := d.StartMerge(g)
	if err != nil {
		return err
	}
	if err := write(); err != nil {
		lm.Stop()
		return err
	}
	if _, err := lm.Run(context.Background(), Options{}); err != nil {
		lm.Stop()
		return err
	}
	if err := write(); err != nil {
		lm.Stop()
		return err
	}
	err = lm.Complete(func() error {
		return storage.WriteFileTo(fsys, state, []byte(lm.Target()), 0o600)
	})
	if err != nil {
		lm.Stop()
		return err
	}
	if err := fsys.Remove(top); err != nil {
		return err
	}
	if err := fsys.SyncDir(filepath.Dir(top)); err != nil {
		return err
	}
	return write()
}

// TestLiveMergeSweep stops a live merge (copy, mirrored writes, switch,
// removal) at every operation. After each point the files pass the strict
// check; the leaf the state file names (the top until the switch is
// recorded) reads every acknowledged write and nothing that was not
// written; and the merge, run again from there as a restarted host does
// (same DataWriteGuid), finishes with the target reading the same.
func TestLiveMergeSweep(t *testing.T) {
	dir := t.TempDir()
	paths, contents := buildChain(t, dir, 1)
	top, target := paths[1], paths[0]
	state := filepath.Join(dir, "leaf")
	g := vhdx.NewGUID()
	data := func(seed byte, n int) []byte { return bytes.Repeat([]byte{seed, seed + 1, 0xee}, n)[:n] }
	writes := []liveWrite{
		{3 << 20, data(1, 64<<10)},             // before the merge: into the leaf
		{(5 << 20) + 512, data(2, 8<<10)},      // during: mirrored into the target
		{(9 << 20) + 4096, data(3, 1<<20+512)}, // after the copy, before the switch
		{(7 << 20) - 512, data(4, 4096)},       // on the target alone
	}
	var w *liveWrites
	files := faulttest.ReadFiles(t, paths...)
	faulttest.Run(t, faulttest.Sweep{
		Files:     files,
		PowerCuts: map[bool]int{false: 1, true: 10}[faulttest.Long()],
		Start: func(fsys *storage.MemFS) (func() error, error) {
			placeholders(fsys, paths)
			w = &liveWrites{writes: writes, model: faulttest.NewModel(bytes.Clone(contents[1]), 512)}
			return func() error { return liveRun(fsys, top, state, g, w) }, nil
		},
		Check: func(fsys *storage.MemFS, p faulttest.Point) error {
			placeholders(fsys, paths)
			if err := checkVHDX(fsys); err != nil {
				return err
			}
			leaf := top
			if b, ok := fsys.Bytes(state); ok {
				leaf = string(b)
			}
			got, err := readLeaf(fsys, leaf)
			if err != nil {
				return fmt.Errorf("the leaf %s: %w", filepath.Base(leaf), err)
			}
			if err := w.model.Check(got); err != nil {
				return fmt.Errorf("the leaf %s: %w", filepath.Base(leaf), err)
			}
			// A restarted host: the switch not recorded, merge again;
			// recorded, the merged file is removed if it is still there.
			if leaf == top {
				if err := rerunLive(fsys, top, state, g); err != nil {
					return fmt.Errorf("re-running the merge: %w", err)
				}
			} else if _, err := fsys.Stat(top); err == nil {
				if err := fsys.Remove(top); err != nil {
					return err
				}
			}
			after, err := readLeaf(fsys, target)
			if err != nil {
				return fmt.Errorf("the target after the re-run: %w", err)
			}
			if !bytes.Equal(after, got) {
				return errors.New("the target after the re-run does not read what the leaf read")
			}
			return checkVHDX(fsys)
		},
	})
}

// rerunLive merges top into its parent again, as a host resuming the job.
func rerunLive(fsys *storage.MemFS, top, state string, g vhdx.GUID) error {
	d, err := OpenDisk(top, vhdx.OpenOptions{FS: fsys})
	if err != nil {
		return err
	}
	defer d.Close()
	lm, err := d.StartMerge(g)
	if err != nil {
		return err
	}
	if _, err := lm.Run(context.Background(), Options{}); err != nil {
		return err
	}
	if err := lm.Complete(func() error { return storage.WriteFileTo(fsys, state, []byte(lm.Target()), 0o600) }); err != nil {
		return err
	}
	return fsys.Remove(top)
}

// readLeaf reads the whole chain whose leaf is path.
func readLeaf(fsys *storage.MemFS, path string) ([]byte, error) {
	im, err := vhdx.Open(path, vhdx.OpenOptions{FS: fsys, ReadOnly: true})
	if err != nil {
		return nil, err
	}
	defer im.Close()
	b := make([]byte, im.Size())
	_, err = im.ReadAt(b, 0)
	return b, err
}
