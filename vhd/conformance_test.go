package vhd

import (
	"math/rand/v2"
	"path/filepath"
	"sync"
	"testing"

	"github.com/vhdkit/vhdkit/disk"
	"github.com/vhdkit/vhdkit/disk/disktest"
	"github.com/vhdkit/vhdkit/storage"
)

// reopenPath flushes, closes and opens a file-backed image again.
func reopenPath(t *testing.T, img disk.Image) disk.Image {
	t.Helper()
	im := img.(*Image)
	if err := im.Close(); err != nil {
		t.Fatal(err)
	}
	re, err := Open(im.path, OpenOptions{})
	if err != nil {
		t.Fatal(err)
	}
	return re
}

// memImages remembers the MemFile under each image, so that Reopen can
// open what a power cut right after Flush leaves.
type memImages struct {
	mu    sync.Mutex
	files map[disk.Image]*storage.MemFile
}

func (m *memImages) add(img *Image, f *storage.MemFile) *Image {
	m.mu.Lock()
	defer m.mu.Unlock()
	if m.files == nil {
		m.files = map[disk.Image]*storage.MemFile{}
	}
	m.files[img] = f
	return img
}

func (m *memImages) reopenCrashed(t *testing.T, img disk.Image) disk.Image {
	t.Helper()
	if err := img.Flush(); err != nil {
		t.Fatal(err)
	}
	m.mu.Lock()
	f := m.files[img]
	m.mu.Unlock()
	c := f.CrashClone(rand.New(rand.NewPCG(9, 9)))
	path := img.(*Image).path
	if err := img.Close(); err != nil {
		t.Fatal(err)
	}
	// A crash after a Flush leaves a file the strict Check finds no error
	// in.
	probs, err := CheckFile(c, path)
	if err != nil {
		t.Fatal(err)
	}
	for _, p := range probs {
		if !p.Warning {
			t.Fatalf("after a crash: Check: %v", p)
		}
	}
	re, err := OpenFile(c, path, OpenOptions{})
	if err != nil {
		t.Fatal(err)
	}
	return m.add(re, c)
}

// parentChain creates levels images in dir, each over the previous, with
// some data in each, and returns the top's path and content.
func parentChain(t *testing.T, dir string, size int64, levels int) (string, []byte) {
	t.Helper()
	r := rand.New(rand.NewPCG(10, uint64(levels)))
	content := make([]byte, size)
	var path string
	for l := range levels {
		opts := CreateOptions{Size: uint64(size)}
		if l > 0 {
			opts = CreateOptions{Parent: path}
		}
		path = filepath.Join(dir, "level"+string(rune('0'+l))+".vhd")
		img, err := Create(path, opts)
		if err != nil {
			t.Fatal(err)
		}
		for range 12 {
			off := r.Int64N(size)
			p := make([]byte, min(size-off, r.Int64N(300<<10)+1))
			fill(r, p)
			mustWrite(t, img, p, off)
			copy(content[off:], p)
		}
		mustClose(t, img)
	}
	return path, content
}

func TestConformance(t *testing.T) {
	fileBacked := func(opts CreateOptions) disktest.Harness {
		return disktest.Harness{
			New: func(t *testing.T, size int64) (disk.Image, []byte) {
				o := opts
				o.Size = uint64(size)
				img, err := Create(filepath.Join(t.TempDir(), "d.vhd"), o)
				if err != nil {
					t.Fatal(err)
				}
				return img, nil
			},
			Reopen: reopenPath,
		}
	}
	t.Run("fixed", func(t *testing.T) { disktest.Run(t, fileBacked(CreateOptions{Type: Fixed})) })
	t.Run("dynamic", func(t *testing.T) { disktest.Run(t, fileBacked(CreateOptions{Type: Dynamic})) })
	t.Run("dynamic-64K-memfile", func(t *testing.T) {
		var m memImages
		disktest.Run(t, disktest.Harness{
			New: func(t *testing.T, size int64) (disk.Image, []byte) {
				f := storage.NewMemFile(nil)
				img, err := CreateFile(f, "/nonexistent/d.vhd", CreateOptions{Size: uint64(size), BlockSize: 64 << 10})
				if err != nil {
					t.Fatal(err)
				}
				return m.add(img, f), nil
			},
			Reopen: m.reopenCrashed,
		})
	})
	for _, levels := range []int{1, 2} {
		t.Run("differencing-over-"+string(rune('0'+levels)), func(t *testing.T) {
			var m memImages
			disktest.Run(t, disktest.Harness{
				New: func(t *testing.T, size int64) (disk.Image, []byte) {
					dir := t.TempDir()
					parent, content := parentChain(t, dir, size, levels)
					// The child lives in memory, next to its parents.
					f := storage.NewMemFile(nil)
					img, err := CreateFile(f, filepath.Join(dir, "child.vhd"), CreateOptions{Parent: parent, BlockSize: 512 << 10})
					if err != nil {
						t.Fatal(err)
					}
					return m.add(img, f), content
				},
				Reopen:          m.reopenCrashed,
				TrimUnspecified: true,
			})
		})
	}
}
