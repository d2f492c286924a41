package vhdx

import (
	"fmt"
	"path/filepath"
	"testing"

	"github.com/vhdkit/vhdkit/disk"
	"github.com/vhdkit/vhdkit/disk/disktest"
)

// TestConformance runs the shared disk suite over every VHDX kind: fixed,
// dynamic, and differencing 1 to 3 levels deep over parents holding data in
// partially present blocks, with 512- and 4096-byte sectors.
func TestConformance(t *testing.T) {
	for _, sector := range []uint32{512, 4096} {
		for _, kind := range []string{"fixed", "dynamic", "diff1", "diff2", "diff3"} {
			t.Run(fmt.Sprintf("%s-%d", kind, sector), func(t *testing.T) {
				t.Parallel()
				disktest.Run(t, harness(kind, sector))
			})
		}
	}
}

func harness(kind string, sector uint32) disktest.Harness {
	levels := 0
	fmt.Sscanf(kind, "diff%d", &levels)
	return disktest.Harness{
		Sector:          int(sector),
		TrimUnspecified: false,
		New: func(t *testing.T, size int64) (disk.Image, []byte) {
			dir := t.TempDir()
			path := filepath.Join(dir, "disk.vhdx")
			opts := CreateOptions{Size: uint64(size), BlockSize: 1 << 20, LogicalSectorSize: sector}
			if kind == "fixed" {
				opts.Type = Fixed
			}
			var initial []byte
			if levels > 0 {
				leaf, model := makeChain(t, dir, uint64(size), levels-1, sector)
				initial = model
				path = filepath.Join(dir, "top.avhdx")
				opts = CreateOptions{Parent: leaf, BlockSize: 1 << 20}
			}
			im, err := Create(path, opts)
			if err != nil {
				t.Fatal(err)
			}
			return im, initial
		},
		Reopen: func(t *testing.T, img disk.Image) disk.Image {
			path := img.(*Image).Path()
			if err := img.Close(); err != nil {
				t.Fatal(err)
			}
			im, err := Open(path, OpenOptions{})
			if err != nil {
				t.Fatal(err)
			}
			return im
		},
	}
}
