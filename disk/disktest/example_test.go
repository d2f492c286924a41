package disktest_test

import (
	"path/filepath"
	"testing"

	"github.com/vhdkit/vhdkit/disk"
	"github.com/vhdkit/vhdkit/disk/disktest"
	"github.com/vhdkit/vhdkit/vhdx"
)

// The suite over differencing VHDX images whose parent holds data: the
// model starts as the parent's content, and every read through the child
// must match it as the suite writes, trims and zeroes.
//
// Run needs the *testing.T of a running test, so it is called from a test
// function in a format's _test.go file:
//
//	func TestConformance(t *testing.T) {
//		disktest.Run(t, harness)
//	}
//
// For that reason this example has no Output comment: go test compiles it
// but does not run it.
func ExampleRun() {
	harness := disktest.Harness{
		New: func(t *testing.T, size int64) (disk.Image, []byte) {
			dir := t.TempDir()
			parentPath := filepath.Join(dir, "base.vhdx")
			parent, err := vhdx.Create(parentPath, vhdx.CreateOptions{Size: uint64(size), BlockSize: 1 << 20})
			if err != nil {
				t.Fatal(err)
			}
			// A sector of data every megabyte, so that some of the
			// child's blocks are partly the parent's.
			initial := make([]byte, size)
			for off := int64(0); off+512 <= size; off += 1 << 20 {
				sector := initial[off : off+512]
				for i := range sector {
					sector[i] = byte(off>>20) + byte(i)
				}
				if _, err := parent.WriteAt(sector, off); err != nil {
					t.Fatal(err)
				}
			}
			if err := parent.Close(); err != nil {
				t.Fatal(err)
			}
			child, err := vhdx.Create(filepath.Join(dir, "base_1.avhdx"), vhdx.CreateOptions{Parent: parentPath})
			if err != nil {
				t.Fatal(err)
			}
			return child, initial
		},
		// Reopen makes the suite check that what was flushed survives a
		// close and an open.
		Reopen: func(t *testing.T, img disk.Image) disk.Image {
			path := img.(*vhdx.Image).Path()
			if err := img.Close(); err != nil {
				t.Fatal(err)
			}
			im, err := vhdx.Open(path, vhdx.OpenOptions{})
			if err != nil {
				t.Fatal(err)
			}
			return im
		},
	}

	// The body of TestConformance (above): every subtest makes its image
	// with harness.New and compares each read with the model.
	testConformance := func(t *testing.T) {
		disktest.Run(t, harness)
	}
	_ = testConformance
}
