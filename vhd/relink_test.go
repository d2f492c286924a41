package vhd

import (
	"bytes"
	"errors"
	"math/rand/v2"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"testing"

	"github.com/vhdkit/vhdkit/disk"
	"github.com/vhdkit/vhdkit/internal/testenv"
)

// wholeBlockChild creates a child of parent at path and writes whole
// blocks into it (libvhdi misreads partial bitmaps), returning the chain's
// content.
func wholeBlockChild(t *testing.T, r *rand.Rand, path, parent string, parentContent []byte, bs uint32) []byte {
	t.Helper()
	img, err := Create(path, CreateOptions{Parent: parent, BlockSize: bs})
	if err != nil {
		t.Fatal(err)
	}
	model := bytes.Clone(parentContent)
	n := int64(len(model)) / int64(bs)
	for range 4 {
		off := r.Int64N(n) * int64(bs)
		p := make([]byte, bs)
		fill(r, p)
		mustWrite(t, img, p, off)
		copy(model[off:], p)
	}
	mustClose(t, img)
	return model
}

// vhdimountChild mounts child over parent with libvhdi and reads the
// child's layer (vhdimount numbers the layers base first).
//
// vhdimount 20210425 looks for the parent at the child's folder joined
// with the header's parent name after its last backslash; our parent
// name is a Unix path, which it joins whole. A symbolic link at that
// joined path leads it to the parent.
func vhdimountChild(t *testing.T, child, parent string) []byte {
	t.Helper()
	testenv.Tool(t, "vhdimount")
	if _, err := os.Stat("/dev/fuse"); err != nil {
		if inCI() {
			t.Fatalf("vhdimount needs /dev/fuse: %v", err)
		}
		t.Skip("no /dev/fuse")
	}
	img, err := Open(child, OpenOptions{ReadOnly: true, NoParent: true})
	if err != nil {
		t.Fatal(err)
	}
	name := img.Info().ParentName
	img.Close()
	joined := filepath.Join(filepath.Dir(child), name)
	if err := os.MkdirAll(filepath.Dir(joined), 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.Symlink(parent, joined); err != nil {
		t.Fatal(err)
	}
	defer os.Remove(joined)
	mnt := filepath.Join(t.TempDir(), "mnt")
	os.Mkdir(mnt, 0o755)
	run(t, "vhdimount", "-X", "allow_root", child, mnt)
	defer exec.Command("umount", mnt).Run()
	got, err := os.ReadFile(filepath.Join(mnt, "vhdi2"))
	if err != nil {
		t.Fatal(err)
	}
	return got
}

func checkClean(t *testing.T, path string) {
	t.Helper()
	probs, err := Check(path, false)
	if err != nil {
		t.Fatal(err)
	}
	for _, p := range probs {
		if !p.Warning {
			t.Errorf("Check %s: %v", path, p)
		}
	}
}

// The parent moves to another folder under another name: the child opens
// without it (NoParent), SetParent links it to the new place, and the
// chain reads as before — in 7-Zip and libvhdi too.
func TestSetParentMoved(t *testing.T) {
	r := rand.New(rand.NewPCG(21, 21))
	root := t.TempDir()
	one, two := filepath.Join(root, "one"), filepath.Join(root, "two")
	os.Mkdir(one, 0o755)
	os.Mkdir(two, 0o755)
	size := chsExact(6 << 20)
	base, baseContent := makeImage(t, one, "base.vhd", CreateOptions{Size: uint64(size)})
	child := filepath.Join(one, "child.vhd")
	model := wholeBlockChild(t, r, child, base, baseContent, 512<<10)
	oldInfo := func() Info {
		img, err := Open(child, OpenOptions{ReadOnly: true})
		if err != nil {
			t.Fatal(err)
		}
		defer img.Close()
		return img.Info()
	}()

	moved := filepath.Join(two, "renamed base.vhd")
	if err := os.Rename(base, moved); err != nil {
		t.Fatal(err)
	}
	if _, err := Open(child, OpenOptions{}); !errors.Is(err, disk.ErrParentNotFound) {
		t.Fatalf("open without its parent: %v", err)
	}
	img, err := Open(child, OpenOptions{NoParent: true})
	if err != nil {
		t.Fatal(err)
	}
	// What the file holds reads; the rest needs the parent.
	exts, err := img.Extents(0, size)
	if err != nil {
		t.Fatal(err)
	}
	for _, e := range exts {
		buf := make([]byte, min(e.Length, 4096))
		_, err := img.ReadAt(buf, e.Offset)
		switch {
		case e.Depth == 0 && (err != nil || !bytes.Equal(buf, model[e.Offset:e.Offset+int64(len(buf))])):
			t.Fatalf("stored extent %+v: %v", e, err)
		case e.Depth > 0 && !errors.Is(err, disk.ErrParentNotFound):
			t.Fatalf("extent %+v from the missing parent: %v", e, err)
		}
	}
	if err := img.SetParent(moved); err != nil {
		t.Fatal(err)
	}
	info := img.Info()
	mustClose(t, img)

	wantLocs := []Locator{{Platform: "W2ku", Path: moved}, {Platform: "W2ru", Path: `..\two\renamed base.vhd`}}
	for i, l := range info.ParentLocators {
		if i >= len(wantLocs) || l.Platform != wantLocs[i].Platform || l.Path != wantLocs[i].Path {
			t.Errorf("locators %+v, want %+v", info.ParentLocators, wantLocs)
			break
		}
	}
	if info.ParentName != moved || info.ParentUniqueID != oldInfo.ParentUniqueID || info.UniqueID != oldInfo.UniqueID {
		t.Errorf("after SetParent: %+v", info)
	}
	img, err = Open(child, OpenOptions{ReadOnly: true})
	if err != nil {
		t.Fatal(err)
	}
	if got := readAll(t, img); !bytes.Equal(got, model) {
		t.Fatalf("relinked chain reads %s", diffAt(got, model))
	}
	if got := hashImage(t, img); got != md5hex(model) {
		t.Fatal("extent-wise content differs")
	}
	if w := img.Info().Warnings; len(w) > 0 {
		t.Errorf("warnings %q", w)
	}
	if img.Info().ParentPath != moved {
		t.Errorf("parent opened %s", img.Info().ParentPath)
	}
	mustClose(t, img)
	checkClean(t, child)
	link, err := ReadParentLink(child, OpenOptions{})
	if err != nil || link == nil || link.UniqueID != oldInfo.ParentUniqueID || len(link.Candidates) == 0 || link.Candidates[0] != moved {
		t.Fatalf("ReadParentLink: %+v, %v", link, err)
	}

	// The header now sits near the end of the file; other readers follow
	// the footer's data offset to it.
	if img, _ := Open(child, OpenOptions{ReadOnly: true}); img.hdrOff == footerSize {
		t.Fatal("header did not move")
	} else {
		img.Close()
	}
	testenv.Tool(t, "vhdiinfo")
	out := string(run(t, "vhdiinfo", child))
	for _, w := range []string{"Parent identifier\t: " + oldInfo.ParentUniqueID.String(), "Parent filename\t\t: " + moved} {
		if !strings.Contains(out, w) {
			t.Errorf("vhdiinfo lacks %q:\n%s", w, out)
		}
	}
	if got := vhdimountChild(t, child, moved); !bytes.Equal(got, model) {
		t.Errorf("vhdimount reads %s", diffAt(got, model))
	}

	// 7-Zip on Linux follows only a W2ru path within the child's folder
	// (".\name"; it keeps other backslashes): move the child next to the
	// parent and relink it again.
	next := filepath.Join(two, "child.vhd")
	if err := os.Rename(child, next); err != nil {
		t.Fatal(err)
	}
	img, err = Open(next, OpenOptions{})
	if err != nil {
		t.Fatal(err)
	}
	if err := img.SetParent(moved); err != nil {
		t.Fatal(err)
	}
	mustClose(t, img)
	checkClean(t, next)
	testenv.Tool(t, "7zz")
	if got := sevenZipExtract(t, next); !bytes.Equal(got, model) {
		t.Errorf("7-Zip extracts %s", diffAt(got, model))
	}
}

// Re-parenting onto another file with the same content (what merge does
// after folding a parent into the grandparent): the child records the new
// parent's unique id and opens over it, the old parent gone.
func TestSetParentOtherFile(t *testing.T) {
	r := rand.New(rand.NewPCG(22, 22))
	dir := t.TempDir()
	size := int64(3 << 20)
	old, content := makeImage(t, dir, "old.vhd", CreateOptions{Size: uint64(size)})
	child := filepath.Join(dir, "child.avhd")
	model := wholeBlockChild(t, r, child, old, content, 64<<10)
	// Pending writes are flushed by SetParent.
	img, err := Open(child, OpenOptions{})
	if err != nil {
		t.Fatal(err)
	}
	p := bytes.Repeat([]byte{0x5C}, 70000)
	mustWrite(t, img, p, 1<<20+100)
	copy(model[1<<20+100:], p)

	newer := filepath.Join(dir, "new.vhd")
	np, err := Create(newer, CreateOptions{Size: uint64(size), BlockSize: 128 << 10})
	if err != nil {
		t.Fatal(err)
	}
	mustWrite(t, np, content, 0)
	mustClose(t, np)
	if err := img.SetParent(newer); err != nil {
		t.Fatal(err)
	}
	// Still reads through the parent it was opened with.
	if got := readAll(t, img); !bytes.Equal(got, model) {
		t.Fatalf("after SetParent: %s", diffAt(got, model))
	}
	mustClose(t, img)
	os.Remove(old)
	img, err = Open(child, OpenOptions{ReadOnly: true})
	if err != nil {
		t.Fatal(err)
	}
	if got := readAll(t, img); !bytes.Equal(got, model) {
		t.Fatalf("over the new parent: %s", diffAt(got, model))
	}
	if id := img.Info().ParentUniqueID; id != uniqueID(t, newer) {
		t.Errorf("parent id %s, want %s", id, uniqueID(t, newer))
	}
	mustClose(t, img)
	checkClean(t, child)
	testenv.Tool(t, "7zz")
	if got := sevenZipExtract(t, child); !bytes.Equal(got, model) {
		t.Errorf("7-Zip extracts %s", diffAt(got, model))
	}
}

// Paths longer than the old locator data space and the parent name field
// (255 UTF-16 units), and not ASCII: the locators take new space at the
// end, the name falls back to the file name. SetParent twice: each moves
// the header again.
func TestSetParentLongPath(t *testing.T) {
	root := t.TempDir()
	base, content := makeImage(t, root, "b.vhd", CreateOptions{Size: 1 << 20, BlockSize: 4096})
	child := filepath.Join(root, "c.vhd")
	img, err := Create(child, CreateOptions{Parent: base, BlockSize: 4096})
	if err != nil {
		t.Fatal(err)
	}
	mustWrite(t, img, []byte("kid"), 12345)
	copy(content[12345:], "kid")
	deep := root
	for i := range 5 {
		deep = filepath.Join(deep, strings.Repeat(string(rune('a'+i)), 60)+"-Ünïcødé-日本")
	}
	if err := os.MkdirAll(deep, 0o755); err != nil {
		t.Fatal(err)
	}
	long := filepath.Join(deep, "pärent.vhd")
	data, _ := os.ReadFile(base)
	if err := os.WriteFile(long, data, 0o644); err != nil {
		t.Fatal(err)
	}
	if len(encodeUTF16LE(long)) <= int(img.hdr.Locators[0].DataSpace) {
		t.Fatal("the path fits the old locator space; make it longer")
	}
	if err := img.SetParent(long); err != nil {
		t.Fatal(err)
	}
	if err := img.SetParent(long); err != nil {
		t.Fatal(err)
	}
	mustClose(t, img)
	os.Remove(base)
	img, err = Open(child, OpenOptions{ReadOnly: true})
	if err != nil {
		t.Fatal(err)
	}
	info := img.Info()
	if info.ParentPath != long || info.ParentName != "pärent.vhd" || info.ParentLocators[0].Path != long {
		t.Errorf("parent %q, name %q, locators %+v", info.ParentPath, info.ParentName, info.ParentLocators)
	}
	if got := readAll(t, img); !bytes.Equal(got, content) {
		t.Fatal(diffAt(got, content))
	}
	mustClose(t, img)
	checkClean(t, child)
}

func TestSetParentRefused(t *testing.T) {
	dir := t.TempDir()
	base, child := makeChain(t, dir)
	dyn, err := Open(base, OpenOptions{})
	if err != nil {
		t.Fatal(err)
	}
	if err := dyn.SetParent(child); !errors.Is(err, disk.ErrUnsupported) {
		t.Errorf("dynamic image: %v", err)
	}
	mustClose(t, dyn)
	ro, err := Open(child, OpenOptions{ReadOnly: true})
	if err != nil {
		t.Fatal(err)
	}
	if err := ro.SetParent(base); !errors.Is(err, disk.ErrReadOnly) {
		t.Errorf("read-only image: %v", err)
	}
	mustClose(t, ro)
	img, err := Open(child, OpenOptions{})
	if err != nil {
		t.Fatal(err)
	}
	notVHD := filepath.Join(dir, "junk.vhd")
	os.WriteFile(notVHD, make([]byte, 4096), 0o644)
	for _, p := range []string{filepath.Join(dir, "missing.vhd"), child, dir, notVHD} {
		if err := img.SetParent(p); err == nil {
			t.Errorf("SetParent(%s) accepted", p)
		}
	}
	// Refusals leave the image usable.
	mustWrite(t, img, []byte("still"), 0)
	mustClose(t, img)
	img, err = Open(child, OpenOptions{ReadOnly: true})
	if err != nil {
		t.Fatal(err)
	}
	if img.Info().ParentPath != base {
		t.Errorf("parent %s", img.Info().ParentPath)
	}
	mustClose(t, img)
}

// Hyper-V's differencing image (its layout, its locators, 2 MiB blocks):
// relinked to a renamed parent, it reads as its sample checksum says, in
// 7-Zip too.
func TestSetParentHyperV(t *testing.T) {
	dir := t.TempDir()
	cp := func(rel, name string) string {
		b, err := os.ReadFile(sample(t, rel))
		if err != nil {
			t.Fatal(err)
		}
		p := filepath.Join(dir, name)
		if err := os.WriteFile(p, b, 0o644); err != nil {
			t.Fatal(err)
		}
		return p
	}
	parent := cp("synthetic-parents/fat-parent.vhd.gz", "another name.vhd")
	child := cp("hyperv/fat-differential.vhd.gz", "fat-differential.vhd")
	before, err := ReadParentLink(child, OpenOptions{})
	if err != nil {
		t.Fatal(err)
	}
	if want := filepath.Join(dir, "fat-parent.vhd"); !slices.Contains(before.Candidates, want) {
		t.Errorf("candidates %q lack %s", before.Candidates, want)
	}
	img, err := Open(child, OpenOptions{NoParent: true})
	if err != nil {
		t.Fatal(err)
	}
	if err := img.SetParent(parent); err != nil {
		t.Fatal(err)
	}
	mustClose(t, img)
	after, err := ReadParentLink(child, OpenOptions{})
	if err != nil || after.UniqueID != before.UniqueID || after.Candidates[0] != parent {
		t.Fatalf("after: %+v %v", after, err)
	}
	img, err = Open(child, OpenOptions{ReadOnly: true})
	if err != nil {
		t.Fatal(err)
	}
	model := readAll(t, img)
	if got := md5hex(model); got != "7d2a62d50cff41ac1340df4a1e055cb9" {
		t.Errorf("md5 %s", got)
	}
	mustClose(t, img)
	checkClean(t, child)
	testenv.Tool(t, "7zz")
	if got := sevenZipExtract(t, child); !bytes.Equal(got, model) {
		t.Errorf("7-Zip extracts %s", diffAt(got, model))
	}
}

func TestReadParentLink(t *testing.T) {
	dir := t.TempDir()
	base, child := makeChain(t, dir)
	if l, err := ReadParentLink(base, OpenOptions{}); l != nil || err != nil {
		t.Errorf("dynamic image: %+v, %v", l, err)
	}
	fixed, _ := makeImage(t, dir, "fixed.vhd", CreateOptions{Type: Fixed, Size: 1 << 20})
	if l, err := ReadParentLink(fixed, OpenOptions{}); l != nil || err != nil {
		t.Errorf("fixed image: %+v, %v", l, err)
	}
	l, err := ReadParentLink(child, OpenOptions{})
	if err != nil {
		t.Fatal(err)
	}
	if l.UniqueID != uniqueID(t, base) || !slices.Equal(l.Candidates, []string{base}) {
		t.Errorf("link %+v", l)
	}
	// The parent need not exist.
	os.Remove(base)
	if l2, err := ReadParentLink(child, OpenOptions{}); err != nil || !slices.Equal(l2.Candidates, l.Candidates) {
		t.Errorf("without the parent: %+v %v", l2, err)
	}
	if _, err := ReadParentLink(filepath.Join(dir, "none.vhd"), OpenOptions{}); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("missing file: %v", err)
	}
	junk := filepath.Join(dir, "junk.vhd")
	os.WriteFile(junk, bytes.Repeat([]byte{1}, 4096), 0o644)
	if _, err := ReadParentLink(junk, OpenOptions{}); !errors.Is(err, disk.ErrFormat) {
		t.Errorf("junk: %v", err)
	}
	// A moved child: the relative locator is resolved from where it is.
	sub := filepath.Join(dir, "sub")
	os.Mkdir(sub, 0o755)
	moved := filepath.Join(sub, "child.vhd")
	os.Rename(child, moved)
	l, err = ReadParentLink(moved, OpenOptions{})
	if err != nil || !slices.Equal(l.Candidates, []string{filepath.Join(sub, "base.vhd"), base}) {
		t.Errorf("moved child: %+v %v", l, err)
	}
}

// An image opened without its parent writes whole sectors, refuses what
// needs the parent with ErrParentNotFound, and stays usable.
func TestNoParent(t *testing.T) {
	dir := t.TempDir()
	base, content := makeImage(t, dir, "base.vhd", CreateOptions{Size: 1 << 20})
	child := filepath.Join(dir, "child.vhd")
	img, err := Create(child, CreateOptions{Parent: base, BlockSize: 4096})
	if err != nil {
		t.Fatal(err)
	}
	mustClose(t, img)
	img, err = Open(child, OpenOptions{NoParent: true})
	if err != nil {
		t.Fatal(err)
	}
	if img.Parent() == nil || img.Info().ParentPath != "" {
		t.Errorf("parent %v, path %q", img.Parent(), img.Info().ParentPath)
	}
	whole := bytes.Repeat([]byte{0x77}, 1024)
	mustWrite(t, img, whole, 8192)
	copy(content[8192:], whole)
	if _, err := img.WriteAt([]byte("partial"), 20000); !errors.Is(err, disk.ErrParentNotFound) {
		t.Errorf("partial sector write: %v", err)
	}
	if _, err := img.ReadAt(make([]byte, 100), 0); !errors.Is(err, disk.ErrParentNotFound) {
		t.Errorf("read from the missing parent: %v", err)
	}
	got := make([]byte, 1024)
	if _, err := img.ReadAt(got, 8192); err != nil || !bytes.Equal(got, whole) {
		t.Errorf("stored sectors: %v", err)
	}
	exts, err := img.Extents(0, 1<<20)
	if err != nil || len(exts) != 3 || exts[0].Depth != 1 || exts[1].Depth != 0 {
		t.Errorf("extents %+v %v", exts, err)
	}
	if err := img.Resize(2 << 20); err != nil {
		t.Fatal(err)
	}
	mustClose(t, img)
	img, err = Open(child, OpenOptions{ReadOnly: true})
	if err != nil {
		t.Fatal(err)
	}
	want := append(bytes.Clone(content), make([]byte, 1<<20)...)
	if got := readAll(t, img); !bytes.Equal(got, want) {
		t.Fatal(diffAt(got, want))
	}
	mustClose(t, img)
	checkClean(t, child)
}
