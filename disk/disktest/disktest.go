// Package disktest is the conformance suite for disk.Image implementations.
//
// Run drives an image through aligned, unaligned, random, boundary,
// trim, zeroing, allocation-map, persistence and concurrent operations and
// compares every read with a plain []byte model of what the disk must
// hold. Each subtest starts from a fresh image made by the Harness.
//
// A format's test supplies a Harness:
//
//	func TestConformance(t *testing.T) {
//		disktest.Run(t, disktest.Harness{
//			New: func(t *testing.T, size int64) (disk.Image, []byte) {
//				img, err := raw.Create(filepath.Join(t.TempDir(), "d.img"), size)
//				if err != nil {
//					t.Fatal(err)
//				}
//				return img, nil
//			},
//		})
//	}
//
// Random choices come from a seed that failing tests log; setting the
// environment variable DISKTEST_SEED to it repeats the run.
package disktest

import (
	"bytes"
	"encoding/binary"
	"math/rand/v2"
	"os"
	"strconv"
	"testing"

	"github.com/vhdkit/vhdkit/disk"
)

// Harness describes the image kind under test.
type Harness struct {
	// New makes a fresh image of size bytes and returns it with its
	// expected initial content (nil means all zeros). For a differencing
	// image the initial content is the parent's.
	New func(t *testing.T, size int64) (img disk.Image, initial []byte)
	// Reopen flushes and closes img and opens the same image again; nil
	// skips the persistence checks.
	Reopen func(t *testing.T, img disk.Image) disk.Image
	// Size is the image size; 0 means 9 MiB + 3 sectors, which is not a
	// multiple of common block sizes.
	Size int64
	// Sector is the logical sector size, which aligned cases and extent
	// boundaries use; 0 means 512.
	Sector int
	// TrimUnspecified says a trimmed byte may read as zero, its old value
	// or its initial (parent) value, as in a differencing image whose
	// trim may expose the parent. Otherwise trimmed ranges must read as
	// zeros. Either way the value must then stay put.
	TrimUnspecified bool
	// HoleDepthUnknown takes a hole's Depth of 0: an image that cannot
	// know its chain's length (an NBD client) reports holes so.
	HoleDepthUnknown bool
}

// Run runs the suite over h as subtests of t.
func Run(t *testing.T, h Harness) {
	t.Helper()
	if h.New == nil {
		t.Fatal("disktest: Harness.New is nil")
	}
	if h.Sector == 0 {
		h.Sector = 512
	}
	if h.Size == 0 {
		h.Size = 9<<20 + 3*int64(h.Sector)
	}
	if h.Sector < 1 || h.Size < 1 {
		t.Fatalf("disktest: bad Harness: Size %d, Sector %d", h.Size, h.Sector)
	}
	seed := uint64(rand.Int64())
	if s := os.Getenv("DISKTEST_SEED"); s != "" {
		v, err := strconv.ParseUint(s, 10, 64)
		if err != nil {
			t.Fatalf("disktest: DISKTEST_SEED=%q: %v", s, err)
		}
		seed = v
	}
	t.Logf("disktest seed %d (DISKTEST_SEED=%d repeats it)", seed, seed)
	for i, st := range subtests {
		t.Run(st.name, func(t *testing.T) {
			st.run(newFixture(t, &h, seed, uint64(i)))
		})
	}
}

var subtests = []struct {
	name string
	run  func(*fixture)
}{
	{"Fresh", testFresh},
	{"Aligned", testAligned},
	{"Unaligned", testUnaligned},
	{"Random", testRandom},
	{"Bounds", testBounds},
	{"ZeroLength", testZeroLength},
	{"Trim", testTrim},
	{"WriteZeroes", testWriteZeroes},
	{"Extents", testExtents},
	{"Reopen", testReopen},
	{"Concurrent", testConcurrent},
}

// fixture is one subtest's image and its model.
type fixture struct {
	t       *testing.T
	h       *Harness
	img     disk.Image
	size    int64
	sector  int64
	initial []byte // content at creation, the parent's; nil for zeros
	model   []byte // what img must read as
	// touched marks sectors written since creation: where they hold
	// non-zero bytes, the image itself (depth 0) must hold them.
	touched []bool
	rng     *rand.Rand
	bytes   *rand.ChaCha8
	// Scratch buffers, reused to spare the allocator (and the race
	// detector's shadow memory) megabytes per operation.
	rbuf, wbuf []byte
}

// scratch returns (*buf)[:n], growing it when needed.
func scratch(buf *[]byte, n int64) []byte {
	if int64(cap(*buf)) < n {
		*buf = make([]byte, n)
	}
	return (*buf)[:n]
}

func newFixture(t *testing.T, h *Harness, seed, salt uint64) *fixture {
	t.Helper()
	img, initial := h.New(t, h.Size)
	if img == nil {
		t.Fatal("Harness.New returned a nil image")
	}
	fx := &fixture{t: t, h: h, img: img, size: h.Size, sector: int64(h.Sector)}
	t.Cleanup(func() {
		if err := fx.img.Close(); err != nil {
			t.Errorf("Close: %v", err)
		}
	})
	if got := img.Size(); got != h.Size {
		t.Fatalf("Size() = %d, want %d", got, h.Size)
	}
	switch {
	case initial == nil:
		fx.model = make([]byte, h.Size)
	case int64(len(initial)) != h.Size:
		t.Fatalf("Harness.New returned %d bytes of initial content for a %d-byte image", len(initial), h.Size)
	default:
		fx.initial = initial
		fx.model = bytes.Clone(initial)
	}
	fx.touched = make([]bool, (h.Size+fx.sector-1)/fx.sector)
	var key [32]byte
	binary.LittleEndian.PutUint64(key[0:], seed)
	binary.LittleEndian.PutUint64(key[8:], salt)
	fx.rng = rand.New(rand.NewPCG(seed, salt))
	fx.bytes = rand.NewChaCha8(key)
	return fx
}

// fill returns n random bytes, valid until the next call.
func (fx *fixture) fill(n int64) []byte {
	p := scratch(&fx.wbuf, n)
	fx.bytes.Read(p)
	return p
}

// clamp cuts [off, off+n) to the image, returning ok false when nothing
// is left.
func (fx *fixture) clamp(off, n int64) (int64, int64, bool) {
	lo, hi := max(off, 0), min(off+n, fx.size)
	return lo, hi - lo, hi > lo
}

// write writes n random bytes at off and updates the model.
func (fx *fixture) write(off, n int64, what string) {
	fx.t.Helper()
	fx.writeBuf(off, fx.fill(n), what)
}

func (fx *fixture) writeBuf(off int64, p []byte, what string) {
	fx.t.Helper()
	n, err := fx.img.WriteAt(p, off)
	if n != len(p) || err != nil {
		fx.t.Fatalf("%s: WriteAt(%d bytes at %d) = %d, %v; want %d, nil", what, len(p), off, n, err, len(p))
	}
	copy(fx.model[off:], p)
	for s := off / fx.sector; s*fx.sector < off+int64(len(p)); s++ {
		fx.touched[s] = true
	}
}

// check reads [off, off+n) and compares it with the model.
func (fx *fixture) check(off, n int64, what string) {
	fx.t.Helper()
	p := scratch(&fx.rbuf, n)
	got, err := fx.img.ReadAt(p, off)
	if got != len(p) || err != nil {
		fx.t.Fatalf("%s: ReadAt(%d bytes at %d) = %d, %v; want %d, nil", what, n, off, got, err, n)
	}
	if i := firstDiff(p, fx.model[off:off+n]); i >= 0 {
		fx.t.Fatalf("%s: ReadAt(%d bytes at %d): byte at %d reads %#02x, want %#02x (%d of %d bytes differ)",
			what, n, off, off+int64(i), p[i], fx.model[off+int64(i)], countDiff(p, fx.model[off:off+n]), n)
	}
}

// checkAround checks [off, off+n) and a few sectors either side, where a
// misplaced write would land.
func (fx *fixture) checkAround(off, n int64, what string) {
	fx.t.Helper()
	if lo, n, ok := fx.clamp(off-2*fx.sector-1, n+4*fx.sector+2); ok {
		fx.check(lo, n, what)
	}
}

// checkAll compares the whole image with the model.
func (fx *fixture) checkAll(what string) {
	fx.t.Helper()
	const chunk = 1 << 20
	for off := int64(0); off < fx.size; off += chunk {
		fx.check(off, min(chunk, fx.size-off), what)
	}
}

// trim trims [off, off+n) and checks the result.
func (fx *fixture) trim(tr disk.Trimmer, off, n int64, what string) {
	fx.t.Helper()
	if err := tr.Trim(off, n); err != nil {
		fx.t.Fatalf("%s: Trim(%d, %d): %v", what, off, n, err)
	}
	if fx.h.TrimUnspecified {
		fx.adopt(off, n, what)
	} else {
		clear(fx.model[off : off+n])
	}
	fx.untouch(off, n)
	fx.checkAround(off, n, what)
}

// adopt takes what a trimmed range reads as into the model after checking
// each byte is zero, its old value or its initial value.
func (fx *fixture) adopt(off, n int64, what string) {
	fx.t.Helper()
	p := scratch(&fx.rbuf, n)
	if got, err := fx.img.ReadAt(p, off); got != len(p) || err != nil {
		fx.t.Fatalf("%s: ReadAt(%d bytes at %d) after Trim = %d, %v", what, n, off, got, err)
	}
	old := fx.model[off : off+n]
	var initial []byte // nil: zeros
	if fx.initial != nil {
		initial = fx.initial[off : off+n]
	}
	at := func(k int64) byte {
		if initial == nil {
			return 0
		}
		return initial[k]
	}
	for i := int64(0); i < n; i += fx.sector {
		j := min(i+fx.sector, n)
		s := p[i:j]
		if disk.IsZero(s) || bytes.Equal(s, old[i:j]) || initial != nil && bytes.Equal(s, initial[i:j]) {
			continue
		}
		for k := i; k < j; k++ { // a mix within the sector: check each byte
			if p[k] != 0 && p[k] != old[k] && p[k] != at(k) {
				fx.t.Fatalf("%s: after Trim(%d, %d), byte at %d reads %#02x: not zero, old %#02x or initial %#02x",
					what, off, n, off+k, p[k], old[k], at(k))
			}
		}
	}
	copy(old, p)
}

// zero runs WriteZeroes on [off, off+n) and checks the result.
func (fx *fixture) zero(z disk.Zeroer, off, n int64, unmap bool, what string) {
	fx.t.Helper()
	if err := z.WriteZeroes(off, n, unmap); err != nil {
		fx.t.Fatalf("%s: WriteZeroes(%d, %d, %v): %v", what, off, n, unmap, err)
	}
	clear(fx.model[off : off+n])
	fx.untouch(off, n)
	fx.checkAround(off, n, what)
}

// untouch forgets the writes to sectors wholly inside [off, off+n).
func (fx *fixture) untouch(off, n int64) {
	for s := (off + fx.sector - 1) / fx.sector; (s+1)*fx.sector <= off+n; s++ {
		fx.touched[s] = false
	}
}

func (fx *fixture) flush(what string) {
	fx.t.Helper()
	if err := fx.img.Flush(); err != nil {
		fx.t.Fatalf("%s: Flush: %v", what, err)
	}
}

// firstDiff returns the index of the first byte where a and b (of equal
// length) differ, or -1.
func firstDiff(a, b []byte) int {
	const chunk = 4096
	for i := 0; i < len(a); i += chunk {
		j := min(i+chunk, len(a))
		if bytes.Equal(a[i:j], b[i:j]) {
			continue
		}
		for k := i; k < j; k++ {
			if a[k] != b[k] {
				return k
			}
		}
	}
	return -1
}

func countDiff(a, b []byte) int {
	n := 0
	for i := range a {
		if a[i] != b[i] {
			n++
		}
	}
	return n
}
