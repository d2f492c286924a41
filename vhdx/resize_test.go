package vhdx

import (
	"bytes"
	"encoding/binary"
	"errors"
	"fmt"
	"math/rand"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"

	"github.com/vhdkit/vhdkit/disk"
	"github.com/vhdkit/vhdkit/internal/testenv"
)

// Tests of Resize and of chains whose layers differ in size. A disk grown
// past the BAT's first region is over 100 GiB, so the model keeps only
// the pieces written; disks up to modelFull are still compared byte for
// byte.

const (
	pieceSize = 1 << 20
	modelFull = 64 << 20 // compare every byte up to this size
)

// diskModel is what a disk must read as: its size and, in 1 MiB pieces,
// the bytes written (an absent piece is zeros). Pieces are never changed
// in place, only replaced, so clones share them: the sweeps clone a model
// at every flush of every point.
type diskModel struct {
	size   int64
	pieces map[int64][]byte
}

func newModel(size int64, initial []byte) *diskModel {
	m := &diskModel{size: size, pieces: map[int64][]byte{}}
	m.write(initial, 0)
	return m
}

func (m *diskModel) write(p []byte, off int64) {
	for len(p) > 0 {
		k, in := off/pieceSize, off%pieceSize
		n := min(int64(len(p)), pieceSize-in)
		b := m.pieces[k]
		switch {
		case b != nil:
			b = bytes.Clone(b)
		case !disk.IsZero(p[:n]):
			b = make([]byte, pieceSize)
		}
		if b != nil {
			copy(b[in:], p[:n])
			m.pieces[k] = b
		}
		p, off = p[n:], off+n
	}
}

// read fills p from off; past the size it reads zeros.
func (m *diskModel) read(p []byte, off int64) {
	for len(p) > 0 {
		k, in := off/pieceSize, off%pieceSize
		n := min(int64(len(p)), pieceSize-in)
		if b := m.pieces[k]; b != nil {
			copy(p[:n], b[in:])
		} else {
			clear(p[:n])
		}
		p, off = p[n:], off+n
	}
}

// resize drops what lies past size, as Resize must.
func (m *diskModel) resize(size int64) {
	for k, b := range m.pieces {
		switch {
		case k*pieceSize >= size:
			delete(m.pieces, k)
		case (k+1)*pieceSize > size:
			b = bytes.Clone(b)
			clear(b[size-k*pieceSize:])
			m.pieces[k] = b
		}
	}
	m.size = size
}

func (m *diskModel) clone() *diskModel {
	c := &diskModel{size: m.size, pieces: make(map[int64][]byte, len(m.pieces))}
	for k, b := range m.pieces {
		c.pieces[k] = b
	}
	return c
}

// checkModels compares im with what it may read as: its size is one of
// the models' and every 512-byte sector equals that of one of the models
// it lies within (a crash leaves each sector flushed or newest). A disk up to modelFull is
// read whole; a larger one in every piece a model holds and at both ends
// of every extent, and no Zero or Hole extent may cover a sector that
// every model holds non-zero.
func checkModels(im *Image, ms ...*diskModel) error {
	size := im.Size()
	if !sizeOneOf(size, ms) {
		return fmt.Errorf("size %d, want one of %v", size, sizes(ms))
	}
	type span struct{ off, end int64 }
	var spans []span
	if size <= modelFull {
		spans = append(spans, span{0, size})
	} else {
		for _, m := range ms {
			for k := range m.pieces {
				if k*pieceSize < size {
					spans = append(spans, span{k * pieceSize, min((k+1)*pieceSize, size)})
				}
			}
		}
		ext, err := im.Extents(0, size)
		if err != nil {
			return err
		}
		for _, e := range ext {
			end := e.Offset + e.Length
			spans = append(spans, span{e.Offset, min(end, e.Offset+64<<10)}, span{max(e.Offset, end-64<<10), end})
			if e.Type == disk.Data {
				continue
			}
			// Only a piece a model holds can have data.
			for _, m := range ms {
				for k := range m.pieces {
					lo, hi := max(e.Offset, k*pieceSize), min(end, (k+1)*pieceSize)
					if lo >= hi {
						continue
					}
					if err := zeroInOne(lo, hi, ms); err != nil {
						return fmt.Errorf("extent %+v: %w", e, err)
					}
				}
			}
		}
	}
	got := make([]byte, pieceSize)
	want := make([]byte, pieceSize)
	for _, s := range spans {
		for off := s.off; off < s.end; {
			n := min(s.end-off, pieceSize)
			if _, err := im.ReadAt(got[:n], off); err != nil {
				return err
			}
			for sec := int64(0); sec < n; sec += 512 {
				k := min(sec+512, n)
				ok := false
				for _, m := range ms {
					if off+sec >= m.size {
						continue // not a sector of that disk
					}
					m.read(want[sec:k], off+sec)
					if bytes.Equal(got[sec:k], want[sec:k]) {
						ok = true
						break
					}
				}
				if !ok {
					return fmt.Errorf("sector at %d holds %x.., no model has it (one has %x..)", off+sec, got[sec:sec+16], want[sec:sec+16])
				}
			}
			off += n
		}
	}
	return nil
}

func sizeOneOf(size int64, ms []*diskModel) bool {
	for _, m := range ms {
		if m.size == size {
			return true
		}
	}
	return false
}

func sizes(ms []*diskModel) []int64 {
	var s []int64
	for _, m := range ms {
		s = append(s, m.size)
	}
	return s
}

// zeroInOne reports a sector of [lo, hi) that no model has zero.
func zeroInOne(lo, hi int64, ms []*diskModel) error {
	b := make([]byte, 512)
	for off := lo; off < hi; off += 512 {
		n := min(hi-off, 512)
		zero := false
		for _, m := range ms {
			if off >= m.size {
				continue
			}
			m.read(b[:n], off)
			zero = zero || disk.IsZero(b[:n])
		}
		if !zero {
			return fmt.Errorf("sector at %d reads as zeros but holds data", off)
		}
	}
	return nil
}

func mustMatch(t testing.TB, im *Image, m *diskModel, what string) {
	t.Helper()
	if err := checkModels(im, m); err != nil {
		t.Fatalf("%s: %v", what, err)
	}
}

// writeAround writes n random chunks (a fifth all zeros) at offsets near
// each of the given points, into im and m, crossing them where the disk
// allows.
func writeAround(t testing.TB, im *Image, m *diskModel, seed int64, n int, maxLen int64, points ...int64) {
	t.Helper()
	r := rand.New(rand.NewSource(seed))
	size := im.Size()
	for i := 0; i < n; i++ {
		at := points[r.Intn(len(points))] + r.Int63n(2*maxLen) - maxLen
		at = min(max(at, 0), size-1)
		if r.Intn(2) == 0 {
			at = at / 512 * 512
		}
		buf := make([]byte, min(r.Int63n(maxLen)+1, size-at))
		if r.Intn(5) != 0 {
			r.Read(buf)
		}
		if _, err := im.WriteAt(buf, at); err != nil {
			t.Fatal(err)
		}
		m.write(buf, at)
	}
}

// resizeBoth resizes im and m, checking the result.
func resizeBoth(t testing.TB, im *Image, m *diskModel, size int64) {
	t.Helper()
	old := im.Size()
	if err := im.Resize(size); err != nil {
		t.Fatalf("Resize %d -> %d: %v", old, size, err)
	}
	m.resize(size)
	if im.Size() != size || im.Info().VirtualSize != uint64(size) {
		t.Fatalf("Resize %d -> %d: Size %d, Info %d", old, size, im.Size(), im.Info().VirtualSize)
	}
	mustMatch(t, im, m, fmt.Sprintf("after Resize %d -> %d", old, size))
	checkBATShape(t, im)
}

// checkBATShape checks, right after a Resize, which committed everything,
// that the BAT in the file equals the one in memory, which has the new
// size's entry count, and that no block past the end is named in either.
func checkBATShape(t testing.TB, im *Image) {
	t.Helper()
	g := &im.geo
	if int64(len(im.bat)) != g.totalEntries {
		t.Fatalf("%d BAT entries in memory, want %d", len(im.bat), g.totalEntries)
	}
	raw := make([]byte, im.regs.BAT.Length)
	if _, err := im.f.ReadAt(raw, int64(im.regs.BAT.Offset)); err != nil {
		t.Fatal(err)
	}
	for i := int64(0); i < int64(len(raw)/8); i++ {
		e := binary.LittleEndian.Uint64(raw[8*i:])
		if i < g.totalEntries && e != im.bat[i] {
			t.Fatalf("BAT entry %d is %#x in the file, %#x in memory", i, e, im.bat[i])
		}
		isBitmap := (i+1)%(g.chunkRatio+1) == 0
		blk := i - i/(g.chunkRatio+1)
		if e != 0 && (i >= g.totalEntries || !isBitmap && blk >= g.dataBlocks) {
			t.Fatalf("BAT entry %d (%#x) names a block past the end (%d entries, %d blocks)", i, e, g.totalEntries, g.dataBlocks)
		}
	}
}

func reopen(t testing.TB, im *Image) *Image {
	t.Helper()
	path := im.Path()
	if err := im.Close(); err != nil {
		t.Fatal(err)
	}
	im, err := Open(path, OpenOptions{})
	if err != nil {
		t.Fatal(err)
	}
	return im
}

func checkClean(t testing.TB, path string) {
	t.Helper()
	if probs, err := Check(path, false); err != nil || len(probs) > 0 {
		t.Fatalf("check %s: %v %v", filepath.Base(path), probs, err)
	}
}

// newResizable makes an image of kind "dynamic", "fixed" or "diff" (a
// child of a base holding data) and returns it with its model.
func newResizable(t testing.TB, dir, kind string, size int64, block, sector uint32) (*Image, *diskModel) {
	t.Helper()
	opts := CreateOptions{Size: uint64(size), BlockSize: block, LogicalSectorSize: sector}
	path := filepath.Join(dir, "disk.vhdx")
	var initial []byte
	switch kind {
	case "fixed":
		opts.Type = Fixed
	case "diff":
		basePath := filepath.Join(dir, "base.vhdx")
		base, err := Create(basePath, CreateOptions{Size: uint64(size), BlockSize: 1 << 20, LogicalSectorSize: sector})
		if err != nil {
			t.Fatal(err)
		}
		initial = make([]byte, size)
		fillRandom(t, base, initial, 11, 12, 1<<20)
		if err := base.Close(); err != nil {
			t.Fatal(err)
		}
		path = filepath.Join(dir, "disk.avhdx")
		opts = CreateOptions{Parent: basePath, BlockSize: block}
	}
	im, err := Create(path, opts)
	if err != nil {
		t.Fatal(err)
	}
	return im, newModel(size, initial)
}

// TestResize grows and shrinks fixed, dynamic and differencing images of
// both sector sizes and several block sizes, writing around the old and
// new ends after each step and comparing every byte, also after reopening.
// The differencing child shrinks below its parent and grows again: the
// new range reads zeros, not the parent's data under it.
func TestResize(t *testing.T) {
	for _, kind := range []string{"dynamic", "fixed", "diff"} {
		for _, sector := range []uint32{512, 4096} {
			for _, block := range []uint32{1 << 20, 4 << 20, 32 << 20} {
				t.Run(fmt.Sprintf("%s-%d-%dM", kind, sector, block>>20), func(t *testing.T) {
					t.Parallel()
					ss := int64(sector)
					im, m := newResizable(t, t.TempDir(), kind, 9<<20+3*ss, block, sector)
					writeAround(t, im, m, 1, 10, 300<<10, 0, 4<<20, im.Size())
					for i, size := range []int64{
						21<<20 + 5*ss, // grow, unaligned both ends
						5<<20 + 7*ss,  // shrink, cutting a block
						5<<20 + 2*ss,  // shrink within the last block
						13 << 20,      // grow over the cut block's old bytes
						40<<20 + ss,   // grow past several blocks
						ss,            // the smallest disk
						6<<20 + 9*ss,  // and back
						6<<20 + 9*ss,  // no change
					} {
						old := im.Size()
						resizeBoth(t, im, m, size)
						writeAround(t, im, m, int64(i+2), 6, 200<<10, old, size, size/2)
						mustMatch(t, im, m, fmt.Sprintf("writes after Resize to %d", size))
						if i%2 == 1 {
							im = reopen(t, im)
							mustMatch(t, im, m, fmt.Sprintf("reopened at %d", size))
						}
					}
					path := im.Path()
					if err := im.Close(); err != nil {
						t.Fatal(err)
					}
					checkClean(t, path)
					ro := mustOpen(t, path)
					mustMatch(t, ro, m, "reopened read-only")
				})
			}
		}
	}
}

// TestResizeMovesBAT grows images with 1 MiB blocks past what their first
// BAT region holds (128 GiB at 1 MiB per block), so the BAT moves to the
// end of the file; the grown disk takes writes at its far end, shrinks,
// grows back inside the moved BAT, and every step survives a reopen.
func TestResizeMovesBAT(t *testing.T) {
	const big = 130<<30 + 7*4096
	for _, c := range []struct {
		kind   string
		sector uint32
	}{{"dynamic", 512}, {"dynamic", 4096}, {"fixed", 512}, {"diff", 512}, {"diff", 4096}} {
		t.Run(fmt.Sprintf("%s-%d", c.kind, c.sector), func(t *testing.T) {
			im, m := newResizable(t, t.TempDir(), c.kind, 1<<20+3*4096, 1<<20, c.sector)
			writeAround(t, im, m, 1, 6, 100<<10, 0, im.Size())
			batBefore := im.regs.BAT
			resizeBoth(t, im, m, big)
			if im.regs.BAT.Offset == batBefore.Offset || int64(im.regs.BAT.Length) < im.geo.totalEntries*8 {
				t.Fatalf("BAT region %+v -> %+v for %d entries", batBefore, im.regs.BAT, im.geo.totalEntries)
			}
			writeAround(t, im, m, 2, 8, 300<<10, 1<<20, 64<<30, 100<<30, big)
			mustMatch(t, im, m, "writes after the grow")
			im = reopen(t, im)
			mustMatch(t, im, m, "reopened after the grow")
			checkClean(t, im.Path())

			resizeBoth(t, im, m, 3<<20+4096)
			im = reopen(t, im)
			mustMatch(t, im, m, "reopened after the shrink")
			resizeBoth(t, im, m, 129<<30)
			writeAround(t, im, m, 3, 4, 100<<10, 3<<20, 129<<30)
			im = reopen(t, im)
			mustMatch(t, im, m, "reopened after growing back")
			path := im.Path()
			if err := im.Close(); err != nil {
				t.Fatal(err)
			}
			checkClean(t, path)
		})
	}
}

// TestResizeDifferencingChunks grows a differencing child (1 MiB blocks,
// 512-byte sectors: a sector bitmap chunk per 4 GiB) across several chunk
// boundaries, writes partial blocks in each chunk so each gets a sector
// bitmap, then past the first BAT region, and shrinks back across chunks.
func TestResizeDifferencingChunks(t *testing.T) {
	im, m := newResizable(t, t.TempDir(), "diff", 8<<20+512, 1<<20, 512)
	const chunk = 4 << 30
	writeAround(t, im, m, 1, 10, 100<<10, 0, 8<<20)
	resizeBoth(t, im, m, 2*chunk+3<<20+512*5)
	if im.geo.bitmapBlocks != 3 {
		t.Fatalf("%d chunks, want 3", im.geo.bitmapBlocks)
	}
	writeAround(t, im, m, 2, 12, 20<<10, 8<<20, chunk, 2*chunk, im.Size())
	im = reopen(t, im)
	mustMatch(t, im, m, "reopened across chunks")
	resizeBoth(t, im, m, 40*chunk) // 160 GiB: the BAT moves
	writeAround(t, im, m, 3, 12, 20<<10, 2*chunk, 33*chunk, 40*chunk)
	im = reopen(t, im)
	mustMatch(t, im, m, "reopened past the first BAT region")
	resizeBoth(t, im, m, chunk+512) // drops chunks, cuts one to a sector
	im = reopen(t, im)
	mustMatch(t, im, m, "reopened after the shrink")
	resizeBoth(t, im, m, 3*chunk)
	writeAround(t, im, m, 4, 6, 20<<10, chunk, 3*chunk)
	im = reopen(t, im)
	mustMatch(t, im, m, "reopened after growing back")
	path := im.Path()
	if err := im.Close(); err != nil {
		t.Fatal(err)
	}
	checkClean(t, path)
}

// TestResizeRefuses: a read-only or frozen image, and sizes that are not
// a positive multiple of the sector up to 64 TiB, are refused and change
// nothing.
func TestResizeRefuses(t *testing.T) {
	dir := t.TempDir()
	path := filepath.Join(dir, "r.vhdx")
	im, err := Create(path, CreateOptions{Size: 8 << 20, LogicalSectorSize: 4096})
	if err != nil {
		t.Fatal(err)
	}
	for _, size := range []int64{0, -4096, 4095, 8<<20 + 512, MaxVirtualSize + 4096} {
		if err := im.Resize(size); err == nil || im.Size() != 8<<20 {
			t.Errorf("Resize(%d): %v, size %d", size, err, im.Size())
		}
	}
	if err := im.Resize(MaxVirtualSize); err != nil {
		t.Errorf("Resize to 64 TiB: %v", err)
	}
	if err := im.Resize(4096); err != nil {
		t.Errorf("Resize to one sector: %v", err)
	}
	im.Close()
	if err := im.Resize(8 << 20); err == nil {
		t.Error("Resize of a closed image succeeded")
	}
	ro := mustOpen(t, path)
	if err := ro.Resize(8 << 20); !errors.Is(err, ErrReadOnly) {
		t.Errorf("Resize read-only: %v", err)
	}
	rw, err := Open(path, OpenOptions{})
	if err != nil {
		t.Fatal(err)
	}
	child, err := rw.CreateChild(filepath.Join(dir, "c.avhdx"), CreateOptions{})
	if err != nil {
		t.Fatal(err)
	}
	defer child.Close()
	if err := rw.Resize(8 << 20); !errors.Is(err, ErrReadOnly) {
		t.Errorf("Resize frozen: %v", err)
	}
	checkClean(t, path)
}

// checkExtents checks Extents over the whole of im against its content:
// the extents tile the disk, adjacent ones differ, Zero and Hole read as
// zeros, and a hole is as deep as the chain.
func checkExtents(t testing.TB, im *Image, want []byte) []disk.Extent {
	t.Helper()
	list, err := im.Extents(0, im.Size())
	if err != nil {
		t.Fatal(err)
	}
	pos := int64(0)
	for i, e := range list {
		switch {
		case e.Offset != pos || e.Length <= 0:
			t.Fatalf("extent %d %+v does not start at %d", i, e, pos)
		case i > 0 && list[i-1].Type == e.Type && list[i-1].Depth == e.Depth:
			t.Fatalf("extent %d %+v not merged with %+v", i, e, list[i-1])
		case e.Type == disk.Hole && e.Depth != im.Depth():
			t.Fatalf("hole %+v in a chain of %d", e, im.Depth())
		case e.Type != disk.Data && !disk.IsZero(want[e.Offset:e.Offset+e.Length]):
			t.Fatalf("extent %+v holds data", e)
		}
		pos += e.Length
	}
	if pos != im.Size() {
		t.Fatalf("extents end at %d of %d", pos, im.Size())
	}
	return list
}

// extentAt returns the extent holding off.
func extentAt(list []disk.Extent, off int64) disk.Extent {
	for _, e := range list {
		if off >= e.Offset && off < e.Offset+e.Length {
			return e
		}
	}
	return disk.Extent{}
}

// TestChainOfSizes: chains whose layers differ in size open, read, take
// writes and report extents. A middle layer re-pointed at a smaller parent
// (the same data, cut short) holds nothing past that parent's end in
// places: there the chain reads zeros and reports a hole as deep as the
// chain, while what the upper layers hold past it stays. A child grown by
// Resize holds its new range itself (ZERO); a shrunk child reads its
// parent's prefix.
func TestChainOfSizes(t *testing.T) {
	for _, sector := range []uint32{512, 4096} {
		t.Run(fmt.Sprint(sector), func(t *testing.T) {
			dir := t.TempDir()
			ss := int64(sector)
			const size = 16 << 20
			cut := 10<<20 + 3*ss // the smaller parent's end, inside a block
			held := make([]bool, size/ss)
			write := func(im *Image, model []byte, off, n int64, seed int64) {
				b := make([]byte, n)
				rand.New(rand.NewSource(seed)).Read(b)
				if _, err := im.WriteAt(b, off); err != nil {
					t.Fatal(err)
				}
				copy(model[off:], b)
				for s := off / ss; s*ss < off+n; s++ {
					held[s] = true
				}
			}

			bigPath := filepath.Join(dir, "big.vhdx")
			big, err := Create(bigPath, CreateOptions{Size: size, BlockSize: 1 << 20, LogicalSectorSize: sector})
			if err != nil {
				t.Fatal(err)
			}
			model := make([]byte, size)
			fillRandom(t, big, model, 1, 30, 1<<20)
			if err := big.Close(); err != nil {
				t.Fatal(err)
			}
			// The same data cut short, a parent the middle layer moves to.
			smallPath := filepath.Join(dir, "small.vhdx")
			small, err := Create(smallPath, CreateOptions{Size: uint64(cut), BlockSize: 1 << 20, LogicalSectorSize: sector})
			if err != nil {
				t.Fatal(err)
			}
			if _, err := small.WriteAt(model[:cut], 0); err != nil {
				t.Fatal(err)
			}
			smallGUID := small.Info().DataWriteGUID
			if err := small.Close(); err != nil {
				t.Fatal(err)
			}

			midPath := filepath.Join(dir, "mid.avhdx")
			mid, err := Create(midPath, CreateOptions{Parent: bigPath, BlockSize: 1 << 20})
			if err != nil {
				t.Fatal(err)
			}
			r := rand.New(rand.NewSource(2))
			for i := 0; i < 25; i++ {
				write(mid, model, r.Int63n(size-(200<<10)), r.Int63n(200<<10)+1, int64(i))
			}
			write(mid, model, 12<<20, 1<<20, 99) // a whole block past the cut
			if err := mid.Close(); err != nil {
				t.Fatal(err)
			}
			topPath := filepath.Join(dir, "top.avhdx")
			top, err := Create(topPath, CreateOptions{Parent: midPath, BlockSize: 2 << 20})
			if err != nil {
				t.Fatal(err)
			}
			for i := 0; i < 25; i++ {
				write(top, model, r.Int63n(size-(100<<10)), r.Int63n(100<<10)+1, int64(100+i))
			}
			if err := top.Close(); err != nil {
				t.Fatal(err)
			}

			// Re-point the middle layer; the top's link to it stays.
			mid, err = Open(midPath, OpenOptions{})
			if err != nil {
				t.Fatal(err)
			}
			if err := mid.SetParent(smallPath, smallGUID); err != nil {
				t.Fatal(err)
			}
			if err := mid.Close(); err != nil {
				t.Fatal(err)
			}
			for s := cut / ss; s < size/ss; s++ {
				if !held[s] {
					clear(model[s*ss : (s+1)*ss])
				}
			}
			top, err = Open(topPath, OpenOptions{})
			if err != nil {
				t.Fatal(err)
			}
			if top.Depth() != 3 || top.Parent().Parent().Size() != cut {
				t.Fatalf("depth %d, base %d bytes", top.Depth(), top.Parent().Parent().Size())
			}
			if got := readAll(t, top); !bytes.Equal(got, model) {
				t.Fatalf("differs at %d", firstDiff(got, model))
			}
			list := checkExtents(t, top, model)
			sawHole, sawMid := false, false
			for _, e := range list {
				sawHole = sawHole || e.Type == disk.Hole && e.Offset >= cut
				sawMid = sawMid || e.Type == disk.Data && e.Depth == 1 && e.Offset >= cut
				if e.Offset < cut && e.Offset+e.Length > cut && e.Depth == 2 {
					t.Errorf("the base's extent %+v goes past its end", e)
				}
			}
			if !sawHole || !sawMid {
				t.Errorf("past the base's end: a hole %v, the middle layer's data %v\n%+v", sawHole, sawMid, list)
			}
			if e := extentAt(list, 12<<20); e.Type != disk.Data || e.Depth != 1 {
				t.Errorf("the middle layer's block past the cut: %+v", e)
			}
			// Writes across the base's end, partial sectors completed from
			// a parent read that stops there.
			for i, w := range []struct{ off, n int64 }{{cut - 700, 1500}, {cut + 3*ss + 17, 100}, {cut - 3*ss, ss}, {15<<20 - 5, 10}} {
				write(top, model, w.off, w.n, int64(200+i))
			}
			if got := readAll(t, top); !bytes.Equal(got, model) {
				t.Fatalf("after writes: differs at %d", firstDiff(got, model))
			}
			if e := extentAt(checkExtents(t, top, model), cut-700); e.Type != disk.Data || e.Depth != 0 {
				t.Errorf("written across the base's end: %+v", e)
			}
			// Grown by Resize: the new range is the top's own zeros.
			resizeModel(t, top, &model, 20<<20+ss)
			if e := extentAt(checkExtents(t, top, model), 19<<20); e.Type != disk.Zero || e.Depth != 0 {
				t.Errorf("grown range: %+v", e)
			}
			top = reopen(t, top)
			if got := readAll(t, top); !bytes.Equal(got, model) {
				t.Fatalf("reopened: differs at %d", firstDiff(got, model))
			}
			if err := top.Close(); err != nil {
				t.Fatal(err)
			}
			checkClean(t, topPath)

			// A child smaller than its parent: the parent's prefix.
			child, err := Create(filepath.Join(dir, "child.avhdx"), CreateOptions{Parent: bigPath})
			if err != nil {
				t.Fatal(err)
			}
			prefix := bytes.Clone(readAll(t, mustOpen(t, bigPath)))
			resizeModel(t, child, &prefix, 5<<20+7*ss)
			if _, err := child.ReadAt(make([]byte, ss), 5<<20+7*ss); err == nil {
				t.Error("read past the smaller child's end")
			}
			child = reopen(t, child)
			if got := readAll(t, child); !bytes.Equal(got, prefix) {
				t.Fatalf("smaller child differs at %d", firstDiff(got, prefix))
			}
			checkExtents(t, child, prefix)
			child.Close()
		})
	}
}

// resizeModel resizes im and the flat model b.
func resizeModel(t testing.TB, im *Image, b *[]byte, size int64) {
	t.Helper()
	if err := im.Resize(size); err != nil {
		t.Fatal(err)
	}
	if size < int64(len(*b)) {
		*b = (*b)[:size]
	} else {
		*b = append(*b, make([]byte, size-int64(len(*b)))...)
	}
	if got := readAll(t, im); !bytes.Equal(got, *b) {
		t.Fatalf("after Resize to %d: differs at %d", size, firstDiff(got, *b))
	}
}

// TestResizedChainWith7zip: 7-Zip extracts a 2-level chain whose child
// was grown past its parent (whole MiB sizes, which 7-Zip needs), with
// writes across the parent's end and partial blocks past it, as we read
// it: the parent's data, then zeros where the child holds nothing; and it
// lists the chain clean once the child's BAT has moved.
func TestResizedChainWith7zip(t *testing.T) {
	testenv.Tool(t, "7zz")
	dir := t.TempDir()
	leaf, model := grownChain(t, dir)
	out := filepath.Join(dir, "x")
	run(t, "7zz", "x", "-y", "-o"+out, leaf)
	got, err := os.ReadFile(filepath.Join(out, "child.img"))
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(got, model) {
		t.Fatalf("7zz x: %d bytes, want %d; differs at %d", len(got), len(model), firstDiff(got, model))
	}
	if list := run(t, "7zz", "l", "-slt", leaf); strings.Contains(list, "ERRORS") || strings.Contains(list, "WARNINGS") {
		t.Errorf("7zz reports problems:\n%s", list)
	}
	// Grown past its BAT region (the BAT moves), the chain still lists
	// clean with its new size (extracting it would write 130 GiB).
	child, err := Open(leaf, OpenOptions{})
	if err != nil {
		t.Fatal(err)
	}
	if err := child.Resize(130 << 30); err != nil {
		t.Fatal(err)
	}
	if err := child.Close(); err != nil {
		t.Fatal(err)
	}
	list := run(t, "7zz", "l", "-slt", leaf)
	if strings.Contains(list, "ERRORS") || strings.Contains(list, "WARNINGS") || !strings.Contains(list, fmt.Sprintf("Size = %d\n", int64(130<<30))) {
		t.Errorf("7zz l -slt of the grown chain:\n%s", list)
	}
}

// grownChain makes base.vhdx (9 MiB, 1 MiB blocks, data) and child.avhdx
// grown to 24 MiB (2 MiB blocks: block 4 straddles the parent's end),
// written across the parent's end and past it, and returns the child's
// path and content.
func grownChain(t testing.TB, dir string) (string, []byte) {
	basePath := filepath.Join(dir, "base.vhdx")
	base, err := Create(basePath, CreateOptions{Size: 9 << 20, BlockSize: 1 << 20})
	if err != nil {
		t.Fatal(err)
	}
	model := make([]byte, 9<<20)
	fillRandom(t, base, model, 1, 20, 1<<20)
	if err := base.Close(); err != nil {
		t.Fatal(err)
	}
	leaf := filepath.Join(dir, "child.avhdx")
	child, err := Create(leaf, CreateOptions{Parent: basePath, BlockSize: 2 << 20})
	if err != nil {
		t.Fatal(err)
	}
	fillRandom(t, child, model, 2, 10, 100<<10)
	resizeModel(t, child, &model, 24<<20)
	for i, w := range []struct{ off, n int64 }{{9<<20 - 1000, 3000}, {8<<20 + 100, 512}, {13 << 20, 4096}, {20<<20 + 7, 1 << 20}} {
		b := bytes.Repeat([]byte{byte(0xa0 + i)}, int(w.n))
		if _, err := child.WriteAt(b, w.off); err != nil {
			t.Fatal(err)
		}
		copy(model[w.off:], b)
	}
	if err := child.Close(); err != nil {
		t.Fatal(err)
	}
	return leaf, model
}

// TestResizeQemu: qemu-img checks our resized dynamic and fixed images
// clean, reports their new virtual size, and finds them identical to a raw
// file that qemu-img resize grew or shrank the same way (zeros in the new
// range) and that took the same writes. qemu-img cannot resize a VHDX.
func TestResizeQemu(t *testing.T) {
	testenv.Tool(t, "qemu-img")
	for _, c := range []struct {
		typ   Type
		block uint32
	}{{Dynamic, 0}, {Dynamic, 1 << 20}, {Dynamic, 8 << 20}, {Fixed, 1 << 20}, {Fixed, 0}} {
		t.Run(fmt.Sprintf("%v-%d", c.typ, c.block), func(t *testing.T) {
			t.Parallel()
			dir := t.TempDir()
			path, raw := filepath.Join(dir, "d.vhdx"), filepath.Join(dir, "d.raw")
			size := int64(33<<20 + 512*7)
			im, err := Create(path, CreateOptions{Type: c.typ, Size: uint64(size), BlockSize: c.block})
			if err != nil {
				t.Fatal(err)
			}
			run(t, "qemu-img", "create", "-q", "-f", "raw", raw, fmt.Sprint(size))
			rf, err := os.OpenFile(raw, os.O_RDWR, 0)
			if err != nil {
				t.Fatal(err)
			}
			defer rf.Close()
			write := func(seed int64, points ...int64) {
				r := rand.New(rand.NewSource(seed))
				for i := 0; i < 8; i++ {
					at := min(max(points[r.Intn(len(points))]+r.Int63n(2<<20)-1<<20, 0), im.Size()-1)
					buf := make([]byte, min(r.Int63n(1<<20)+1, im.Size()-at))
					r.Read(buf)
					if _, err := im.WriteAt(buf, at); err != nil {
						t.Fatal(err)
					}
					if _, err := rf.WriteAt(buf, at); err != nil {
						t.Fatal(err)
					}
				}
			}
			write(1, 0, size)
			for i, next := range []int64{100<<20 + 512*3, 20<<20 + 512, 20<<20 + 512*9, 64 << 20} {
				if err := im.Resize(next); err != nil {
					t.Fatal(err)
				}
				args := []string{"resize", "-q", "-f", "raw"}
				if next < size {
					args = append(args, "--shrink")
				}
				run(t, "qemu-img", append(args, raw, fmt.Sprint(next))...)
				write(int64(i+2), size, next)
				size = next
				if err := im.Close(); err != nil {
					t.Fatal(err)
				}
				run(t, "qemu-img", "check", "-f", "vhdx", path)
				if info := run(t, "qemu-img", "info", "--output=json", "-f", "vhdx", path); !strings.Contains(info, fmt.Sprintf(`"virtual-size": %d,`, size)) {
					t.Fatalf("qemu-img info after resizing to %d:\n%s", size, info)
				}
				run(t, "qemu-img", "compare", "-f", "vhdx", "-F", "raw", path, raw)
				if im, err = Open(path, OpenOptions{}); err != nil {
					t.Fatal(err)
				}
			}
			im.Close()
		})
	}
}

// TestResizeQemuMovesBAT: after a grow past the first BAT region (the BAT
// moves to the end of the file), qemu-img checks the image clean and
// qemu-io reads what we wrote at both ends and zeros between. (qemu-img
// compare would read all 130 GiB.)
func TestResizeQemuMovesBAT(t *testing.T) {
	testenv.Tool(t, "qemu-img")
	testenv.Tool(t, "qemu-io")
	for _, typ := range []Type{Dynamic, Fixed} {
		t.Run(typ.String(), func(t *testing.T) {
			path := filepath.Join(t.TempDir(), "big.vhdx")
			im, err := Create(path, CreateOptions{Type: typ, Size: 1<<20 + 512, BlockSize: 1 << 20})
			if err != nil {
				t.Fatal(err)
			}
			const big = 130<<30 + 512*3
			type span struct {
				off, n int64
				pat    byte
			}
			spans := []span{{0, 1<<20 + 512, 0x11}, {64<<30 - 512, 4096, 0x22}, {big - 3<<20 - 5, 3<<20 + 5, 0x33}}
			if _, err := im.WriteAt(bytes.Repeat([]byte{spans[0].pat}, int(spans[0].n)), 0); err != nil {
				t.Fatal(err)
			}
			if err := im.Resize(big); err != nil {
				t.Fatal(err)
			}
			for _, s := range spans[1:] {
				if _, err := im.WriteAt(bytes.Repeat([]byte{s.pat}, int(s.n)), s.off); err != nil {
					t.Fatal(err)
				}
			}
			if err := im.Close(); err != nil {
				t.Fatal(err)
			}
			run(t, "qemu-img", "check", "-f", "vhdx", path)
			if info := run(t, "qemu-img", "info", "--output=json", "-f", "vhdx", path); !strings.Contains(info, fmt.Sprintf(`"virtual-size": %d,`, int64(big))) {
				t.Fatalf("qemu-img info:\n%s", info)
			}
			args := []string{"-f", "vhdx", "-r"}
			zero := []span{{1<<20 + 512, 3<<20 - 512, 0}, {64<<30 - 1<<20, 1<<20 - 512, 0}, {64<<30 + 3584, 1 << 20, 0}, {100 << 30, 4 << 20, 0}, {big - 4<<20, 1<<20 - 5, 0}}
			for _, s := range append(spans, zero...) {
				args = append(args, "-c", fmt.Sprintf("read -P %d %d %d", s.pat, s.off, s.n))
			}
			if out := run(t, "qemu-io", append(args, path)...); strings.Contains(out, "failed") {
				t.Fatalf("qemu-io:\n%s", out)
			}
		})
	}
}

// TestResizeConcurrent: writers, readers, Extents, Flush and Size run while
// another goroutine grows and shrinks the disk (staying above 4 MiB): I/O
// below 4 MiB always succeeds, I/O near the moving end fails at most with
// ErrOutOfRange, and each writer's region holds its last writes at the
// end, also after reopening.
func TestResizeConcurrent(t *testing.T) {
	for _, kind := range []string{"dynamic", "diff"} {
		t.Run(kind, func(t *testing.T) {
			im, m := newResizable(t, t.TempDir(), kind, 8<<20, 1<<20, 512)
			const writers, region = 4, 1 << 20
			regions := make([][]byte, writers)
			for w := range regions {
				regions[w] = make([]byte, region)
				m.read(regions[w], int64(w)*region)
			}
			stop := make(chan struct{})
			errs := make(chan error, 16)
			var wg sync.WaitGroup
			loop := func(seed int64, body func(r *rand.Rand) error) {
				wg.Add(1)
				go func() {
					defer wg.Done()
					r := rand.New(rand.NewSource(seed))
					for {
						select {
						case <-stop:
							return
						default:
						}
						if err := body(r); err != nil {
							errs <- err
							return
						}
					}
				}()
			}
			for w := 0; w < writers; w++ {
				loop(int64(w), func(r *rand.Rand) error {
					off := r.Int63n(region - 1)
					b := make([]byte, min(r.Int63n(64<<10)+1, region-off))
					r.Read(b)
					if _, err := im.WriteAt(b, int64(w)*region+off); err != nil {
						return err
					}
					copy(regions[w][off:], b)
					return nil
				})
			}
			outOfRange := func(err error) error {
				if err != nil && !errors.Is(err, disk.ErrOutOfRange) {
					return err
				}
				return nil
			}
			loop(10, func(r *rand.Rand) error {
				b := make([]byte, r.Int63n(256<<10)+1)
				if _, err := im.ReadAt(b, r.Int63n(4<<20-int64(len(b)))); err != nil {
					return err
				}
				_, err := im.ReadAt(b, max(im.Size()-int64(len(b))-r.Int63n(1<<20), 0))
				return outOfRange(err)
			})
			loop(11, func(r *rand.Rand) error {
				_, err := im.Extents(0, im.Size())
				if err = outOfRange(err); err == nil {
					_, err = im.WriteAt([]byte{0}, im.Size()-1)
					err = outOfRange(err)
				}
				return err
			})
			loop(12, func(r *rand.Rand) error { return im.Flush() })
			sizes := []int64{5 << 20, 200 << 30, 4<<20 + 512, 150 << 20, 9<<20 + 4096, 4<<20 + 4096, 64 << 30}
			for i := 0; i < 3*len(sizes); i++ {
				if err := im.Resize(sizes[i%len(sizes)]); err != nil {
					t.Fatal(err)
				}
			}
			close(stop)
			wg.Wait()
			close(errs)
			for err := range errs {
				t.Fatal(err)
			}
			check := func(im *Image, what string) {
				for w, want := range regions {
					got := make([]byte, region)
					if _, err := im.ReadAt(got, int64(w)*region); err != nil {
						t.Fatal(err)
					}
					if !bytes.Equal(got, want) {
						t.Fatalf("%s: region %d differs at %d", what, w, firstDiff(got, want))
					}
				}
			}
			check(im, "after the run")
			im = reopen(t, im)
			check(im, "reopened")
			path := im.Path()
			if err := im.Close(); err != nil {
				t.Fatal(err)
			}
			checkClean(t, path)
		})
	}
}

// TestResizeNoParent: a child opened without its parent (NoParent) grows
// and shrinks, since Resize reads nothing from the parent; reopened with
// its parent it reads as expected.
func TestResizeNoParent(t *testing.T) {
	dir := t.TempDir()
	im, m := newResizable(t, dir, "diff", 3<<20+512, 2<<20, 512)
	writeAround(t, im, m, 1, 6, 100<<10, 0, im.Size())
	path := im.Path()
	if err := im.Close(); err != nil {
		t.Fatal(err)
	}
	np, err := Open(path, OpenOptions{NoParent: true})
	if err != nil {
		t.Fatal(err)
	}
	for _, size := range []int64{9<<20 + 1024, 1<<20 + 512, 6 << 20} {
		if err := np.Resize(size); err != nil {
			t.Fatal(err)
		}
		m.resize(size)
	}
	if err := np.Close(); err != nil {
		t.Fatal(err)
	}
	mustMatch(t, mustOpen(t, path), m, "reopened with the parent")
	checkClean(t, path)
}
