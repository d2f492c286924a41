package vhd

import (
	"encoding/binary"
	"errors"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/vhdkit/vhdkit/disk"
)

func TestParentCandidates(t *testing.T) {
	dir := "/vms/child"
	for _, c := range []struct {
		locs []Locator
		name string
		want []string
	}{
		{ // Hyper-V: W2ru first, the W2ku drive path only by its file name.
			[]Locator{{Platform: "W2ku", Path: `C:\Projects\fat-parent.vhd`}, {Platform: "W2ru", Path: `.\fat-parent.vhd`}},
			`C:\Projects\fat-parent.vhd`,
			[]string{"/vms/child/fat-parent.vhd"},
		},
		{
			[]Locator{{Platform: "W2ru", Path: `..\base\p.vhd`}, {Platform: "W2ku", Path: `/srv/base/p.vhd`}},
			"",
			[]string{"/vms/base/p.vhd", "/srv/base/p.vhd", "/vms/child/p.vhd"},
		},
		{
			[]Locator{{Platform: "W2ku", Path: `\\server\share\p.vhd`}},
			"",
			[]string{"/vms/child/p.vhd"},
		},
		{ // No locators: the header's name (dfvfs-image-differential.vhd).
			nil, "image.vhd", []string{"/vms/child/image.vhd"},
		},
	} {
		if got := parentCandidates(dir, c.locs, c.name); !slices.Equal(got, c.want) {
			t.Errorf("%v %q: got %q, want %q", c.locs, c.name, got, c.want)
		}
	}
	if p, err := decodeLocatorPath(platformMacX, []byte("file://localhost/Users/me/My%20Disk.vhd")); err != nil || p != "/Users/me/My Disk.vhd" {
		t.Errorf("MacX: %q %v", p, err)
	}
}

// makeChain creates base.vhd and child.vhd (over it) in dir.
func makeChain(t *testing.T, dir string) (base, child string) {
	t.Helper()
	base, _ = makeImage(t, dir, "base.vhd", CreateOptions{Size: 2 << 20})
	child = filepath.Join(dir, "child.vhd")
	img, err := Create(child, CreateOptions{Parent: base})
	if err != nil {
		t.Fatal(err)
	}
	mustWrite(t, img, []byte("child"), 4096)
	mustClose(t, img)
	return base, child
}

func TestParentMovedAndMissing(t *testing.T) {
	root := t.TempDir()
	d1 := filepath.Join(root, "one")
	os.Mkdir(d1, 0o755)
	_, child := makeChain(t, d1)

	// The folder moves: W2ku is stale, W2ru finds the parent.
	d2 := filepath.Join(root, "two")
	if err := os.Rename(d1, d2); err != nil {
		t.Fatal(err)
	}
	child = filepath.Join(d2, "child.vhd")
	img, err := Open(child, OpenOptions{ReadOnly: true})
	if err != nil {
		t.Fatal(err)
	}
	if p := img.Info().ParentPath; p != filepath.Join(d2, "base.vhd") {
		t.Errorf("parent %s", p)
	}
	mustClose(t, img)

	// The child moves alone: W2ku (absolute) finds the parent.
	d3 := filepath.Join(root, "three")
	os.Mkdir(d3, 0o755)
	os.Rename(d2, d1) // base back where W2ku says
	if err := os.Rename(filepath.Join(d1, "child.vhd"), filepath.Join(d3, "child.vhd")); err != nil {
		t.Fatal(err)
	}
	child = filepath.Join(d3, "child.vhd")
	img, err = Open(child, OpenOptions{ReadOnly: true})
	if err != nil {
		t.Fatal(err)
	}
	mustClose(t, img)

	// Confined to the child's folder, the parent is refused.
	_, err = Open(child, OpenOptions{ReadOnly: true, ParentDirs: []string{d3}})
	if !errors.Is(err, disk.ErrParentNotFound) || !strings.Contains(err.Error(), "outside") {
		t.Errorf("ParentDirs: %v", err)
	}
	if img, err := Open(child, OpenOptions{ReadOnly: true, ParentDirs: []string{d1}}); err != nil {
		t.Errorf("ParentDirs allowing it: %v", err)
	} else {
		img.Close()
	}

	// An explicit parent path wins.
	moved := filepath.Join(root, "elsewhere.vhd")
	if err := os.Rename(filepath.Join(d1, "base.vhd"), moved); err != nil {
		t.Fatal(err)
	}
	_, err = Open(child, OpenOptions{ReadOnly: true})
	if !errors.Is(err, disk.ErrParentNotFound) || !strings.Contains(err.Error(), "base.vhd") {
		t.Errorf("missing parent: %v", err)
	}
	img, err = Open(child, OpenOptions{ReadOnly: true, ParentPath: moved})
	if err != nil {
		t.Fatal(err)
	}
	b := make([]byte, 5)
	img.ReadAt(b, 4096)
	if string(b) != "child" {
		t.Errorf("read %q", b)
	}
	mustClose(t, img)
}

func TestParentTimeStamp(t *testing.T) {
	dir := t.TempDir()
	base, _ := makeImage(t, dir, "base.vhd", CreateOptions{Size: 2 << 20})
	// The child records the parent's modification time; make it differ
	// from the parent's footer time stamp, which also counts as a match.
	earlier := time.Now().Add(-48 * time.Hour)
	if err := os.Chtimes(base, earlier, earlier); err != nil {
		t.Fatal(err)
	}
	child := filepath.Join(dir, "child.vhd")
	img, err := Create(child, CreateOptions{Parent: base})
	if err != nil {
		t.Fatal(err)
	}
	mustClose(t, img)
	if img, err = Open(child, OpenOptions{ReadOnly: true}); err != nil || img.Info().ParentTimeStampMismatch {
		t.Fatalf("fresh child: %v", err)
	}
	mustClose(t, img)
	later := time.Now().Add(48 * time.Hour)
	if err := os.Chtimes(base, later, later); err != nil {
		t.Fatal(err)
	}
	img, err = Open(child, OpenOptions{ReadOnly: true})
	if err != nil {
		t.Fatalf("a time stamp mismatch must not prevent opening: %v", err)
	}
	info := img.Info()
	if !info.ParentTimeStampMismatch || len(info.Warnings) == 0 {
		t.Errorf("mismatch not reported: %+v", info)
	}
	mustClose(t, img)
	probs, err := Check(child, false)
	if err != nil {
		t.Fatal(err)
	}
	if !slices.ContainsFunc(probs, func(p Problem) bool { return p.Warning && strings.Contains(p.What, "time stamp") }) {
		t.Errorf("Check: %v", probs)
	}
}

// setParentID rewrites the parent unique id in a child's header.
func setParentID(t *testing.T, path string, id UUID) {
	t.Helper()
	f, err := os.OpenFile(path, os.O_RDWR, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	var h [headerSize]byte
	if _, err := f.ReadAt(h[:], footerSize); err != nil {
		t.Fatal(err)
	}
	copy(h[headerParentIDAt:], id[:])
	binary.BigEndian.PutUint32(h[headerChecksumAt:], checksum(h[:], headerChecksumAt))
	if _, err := f.WriteAt(h[:], footerSize); err != nil {
		t.Fatal(err)
	}
}

func uniqueID(t *testing.T, path string) UUID {
	t.Helper()
	ft, ok := peekFooter(path, false)
	if !ok {
		t.Fatalf("%s is not a VHD", path)
	}
	return ft.UniqueID
}

func TestParentLoops(t *testing.T) {
	// A child that is its own parent.
	dir := t.TempDir()
	base, child := makeChain(t, dir)
	os.Remove(base)
	os.Symlink("child.vhd", base)
	setParentID(t, child, uniqueID(t, child))
	if _, err := Open(child, OpenOptions{ReadOnly: true}); !errors.Is(err, disk.ErrFormat) || !strings.Contains(err.Error(), "loops") {
		t.Errorf("self parent: %v", err)
	}

	// y -> z -> y, ids consistent.
	dir = t.TempDir()
	x, y := makeChain(t, dir)
	z := filepath.Join(dir, "z.vhd")
	img, err := Create(z, CreateOptions{Parent: y})
	if err != nil {
		t.Fatal(err)
	}
	mustClose(t, img)
	os.Remove(x)
	os.Symlink("z.vhd", x)
	setParentID(t, y, uniqueID(t, z))
	if _, err := Open(z, OpenOptions{ReadOnly: true}); !errors.Is(err, disk.ErrFormat) || !strings.Contains(err.Error(), "loops") {
		t.Errorf("two-image loop: %v", err)
	}
}

// Images registered with package disk open through it, fixed ones by
// their extension.
func TestRegistered(t *testing.T) {
	dir := t.TempDir()
	for _, typ := range []Type{Fixed, Dynamic} {
		path, content := makeImage(t, dir, typ.String()+".vhd", CreateOptions{Type: typ, Size: 1 << 20})
		f, err := disk.Detect(path)
		if err != nil || f.Name != "vhd" {
			t.Fatalf("%v: detected %q, %v", typ, f.Name, err)
		}
		img, err := disk.Open(path, disk.OpenOptions{ReadOnly: true})
		if err != nil {
			t.Fatal(err)
		}
		if got := readAll(t, img); string(got) != string(content) {
			t.Errorf("%v reads wrong through disk.Open", typ)
		}
		if _, err := img.WriteAt([]byte{1}, 0); !errors.Is(err, disk.ErrReadOnly) {
			t.Errorf("write to a read-only image: %v", err)
		}
		mustClose(t, img)
	}
	// .avhd is ours too.
	if f, ok := disk.FormatForPath("x.AVHD"); !ok || f.Name != "vhd" {
		t.Errorf(".avhd: %v", f.Name)
	}
}
