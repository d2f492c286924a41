package storage

import (
	"bytes"
	"errors"
	"os"
	"os/exec"
	"path/filepath"
	"syscall"
	"testing"

	"golang.org/x/sys/unix"
)

// allocatedBytes is how much of the file at path the file system holds
// blocks for (stat's st_blocks counts 512-byte units).
func allocatedBytes(t *testing.T, path string) int64 {
	t.Helper()
	var st syscall.Stat_t
	if err := syscall.Stat(path, &st); err != nil {
		t.Fatal(err)
	}
	return st.Blocks * 512
}

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
	if got := allocatedBytes(t, path); got < size {
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

// mountLoop makes a file system of size bytes with mkfs (e.g. mkfs.ext2)
// in a file, mounts it on a fresh folder and returns the folder; it is
// unmounted when the test ends. The test is skipped where mounting is not
// allowed (not root, no loop devices); a missing mkfs fails it in CI.
func mountLoop(t *testing.T, mkfs string, size int64) string {
	t.Helper()
	if os.Geteuid() != 0 {
		t.Skip("mounting a file system needs root")
	}
	if _, err := exec.LookPath(mkfs); err != nil {
		if os.Getenv("CI") == "true" {
			t.Fatalf("%s is required in CI: %v", mkfs, err)
		}
		t.Skipf("%s not installed", mkfs)
	}
	dir := t.TempDir()
	img := filepath.Join(dir, "fs.img")
	if err := os.WriteFile(img, nil, 0o600); err != nil {
		t.Fatal(err)
	}
	if err := os.Truncate(img, size); err != nil {
		t.Fatal(err)
	}
	if out, err := exec.Command(mkfs, "-q", "-F", img).CombinedOutput(); err != nil {
		t.Fatalf("%s: %v\n%s", mkfs, err, out)
	}
	mnt := filepath.Join(dir, "mnt")
	if err := os.Mkdir(mnt, 0o700); err != nil {
		t.Fatal(err)
	}
	if out, err := exec.Command("mount", "-o", "loop", img, mnt).CombinedOutput(); err != nil {
		t.Skipf("cannot loop-mount here: %v: %s", err, out)
	}
	t.Cleanup(func() {
		if out, err := exec.Command("umount", mnt).CombinedOutput(); err != nil {
			t.Errorf("umount %s: %v: %s", mnt, err, out)
		}
	})
	return mnt
}

// ext2 files have no extents, and ext4's fallocate refuses them.
func TestAllocateUnsupported(t *testing.T) {
	mnt := mountLoop(t, "mkfs.ext2", 16<<20)
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
	mnt := mountLoop(t, "mkfs.ext4", 16<<20)
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
