package storage

import (
	"bytes"
	"errors"
	"os"
	"path/filepath"
	"testing"

	"golang.org/x/sys/unix"

	"github.com/vhdkit/vhdkit/internal/testenv"
)

func TestAllocateOSFile(t *testing.T) {
	path := filepath.Join(t.TempDir(), "f")
	f, err := OpenFile(path, os.O_RDWR|os.O_CREATE|os.O_EXCL, 0o600)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	head := bytes.Repeat([]byte{0xA5}, 4096)
	if _, err := f.WriteAt(head, 0); err != nil {
		t.Fatal(err)
	}
	const size = 64 << 20
	if err := Allocate(f, 0, size); err != nil {
		t.Fatal(err)
	}
	if n, _ := f.Size(); n != size {
		t.Fatalf("size after Allocate %d, want %d", n, size)
	}
	if got, _ := testenv.Allocated(t, path); got < size {
		t.Fatalf("%d bytes allocated of %d: the file is still sparse", got, size)
	}
	got := make([]byte, 8192)
	if _, err := f.ReadAt(got, 0); err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(got[:4096], head) || !bytes.Equal(got[4096:], make([]byte, 4096)) {
		t.Fatal("Allocate changed what the file reads")
	}
	// A range inside the file never shrinks it.
	if err := Allocate(f, 4096, 4096); err != nil {
		t.Fatal(err)
	}
	if n, _ := f.Size(); n != size {
		t.Fatalf("size after allocating inside %d, want %d", n, size)
	}
	if err := Allocate(f, -1, 10); err == nil {
		t.Fatal("negative offset accepted")
	}
}

func TestAllocateMemFileGrows(t *testing.T) {
	f := NewMemFile(nil)
	if err := Allocate(f, 0, 1<<20); err != nil {
		t.Fatal(err)
	}
	if n, _ := f.Size(); n != 1<<20 {
		t.Fatalf("size %d, want %d", n, 1<<20)
	}
	if err := Allocate(f, 0, 10); err != nil {
		t.Fatal(err)
	}
	if n, _ := f.Size(); n != 1<<20 {
		t.Fatalf("shrunk to %d", n)
	}
}

// ext2 files have no extents, and ext4's fallocate refuses them.
func TestAllocateUnsupported(t *testing.T) {
	mnt := testenv.MountLoop(t, 16<<20, "mkfs.ext2")
	path := filepath.Join(mnt, "f")
	f, err := OpenFile(path, os.O_RDWR|os.O_CREATE|os.O_EXCL, 0o600)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	err = Allocate(f, 0, 1<<20)
	if !errors.Is(err, ErrAllocateUnsupported) || !errors.Is(err, unix.EOPNOTSUPP) {
		t.Fatalf("Allocate on ext2: %v, want ErrAllocateUnsupported", err)
	}
	t.Log(err)
}

func TestAllocateNoSpace(t *testing.T) {
	mnt := testenv.MountLoop(t, 16<<20, "mkfs.ext4")
	path := filepath.Join(mnt, "f")
	f, err := OpenFile(path, os.O_RDWR|os.O_CREATE|os.O_EXCL, 0o600)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	err = Allocate(f, 0, 64<<20)
	if !errors.Is(err, unix.ENOSPC) || errors.Is(err, ErrAllocateUnsupported) {
		t.Fatalf("Allocate of 64 MiB on a 16 MiB file system: %v, want ENOSPC", err)
	}
	t.Log(err)
}
