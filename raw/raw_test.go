package raw_test

import (
	"bytes"
	"errors"
	"io"
	"io/fs"
	"math/rand/v2"
	"os"
	"path/filepath"
	"sync"
	"testing"

	"github.com/vhdkit/vhdkit/disk"
	"github.com/vhdkit/vhdkit/disk/disktest"
	"github.com/vhdkit/vhdkit/raw"
	"github.com/vhdkit/vhdkit/storage"
)

// TestConformanceMemFile runs the suite over raw images on a MemFile,
// which takes the paths for files that are not OS files (zeros written,
// one data extent). Reopen goes through a crash clone, so whatever Flush
// did not make durable is lost.
func TestConformanceMemFile(t *testing.T) {
	var mu sync.Mutex
	files := map[disk.Image]*storage.MemFile{}
	open := func(t *testing.T, f *storage.MemFile) disk.Image {
		img, err := raw.New(f, false)
		if err != nil {
			t.Fatal(err)
		}
		mu.Lock()
		files[img] = f
		mu.Unlock()
		return img
	}
	disktest.Run(t, disktest.Harness{
		New: func(t *testing.T, size int64) (disk.Image, []byte) {
			f := storage.NewMemFile(nil)
			if err := f.Truncate(size); err != nil {
				t.Fatal(err)
			}
			return open(t, f), nil
		},
		Reopen: func(t *testing.T, img disk.Image) disk.Image {
			if err := img.Flush(); err != nil {
				t.Fatal(err)
			}
			mu.Lock()
			f := files[img]
			mu.Unlock()
			c := f.CrashClone(rand.New(rand.NewPCG(1, 2)))
			if err := img.Close(); err != nil {
				t.Fatal(err)
			}
			return open(t, c)
		},
	})
}

func TestCreateSparseTrimExtents(t *testing.T) {
	const size = 8 << 20
	path := filepath.Join(t.TempDir(), "d.img")
	img, err := raw.Create(path, size)
	if err != nil {
		t.Fatal(err)
	}
	defer img.Close()
	if fi, err := os.Stat(path); err != nil || fi.Size() != size {
		t.Fatalf("file size %v, %v", fi.Size(), err)
	}
	list, err := img.Extents(0, size)
	if err != nil {
		t.Fatal(err)
	}
	if len(list) == 1 && list[0].Type == disk.Data {
		t.Skip("file system reports no holes")
	}
	hole := disk.Extent{Offset: 0, Length: size, Type: disk.Hole, Depth: 1}
	if len(list) != 1 || list[0] != hole {
		t.Fatalf("fresh image extents %+v, want %+v", list, hole)
	}
	if _, err := img.WriteAt([]byte{1}, 1<<20+5); err != nil {
		t.Fatal(err)
	}
	list, _ = img.Extents(0, size)
	if len(list) != 3 || list[1].Type != disk.Data || list[1].Depth != 0 ||
		list[1].Offset > 1<<20+5 || list[1].Offset+list[1].Length <= 1<<20+5 {
		t.Fatalf("after one write: %+v", list)
	}
	if err := img.Trim(list[1].Offset, list[1].Length); err != nil {
		t.Fatal(err)
	}
	if list, _ = img.Extents(0, size); len(list) != 1 || list[0] != hole {
		t.Fatalf("after trimming the data: %+v", list)
	}
	// A part of the map starts and ends where asked.
	if list, _ = img.Extents(3, 100); len(list) != 1 || list[0] != (disk.Extent{Offset: 3, Length: 100, Type: disk.Hole, Depth: 1}) {
		t.Fatalf("Extents(3, 100) = %+v", list)
	}
}

func TestCreateRefusesExisting(t *testing.T) {
	path := filepath.Join(t.TempDir(), "d.img")
	if err := os.WriteFile(path, []byte("keep me"), 0o666); err != nil {
		t.Fatal(err)
	}
	if _, err := raw.Create(path, 1<<20); !errors.Is(err, fs.ErrExist) {
		t.Fatalf("Create over a file: %v, want fs.ErrExist", err)
	}
	if b, _ := os.ReadFile(path); string(b) != "keep me" {
		t.Fatalf("Create changed the existing file to %q", b)
	}
	if _, err := raw.Create(filepath.Join(t.TempDir(), "n.img"), -1); err == nil {
		t.Fatal("Create with a negative size succeeded")
	}
	if _, err := raw.Open(filepath.Join(t.TempDir(), "missing.img"), disk.OpenOptions{}); !errors.Is(err, fs.ErrNotExist) {
		t.Fatalf("Open of a missing file: %v", err)
	}
}

func TestReadOnly(t *testing.T) {
	path := filepath.Join(t.TempDir(), "d.raw")
	content := bytes.Repeat([]byte("0123456789abcdef"), 4096)
	if err := os.WriteFile(path, content, 0o666); err != nil {
		t.Fatal(err)
	}
	img, err := disk.Open(path, disk.OpenOptions{ReadOnly: true})
	if err != nil {
		t.Fatal(err)
	}
	defer img.Close()
	if img.Size() != int64(len(content)) {
		t.Fatalf("Size %d", img.Size())
	}
	if _, err := img.WriteAt([]byte{1}, 0); !errors.Is(err, disk.ErrReadOnly) {
		t.Errorf("WriteAt: %v", err)
	}
	if err := img.(disk.Trimmer).Trim(0, 4096); !errors.Is(err, disk.ErrReadOnly) {
		t.Errorf("Trim: %v", err)
	}
	if err := img.(disk.Zeroer).WriteZeroes(0, 4096, false); !errors.Is(err, disk.ErrReadOnly) {
		t.Errorf("WriteZeroes: %v", err)
	}
	if err := img.Flush(); err != nil {
		t.Errorf("Flush: %v", err)
	}
	got := make([]byte, len(content))
	if n, err := img.ReadAt(got, 0); n != len(got) || err != nil || !bytes.Equal(got, content) {
		t.Fatalf("ReadAt = %d, %v", n, err)
	}
	if b, _ := os.ReadFile(path); !bytes.Equal(b, content) {
		t.Fatal("the file changed")
	}
}

func TestRegistered(t *testing.T) {
	f, ok := disk.FormatByName("raw")
	if !ok || f.Match != nil || f.Open == nil {
		t.Fatalf("raw format %+v, %v", f, ok)
	}
	for _, name := range []string{"a.img", "b.RAW", "c.bin"} {
		if f, ok := disk.FormatForPath(name); !ok || f.Name != "raw" {
			t.Errorf("FormatForPath(%q) = %q, %v", name, f.Name, ok)
		}
	}
	// Open through the registry returns no typed nil on failure.
	if img, err := f.Open(filepath.Join(t.TempDir(), "missing.img"), disk.OpenOptions{}); err == nil || img != nil {
		t.Fatalf("Open of a missing file = %v, %v", img, err)
	}
}

func TestFileErrors(t *testing.T) {
	// Every failure of the file comes back wrapped.
	for i := int64(0); ; i++ {
		ff := &storage.FaultFile{File: storage.NewMemFile(make([]byte, 256<<10)), FailAt: i, Dead: true}
		img, err := raw.New(ff, false)
		if err != nil {
			t.Fatal(err)
		}
		steps := []func() error{
			func() error { _, err := img.WriteAt(make([]byte, 1000), 10); return err },
			func() error { _, err := img.ReadAt(make([]byte, 1000), 10); return err },
			func() error { return img.WriteZeroes(0, 200<<10, true) }, // 4 writes of 64 KiB
			func() error { return img.Flush() },
		}
		for _, s := range steps {
			if err = s(); err != nil {
				break
			}
		}
		if !ff.Injected() {
			if err != nil || i != 7 {
				t.Fatalf("run of %d ops ended with %v", i, err)
			}
			break
		}
		if !errors.Is(err, storage.ErrInjected) {
			t.Fatalf("FailAt %d: %v, want ErrInjected", i, err)
		}
	}
}

func TestFileShrankUnderneath(t *testing.T) {
	f := storage.NewMemFile(make([]byte, 8192))
	img, err := raw.New(f, false)
	if err != nil {
		t.Fatal(err)
	}
	f.Truncate(4096)
	n, err := img.ReadAt(make([]byte, 8192), 0)
	if n != 4096 || !errors.Is(err, io.ErrUnexpectedEOF) {
		t.Fatalf("ReadAt past the shrunk file = %d, %v", n, err)
	}
	if _, err := img.ReadAt(make([]byte, 1), 8192); !errors.Is(err, disk.ErrOutOfRange) {
		t.Fatalf("ReadAt past the image: %v", err)
	}
}
