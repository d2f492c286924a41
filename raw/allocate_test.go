package raw_test

import (
	"errors"
	"io/fs"
	"os"
	"path/filepath"
	"testing"

	"github.com/vhdkit/vhdkit/disk"
	"github.com/vhdkit/vhdkit/internal/testenv"
	"github.com/vhdkit/vhdkit/raw"
)

// A fixed raw disk has its blocks from the start; a sparse one gets them
// as it is written. Both read zeros.
func TestCreateAllocated(t *testing.T) {
	const size = 64 << 20
	dir := t.TempDir()
	fixed, sparse := filepath.Join(dir, "fixed.img"), filepath.Join(dir, "sparse.img")
	img, err := raw.CreateAllocated(fixed, size)
	if err != nil {
		t.Fatal(err)
	}
	if img.Size() != size {
		t.Fatalf("size %d, want %d", img.Size(), size)
	}
	buf := make([]byte, 1<<20)
	buf[0] = 1
	if _, err := img.ReadAt(buf, size-1<<20); err != nil || !disk.IsZero(buf) {
		t.Fatalf("the allocated image does not read zeros (%v)", err)
	}
	if err := img.Close(); err != nil {
		t.Fatal(err)
	}
	if got, _ := testenv.Allocated(t, fixed); got < size {
		t.Fatalf("CreateAllocated: %d of %d bytes allocated", got, size)
	}
	img, err = raw.Create(sparse, size)
	if err != nil {
		t.Fatal(err)
	}
	img.Close()
	if got, _ := testenv.Allocated(t, sparse); got > size/2 {
		t.Fatalf("Create: %d of %d bytes allocated, want a sparse file", got, size)
	}
	if _, err := raw.CreateAllocated(fixed, size); !errors.Is(err, fs.ErrExist) {
		t.Fatalf("CreateAllocated over a file: %v, want fs.ErrExist", err)
	}
	if fi, err := os.Stat(fixed); err != nil || fi.Size() != size {
		t.Fatalf("the existing file changed: %v %v", fi, err)
	}
}
