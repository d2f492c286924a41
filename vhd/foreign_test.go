package vhd

import (
	"bytes"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"

	"github.com/vhdkit/vhdkit/disk"
	"github.com/vhdkit/vhdkit/raw"
	"github.com/vhdkit/vhdkit/vhdx"
)

// foreignParents are files a differencing VHD's locator may name that are
// not VHDs: a raw file (any readable file on the host: a secret) and a
// VHDX. Their content is a recognisable pattern.
var foreignParents = []struct {
	name   string
	create func(path string, size int64) (disk.Image, error)
}{
	{"secret.img", func(p string, size int64) (disk.Image, error) { return raw.Create(p, size) }},
	{"other.vhdx", func(p string, size int64) (disk.Image, error) {
		return vhdx.Create(p, vhdx.CreateOptions{Size: uint64(size)})
	}},
}

func writeForeign(t *testing.T, path string, create func(string, int64) (disk.Image, error), size int64) {
	t.Helper()
	p, err := create(path, size)
	if err != nil {
		t.Fatal(err)
	}
	mustWrite(t, p, bytes.Repeat([]byte("SECRET!!"), 4096/8), 0)
	mustClose(t, p)
}

// A crafted child whose locators name a raw file or a VHDX — with the
// parent unique id the child records, or a zero one — must not serve that
// file's bytes: Open refuses it as not a VHD, whichever way the parent is
// named (locator, ParentPath), and Create and SetParent refuse such a
// parent.
func TestNonVHDParentRefused(t *testing.T) {
	const size = 4 << 20
	for _, c := range foreignParents {
		t.Run(c.name, func(t *testing.T) {
			dir := t.TempDir()
			base, child := makeChain(t, dir)
			// The locators name base.vhd (absolute and relative); put the
			// foreign file there instead.
			os.Remove(base)
			writeForeign(t, base, c.create, size)
			for _, zeroID := range []bool{false, true} {
				if zeroID {
					setParentID(t, child, UUID{})
				}
				for _, o := range []OpenOptions{{ReadOnly: true}, {ReadOnly: true, ParentPath: base}, {}} {
					img, err := Open(child, o)
					if err == nil {
						b := make([]byte, 4096)
						img.ReadAt(b, 0)
						img.Close()
						t.Fatalf("zero id %v, %+v: opened over %s (reads %q...)", zeroID, o, c.name, b[:16])
					}
					if !errors.Is(err, disk.ErrParentMismatch) || !strings.Contains(err.Error(), "not a VHD") {
						t.Errorf("zero id %v, %+v: %v, want a parent mismatch naming a non-VHD", zeroID, o, err)
					}
				}
			}
			// Neither Create nor SetParent links a VHD to it.
			if img, err := Create(filepath.Join(dir, "new.vhd"), CreateOptions{Parent: base}); err == nil {
				img.Close()
				t.Error("Create made a child of a non-VHD")
			}
			if _, err := os.Stat(filepath.Join(dir, "new.vhd")); !errors.Is(err, os.ErrNotExist) {
				t.Error("failed Create left a file")
			}
			img, err := Open(child, OpenOptions{NoParent: true})
			if err != nil {
				t.Fatal(err)
			}
			if err := img.SetParent(base); err == nil || !errors.Is(err, disk.ErrUnsupported) {
				t.Errorf("SetParent to %s: %v", c.name, err)
			}
			mustClose(t, img)
		})
	}
}

// The right parent found after a foreign file: a stale locator naming a
// non-VHD is passed over for the next candidate.
func TestNonVHDCandidateSkipped(t *testing.T) {
	dir := t.TempDir()
	base, child := makeChain(t, dir)
	want := readChain(t, child)
	// The absolute locator (W2ku) still names base.vhd; the relative one
	// is tried first. Move the real parent into a folder the absolute
	// path leads nowhere near and leave a raw file at the relative name.
	os.Mkdir(filepath.Join(dir, "sub"), 0o755)
	moved := filepath.Join(dir, "sub", "base.vhd")
	if err := os.Rename(base, moved); err != nil {
		t.Fatal(err)
	}
	writeForeign(t, base, foreignParents[0].create, 4<<20)
	if _, err := Open(child, OpenOptions{ReadOnly: true}); !errors.Is(err, disk.ErrParentMismatch) {
		t.Fatalf("only a raw file at the locators: %v", err)
	}
	img, err := Open(child, OpenOptions{ReadOnly: true, ParentPath: moved})
	if err != nil {
		t.Fatal(err)
	}
	defer mustClose(t, img)
	if got := readAll(t, img); !bytes.Equal(got, want) {
		t.Fatal(diffAt(got, want))
	}
}

func readChain(t *testing.T, path string) []byte {
	t.Helper()
	img, err := Open(path, OpenOptions{ReadOnly: true})
	if err != nil {
		t.Fatal(err)
	}
	defer mustClose(t, img)
	return readAll(t, img)
}

// A FIFO where a parent or an image should be does not block: opening it
// read-only finds no VHD (a locator naming one is also refused by its
// type before any open; this covers a file swapped in between).
func TestFIFONeverBlocks(t *testing.T) {
	dir := t.TempDir()
	fifo := filepath.Join(dir, "fifo.vhd")
	if err := syscall.Mkfifo(fifo, 0o600); err != nil {
		t.Skip(err)
	}
	done := make(chan error, 2)
	go func() {
		_, ok := peekFooter(fifo, false)
		if ok {
			done <- errors.New("a FIFO read as a VHD")
			return
		}
		done <- nil
	}()
	go func() {
		img, err := Open(fifo, OpenOptions{ReadOnly: true})
		if err == nil {
			img.Close()
			done <- errors.New("a FIFO opened as a VHD")
			return
		}
		done <- nil
	}()
	// A regression hangs here (until go test's timeout).
	for range 2 {
		if err := <-done; err != nil {
			t.Error(err)
		}
	}
}
