package testenv_test

import (
	"os"
	"path/filepath"
	"testing"

	"golang.org/x/sys/unix"

	"github.com/vhdkit/vhdkit/internal/testenv"
)

// MountLoop gives a folder on a file system of the kind and size asked.
func TestMountLoop(t *testing.T) {
	mnt := testenv.MountLoop(t, 16<<20, "mkfs.ext4")
	var st unix.Statfs_t
	if err := unix.Statfs(mnt, &st); err != nil {
		t.Fatal(err)
	}
	if st.Type != unix.EXT4_SUPER_MAGIC {
		t.Fatalf("file system type %#x, want ext4's", st.Type)
	}
	if total := int64(st.Blocks) * st.Bsize; total > 16<<20 || total < 8<<20 {
		t.Fatalf("file system of %d bytes, want about 16 MiB", total)
	}
	if err := os.WriteFile(filepath.Join(mnt, "f"), []byte("x"), 0o600); err != nil {
		t.Fatal(err)
	}
}
