// Package testenv gives tests the real tools and file systems they check
// against: a tool that is missing skips the test, except in CI
// (CI set, as .ci/run sets CI=true), where it fails it, so that CI never passes by skipping.
package testenv

import (
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"testing"

	"golang.org/x/sys/unix"
)

// Tool returns the path of the program name, skipping the test when it is
// not installed (failing it in CI).
func Tool(t testing.TB, name string) string {
	t.Helper()
	p, err := exec.LookPath(name)
	if err != nil {
		if os.Getenv("CI") != "" {
			t.Fatalf("%s is required in CI: %v", name, err)
		}
		t.Skipf("%s not installed", name)
	}
	return p
}

// MountLoop makes a file system of size bytes with mkfs (mkfs.ext2,
// mkfs.ext4, mkfs.xfs, mkfs.btrfs; extra mkfs arguments after it, such as
// "-m", "reflink=1") in a file, mounts it on a fresh folder and returns the
// folder, unmounted when the test ends. The test is skipped where mounting
// is not allowed (not root, no loop devices): that is a privilege, not a
// missing tool. A missing mkfs fails it in CI.
func MountLoop(t testing.TB, size int64, mkfs string, args ...string) string {
	t.Helper()
	if os.Geteuid() != 0 {
		t.Skip("mounting a file system needs root")
	}
	mkfs = Tool(t, mkfs)
	dir := t.TempDir()
	img := filepath.Join(dir, "fs.img")
	if err := os.WriteFile(img, nil, 0o600); err != nil {
		t.Fatal(err)
	}
	if err := os.Truncate(img, size); err != nil {
		t.Fatal(err)
	}
	force := "-f" // mkfs.xfs, mkfs.btrfs
	if strings.HasPrefix(filepath.Base(mkfs), "mkfs.ext") {
		force = "-F"
	}
	cmd := exec.Command(mkfs, append(append([]string{"-q", force}, args...), img)...)
	if out, err := cmd.CombinedOutput(); err != nil {
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

// Allocated returns how many bytes of the file at path the file system
// holds blocks for (st_blocks, in 512-byte units), and the file's size.
func Allocated(t testing.TB, path string) (allocated, size int64) {
	t.Helper()
	var st unix.Stat_t
	if err := unix.Stat(path, &st); err != nil {
		t.Fatal(err)
	}
	return st.Blocks * 512, st.Size
}

// SharedBytes sums the extents of the file at path that filefrag -v
// (FIEMAP) flags shared with another file: what a clone left in common.
func SharedBytes(t testing.TB, path string) int64 {
	t.Helper()
	filefrag := Tool(t, "filefrag")
	out, err := exec.Command(filefrag, "-v", "-b4096", path).CombinedOutput()
	if err != nil {
		t.Fatalf("filefrag -v %s: %v\n%s", path, err, out)
	}
	var shared int64
	for _, line := range strings.Split(string(out), "\n") {
		// "   0:        0..     255:      24832..     25087:    256:             shared"
		f := strings.Split(line, ":")
		if len(f) < 5 || !strings.Contains(f[len(f)-1], "shared") {
			continue
		}
		n, err := strconv.ParseInt(strings.TrimSpace(f[3]), 10, 64)
		if err != nil {
			t.Fatalf("filefrag line %q: %v", line, err)
		}
		shared += n * 4096
	}
	return shared
}
