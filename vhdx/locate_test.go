package vhdx_test

import (
	"os"
	"path/filepath"
	"testing"

	"github.com/vhdkit/vhdkit/vhdx"
)

// TestLocateAcrossZeroGaps: in a partially present block, Locate carries
// a run of present sectors over the gaps after it where the chain below
// reads zeros and the child's file holds a hole, so that one file range
// (one clone) covers the runs around them; it stops at a gap the parent
// holds data in, and at one the file holds bytes in.
func TestLocateAcrossZeroGaps(t *testing.T) {
	dir := t.TempDir()
	base, err := vhdx.Create(filepath.Join(dir, "base.vhdx"), vhdx.CreateOptions{Size: 64 << 20, BlockSize: 8 << 20})
	if err != nil {
		t.Fatal(err)
	}
	page := func(b byte) []byte {
		p := make([]byte, 4096)
		for i := range p {
			p[i] = b
		}
		return p
	}
	// The parent holds data in the second block.
	if _, err := base.WriteAt(page(9), 8<<20+2*4096); err != nil {
		t.Fatal(err)
	}
	child, err := base.CreateChild(filepath.Join(dir, "child.avhdx"), vhdx.CreateOptions{})
	if err != nil {
		t.Fatal(err)
	}
	// Runs of one page with one-page gaps, at the start of both blocks.
	for _, blk := range []int64{0, 8 << 20} {
		for i := int64(0); i < 5; i++ {
			if _, err := child.WriteAt(page(byte(i+1)), blk+2*i*4096); err != nil {
				t.Fatal(err)
			}
		}
	}
	if err := child.Close(); err != nil {
		t.Fatal(err)
	}
	locate := func(off, n int64) (int64, int64) {
		t.Helper()
		im, err := vhdx.Open(filepath.Join(dir, "child.avhdx"), vhdx.OpenOptions{ReadOnly: true})
		if err != nil {
			t.Fatal(err)
		}
		defer im.Close()
		f, fileOff, m, err := im.Locate(off, n)
		if err != nil || f == nil {
			t.Fatalf("Locate(%#x, %#x): %v, %v", off, n, f, err)
		}
		return fileOff, m
	}
	// Block 0: the parent reads zeros, the file has holes: the five runs
	// and the four gaps between them are one range; not the gap after.
	fileOff, m := locate(0, 8<<20)
	if m != 9*4096 {
		t.Errorf("block 0: Locate gave %d bytes, want 9 pages", m)
	}
	if _, m := locate(0, 3*4096+100); m != 3*4096 {
		t.Errorf("block 0 cut at 3 pages and 100 bytes: Locate gave %d bytes, want 3 pages", m)
	}
	// Block 1: the parent holds it (a base's block is allocated whole):
	// the first run alone.
	if _, m := locate(8<<20, 8<<20); m != 4096 {
		t.Errorf("block 1: Locate gave %d bytes over the parent's data, want the first page", m)
	}
	// Bytes in the file's gap (a block's space reused, say): not a hole.
	f, err := os.OpenFile(filepath.Join(dir, "child.avhdx"), os.O_RDWR, 0)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := f.WriteAt(page(0x5a), fileOff+5*4096); err != nil {
		t.Fatal(err)
	}
	f.Close()
	if _, m := locate(0, 8<<20); m != 5*4096 {
		t.Errorf("block 0 with bytes in its third gap: Locate gave %d bytes, want 5 pages", m)
	}
}
