package main

import (
	"bytes"
	"math/rand/v2"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
)

// A disk of 4096-byte sectors counts its GPT in 4 KiB sectors: resize
// --to-minimum of a 4K VHDX reads it so, as of a raw copy, whose GPT's
// layout tells; both, seen through a 4096-byte-sector loop device, pass
// sgdisk -v and sfdisk --verify with their partitions unchanged.
func TestResizeToMinimum4K(t *testing.T) {
	for _, tool := range []string{"sfdisk", "sgdisk", "losetup"} {
		if _, err := exec.LookPath(tool); err != nil {
			if os.Getenv("CI") == "true" {
				t.Fatalf("%s is required in CI", tool)
			}
			t.Skipf("%s not installed", tool)
		}
	}
	if os.Geteuid() != 0 {
		t.Skip("a 4096-byte-sector loop device needs root")
	}
	dir := t.TempDir()
	src := filepath.Join(dir, "src.img")
	os.WriteFile(src, nil, 0o600)
	os.Truncate(src, 64<<20)
	loop := func(path string, args ...string) string {
		out, err := exec.Command("losetup", append([]string{"-f", "--show", "-b", "4096"}, append(args, path)...)...).CombinedOutput()
		if err != nil {
			t.Skipf("no 4096-byte loop device here: %v: %s", err, out)
		}
		return strings.TrimSpace(string(out))
	}
	sh := func(stdin, name string, args ...string) string {
		cmd := exec.Command(name, args...)
		cmd.Stdin = strings.NewReader(stdin)
		out, err := cmd.CombinedOutput()
		if err != nil {
			t.Fatalf("%s %s: %v\n%s", name, strings.Join(args, " "), err, out)
		}
		return string(out)
	}
	dev := loop(src)
	sh("label: gpt\nsize=10M\nsize=20M\n", "sfdisk", "-q", "--no-reread", dev)
	sh("", "losetup", "-d", dev)
	data := make([]byte, 30<<20)
	r := rand.NewChaCha8([32]byte{4, 0, 9, 6})
	r.Read(data)
	f, _ := os.OpenFile(src, os.O_RDWR, 0)
	f.WriteAt(data, 1<<20)
	f.Close()

	// A raw copy says no sector size: the GPT's layout tells it.
	rawCopy := filepath.Join(dir, "copy.img")
	vhdx := filepath.Join(dir, "d.vhdx")
	for _, args := range [][]string{
		{"convert", src, rawCopy},
		{"resize", "--to-minimum", rawCopy},
		{"convert", "--logical-sector", "4096", src, vhdx},
		{"resize", "--to-minimum", vhdx},
	} {
		if code, stderr := vhdkit(args...); code != 0 {
			t.Fatalf("vhdkit %s: exit %d: %s", strings.Join(args, " "), code, stderr)
		}
	}
	back := filepath.Join(dir, "back.img")
	if code, stderr := vhdkit("convert", vhdx, back); code != 0 {
		t.Fatalf("convert back: %s", stderr)
	}
	got, err := os.ReadFile(back)
	if err != nil {
		t.Fatal(err)
	}
	if len(got) != 32<<20 {
		t.Fatalf("shrunk to %d bytes, want %d", len(got), 32<<20)
	}
	if !bytes.Equal(got[1<<20:31<<20], data) {
		t.Error("the partitions' bytes changed")
	}
	copied, err := os.ReadFile(rawCopy)
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(copied, got) {
		t.Error("the raw copy shrunk differs from the VHDX shrunk")
	}
	for _, path := range []string{back, rawCopy} {
		dev := loop(path, "-r")
		if out := sh("", "sgdisk", "-v", dev); !strings.Contains(out, "No problems found") {
			t.Errorf("sgdisk -v %s:\n%s", filepath.Base(path), out)
		}
		if out := sh("", "sfdisk", "--verify", dev); !strings.Contains(out, "No errors detected") {
			t.Errorf("sfdisk --verify %s:\n%s", filepath.Base(path), out)
		}
		sh("", "losetup", "-d", dev)
	}
}
