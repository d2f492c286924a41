package vhdx

import (
	"errors"
	"fmt"
	"math/rand"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"

	"github.com/vhdkit/vhdkit/storage"
	"github.com/vhdkit/vhdkit/storage/faulttest"
)

// Crash and fault sweeps of writes, Create and log replay, on the one
// harness (see sweep_test.go): every point of every mode must leave an
// image that passes the strict check, opens, holds every write
// acknowledged by the last successful Flush and nothing else, and takes a
// write after reopening.

const crashSize = 6<<20 + 512*5 // a partial last block

// crashWorkload mixes allocating and in-place writes, unaligned and
// block-crossing ones, zeroing, and flushes. Within one flush window the
// writes do not overlap, so after a crash every sector holds either its
// last flushed or its newest content.
func crashWorkload(seed int64, size int64) []step {
	r := rand.New(rand.NewSource(seed))
	var steps []step
	for w := 0; w < 4; w++ {
		slots := r.Perm(int(size / (256 << 10)))
		for _, s := range slots[:5] {
			off := int64(s)*(256<<10) + r.Int63n(4096)
			n := r.Int63n(200<<10) + 1
			if w == 2 && s%2 == 0 {
				steps = append(steps, step{off: off / 512 * 512, zero: (n + 511) / 512 * 512})
				continue
			}
			b := make([]byte, n)
			r.Read(b)
			steps = append(steps, step{off: off, data: b})
		}
		steps = append(steps, step{})
	}
	// A block-crossing write, then close (flush + clean header).
	b := make([]byte, 1<<20+1000)
	r.Read(b)
	steps = append(steps, step{off: 2<<20 - 500, data: b}, step{close: true})
	return steps
}

// TestCrashDynamic sweeps the crash workload over a dynamic image, for
// both logical sector sizes, in every mode: a dead disk (as left and
// after power cuts), one failed I/O (the failed step retried must
// succeed), a full disk. Long mode sweeps ten workloads each.
func TestCrashDynamic(t *testing.T) {
	for _, sector := range []uint32{512, 4096} {
		t.Run(fmt.Sprint(sector), func(t *testing.T) {
			path := filepath.Join(t.TempDir(), "crash.vhdx")
			size := int64(crashSize / 4096 * 4096)
			files := memFiles(t, nil, func(fsys *storage.MemFS) error {
				return createClosed(fsys, path, CreateOptions{Size: uint64(size), BlockSize: 1 << 20, LogicalSectorSize: sector})
			})
			for _, seed := range faulttest.Seeds(1) {
				t.Run(fmt.Sprintf("seed%d", seed), func(t *testing.T) {
					workloadSweep(t, files, path, newModel(size, nil), crashWorkload(int64(sector)+int64(seed)<<16, size))
				})
			}
		})
	}
}

// TestCrashDifferencing sweeps the crash workload over a child whose
// parent holds data: sectors the child never wrote read the parent's.
// Long mode sweeps ten workloads.
func TestCrashDifferencing(t *testing.T) {
	dir := t.TempDir()
	basePath := filepath.Join(dir, "base.vhdx")
	base, err := Create(basePath, CreateOptions{Size: crashSize, BlockSize: 1 << 20})
	if err != nil {
		t.Fatal(err)
	}
	parentData := make([]byte, crashSize)
	fillRandom(t, base, parentData, 5, 20, 1<<20)
	if err := base.Close(); err != nil {
		t.Fatal(err)
	}
	path := filepath.Join(dir, "child.avhdx")
	files := memFiles(t, []string{basePath}, func(fsys *storage.MemFS) error {
		return createClosed(fsys, path, CreateOptions{Parent: basePath, BlockSize: 1 << 20})
	})
	for _, seed := range faulttest.Seeds(1) {
		t.Run(fmt.Sprintf("seed%d", seed), func(t *testing.T) {
			workloadSweep(t, files, path, newModel(crashSize, parentData), crashWorkload(2+int64(seed)<<16, crashSize))
		})
	}
}

// TestCrashCreate sweeps Create — the temporary file built and synced,
// renamed into place, the folder synced, the image opened — for a
// dynamic, a fixed and a differencing image: wherever it stopped, the
// name holds no file or a complete image, which checkImage accepts
// reading as new (zeros, or the parent's data); without one, Create run
// again succeeds. A process that saw the error (not a crash) leaves no
// temporary file.
func TestCrashCreate(t *testing.T) {
	dir := t.TempDir()
	const size = 8 << 20
	basePath := filepath.Join(dir, "base.vhdx")
	base, err := Create(basePath, CreateOptions{Size: size, BlockSize: 1 << 20})
	if err != nil {
		t.Fatal(err)
	}
	parentData := make([]byte, size)
	fillRandom(t, base, parentData, 6, 10, 1<<20)
	if err := base.Close(); err != nil {
		t.Fatal(err)
	}
	files := memFiles(t, []string{basePath}, func(*storage.MemFS) error { return nil })
	for _, c := range []struct {
		name string
		opts CreateOptions
		want *diskModel
	}{
		{"dynamic", CreateOptions{Size: size}, newModel(size, nil)},
		{"fixed", CreateOptions{Type: Fixed, Size: size, BlockSize: 1 << 20}, newModel(size, nil)},
		{"differencing", CreateOptions{Parent: basePath, BlockSize: 1 << 20}, newModel(size, parentData)},
	} {
		t.Run(c.name, func(t *testing.T) {
			path := filepath.Join(dir, c.name+".vhdx")
			faulttest.Run(t, faulttest.Sweep{
				Files: files,
				Start: func(fsys *storage.MemFS) (func() error, error) {
					return func() error { return createClosed(fsys, path, c.opts) }, nil
				},
				Check: func(fsys *storage.MemFS, p faulttest.Point) error {
					for _, n := range fsys.Names() {
						if p.Mode != faulttest.Crash && strings.Contains(n, ".tmp-") {
							return fmt.Errorf("the failed Create left %s", filepath.Base(n))
						}
					}
					if _, err := fsys.Stat(path); err != nil {
						if p.Err == nil {
							return errors.New("Create succeeded and the image is not there")
						}
						if err := createClosed(fsys, path, c.opts); err != nil {
							return fmt.Errorf("creating again: %w", err)
						}
					}
					_, err := checkImage(fsys, path, newExpectation(c.want))
					return err
				},
			})
		})
	}
}

// TestCrashDuringReplay sweeps the read-write open of a real Hyper-V
// image with a pending log (replayed on the file, then the log cleared)
// and its Close: wherever it stopped, the image passes the strict check
// and reads, read-only and read-write, what the log replays to, since
// replay is idempotent and the log is cleared last.
func TestCrashDuringReplay(t *testing.T) {
	dir := t.TempDir()
	path := sample(t, "hyperv/discutils-vhdx-log-replay.vhdx.gz", dir, "")
	orig, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	files := map[string][]byte{path: orig}
	want, err := replayedDigest(storage.NewMemFS(files), path, true)
	if err != nil {
		t.Fatal(err)
	}
	replaySweep(t, files, path, want)
}

// replaySweep sweeps the read-write open and Close of the image at path,
// whose log replays to content with digest want.
func replaySweep(t *testing.T, files map[string][]byte, path, want string) {
	t.Helper()
	faulttest.Run(t, faulttest.Sweep{
		Files: files,
		Start: func(fsys *storage.MemFS) (func() error, error) {
			return func() error {
				im, err := Open(path, OpenOptions{FS: fsys})
				if err != nil {
					return err
				}
				return im.Close()
			}, nil
		},
		Check: func(fsys *storage.MemFS, p faulttest.Point) error {
			if err := strictFS(fsys, path); err != nil {
				return fmt.Errorf("as found: %w", err)
			}
			for _, ro := range []bool{true, false} {
				got, err := replayedDigest(fsys, path, ro)
				if err != nil {
					return err
				}
				if got != want {
					return fmt.Errorf("read-only %v: the content differs from what the log replays to", ro)
				}
			}
			return strictFS(fsys, path)
		},
	})
}

// replayedDigest opens the image at path in fsys, read-only or not, and
// returns contentDigest of what it reads.
func replayedDigest(fsys storage.FS, path string, ro bool) (string, error) {
	im, err := Open(path, OpenOptions{FS: fsys, ReadOnly: ro})
	if err != nil {
		return "", fmt.Errorf("open (read-only %v): %w", ro, err)
	}
	d, err := contentDigest(im)
	if cerr := im.Close(); err == nil {
		err = cerr
	}
	return d, err
}

// TestCrashReplayOwnLog sweeps the replay of a log vhdkit wrote: a
// dynamic image grown past its BAT region (the BAT moved, the metadata
// rewritten) and written in several blocks, flushed and never closed, so
// the header still names the log.
func TestCrashReplayOwnLog(t *testing.T) {
	path := filepath.Join(t.TempDir(), "log.vhdx")
	files := memFiles(t, nil, func(fsys *storage.MemFS) error {
		im, err := Create(path, CreateOptions{Size: 4 << 20, BlockSize: 1 << 20, FS: fsys})
		if err != nil {
			return err
		}
		if err := im.Resize(130 << 30); err != nil {
			return err
		}
		for i, off := range []int64{0, 3<<20 + 512, 100 << 30, 130<<30 - 4096} {
			if _, err := im.WriteAt(slices.Repeat([]byte{byte(i + 1)}, 8192), min(off, 130<<30-8192)); err != nil {
				return err
			}
		}
		return im.Flush() // and not closed: the log stays to replay
	})
	b := files[path]
	var h header
	for _, off := range []int64{header1Offset, header2Offset} {
		if c, err := parseHeader(b[off:], "header", off); err == nil && c.Seq >= h.Seq {
			h = c
		}
	}
	if h.LogGUID.IsZero() {
		t.Fatal("the image has no log to replay")
	}
	want, err := replayedDigest(storage.NewMemFS(files), path, true)
	if err != nil {
		t.Fatal(err)
	}
	replaySweep(t, files, path, want)
}
