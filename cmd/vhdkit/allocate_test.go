package main

import (
	"context"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	"github.com/vhdkit/vhdkit/internal/testenv"
)

// vhdkit runs the command line in this process and returns its exit
// status and stderr.
func vhdkit(args ...string) (code int, stderr string) {
	var out, errOut strings.Builder
	code = run(context.Background(), args, &out, &errOut)
	return code, errOut.String()
}

// Fixed disks made by create and convert --type fixed (and raw files made
// by create) have all their space allocated; with --sparse, and a raw
// convert without --type fixed, they are sparse. All read what they should
// in qemu-img.
func TestFixedAllocated(t *testing.T) {
	if _, err := exec.LookPath("qemu-img"); err != nil {
		if os.Getenv("CI") == "true" {
			t.Fatal("qemu-img is required in CI")
		}
		t.Skip("qemu-img not installed")
	}
	const size = 64 << 20
	dir := t.TempDir()
	src := filepath.Join(dir, "src.img")
	f, err := os.Create(src)
	if err != nil {
		t.Fatal(err)
	}
	f.WriteAt([]byte(strings.Repeat("data", 1024)), 5<<20)
	f.Truncate(size)
	f.Close()
	qemuFormat := map[string]string{".vhdx": "vhdx", ".vhd": "vpc", ".img": "raw"}
	for _, tc := range []struct {
		args   []string // the command, its last argument the new file
		sparse bool
	}{
		{[]string{"create", "--type", "fixed", "--size", "64M", "c.vhdx"}, false},
		{[]string{"create", "--type", "fixed", "--size", "64M", "c.vhd"}, false},
		{[]string{"create", "--size", "64M", "c.img"}, false},
		{[]string{"create", "--type", "fixed", "--sparse", "--size", "64M", "cs.vhdx"}, true},
		{[]string{"create", "--type", "fixed", "--sparse", "--size", "64M", "cs.vhd"}, true},
		{[]string{"create", "--sparse", "--size", "64M", "cs.img"}, true},
		{[]string{"convert", "--type", "fixed", src, "v.vhdx"}, false},
		{[]string{"convert", "--type", "fixed", src, "v.vhd"}, false},
		{[]string{"convert", "--type", "fixed", src, "v.img"}, false},
		{[]string{"convert", "--type", "fixed", "--sparse", src, "vs.vhdx"}, true},
		{[]string{"convert", "--type", "fixed", "--sparse", src, "vs.vhd"}, true},
		{[]string{"convert", src, "vs.img"}, true},
	} {
		name := tc.args[len(tc.args)-1]
		path := filepath.Join(dir, name)
		args := append(append([]string(nil), tc.args[:len(tc.args)-1]...), path)
		if code, stderr := vhdkit(args...); code != 0 {
			t.Fatalf("vhdkit %s: exit %d: %s", strings.Join(tc.args, " "), code, stderr)
		}
		allocated, fileSize := testenv.Allocated(t, path)
		t.Logf("%s: %d bytes, %d allocated", name, fileSize, allocated)
		if fileSize < size {
			t.Errorf("%s: %d bytes, less than the disk", name, fileSize)
		}
		if !tc.sparse && allocated < fileSize {
			t.Errorf("%s: %d of its %d bytes allocated, want all", name, allocated, fileSize)
		}
		if tc.sparse && allocated >= size/2 {
			t.Errorf("%s: %d of its %d bytes allocated, want a sparse file", name, allocated, fileSize)
		}
		want := src
		if tc.args[0] == "create" {
			want = filepath.Join(dir, "zeros.img")
			os.WriteFile(want, nil, 0o600)
			os.Truncate(want, size)
		}
		if out, err := exec.Command("qemu-img", "compare", "-f", qemuFormat[filepath.Ext(name)], "-F", "raw", path, want).CombinedOutput(); err != nil {
			t.Errorf("qemu-img compare %s %s: %v\n%s", name, want, err, out)
		}
	}
	if code, stderr := vhdkit("create", "--sparse", "--size", "1M", filepath.Join(dir, "d.vhdx")); code != 2 || !strings.Contains(stderr, "--sparse is for fixed disks") {
		t.Errorf("--sparse for a dynamic disk: exit %d, %q; want a usage error", code, stderr)
	}
}

// entries lists the names in dir but lost+found.
func entries(t *testing.T, dir string) []string {
	t.Helper()
	list, err := os.ReadDir(dir)
	if err != nil {
		t.Fatal(err)
	}
	var names []string
	for _, e := range list {
		if e.Name() != "lost+found" {
			names = append(names, e.Name())
		}
	}
	return names
}

// On a 16 MiB file system a fixed 64 MiB disk fails when it is made, in
// one line that names the cause and --sparse, and leaves no file; a sparse
// one is made.
func TestFixedNoSpace(t *testing.T) {
	mnt := testenv.MountLoop(t, 16<<20, "mkfs.ext4")
	src := filepath.Join(t.TempDir(), "src.img")
	if err := os.WriteFile(src, []byte("data"), 0o600); err != nil {
		t.Fatal(err)
	}
	if err := os.Truncate(src, 64<<20); err != nil {
		t.Fatal(err)
	}
	for _, name := range []string{"f.vhdx", "f.vhd", "f.img"} {
		path := filepath.Join(mnt, name)
		for _, args := range [][]string{
			{"create", "--type", "fixed", "--size", "64M", path},
			{"convert", "--type", "fixed", src, path},
		} {
			code, stderr := vhdkit(args...)
			if code != 1 || strings.Count(stderr, "\n") != 1 ||
				!strings.Contains(stderr, "no space left on device") || !strings.Contains(stderr, "--sparse") {
				t.Errorf("vhdkit %s: exit %d, %q; want 1 and one line naming ENOSPC and --sparse", strings.Join(args, " "), code, stderr)
			}
			if left := entries(t, mnt); len(left) != 0 {
				t.Fatalf("vhdkit %s left %v", strings.Join(args, " "), left)
			}
		}
		sparse := []string{"create", "--type", "fixed", "--sparse", "--size", "64M", path}
		if name == "f.img" {
			sparse = []string{"create", "--sparse", "--size", "64M", path}
		}
		if code, stderr := vhdkit(sparse...); code != 0 {
			t.Errorf("vhdkit %s: exit %d: %s", strings.Join(sparse, " "), code, stderr)
		}
		os.Remove(path)
	}
}

// ext2 files cannot be allocated ahead (ext4's fallocate needs extents):
// a fixed disk there is refused with a hint at --sparse, and leaves no file.
func TestFixedNoFallocate(t *testing.T) {
	mnt := testenv.MountLoop(t, 16<<20, "mkfs.ext2")
	for _, name := range []string{"f.vhdx", "f.vhd", "f.img"} {
		path := filepath.Join(mnt, name)
		args := []string{"create", "--type", "fixed", "--size", "1M", path}
		code, stderr := vhdkit(args...)
		if code != 1 || strings.Count(stderr, "\n") != 1 ||
			!strings.Contains(stderr, "cannot allocate space ahead of writes") || !strings.Contains(stderr, "--sparse") {
			t.Errorf("vhdkit %s: exit %d, %q; want 1 and one line saying so and naming --sparse", strings.Join(args, " "), code, stderr)
		}
		if left := entries(t, mnt); len(left) != 0 {
			t.Fatalf("vhdkit %s left %v", strings.Join(args, " "), left)
		}
		args = []string{"create", "--type", "fixed", "--sparse", "--size", "1M", path}
		if code, stderr := vhdkit(args...); code != 0 {
			t.Errorf("vhdkit %s: exit %d: %s", strings.Join(args, " "), code, stderr)
		}
		os.Remove(path)
	}
}

// A fixed disk made with its space keeps it as resize grows it; one made
// with --sparse stays sparse. Both read zeros in the new range.
func TestFixedGrowAllocated(t *testing.T) {
	dir := t.TempDir()
	for _, tc := range []struct {
		name   string
		sparse bool
	}{{"g.vhdx", false}, {"g.vhd", false}, {"gs.vhdx", true}, {"gs.vhd", true}} {
		path := filepath.Join(dir, tc.name)
		args := []string{"create", "--type", "fixed", "--size", "16M", path}
		if tc.sparse {
			args = append(args[:len(args)-1], "--sparse", path)
		}
		if code, stderr := vhdkit(args...); code != 0 {
			t.Fatalf("create %s: %s", tc.name, stderr)
		}
		if code, stderr := vhdkit("resize", "--size", "64M", path); code != 0 {
			t.Fatalf("resize %s: %s", tc.name, stderr)
		}
		allocated, size := testenv.Allocated(t, path)
		t.Logf("%s: %d bytes, %d allocated", tc.name, size, allocated)
		switch {
		case !tc.sparse && allocated < 64<<20:
			t.Errorf("%s grown to 64 MiB: only %d bytes allocated", tc.name, allocated)
		case tc.sparse && allocated >= 64<<20:
			t.Errorf("%s (--sparse) grown: %d bytes allocated", tc.name, allocated)
		}
		if code, stderr := vhdkit("check", path); code != 0 {
			t.Errorf("check %s: %s", tc.name, stderr)
		}
	}
}
