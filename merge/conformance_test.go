package merge

import (
	"context"
	"errors"
	"path/filepath"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/vhdkit/vhdkit/disk"
	"github.com/vhdkit/vhdkit/disk/disktest"
	"github.com/vhdkit/vhdkit/vhdx"
)

// mergingDisk is a running Disk, optionally with a live merge of its
// leaf under way in the background; closing it ends the merge (stopped,
// or finished and switched) before closing the disk.
type mergingDisk struct {
	*Disk
	cancel context.CancelFunc
	done   chan error
	once   sync.Once
}

func (m *mergingDisk) stopMerge() error {
	var err error
	m.once.Do(func() {
		if m.cancel != nil {
			m.cancel()
			err = <-m.done
		}
	})
	return err
}

func (m *mergingDisk) Close() error {
	return errors.Join(m.stopMerge(), m.Disk.Close())
}

// How the background merges of the suite ended, to check that the
// modes did what they say.
var mergesSwitched, mergesStopped atomic.Int64

// startMerging begins a live merge of d's leaf and runs it in the
// background, every piece followed by pause; when the copy is done it
// switches the disk to the target. It ends when the copy and switch are
// done, or at once when cancelled, the merge stopped.
func startMerging(t *testing.T, d *Disk, pause time.Duration) *mergingDisk {
	t.Helper()
	lm, err := d.StartMerge(vhdx.NewGUID())
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	md := &mergingDisk{Disk: d, cancel: cancel, done: make(chan error, 1)}
	go func() {
		_, err := lm.Run(ctx, Options{Pace: func(int64) { time.Sleep(pause) }})
		if err == nil {
			err = lm.Complete(nil)
			if err == nil {
				mergesSwitched.Add(1)
			}
		}
		if err != nil {
			lm.Stop()
		}
		if errors.Is(err, context.Canceled) {
			mergesStopped.Add(1)
			err = nil
		}
		md.done <- err
	}()
	return md
}

// TestConformance runs the shared disk suite over the running disk of a
// machine (a differencing VHDX over a parent holding data): idle, while
// a live merge of its leaf copies slowly underneath (every client write
// mirrored into the parent under range locks), and while a fast one
// finishes and switches the disk to the parent mid-suite. Every read is
// checked against the model whatever the merge is doing.
func TestConformance(t *testing.T) {
	const mib = 1 << 20
	for _, mode := range []struct {
		name  string
		pause time.Duration // -1: no merge
	}{
		{"idle", -1},
		{"merging", 200 * time.Millisecond},
		{"switching", 0},
	} {
		t.Run(mode.name, func(t *testing.T) {
			t.Parallel()
			disktest.Run(t, disktest.Harness{
				// A trim may expose the parent's data.
				TrimUnspecified: true,
				New: func(t *testing.T, size int64) (disk.Image, []byte) {
					dir := t.TempDir()
					base := filepath.Join(dir, "base.vhdx")
					b, err := vhdx.Create(base, vhdx.CreateOptions{Size: uint64(size), BlockSize: mib})
					if err != nil {
						t.Fatal(err)
					}
					// Data in the parent in every other MiB, ending
					// mid-block; the child holds its own over part.
					initial := make([]byte, size)
					for off := int64(0); off+mib <= size; off += 2 * mib {
						fill(initial[off:off+mib/2+512], 0x3c^byte(off>>20))
					}
					if _, err := b.WriteAt(initial, 0); err != nil {
						t.Fatal(err)
					}
					if err := b.Close(); err != nil {
						t.Fatal(err)
					}
					top := filepath.Join(dir, "top.avhdx")
					c, err := vhdx.Create(top, vhdx.CreateOptions{Parent: base, BlockSize: mib})
					if err != nil {
						t.Fatal(err)
					}
					for off := int64(mib / 4); off+mib <= size; off += 3 * mib {
						fill(initial[off:off+mib], 0x71^byte(off>>20))
						if _, err := c.WriteAt(initial[off:off+mib], off); err != nil {
							t.Fatal(err)
						}
					}
					if err := c.Close(); err != nil {
						t.Fatal(err)
					}
					d, err := OpenDisk(top, vhdx.OpenOptions{})
					if err != nil {
						t.Fatal(err)
					}
					if mode.pause < 0 {
						return &mergingDisk{Disk: d}, initial
					}
					return startMerging(t, d, mode.pause), initial
				},
				Reopen: func(t *testing.T, img disk.Image) disk.Image {
					md := img.(*mergingDisk)
					if err := md.stopMerge(); err != nil {
						t.Fatalf("the merge: %v", err)
					}
					leaf := md.Leaf()
					if err := md.Close(); err != nil {
						t.Fatal(err)
					}
					d, err := OpenDisk(leaf, vhdx.OpenOptions{})
					if err != nil {
						t.Fatal(err)
					}
					return &mergingDisk{Disk: d}
				},
			})
		})
	}
	t.Cleanup(func() {
		t.Logf("background merges: %d switched the disk mid-suite, %d were still copying at the subtest's end", mergesSwitched.Load(), mergesStopped.Load())
		if mergesSwitched.Load() == 0 || mergesStopped.Load() == 0 {
			t.Error("the suite ran without a switch under it, or without a merge still copying")
		}
	})
}

// fill writes a pattern of seed into p.
func fill(p []byte, seed byte) {
	for i := range p {
		p[i] = seed ^ byte(i>>9) ^ byte(i)
	}
}
