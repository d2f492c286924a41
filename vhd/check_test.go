package vhd

import (
	"bytes"
	"errors"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"testing"

	"github.com/vhdkit/vhdkit/disk"
)

func hasProblem(probs []Problem, warning bool, text string) bool {
	return slices.ContainsFunc(probs, func(p Problem) bool { return p.Warning == warning && strings.Contains(p.What, text) })
}

func TestCheckLeakAndRepair(t *testing.T) {
	dir := t.TempDir()
	path := filepath.Join(dir, "d.vhd")
	img, err := Create(path, CreateOptions{Size: 8 << 20})
	if err != nil {
		t.Fatal(err)
	}
	data := bytes.Repeat([]byte{7}, 3<<20)
	mustWrite(t, img, data, 1<<20) // blocks 0, 1
	if err := img.Trim(2<<20, 2<<20); err != nil {
		t.Fatal(err)
	}
	mustClose(t, img)
	probs, err := Check(path, false)
	if err != nil {
		t.Fatal(err)
	}
	if !hasProblem(probs, true, "leaked") || hasProblem(probs, false, "") {
		t.Fatalf("after a trim: %v", probs)
	}

	// A crash cut the end footer short.
	whole, _ := os.ReadFile(path)
	if err := os.WriteFile(path, whole[:len(whole)-100], 0o644); err != nil {
		t.Fatal(err)
	}
	probs, _ = Check(path, false)
	if !hasProblem(probs, true, "no valid footer at the end") {
		t.Fatalf("damaged end: %v", probs)
	}
	if _, err := Check(path, true); err != nil {
		t.Fatal(err)
	}
	fixed, _ := os.ReadFile(path)
	if !bytes.Equal(fixed[len(fixed)-footerSize:], whole[len(whole)-footerSize:]) || !bytes.Equal(fixed[:footerSize], whole[:footerSize]) {
		t.Fatal("footer not restored")
	}
	if probs, _ = Check(path, false); hasProblem(probs, true, "footer") {
		t.Fatalf("after repair: %v", probs)
	}

	// The copy at 0 is damaged: an error, since QEMU reads the copy.
	fixed[10] ^= 1
	os.WriteFile(path, fixed, 0o644)
	if probs, _ = Check(path, false); !hasProblem(probs, false, "copy at offset 0 is not a valid footer") {
		t.Fatalf("damaged copy: %v", probs)
	}
	Check(path, true)
	after, _ := os.ReadFile(path)
	if !bytes.Equal(after[:footerSize], after[len(after)-footerSize:]) {
		t.Fatal("copy not restored")
	}
	img, err = Open(path, OpenOptions{ReadOnly: true})
	if err != nil {
		t.Fatal(err)
	}
	got := make([]byte, len(data))
	img.ReadAt(got, 1<<20)
	want := bytes.Clone(data)
	clear(want[1<<20:]) // [2 MiB, 4 MiB) was trimmed
	if !bytes.Equal(got, want) {
		t.Fatal("data lost by repairs")
	}
	mustClose(t, img)
}

func TestCreateOptions(t *testing.T) {
	dir := t.TempDir()
	base, _ := makeImage(t, dir, "base.vhd", CreateOptions{Size: 1 << 20})
	for _, c := range []struct {
		name string
		opts CreateOptions
	}{
		{"zero size", CreateOptions{}},
		{"odd size", CreateOptions{Size: 1000}},
		{"too big", CreateOptions{Size: MaxSize + 512}},
		{"block size", CreateOptions{Size: 1 << 20, BlockSize: 3000}},
		{"fixed child", CreateOptions{Type: Fixed, Parent: base}},
		{"orphan", CreateOptions{Type: Differencing, Size: 1 << 20}},
		{"child size", CreateOptions{Parent: base, Size: 2 << 20}},
		{"no parent", CreateOptions{Parent: filepath.Join(dir, "nope.vhd")}},
	} {
		p := filepath.Join(dir, "new.vhd")
		if img, err := Create(p, c.opts); err == nil {
			img.Close()
			t.Errorf("%s: created", c.name)
		}
		if _, err := os.Stat(p); !errors.Is(err, os.ErrNotExist) {
			t.Errorf("%s: failed create left a file", c.name)
		}
	}
	// Never over an existing file.
	if _, err := Create(base, CreateOptions{Size: 1 << 20}); !errors.Is(err, os.ErrExist) {
		t.Errorf("over an existing file: %v", err)
	}
	// The largest size works and reads as zeros at its end.
	img, err := Create(filepath.Join(dir, "max.vhd"), CreateOptions{Size: MaxSize})
	if err != nil {
		t.Fatal(err)
	}
	b := make([]byte, 4096)
	if _, err := img.ReadAt(b, MaxSize-4096); err != nil || !disk.IsZero(b) {
		t.Fatal(err)
	}
	mustWrite(t, img, []byte("end"), MaxSize-3)
	mustClose(t, img)
	if g := GeometryFor(MaxSize); g != maxGeometry {
		t.Errorf("geometry of 2040 GiB: %v", g)
	}
}

func TestGeometry(t *testing.T) {
	// Hyper-V's 10 MiB fixed.vhd and qemu's rounded-up 10 MiB.
	for _, c := range []struct {
		size int64
		want Geometry
	}{
		{10485760, Geometry{301, 4, 17}},
		{10514432, Geometry{302, 4, 17}},
		{136365211648, Geometry{65278, 16, 255}},
		{4212736, Geometry{121, 4, 17}},
	} {
		if g := GeometryFor(c.size); g != c.want {
			t.Errorf("GeometryFor(%d) = %v, want %v", c.size, g, c.want)
		}
	}
}

// Concurrent readers and writers on disjoint ranges (run with -race).
func TestConcurrent(t *testing.T) {
	dir := t.TempDir()
	base, _ := makeImage(t, dir, "base.vhd", CreateOptions{Size: 4 << 20, BlockSize: 64 << 10})
	img, err := Create(filepath.Join(dir, "child.vhd"), CreateOptions{Parent: base, BlockSize: 64 << 10})
	if err != nil {
		t.Fatal(err)
	}
	var wg sync.WaitGroup
	const workers = 4
	part := img.Size() / workers
	for w := range workers {
		wg.Add(1)
		go func() {
			defer wg.Done()
			lo := int64(w) * part
			p := bytes.Repeat([]byte{byte(w + 1)}, 1000)
			for off := lo; off+1000 <= lo+part; off += 7777 {
				if _, err := img.WriteAt(p, off); err != nil {
					t.Error(err)
					return
				}
				got := make([]byte, 1000)
				if _, err := img.ReadAt(got, off); err != nil || !bytes.Equal(got, p) {
					t.Errorf("read back at %d: %v", off, err)
					return
				}
				if _, err := img.Extents(off, 1000); err != nil {
					t.Error(err)
				}
			}
			if err := img.Flush(); err != nil {
				t.Error(err)
			}
		}()
	}
	wg.Wait()
	mustClose(t, img)
	if _, err := img.ReadAt(make([]byte, 1), 0); !errors.Is(err, os.ErrClosed) {
		t.Errorf("read after close: %v", err)
	}
}
