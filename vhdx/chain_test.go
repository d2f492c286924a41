package vhdx

import (
	"bytes"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/vhdkit/vhdkit/internal/testenv"
)

// TestGUIDRules: opening changes nothing; the first write changes
// FileWriteGuid and DataWriteGuid once; a read-only open never writes.
func TestGUIDRules(t *testing.T) {
	path := filepath.Join(t.TempDir(), "g.vhdx")
	im, err := Create(path, CreateOptions{Size: 8 << 20})
	if err != nil {
		t.Fatal(err)
	}
	im.Close()
	before, _ := os.ReadFile(path)
	im, err = Open(path, OpenOptions{})
	if err != nil {
		t.Fatal(err)
	}
	i0 := im.Info()
	if err := im.Close(); err != nil {
		t.Fatal(err)
	}
	if after, _ := os.ReadFile(path); !bytes.Equal(before, after) {
		t.Fatal("an open and close without writes modified the file")
	}
	im, _ = Open(path, OpenOptions{})
	if _, err := im.WriteAt([]byte{1}, 0); err != nil {
		t.Fatal(err)
	}
	i1 := im.Info()
	if i1.FileWriteGUID == i0.FileWriteGUID || i1.DataWriteGUID == i0.DataWriteGUID {
		t.Error("first write did not change FileWriteGuid and DataWriteGuid")
	}
	im.WriteAt([]byte{2}, 5<<20)
	im.Flush()
	if i2 := im.Info(); i2.FileWriteGUID != i1.FileWriteGUID || i2.DataWriteGUID != i1.DataWriteGUID {
		t.Error("GUIDs changed again within one open")
	}
	im.Close()
	ro, _ := Open(path, OpenOptions{ReadOnly: true})
	if ro.Info().DataWriteGUID != i1.DataWriteGUID {
		t.Error("DataWriteGuid not persisted")
	}
	if _, err := ro.WriteAt([]byte{1}, 0); !errors.Is(err, ErrReadOnly) {
		t.Errorf("write to a read-only image: %v", err)
	}
	ro.Close()
}

// TestParentErrors: a child refuses to open, with a clear error, when its
// parent is missing, changed, of another sector size, outside the allowed
// folders, or when the chain loops.
func TestParentErrors(t *testing.T) {
	dir := t.TempDir()
	base := filepath.Join(dir, "base.vhdx")
	mustCreate(t, base, CreateOptions{Size: 8 << 20})
	child := filepath.Join(dir, "child.avhdx")
	mustCreate(t, child, CreateOptions{Parent: base})

	// Missing parent.
	os.Rename(base, base+".moved")
	if _, err := Open(child, OpenOptions{ReadOnly: true}); !errors.Is(err, ErrParentNotFound) || !strings.Contains(err.Error(), "base.vhdx") {
		t.Errorf("missing parent: %v", err)
	}
	// The caller may name it.
	im, err := Open(child, OpenOptions{ReadOnly: true, ParentPath: base + ".moved"})
	if err != nil {
		t.Fatalf("explicit parent: %v", err)
	}
	im.Close()
	os.Rename(base+".moved", base)

	// Confined resolution.
	other := t.TempDir()
	if _, err := Open(child, OpenOptions{ReadOnly: true, ParentDirs: []string{other}}); !errors.Is(err, ErrParentNotFound) || !strings.Contains(err.Error(), "outside") {
		t.Errorf("parent outside the allowed folders: %v", err)
	}
	if im, err := Open(child, OpenOptions{ReadOnly: true, ParentDirs: []string{dir}}); err != nil {
		t.Errorf("parent inside the allowed folder: %v", err)
	} else {
		im.Close()
	}

	// A parent written after the child was made no longer matches.
	p, _ := Open(base, OpenOptions{})
	p.WriteAt([]byte{1}, 0)
	p.Close()
	if _, err := Open(child, OpenOptions{ReadOnly: true}); !errors.Is(err, ErrParentMismatch) || !strings.Contains(err.Error(), "DataWriteGuid") {
		t.Errorf("changed parent: %v", err)
	}

	// A sector size mismatch, with a linkage that matches, is refused; a
	// size mismatch is not (Hyper-V expands differencing disks).
	for _, c := range []struct {
		opts CreateOptions
		ok   bool
	}{{CreateOptions{Size: 16 << 20}, true}, {CreateOptions{Size: 8 << 20, LogicalSectorSize: 4096}, false}} {
		wrong := filepath.Join(t.TempDir(), "base.vhdx")
		mustCreate(t, wrong, c.opts)
		w, _ := Open(wrong, OpenOptions{ReadOnly: true})
		linked := filepath.Join(filepath.Dir(wrong), "child.avhdx")
		copyFile(t, child, linked)
		setLinkage(t, linked, w.Info().DataWriteGUID)
		w.Close()
		im, err := Open(linked, OpenOptions{ReadOnly: true})
		if c.ok && err == nil {
			im.Close()
		} else if c.ok || !errors.Is(err, ErrParentMismatch) {
			t.Errorf("parent %+v: %v", c.opts, err)
		}
	}

	// A loop: a child whose locator names itself.
	loop := filepath.Join(t.TempDir(), "loop.avhdx")
	copyFile(t, child, loop)
	setLinkage(t, loop, GUID{})
	if _, err := Open(loop, OpenOptions{ReadOnly: true, ParentPath: loop}); !errors.Is(err, ErrParentMismatch) || !strings.Contains(err.Error(), "loop") {
		t.Errorf("loop: %v", err)
	}
}

func mustCreate(t *testing.T, path string, opts CreateOptions) {
	t.Helper()
	im, err := Create(path, opts)
	if err != nil {
		t.Fatal(err)
	}
	if err := im.Close(); err != nil {
		t.Fatal(err)
	}
}

func copyFile(t *testing.T, src, dst string) {
	t.Helper()
	b, err := os.ReadFile(src)
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(dst, b, 0o644); err != nil {
		t.Fatal(err)
	}
}

// setLinkage rewrites a child's parent_linkage in place: the value (same
// length) follows its key in the locator we write.
func setLinkage(t *testing.T, path string, g GUID) {
	t.Helper()
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	i := bytes.Index(b, utf16le("parent_linkage{"))
	if i < 0 {
		t.Fatal("no parent_linkage value")
	}
	copy(b[i+len(utf16le("parent_linkage")):], utf16le("{"+g.String()+"}"))
	if err := os.WriteFile(path, b, 0o644); err != nil {
		t.Fatal(err)
	}
}

func utf16le(s string) []byte {
	var b []byte
	for _, r := range s {
		b = append(b, byte(r), 0)
	}
	return b
}

// TestCheckpointWhileOpen: CreateChild freezes an open, written disk and
// returns its child; writes go on in the child, the frozen parent refuses
// them and keeps the checkpoint's content, and 7-Zip reads the chain.
func TestCheckpointWhileOpen(t *testing.T) {
	dir := t.TempDir()
	base := filepath.Join(dir, "vm.vhdx")
	im, err := Create(base, CreateOptions{Size: 16 << 20, BlockSize: 1 << 20})
	if err != nil {
		t.Fatal(err)
	}
	model := make([]byte, 16<<20)
	fillRandom(t, im, model, 1, 10, 1<<20) // not flushed: CreateChild must
	frozen := bytes.Clone(model)
	leaf, err := im.CreateChild(filepath.Join(dir, "vm_cp1.avhdx"), CreateOptions{})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := im.WriteAt([]byte{1}, 0); !errors.Is(err, ErrReadOnly) {
		t.Errorf("write to the frozen parent: %v", err)
	}
	fillRandom(t, leaf, model, 2, 10, 100<<10)
	if got := readAll(t, leaf); !bytes.Equal(got, model) {
		t.Fatal("the new leaf does not read parent + new writes")
	}
	if err := leaf.Close(); err != nil {
		t.Fatal(err)
	}
	if got := readAll(t, mustOpen(t, base)); !bytes.Equal(got, frozen) {
		t.Fatal("the checkpoint's file changed")
	}
	if probs, err := Check(base, false); err != nil || len(probs) > 0 {
		t.Errorf("check parent: %v %v", probs, err)
	}
	leafPath := filepath.Join(dir, "vm_cp1.avhdx")
	if got := readAll(t, mustOpen(t, leafPath)); !bytes.Equal(got, model) {
		t.Fatal("the reopened leaf differs")
	}
	testenv.Tool(t, "7zz")
	run(t, "7zz", "x", "-y", "-o"+filepath.Join(dir, "x"), leafPath)
	if got, _ := os.ReadFile(filepath.Join(dir, "x", "vm_cp1.img")); !bytes.Equal(got, model) {
		t.Error("7zz reads the checkpoint chain differently")
	}
}

func mustOpen(t *testing.T, path string) *Image {
	t.Helper()
	im, err := Open(path, OpenOptions{ReadOnly: true})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { im.Close() })
	return im
}
