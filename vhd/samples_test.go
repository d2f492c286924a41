package vhd

import (
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/vhdkit/vhdkit/disk"
)

// zeroMD5 holds md5 sums of N zero bytes for the samples too large to hash
// in a test, computed once with `head -c N /dev/zero | md5sum`. An image
// whose extents are all holes has exactly that content.
var zeroMD5 = map[int64]string{
	136365211648: "2d1246210de184923b5270e9fa87b04d",
	136363130880: "31a9c6963bfcee2eb56d32d849da6785",
}

// The rows of ../shared/samples/README.md for VHD files.
var vhdSamples = []struct {
	file    string
	typ     Type
	creator string
	size    int64
	md5     string
	chs     bool // size from geometry
	parent  string
}{
	{"hyperv/fixed.vhd.gz", Fixed, "win", 10485760, "f7c10f0056b2d72e34be924156c76903", false, ""},
	{"hyperv/dynamic.vhd.gz", Dynamic, "win", 10485760, "f0f1f3a5edaa64c4fe671aa1c2e20696", false, ""},
	{"hyperv/fat-differential.vhd.gz", Differencing, "win", 4194304, "7d2a62d50cff41ac1340df4a1e055cb9", false, "synthetic-parents/fat-parent.vhd.gz"},
	{"hyperv/hyperv2012r2-dynamic.vhd.bz2", Dynamic, "win", 136365211648, "2d1246210de184923b5270e9fa87b04d", false, ""},
	{"qemu-made/dfvfs-ext2.vhd.gz", Dynamic, "qemu", 4212736, "3f0e360a1211f80b3f5633a68dbe98ba", true, ""},
	{"disk2vhd/d2v-zerofilled.vhd.bz2", Dynamic, "d2v", 263454720, "b97887579deb55faac424ec9be103073", false, ""},
	// Virtual PC sizes by geometry: we report 136363130880 like qemu-img
	// (7-Zip says 136365211648, the current size). All zeros.
	{"virtualpc/virtualpc-dynamic.vhd.bz2", Dynamic, "vpc", 136363130880, "31a9c6963bfcee2eb56d32d849da6785", true, ""},
	{"synthetic-parents/fat-parent.vhd.gz", Fixed, "qem2", 4194304, "b5cfa9d6c8febd618f91ac2843d50a1c", false, ""},
}

func TestSamples(t *testing.T) {
	for _, s := range vhdSamples {
		t.Run(filepath.Base(s.file), func(t *testing.T) {
			path := sample(t, s.file)
			if s.parent != "" {
				// Parent and child in one folder, the parent under its
				// real name, as the locators expect.
				dir := t.TempDir()
				link := func(src, name string) string {
					dst := filepath.Join(dir, name)
					if err := os.Symlink(src, dst); err != nil {
						t.Fatal(err)
					}
					return dst
				}
				link(sample(t, s.parent), "fat-parent.vhd")
				path = link(path, filepath.Base(path))
			}
			img, err := Open(path, OpenOptions{ReadOnly: true})
			if err != nil {
				t.Fatal(err)
			}
			defer mustClose(t, img)
			info := img.Info()
			if img.Size() != s.size || info.Type != s.typ || info.Creator != s.creator || info.SizeFromGeometry != s.chs {
				t.Errorf("size %d type %v creator %q chs %v; want %d %v %q %v",
					img.Size(), info.Type, info.Creator, info.SizeFromGeometry, s.size, s.typ, s.creator, s.chs)
			}
			if want, ok := zeroMD5[s.size]; ok {
				// Too big to hash here: prove it is all zeros instead.
				if want != s.md5 {
					t.Fatalf("table md5 %s is not that of %d zero bytes", s.md5, s.size)
				}
				exts, err := img.Extents(0, img.Size())
				if err != nil {
					t.Fatal(err)
				}
				for _, e := range exts {
					if e.Type != disk.Hole {
						t.Fatalf("extent %+v in an image the README says is all zeros", e)
					}
				}
				return
			}
			if got := hashImage(t, img); got != s.md5 {
				t.Errorf("md5 %s, want %s", got, s.md5)
			}
			if s.parent != "" {
				if len(info.Chain) != 2 || filepath.Base(info.ParentPath) != "fat-parent.vhd" {
					t.Errorf("chain %q, parent %q", info.Chain, info.ParentPath)
				}
				if info.ParentUniqueID.String() != "5fa21a55-f394-aa4d-9958-1951a67d5540" {
					t.Errorf("parent id %s", info.ParentUniqueID)
				}
			}
		})
	}
}

// The disk must also read the same with every sector read on its own and
// through Extents' view of allocation.
func TestSampleDynamicExtents(t *testing.T) {
	img, err := Open(sample(t, "hyperv/dynamic.vhd.gz"), OpenOptions{ReadOnly: true})
	if err != nil {
		t.Fatal(err)
	}
	defer mustClose(t, img)
	exts, err := img.Extents(0, img.Size())
	if err != nil {
		t.Fatal(err)
	}
	var data int64
	for _, e := range exts {
		if e.Type == disk.Data {
			data += e.Length
		}
	}
	// 3 of 5 blocks allocated.
	if data == 0 || data > 3*DefaultBlockSize {
		t.Errorf("%d data bytes in %v", data, exts)
	}
	if info := img.Info(); info.AllocatedBlocks != 3 || info.TotalBlocks != 5 {
		t.Errorf("allocated %d of %d blocks", info.AllocatedBlocks, info.TotalBlocks)
	}
}

func TestSampleDifferencingWithoutParent(t *testing.T) {
	dir := t.TempDir()
	child := filepath.Join(dir, "fat-differential.vhd")
	if err := os.Symlink(sample(t, "hyperv/fat-differential.vhd.gz"), child); err != nil {
		t.Fatal(err)
	}
	_, err := Open(child, OpenOptions{ReadOnly: true})
	if !errors.Is(err, disk.ErrParentNotFound) || !strings.Contains(err.Error(), "fat-parent.vhd") {
		t.Fatalf("got %v, want a parent-not-found error naming fat-parent.vhd", err)
	}
	// Through the registry too.
	if _, err := disk.Open(child, disk.OpenOptions{ReadOnly: true}); !errors.Is(err, disk.ErrParentNotFound) {
		t.Fatalf("disk.Open: %v", err)
	}
}

func TestSampleParentMismatch(t *testing.T) {
	dir := t.TempDir()
	// Any other VHD under the parent's name.
	if err := os.Symlink(sample(t, "hyperv/fixed.vhd.gz"), filepath.Join(dir, "fat-parent.vhd")); err != nil {
		t.Fatal(err)
	}
	child := filepath.Join(dir, "fat-differential.vhd")
	if err := os.Symlink(sample(t, "hyperv/fat-differential.vhd.gz"), child); err != nil {
		t.Fatal(err)
	}
	_, err := Open(child, OpenOptions{ReadOnly: true})
	if !errors.Is(err, disk.ErrParentMismatch) || !strings.Contains(err.Error(), "5fa21a55-f394-aa4d-9958-1951a67d5540") {
		t.Fatalf("got %v, want a parent mismatch naming the expected id", err)
	}
}

func TestSamplesBroken(t *testing.T) {
	for _, name := range []string{"broken/dfvfs-image.vhd.gz", "broken/dfvfs-image-differential.vhd.gz"} {
		t.Run(filepath.Base(name), func(t *testing.T) {
			path := sample(t, name)
			_, err := Open(path, OpenOptions{ReadOnly: true})
			var fe *FormatError
			if !errors.Is(err, disk.ErrChecksum) || !errors.As(err, &fe) || fe.Struct != "footer" {
				t.Fatalf("got %v, want a footer checksum error", err)
			}
			if !strings.Contains(err.Error(), "offset") {
				t.Errorf("error %q does not give the offset", err)
			}
			probs, err := Check(path, false)
			if err != nil || len(probs) == 0 || probs[0].Warning {
				t.Fatalf("Check: %v %v", probs, err)
			}
		})
	}
	// Read anyway: the plain image opens with the override.
	img, err := Open(sample(t, "broken/dfvfs-image.vhd.gz"), OpenOptions{ReadOnly: true, IgnoreChecksum: true})
	if err != nil {
		t.Fatal(err)
	}
	mustClose(t, img)
	// The child's parent is named "image.vhd" only; with the override it
	// gets as far as looking for it.
	_, err = Open(sample(t, "broken/dfvfs-image-differential.vhd.gz"), OpenOptions{ReadOnly: true, IgnoreChecksum: true})
	if !errors.Is(err, disk.ErrParentNotFound) {
		t.Fatalf("differential with override: %v", err)
	}
}

func TestSampleCheckClean(t *testing.T) {
	for _, name := range []string{"hyperv/fixed.vhd.gz", "hyperv/dynamic.vhd.gz", "qemu-made/dfvfs-ext2.vhd.gz"} {
		probs, err := Check(sample(t, name), false)
		if err != nil {
			t.Fatal(err)
		}
		for _, p := range probs {
			if !p.Warning {
				t.Errorf("%s: %v", name, p)
			}
		}
	}
}
