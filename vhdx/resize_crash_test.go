package vhdx

import (
	"fmt"
	"math/rand"
	"path/filepath"
	"testing"

	"github.com/vhdkit/vhdkit/storage"
)

// Crash and fault sweeps of Resize, on the one harness as crash_test.go's
// of writes: after every point the image has the old or the new size,
// passes the strict check and holds every sector as of the last durable
// point (Flush, Resize or Close) or newer; with one failed I/O the failed
// Resize retried succeeds.

// resizeWorkload builds steps: writes (not overlapping within a flush
// window, so each sector is either durable or newest) around the given
// points, then each size in turn with writes after it, a flush, and Close.
func resizeWorkload(seed, size int64, sizes ...int64) []step {
	r := rand.New(rand.NewSource(seed))
	var steps []step
	writes := func(size int64, points ...int64) {
		var used [][2]int64
	next:
		for len(used) < 4 {
			at := min(max(points[r.Intn(len(points))]+r.Int63n(1<<20)-512<<10, 0), size-1)
			n := min(r.Int63n(300<<10)+1, size-at)
			for _, u := range used {
				if at < u[1] && u[0] < at+n {
					continue next
				}
			}
			used = append(used, [2]int64{at, at + n})
			b := make([]byte, n)
			r.Read(b)
			steps = append(steps, step{off: at, data: b})
		}
	}
	writes(size, 0, size/2, size)
	steps = append(steps, step{})
	for _, next := range sizes {
		steps = append(steps, step{resize: next})
		writes(next, 0, size, next/2, next)
		size = next
	}
	steps = append(steps, step{})
	writes(size, size/3, size)
	return append(steps, step{close: true})
}

// resizeSweep sweeps steps over the image opts makes at path (with the
// real files parents in the sweep's files), in every mode, and logs how
// many states left while a Resize was cut short had the old size and how
// many the new.
func resizeSweep(t *testing.T, path string, parents []string, opts CreateOptions, initial *diskModel, steps []step) {
	t.Helper()
	files := memFiles(t, parents, func(fsys *storage.MemFS) error { return createClosed(fsys, path, opts) })
	_, o, n := workloadSweep(t, files, path, initial, steps)
	t.Logf("states of a Resize cut short: %d with the old size, %d with the new", o, n)
}

// TestCrashResizeGrow: a dynamic image with 1 MiB blocks grows from
// 1 MiB + 3 sectors to 130 GiB, past its BAT region, so the BAT moves.
func TestCrashResizeGrow(t *testing.T) {
	for _, sector := range []uint32{512, 4096} {
		t.Run(fmt.Sprint(sector), func(t *testing.T) {
			ss := int64(sector)
			path := filepath.Join(t.TempDir(), "grow.vhdx")
			size := 1<<20 + 3*ss
			resizeSweep(t, path, nil, CreateOptions{Size: uint64(size), BlockSize: 1 << 20, LogicalSectorSize: sector},
				newModel(size, nil), resizeWorkload(int64(sector), size, 130<<30+7*4096))
		})
	}
}

// TestCrashResizeShrink: a dynamic image shrinks, dropping blocks and
// cutting one, then grows back over the cut block's old bytes.
func TestCrashResizeShrink(t *testing.T) {
	path := filepath.Join(t.TempDir(), "shrink.vhdx")
	size := int64(6<<20 + 5*512)
	resizeSweep(t, path, nil, CreateOptions{Size: uint64(size), BlockSize: 1 << 20},
		newModel(size, nil), resizeWorkload(7, size, 2<<20+3*512, 5<<20))
}

// TestCrashResizeFixed: a fixed image grows (new blocks allocated) and
// shrinks.
func TestCrashResizeFixed(t *testing.T) {
	path := filepath.Join(t.TempDir(), "fixed.vhdx")
	size := int64(3<<20 + 512)
	resizeSweep(t, path, nil, CreateOptions{Type: Fixed, Size: uint64(size), BlockSize: 1 << 20},
		newModel(size, nil), resizeWorkload(8, size, 9<<20+3*512, 2<<20+512))
}

// TestCrashResizeDifferencing: a child shrinks below its parent, then
// grows to 130 GiB (the BAT, full of ZERO entries, moves: several log
// entries before the switch); the new range never shows the parent.
func TestCrashResizeDifferencing(t *testing.T) {
	dir := t.TempDir()
	basePath := filepath.Join(dir, "base.vhdx")
	base, err := Create(basePath, CreateOptions{Size: 8 << 20, BlockSize: 1 << 20})
	if err != nil {
		t.Fatal(err)
	}
	parentData := make([]byte, 8<<20)
	fillRandom(t, base, parentData, 5, 20, 1<<20)
	if err := base.Close(); err != nil {
		t.Fatal(err)
	}
	resizeSweep(t, filepath.Join(dir, "child.avhdx"), []string{basePath}, CreateOptions{Parent: basePath, BlockSize: 1 << 20},
		newModel(8<<20, parentData), resizeWorkload(9, 8<<20, 5<<20+3*512, 130<<30))
}
