package disktest_test

import (
	"bytes"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/vhdkit/vhdkit/disk"
	"github.com/vhdkit/vhdkit/disk/disktest"
	"github.com/vhdkit/vhdkit/raw"
)

// memImage is the simplest correct image: a byte slice under a lock. What
// Flush copies to durable is what Reopen finds.
type memImage struct {
	mu      sync.RWMutex
	data    []byte
	durable []byte
	// parent, when set, makes Trim expose it in whole sectors and zero
	// partial ones, as a differencing image may.
	parent []byte
	sector int64
	closed bool
}

func newMem(size int64, sector int, parent []byte) *memImage {
	m := &memImage{data: make([]byte, size), parent: parent, sector: int64(sector)}
	if parent != nil {
		copy(m.data, parent)
	}
	m.durable = bytes.Clone(m.data)
	return m
}

func (m *memImage) check(off, n int64) error {
	if m.closed {
		return os.ErrClosed
	}
	return disk.CheckRange(off, n, int64(len(m.data)))
}

func (m *memImage) ReadAt(p []byte, off int64) (int, error) {
	m.mu.RLock()
	defer m.mu.RUnlock()
	if err := m.check(off, int64(len(p))); err != nil {
		return 0, err
	}
	return copy(p, m.data[off:]), nil
}

func (m *memImage) WriteAt(p []byte, off int64) (int, error) {
	m.mu.Lock()
	defer m.mu.Unlock()
	if err := m.check(off, int64(len(p))); err != nil {
		return 0, err
	}
	return copy(m.data[off:], p), nil
}

func (m *memImage) mem() *memImage { return m }

func (m *memImage) Size() int64 { return int64(len(m.data)) }

func (m *memImage) Flush() error {
	m.mu.Lock()
	defer m.mu.Unlock()
	copy(m.durable, m.data)
	return nil
}

func (m *memImage) Close() error {
	m.mu.Lock()
	defer m.mu.Unlock()
	if m.closed {
		return os.ErrClosed
	}
	m.closed = true
	return nil
}

func (m *memImage) Trim(off, n int64) error {
	m.mu.Lock()
	defer m.mu.Unlock()
	if err := m.check(off, n); err != nil {
		return err
	}
	clear(m.data[off : off+n])
	if m.parent != nil {
		lo := (off + m.sector - 1) / m.sector * m.sector
		hi := (off + n) / m.sector * m.sector
		if lo < hi {
			copy(m.data[lo:hi], m.parent[lo:hi])
		}
	}
	return nil
}

func (m *memImage) WriteZeroes(off, n int64, _ bool) error {
	m.mu.Lock()
	defer m.mu.Unlock()
	if err := m.check(off, n); err != nil {
		return err
	}
	clear(m.data[off : off+n])
	return nil
}

// Extents reports all-zero sectors as Zero and the others as Data.
func (m *memImage) Extents(off, n int64) ([]disk.Extent, error) {
	m.mu.RLock()
	defer m.mu.RUnlock()
	if err := m.check(off, n); err != nil {
		return nil, err
	}
	var list []disk.Extent
	for pos := off; pos < off+n; {
		end := min((pos/m.sector+1)*m.sector, off+n)
		e := disk.Extent{Offset: pos, Length: end - pos, Type: disk.Data}
		lo := pos / m.sector * m.sector
		if bytes.Count(m.data[lo:min(lo+m.sector, int64(len(m.data)))], []byte{0}) == int(min(m.sector, int64(len(m.data))-lo)) {
			e.Type = disk.Zero
		}
		list = disk.AppendExtent(list, e)
		pos = end
	}
	return list, nil
}

func memHarness(sector int, parent bool) disktest.Harness {
	return disktest.Harness{
		New: func(t *testing.T, size int64) (disk.Image, []byte) {
			var p []byte
			if parent {
				p = make([]byte, size)
				for i := range p {
					p[i] = byte(i*7 + i>>9)
				}
			}
			return newMem(size, sector, p), p
		},
		Reopen: func(t *testing.T, img disk.Image) disk.Image {
			img.Flush()
			img.Close()
			m := img.(interface{ mem() *memImage }).mem()
			n := newMem(0, int(m.sector), m.parent)
			n.data, n.durable = bytes.Clone(m.durable), bytes.Clone(m.durable)
			return n
		},
		Sector:          sector,
		TrimUnspecified: parent,
	}
}

func TestMemImage(t *testing.T) {
	for _, sector := range []int{512, 4096} {
		t.Run(fmt.Sprint(sector), func(t *testing.T) { disktest.Run(t, memHarness(sector, false)) })
	}
	t.Run("parent", func(t *testing.T) { disktest.Run(t, memHarness(512, true)) })
}

// TestOddSizes makes sure the suite itself copes with images smaller than
// its fixed cases or not a whole number of sectors.
func TestOddSizes(t *testing.T) {
	for _, size := range []int64{1, 511, 4097, 64<<10 + 7} {
		t.Run(fmt.Sprint(size), func(t *testing.T) {
			h := memHarness(512, false)
			h.Size = size
			disktest.Run(t, h)
		})
	}
}

func TestRaw(t *testing.T) {
	var mu sync.Mutex
	paths := map[disk.Image]string{}
	disktest.Run(t, disktest.Harness{
		New: func(t *testing.T, size int64) (disk.Image, []byte) {
			path := filepath.Join(t.TempDir(), "disk.img")
			img, err := raw.Create(path, size)
			if err != nil {
				t.Fatal(err)
			}
			mu.Lock()
			paths[img] = path
			mu.Unlock()
			return img, nil
		},
		Reopen: func(t *testing.T, img disk.Image) disk.Image {
			mu.Lock()
			path := paths[img]
			mu.Unlock()
			if err := img.Flush(); err != nil {
				t.Fatal(err)
			}
			if err := img.Close(); err != nil {
				t.Fatal(err)
			}
			n, err := disk.Open(path, disk.OpenOptions{})
			if err != nil {
				t.Fatal(err)
			}
			mu.Lock()
			paths[n] = path
			mu.Unlock()
			return n
		},
	})
}

// brokenImage is memImage with one bug.
type brokenImage struct {
	*memImage
	bug string
}

// bugs maps each deliberate bug to the subtest that must catch it.
var bugs = map[string]string{
	"drop-writes-across-4k":  "Unaligned",
	"no-range-check-on-read": "Bounds",
	"partial-write-at-end":   "Bounds",
	"eof-at-end":             "Fresh",
	"trim-rounds-out":        "Trim",
	"trim-garbage":           "Trim",
	"extents-gap":            "Extents",
	"extents-all-holes":      "Extents",
	"racy-read-modify-write": "Concurrent",
	"flush-loses-data":       "Reopen",
}

func (b *brokenImage) ReadAt(p []byte, off int64) (int, error) {
	switch {
	case b.bug == "no-range-check-on-read" && off >= 0:
		b.mu.RLock()
		defer b.mu.RUnlock()
		n := 0
		if off < int64(len(b.data)) {
			n = copy(p, b.data[off:])
		}
		clear(p[n:])
		return len(p), nil
	case b.bug == "eof-at-end" && len(p) > 0 && off+int64(len(p)) == b.Size():
		n, err := b.memImage.ReadAt(p, off)
		if err == nil {
			err = io.EOF // allowed by io.ReaderAt, not by disk.Image
		}
		return n, err
	}
	return b.memImage.ReadAt(p, off)
}

func (b *brokenImage) WriteAt(p []byte, off int64) (int, error) {
	switch {
	case b.bug == "drop-writes-across-4k" && len(p) > 0 && off/4096 != (off+int64(len(p))-1)/4096:
		return len(p), nil
	case b.bug == "partial-write-at-end" && off >= 0 && off < b.Size() && off+int64(len(p)) > b.Size():
		n, _ := b.memImage.WriteAt(p[:b.Size()-off], off)
		return n, disk.ErrOutOfRange
	case b.bug == "racy-read-modify-write" && len(p) > 0:
		// Sector by sector, reading and writing under separate locks:
		// no data race for the detector, but concurrent writers to one
		// sector lose bytes.
		if err := b.check(off, int64(len(p))); err != nil {
			return 0, err
		}
		S := b.sector
		for s := off / S; s*S < off+int64(len(p)); s++ {
			lo, hi := s*S, min((s+1)*S, b.Size())
			a, e := max(off, lo), min(off+int64(len(p)), hi)
			if a == lo && e == hi {
				b.memImage.WriteAt(p[a-off:e-off], a) // a whole sector
				continue
			}
			buf := make([]byte, hi-lo)
			b.memImage.ReadAt(buf, lo)
			time.Sleep(50 * time.Microsecond)
			copy(buf[a-lo:e-lo], p[a-off:e-off])
			b.memImage.WriteAt(buf, lo)
		}
		return len(p), nil
	}
	return b.memImage.WriteAt(p, off)
}

func (b *brokenImage) Trim(off, n int64) error {
	switch {
	case b.bug == "trim-rounds-out" && n > 0 && b.check(off, n) == nil:
		S := b.sector
		lo, hi := off/S*S, min((off+n+S-1)/S*S, b.Size())
		return b.memImage.Trim(lo, hi-lo)
	case b.bug == "trim-garbage" && n > 0 && b.check(off, n) == nil:
		b.memImage.Trim(off, n)
		b.mu.Lock()
		b.data[off] = 0xA5 // neither zero, nor old, nor the parent's
		b.mu.Unlock()
		return nil
	}
	return b.memImage.Trim(off, n)
}

func (b *brokenImage) Extents(off, n int64) ([]disk.Extent, error) {
	list, err := b.memImage.Extents(off, n)
	switch {
	case err != nil:
	case b.bug == "extents-gap" && len(list) > 1:
		list = list[:len(list)-1]
	case b.bug == "extents-all-holes" && len(list) > 0:
		list = []disk.Extent{{Offset: off, Length: n, Type: disk.Hole, Depth: 1}}
	}
	return list, err
}

func (b *brokenImage) Flush() error {
	if b.bug == "flush-loses-data" {
		return nil
	}
	return b.memImage.Flush()
}

func brokenHarness(bug string) disktest.Harness {
	h := memHarness(512, bug == "trim-garbage")
	newImg, reopen := h.New, h.Reopen
	h.New = func(t *testing.T, size int64) (disk.Image, []byte) {
		img, initial := newImg(t, size)
		return &brokenImage{img.(*memImage), bug}, initial
	}
	h.Reopen = func(t *testing.T, img disk.Image) disk.Image {
		return &brokenImage{reopen(t, img).(*memImage), bug}
	}
	h.Size = 1<<20 + 3*512 // small: these runs only need to fail
	return h
}

const childEnv = "DISKTEST_BROKEN_CHILD"

// TestBrokenImages runs the suite over each broken image; it only runs in
// the child process of TestSuiteCatchesBugs, where failing is the point.
func TestBrokenImages(t *testing.T) {
	if os.Getenv(childEnv) == "" {
		t.Skip("run by TestSuiteCatchesBugs in a child process")
	}
	t.Run("control", func(t *testing.T) { disktest.Run(t, brokenHarness("control")) })
	for bug := range bugs {
		t.Run(bug, func(t *testing.T) { disktest.Run(t, brokenHarness(bug)) })
	}
}

// TestSuiteCatchesBugs proves the suite fails on broken images. The suite
// takes a *testing.T, so the runs that must fail happen in a child process
// of this test binary, and their verdicts are read from its -test.v
// output.
func TestSuiteCatchesBugs(t *testing.T) {
	if os.Getenv(childEnv) != "" {
		t.Skip("in the child")
	}
	exe, err := os.Executable()
	if err != nil {
		t.Fatal(err)
	}
	cmd := exec.Command(exe, "-test.run=^TestBrokenImages$", "-test.v", "-test.count=1", "-test.timeout=5m")
	cmd.Env = append(os.Environ(), childEnv+"=1")
	out, err := cmd.CombinedOutput()
	if _, ok := err.(*exec.ExitError); !ok {
		t.Fatalf("child: %v (want it to run and fail)\n%s", err, tail(out))
	}
	verdicts := string(out)
	if !strings.Contains(verdicts, "--- PASS: TestBrokenImages/control ") {
		t.Errorf("the correct control image did not pass in the child")
	}
	for bug, sub := range bugs {
		if !strings.Contains(verdicts, fmt.Sprintf("--- FAIL: TestBrokenImages/%s/%s ", bug, sub)) {
			t.Errorf("bug %q not caught by subtest %s", bug, sub)
		}
	}
	if t.Failed() {
		t.Logf("child output:\n%s", tail(out))
	}
}

func tail(b []byte) []byte {
	return b[max(0, len(b)-8000):]
}
