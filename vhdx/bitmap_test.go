package vhdx

import (
	"bytes"
	"path/filepath"
	"testing"
)

// TestBitmapPagesLoadedLazily: a chunk's sector bitmap is read a page at a
// time, the pages holding the bits of the blocks looked at; a write loads
// the whole page it changes, so that logging that page keeps the bits of
// the other blocks in it (with 2 MiB blocks and 512-byte sectors, eight
// share a page).
func TestBitmapPagesLoadedLazily(t *testing.T) {
	dir := t.TempDir()
	base, err := Create(filepath.Join(dir, "base.vhdx"), CreateOptions{Size: 4 << 30, BlockSize: 2 << 20})
	if err != nil {
		t.Fatal(err)
	}
	child, err := base.CreateChild(filepath.Join(dir, "child.avhdx"), CreateOptions{})
	if err != nil {
		t.Fatal(err)
	}
	sector := func(b byte) []byte { return bytes.Repeat([]byte{b}, 512) }
	// Blocks 0 and 1 share the first bitmap page; block 1000's bits are on
	// page 125.
	const blk = 2 << 20
	writes := map[int64]byte{0: 1, blk + 512: 2, 1000 * blk: 3}
	for off, b := range writes {
		if _, err := child.WriteAt(sector(b), off); err != nil {
			t.Fatal(err)
		}
	}
	if err := child.Close(); err != nil {
		t.Fatal(err)
	}
	open := func(readOnly bool) *Image {
		t.Helper()
		im, err := Open(filepath.Join(dir, "child.avhdx"), OpenOptions{ReadOnly: readOnly})
		if err != nil {
			t.Fatal(err)
		}
		return im
	}
	loaded := func(im *Image) []int64 {
		var pages []int64
		if cb := im.bitmaps[0].Load(); cb != nil {
			for pg := int64(0); pg < bitmapBlockSize/pageSize; pg++ {
				if cb.isLoaded(pg) {
					pages = append(pages, pg)
				}
			}
		}
		return pages
	}
	check := func(im *Image, want map[int64]byte) {
		t.Helper()
		got := make([]byte, 512)
		for off, b := range want {
			if _, err := im.ReadAt(got, off); err != nil {
				t.Fatal(err)
			}
			if !bytes.Equal(got, sector(b)) {
				t.Fatalf("sector at %#x reads %d, want %d", off, got[0], b)
			}
		}
	}

	im := open(true)
	if im.geo.blockSize != blk || im.geo.sectorSize != 512 {
		t.Fatalf("blocks of %d bytes, sectors of %d: the pages named below assume 2 MiB and 512", im.geo.blockSize, im.geo.sectorSize)
	}
	check(im, map[int64]byte{0: 1})
	if got := loaded(im); len(got) != 1 || got[0] != 0 {
		t.Errorf("after reading block 0, bitmap pages %v loaded, want [0]", got)
	}
	check(im, map[int64]byte{1000 * blk: 3})
	if got := loaded(im); len(got) != 2 || got[1] != 125 {
		t.Errorf("after reading block 1000 too, bitmap pages %v loaded, want [0 125]", got)
	}
	im.Close()

	// A write to block 1 alone, in a fresh open: its page carries block
	// 0's bit, which must survive the page being logged.
	im = open(false)
	writes[blk+1024] = 4
	if _, err := im.WriteAt(sector(4), blk+1024); err != nil {
		t.Fatal(err)
	}
	if err := im.Close(); err != nil {
		t.Fatal(err)
	}
	im = open(true)
	defer im.Close()
	check(im, writes)
}
