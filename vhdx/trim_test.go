package vhdx

import (
	"bytes"
	"encoding/binary"
	"fmt"
	"math/rand/v2"
	"os"
	"path/filepath"
	"slices"
	"syscall"
	"testing"

	"github.com/vhdkit/vhdkit/disk"
	"github.com/vhdkit/vhdkit/storage"
)

// fileAllocated is how much of the file at path the file system holds
// blocks for (stat's st_blocks counts 512-byte units).
func fileAllocated(t *testing.T, path string) int64 {
	t.Helper()
	var st syscall.Stat_t
	if err := syscall.Stat(path, &st); err != nil {
		t.Fatal(err)
	}
	return st.Blocks * 512
}

// TestTrimReturnsSpace: Trim and WriteZeroes(mayUnmap) of whole blocks and
// of whole MiB inside blocks give the host file's space back (stat's
// blocks shrink once the flush commits them), the released blocks are
// reused by later writes instead of growing the file, and the image stays
// valid and reads as the model: per the strict check, and qemu-img.
func TestTrimReturnsSpace(t *testing.T) {
	dir := t.TempDir()
	path := filepath.Join(dir, "t.vhdx")
	const size = 128 << 20
	im, err := Create(path, CreateOptions{Size: size, BlockSize: 16 << 20})
	if err != nil {
		t.Fatal(err)
	}
	model := make([]byte, size)
	r := rand.New(rand.NewPCG(1, 1))
	for i := range model {
		model[i] = byte(r.Uint32()) | 1
	}
	if _, err := im.WriteAt(model, 0); err != nil {
		t.Fatal(err)
	}
	if err := im.Flush(); err != nil {
		t.Fatal(err)
	}
	before := fileAllocated(t, path)
	fileSize := func() int64 {
		fi, err := os.Stat(path)
		if err != nil {
			t.Fatal(err)
		}
		return fi.Size()
	}
	grown := fileSize()
	discard := []struct {
		off, n int64
		zero   bool // WriteZeroes(mayUnmap) rather than Trim
	}{
		{32 << 20, 32 << 20, false},        // two whole blocks: UNMAPPED
		{96 << 20, 16 << 20, true},         // a whole block: ZERO
		{1 << 20, 8 << 20, false},          // 8 MiB inside block 0
		{17<<20 + 512, 6<<20 - 1024, true}, // 4 whole MiB and two partial ones inside block 1
	}
	var freed int64
	for _, d := range discard {
		if d.zero {
			err = im.WriteZeroes(d.off, d.n, true)
		} else {
			err = im.Trim(d.off, d.n)
		}
		if err != nil {
			t.Fatal(err)
		}
		clear(model[d.off : d.off+d.n])
		freed += (d.off+d.n)/(1<<20)*(1<<20) - alignUp(d.off, 1<<20)
	}
	if err := im.Flush(); err != nil {
		t.Fatal(err)
	}
	after := fileAllocated(t, path)
	t.Logf("allocated %d MiB before, %d MiB after discarding %d whole MiB", before>>20, after>>20, freed>>20)
	// The flush itself writes a log entry and metadata pages.
	if before-after < freed-1<<20 {
		t.Fatalf("allocated bytes went from %d to %d: %d freed, want about %d", before, after, before-after, freed)
	}
	// New data lands in the released blocks: the file does not grow.
	fresh := bytes.Repeat([]byte{0xEE}, 48<<20)
	if _, err := im.WriteAt(fresh[:32<<20], 32<<20); err != nil {
		t.Fatal(err)
	}
	if _, err := im.WriteAt(fresh[:1<<20], 100<<20); err != nil {
		t.Fatal(err)
	}
	copy(model[32<<20:], fresh[:32<<20])
	copy(model[100<<20:], fresh[:1<<20])
	if probs := spaceProblems(im); len(probs) > 0 {
		t.Fatal(probs)
	}
	if err := im.Close(); err != nil {
		t.Fatal(err)
	}
	if got := fileSize(); got != grown {
		t.Fatalf("file grew from %d to %d bytes: released blocks were not reused", grown, got)
	}
	wantCleanContent(t, path, model, "trimmed")
	wantQemuReads(t, path, model)
}

// TestTrimDifferencing: in a differencing image a discarded range reads as
// zeros, not the parent's data, and whole MiB inside a partially present
// block are punched.
func TestTrimDifferencing(t *testing.T) {
	dir := t.TempDir()
	parentPath := filepath.Join(dir, "p.vhdx")
	p, err := Create(parentPath, CreateOptions{Size: 32 << 20, BlockSize: 8 << 20})
	if err != nil {
		t.Fatal(err)
	}
	model := bytes.Repeat([]byte{0x11}, 32<<20)
	if _, err := p.WriteAt(model, 0); err != nil {
		t.Fatal(err)
	}
	if err := p.Close(); err != nil {
		t.Fatal(err)
	}
	path := filepath.Join(dir, "c.avhdx")
	im, err := Create(path, CreateOptions{Parent: parentPath, BlockSize: 8 << 20})
	if err != nil {
		t.Fatal(err)
	}
	// Block 0 partially present (6 MiB written), block 1 fully.
	data := bytes.Repeat([]byte{0x22}, 14<<20)
	if _, err := im.WriteAt(data, 1<<20); err != nil {
		t.Fatal(err)
	}
	copy(model[1<<20:], data)
	if err := im.Flush(); err != nil {
		t.Fatal(err)
	}
	before := fileAllocated(t, path)
	for _, d := range [][2]int64{{2 << 20, 3 << 20}, {7<<20 + 4096, 5 << 20}, {24 << 20, 8 << 20}, {512, 1024}} {
		if err := im.Trim(d[0], d[1]); err != nil {
			t.Fatal(err)
		}
		clear(model[d[0] : d[0]+d[1]])
	}
	if err := im.Flush(); err != nil {
		t.Fatal(err)
	}
	after := fileAllocated(t, path)
	t.Logf("allocated %d KiB before, %d KiB after", before>>10, after>>10)
	if before-after < 3<<20 {
		t.Fatalf("allocated bytes went from %d to %d, want at least 3 MiB freed", before, after)
	}
	if got := readAll(t, im); !bytes.Equal(got, model) {
		t.Fatalf("content differs from the model at %d", firstDiff(got, model))
	}
	if err := im.Close(); err != nil {
		t.Fatal(err)
	}
	wantCleanContent(t, path, model, "reopened")
}

// TestFreeSpaceAcrossOpens: the free-space map is rebuilt on open from the
// BAT and the regions: blocks released in one session are reused by the
// next instead of growing the file, and a stale FileOffsetMB in a ZERO
// entry (as older vhdkit wrote) is cleared by the first flush that
// allocates, its space reused only after a reopen.
func TestFreeSpaceAcrossOpens(t *testing.T) {
	dir := t.TempDir()
	path := filepath.Join(dir, "f.vhdx")
	const bs = 1 << 20
	im, err := Create(path, CreateOptions{Size: 16 * bs, BlockSize: bs})
	if err != nil {
		t.Fatal(err)
	}
	model := make([]byte, 16*bs)
	write := func(im *Image, blk int64, v byte) {
		t.Helper()
		b := bytes.Repeat([]byte{v}, bs)
		if _, err := im.WriteAt(b, blk*bs); err != nil {
			t.Fatal(err)
		}
		copy(model[blk*bs:], b)
	}
	for b := int64(0); b < 6; b++ {
		write(im, b, byte(b+1))
	}
	if err := im.Trim(2*bs, 2*bs); err != nil {
		t.Fatal(err)
	}
	clear(model[2*bs : 4*bs])
	if err := im.Close(); err != nil {
		t.Fatal(err)
	}
	fi, _ := os.Stat(path)
	grown := fi.Size()

	im, err = Open(path, OpenOptions{})
	if err != nil {
		t.Fatal(err)
	}
	write(im, 10, 0xA)
	write(im, 11, 0xB)
	if fi, _ := os.Stat(path); fi.Size() != grown {
		t.Fatalf("file grew from %d to %d: the space trimmed before the reopen was not reused", grown, fi.Size())
	}
	// An entry as older vhdkit left it: ZERO, naming block 1's old space.
	old := batOffset(im.bat[1])
	if err := im.WriteZeroes(bs, bs, true); err != nil {
		t.Fatal(err)
	}
	clear(model[bs : 2*bs])
	if err := im.Close(); err != nil {
		t.Fatal(err)
	}
	f, err := os.OpenFile(path, os.O_RDWR, 0)
	if err != nil {
		t.Fatal(err)
	}
	e := make([]byte, 8)
	binary.LittleEndian.PutUint64(e, batEntry(payloadZero, old))
	if _, err := f.WriteAt(e, newBATOffset+8); err != nil {
		t.Fatal(err)
	}
	f.Close()
	im, err = Open(path, OpenOptions{})
	if err != nil {
		t.Fatal(err)
	}
	write(im, 12, 0xC)
	if got := batOffset(im.bat[12]); got == old {
		t.Fatalf("block 12 placed at %#x, which a stale ZERO entry still names on disk", got)
	}
	if err := im.Close(); err != nil {
		t.Fatal(err)
	}
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	if probs := writerProblems(b); len(probs) > 0 {
		t.Fatal(probs)
	}
	im, err = Open(path, OpenOptions{})
	if err != nil {
		t.Fatal(err)
	}
	write(im, 13, 0xD)
	if got := batOffset(im.bat[13]); got != old {
		t.Fatalf("block 13 at %#x, not in the space %#x the cleared entry gave up", got, old)
	}
	if got := readAll(t, im); !bytes.Equal(got, model) {
		t.Fatalf("content differs from the model at %d", firstDiff(got, model))
	}
	if err := im.Close(); err != nil {
		t.Fatal(err)
	}
	// Block 12 alone grew the file.
	if fi, _ := os.Stat(path); fi.Size() != grown+bs {
		t.Fatalf("file is %d bytes, want %d", fi.Size(), grown+bs)
	}
}

// TestReleaseBeforeFirstAllocation: a block zeroed in a session that has
// not allocated yet gives its space up only once the change is durable:
// a block allocated before the flush must not land there, or a crash
// would leave the zeroed block's entry naming the new block's data.
func TestReleaseBeforeFirstAllocation(t *testing.T) {
	path := filepath.Join(t.TempDir(), "r.vhdx")
	mf := storage.NewMemFile(nil)
	im, err := CreateFile(keepOpen{mf}, path, CreateOptions{Size: 8 << 20, BlockSize: 1 << 20})
	if err != nil {
		t.Fatal(err)
	}
	old := bytes.Repeat([]byte{0xAB}, 1<<20)
	if _, err := im.WriteAt(old, 0); err != nil {
		t.Fatal(err)
	}
	if err := im.Close(); err != nil {
		t.Fatal(err)
	}
	im, err = OpenFile(keepOpen{mf}, path, OpenOptions{})
	if err != nil {
		t.Fatal(err)
	}
	if err := im.WriteZeroes(0, 1<<20, true); err != nil {
		t.Fatal(err)
	}
	if _, err := im.WriteAt(bytes.Repeat([]byte{0xCD}, 1<<20), 3<<20); err != nil {
		t.Fatal(err)
	}
	// A crash now, before any flush: block 0 reads as before or as zeros.
	ro, err := OpenFile(mf.CrashClone(rand.New(rand.NewPCG(4, 4))), path, OpenOptions{ReadOnly: true})
	if err != nil {
		t.Fatal(err)
	}
	got := make([]byte, 1<<20)
	if _, err := ro.ReadAt(got, 0); err != nil {
		t.Fatal(err)
	}
	ro.Close()
	for off := 0; off < len(got); off += 512 {
		s := got[off : off+512]
		if !bytes.Equal(s, old[:512]) && !disk.IsZero(s) {
			t.Fatalf("after a crash, block 0's sector at %d holds %x..., neither its data nor zeros", off, s[:8])
		}
	}
	im.Close()
}

// TestCrashTrimReuse stops the disk at every operation of a workload that
// releases whole blocks (WriteZeroes with unmap, and Trim), allocates
// beside the releases before their flush, reuses the released space after
// it, writes into zeroed blocks again and trims part of a block, over a
// dynamic and a differencing image, in every mode of the harness
// (checkImage after each point).
func TestCrashTrimReuse(t *testing.T) {
	const mb = 1 << 20
	block := func(seed byte) []byte {
		b := make([]byte, mb)
		for i := range b {
			b[i] = seed ^ byte(i>>9) | 1
		}
		return b
	}
	steps := []step{
		{off: 0, data: block(1)}, {off: 1 * mb, data: block(2)}, {off: 2 * mb, data: block(3)},
		{off: 3 * mb, data: block(4)}, {off: 4 * mb, data: block(5)}, {},
		{off: 1 * mb, zero: mb}, {off: 3 * mb, trim: mb}, {off: 5 * mb, data: block(6)}, {},
		{off: 6*mb + 4096, data: block(7)[:300<<10]}, {off: 0, zero: 2 * mb}, {},
		{off: 1 * mb, data: block(8)[:5000]}, {off: 3*mb + 512, data: block(9)},
		{off: 4*mb + 8192, trim: 256 << 10}, {},
		{off: 2 * mb, trim: mb}, {close: true},
	}
	dir := t.TempDir()
	basePath := filepath.Join(dir, "base.vhdx")
	base, err := Create(basePath, CreateOptions{Size: 8 * mb, BlockSize: mb})
	if err != nil {
		t.Fatal(err)
	}
	parentData := bytes.Repeat([]byte{0x5C}, 8*mb)
	if _, err := base.WriteAt(parentData, 0); err != nil {
		t.Fatal(err)
	}
	if err := base.Close(); err != nil {
		t.Fatal(err)
	}
	for _, kind := range []string{"dynamic", "differencing"} {
		t.Run(kind, func(t *testing.T) {
			path := filepath.Join(dir, kind+".vhdx")
			opts, initial := CreateOptions{Size: 8 * mb, BlockSize: mb}, newModel(8*mb, nil)
			if kind == "differencing" {
				opts, initial = CreateOptions{Parent: basePath, BlockSize: mb}, newModel(8*mb, parentData)
			}
			files := memFiles(t, []string{basePath}, func(fsys *storage.MemFS) error { return createClosed(fsys, path, opts) })
			workloadSweep(t, files, path, initial, steps)
		})
	}
}

// TestShrinkReleasesBlocks: the blocks a shrink drops serve later writes
// once the shrink is durable: growing back and writing does not grow the
// file, for a dynamic and a differencing image.
func TestShrinkReleasesBlocks(t *testing.T) {
	for _, kind := range []string{"dynamic", "differencing"} {
		t.Run(kind, func(t *testing.T) {
			dir := t.TempDir()
			const mb = 1 << 20
			opts := CreateOptions{Size: 16 * mb, BlockSize: mb}
			if kind == "differencing" {
				parent := filepath.Join(dir, "p.vhdx")
				p, err := Create(parent, opts)
				if err != nil {
					t.Fatal(err)
				}
				p.Close()
				opts = CreateOptions{Parent: parent, BlockSize: mb}
			}
			path := filepath.Join(dir, "s.vhdx")
			im, err := Create(path, opts)
			if err != nil {
				t.Fatal(err)
			}
			model := bytes.Repeat([]byte{0x42}, 16*mb)
			if _, err := im.WriteAt(model, 0); err != nil {
				t.Fatal(err)
			}
			if err := im.Flush(); err != nil {
				t.Fatal(err)
			}
			fi, _ := os.Stat(path)
			full := fi.Size()
			if err := im.Resize(4 * mb); err != nil {
				t.Fatal(err)
			}
			if err := im.Flush(); err != nil {
				t.Fatal(err)
			}
			if err := im.Resize(16 * mb); err != nil {
				t.Fatal(err)
			}
			clear(model[4*mb:])
			fresh := bytes.Repeat([]byte{0x24}, 12*mb)
			if _, err := im.WriteAt(fresh, 4*mb); err != nil {
				t.Fatal(err)
			}
			copy(model[4*mb:], fresh)
			if err := im.Close(); err != nil {
				t.Fatal(err)
			}
			if fi, _ := os.Stat(path); fi.Size() != full {
				t.Fatalf("file went from %d to %d bytes: the dropped blocks were not reused", full, fi.Size())
			}
			wantCleanContent(t, path, model, "shrunk and grown")
		})
	}
}

// spaceProblems checks the free-space map against the BAT: ranges sorted,
// disjoint, below fileEnd, and none (nor any pending one) overlapping a
// live block, the log or a region.
func spaceProblems(im *Image) []string {
	im.mu.RLock()
	defer im.mu.RUnlock()
	if !im.space.built {
		return nil
	}
	var probs []string
	type span struct {
		off, end int64
		what     string
	}
	var taken []span
	taken = append(taken, span{0, mib, "headers"}, span{im.logOff, im.logOff + im.logLen, "log"})
	for _, r := range im.regionTable {
		taken = append(taken, span{int64(r.Offset), int64(r.Offset) + int64(r.Length), "region"})
	}
	for _, b := range im.liveBlocks() {
		taken = append(taken, span{b.off, b.off + b.n, fmt.Sprintf("BAT entry %d", b.idx)})
	}
	prev := int64(0)
	for i, r := range slices.Concat(im.space.free, im.space.pending) {
		if i < len(im.space.free) {
			if r.off < prev || r.end <= r.off || r.end > im.fileEnd {
				probs = append(probs, fmt.Sprintf("free range %d [%#x, %#x) out of order or past fileEnd %#x", i, r.off, r.end, im.fileEnd))
			}
			prev = r.end
		}
		for _, s := range taken {
			if r.off < s.end && s.off < r.end {
				probs = append(probs, fmt.Sprintf("free or pending [%#x, %#x) overlaps %s [%#x, %#x)", r.off, r.end, s.what, s.off, s.end))
			}
		}
	}
	return probs
}
