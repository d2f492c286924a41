package vhd

import (
	"bytes"
	"encoding/binary"
	"errors"
	"math/rand/v2"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/vhdkit/vhdkit/disk"
)

// makeImage creates an image with data in a few blocks and returns its
// path and content.
func makeImage(t *testing.T, dir, name string, opts CreateOptions) (string, []byte) {
	t.Helper()
	path := filepath.Join(dir, name)
	img, err := Create(path, opts)
	if err != nil {
		t.Fatal(err)
	}
	r := rand.New(rand.NewPCG(8, uint64(len(name))))
	content := make([]byte, img.Size())
	for i := 0; i < 6; i++ {
		off := r.Int64N(img.Size() - 70000)
		p := make([]byte, 70000)
		fill(r, p)
		mustWrite(t, img, p, off)
		copy(content[off:], p)
	}
	mustClose(t, img)
	return path, content
}

func TestTruncated(t *testing.T) {
	dir := t.TempDir()
	for _, typ := range []Type{Fixed, Dynamic} {
		src, content := makeImage(t, dir, typ.String()+".vhd", CreateOptions{Type: typ, Size: 3 << 20, BlockSize: 512 << 10})
		whole, err := os.ReadFile(src)
		if err != nil {
			t.Fatal(err)
		}
		for _, cut := range []int64{0, 1, 100, 511, 512, 513, 1000, 1536, 1600, 2048, 4096, 600 << 10,
			int64(len(whole)) / 2, int64(len(whole)) - 513, int64(len(whole)) - 512, int64(len(whole)) - 100, int64(len(whole)) - 1} {
			if cut >= int64(len(whole)) {
				continue
			}
			p := filepath.Join(dir, "cut.vhd")
			if err := os.WriteFile(p, whole[:cut], 0o644); err != nil {
				t.Fatal(err)
			}
			img, err := Open(p, OpenOptions{ReadOnly: true})
			if err != nil {
				var fe *FormatError
				if !errors.Is(err, disk.ErrFormat) || !errors.As(err, &fe) {
					t.Errorf("%v cut at %d: %v, want a FormatError", typ, cut, err)
				}
				continue
			}
			// Only a cut into the end footer of a dynamic image may open
			// (from the footer copy), or a fixed image missing only the
			// footer's last (reserved) byte, which is the 511-byte footer of
			// old images; then it reads right.
			if typ == Fixed && cut != int64(len(whole))-1 || cut < int64(len(whole))-footerSize {
				t.Errorf("%v cut at %d opened", typ, cut)
			} else if got := readAll(t, img); !bytes.Equal(got, content) {
				t.Errorf("%v cut at %d reads wrong", typ, cut)
			}
			img.Close()
		}
	}
}

func TestBadChecksums(t *testing.T) {
	dir := t.TempDir()
	src, _ := makeImage(t, dir, "d.vhd", CreateOptions{Size: 3 << 20})
	whole, err := os.ReadFile(src)
	if err != nil {
		t.Fatal(err)
	}
	end := int64(len(whole)) - footerSize
	for _, c := range []struct {
		name    string
		flip    []int64 // bytes to change
		opens   bool    // opens anyway, from the other footer
		structs string
		off     int64
	}{
		{"end footer", []int64{end + 30}, true, "", 0},
		{"both footers", []int64{end + 30, 30}, false, "footer", end + footerChecksumAt},
		{"header", []int64{footerSize + 100}, false, "dynamic header", footerSize + headerChecksumAt},
	} {
		t.Run(c.name, func(t *testing.T) {
			b := bytes.Clone(whole)
			for _, o := range c.flip {
				b[o] ^= 0x40
			}
			p := filepath.Join(dir, "bad.vhd")
			if err := os.WriteFile(p, b, 0o644); err != nil {
				t.Fatal(err)
			}
			img, err := Open(p, OpenOptions{ReadOnly: true})
			if c.opens {
				if err != nil {
					t.Fatal(err)
				}
				if w := img.Info().Warnings; len(w) == 0 {
					t.Error("no warning about the damaged footer")
				}
				img.Close()
				return
			}
			var fe *FormatError
			if !errors.Is(err, disk.ErrChecksum) || !errors.As(err, &fe) || fe.Struct != c.structs || fe.Offset != c.off {
				t.Fatalf("got %v, want a checksum error on the %s at %d", err, c.structs, c.off)
			}
			if !strings.Contains(err.Error(), p) {
				t.Errorf("error %q does not name the file", err)
			}
			if img, err := Open(p, OpenOptions{ReadOnly: true, IgnoreChecksum: true}); err != nil {
				t.Errorf("IgnoreChecksum: %v", err)
			} else {
				img.Close()
			}
		})
	}
}

// Hand-made hostile values, each rejected with a FormatError naming the
// structure.
func TestHostileFields(t *testing.T) {
	dir := t.TempDir()
	src, _ := makeImage(t, dir, "d.vhd", CreateOptions{Size: 3 << 20, BlockSize: 512 << 10})
	whole, err := os.ReadFile(src)
	if err != nil {
		t.Fatal(err)
	}
	end := int64(len(whole)) - footerSize
	setFooter := func(b []byte, at int, v uint64, n int) {
		for _, base := range []int64{0, end} {
			put(b[base+int64(at):], v, n)
			binary.BigEndian.PutUint32(b[base+footerChecksumAt:], checksum(b[base:base+footerSize], footerChecksumAt))
		}
	}
	setHeader := func(b []byte, at int, v uint64, n int) {
		put(b[footerSize+at:], v, n)
		binary.BigEndian.PutUint32(b[footerSize+headerChecksumAt:], checksum(b[footerSize:footerSize+headerSize], headerChecksumAt))
	}
	for _, c := range []struct {
		name    string
		edit    func(b []byte)
		want    error
		struct_ string
	}{
		{"huge size", func(b []byte) { setFooter(b, 48, 3<<40, 8) }, disk.ErrUnsupported, "footer"},
		{"disk type 5", func(b []byte) { setFooter(b, 60, 5, 4) }, disk.ErrUnsupported, "footer"},
		{"header past end", func(b []byte) { setFooter(b, 16, 1<<40, 8) }, disk.ErrFormat, "footer"},
		{"block size 3", func(b []byte) { setHeader(b, headerBlockSizeAt, 3, 4) }, disk.ErrFormat, "dynamic header"},
		{"block size 1G", func(b []byte) { setHeader(b, headerBlockSizeAt, 1<<30, 4) }, disk.ErrUnsupported, "dynamic header"},
		{"too many entries", func(b []byte) { setHeader(b, headerMaxEntAt, 1<<30, 4) }, disk.ErrUnsupported, "dynamic header"},
		{"BAT past end", func(b []byte) { setHeader(b, headerTableOffAt, uint64(end), 8) }, disk.ErrFormat, "dynamic header"},
		{"too few entries", func(b []byte) { setHeader(b, headerMaxEntAt, 2, 4) }, disk.ErrFormat, "dynamic header"},
		{"BAT over header", func(b []byte) { setHeader(b, headerTableOffAt, 1024, 8) }, disk.ErrFormat, "BAT"},
		{"block past end", func(b []byte) { put(b[1536:], uint64(end/SectorSize), 4) }, disk.ErrFormat, "BAT"},
		{"block over BAT", func(b []byte) { put(b[1536:], 3, 4) }, disk.ErrFormat, "BAT"},
		{"blocks overlap", func(b []byte) {
			first := uint64(binary.BigEndian.Uint32(findAllocated(b)))
			put(b[1536:], first+1, 4)
			put(b[1540:], first, 4)
		}, disk.ErrFormat, "BAT"},
	} {
		t.Run(c.name, func(t *testing.T) {
			b := bytes.Clone(whole)
			c.edit(b)
			p := filepath.Join(dir, "hostile.vhd")
			if err := os.WriteFile(p, b, 0o644); err != nil {
				t.Fatal(err)
			}
			_, err := Open(p, OpenOptions{ReadOnly: true})
			var fe *FormatError
			if !errors.Is(err, c.want) || !errors.As(err, &fe) || fe.Struct != c.struct_ {
				t.Fatalf("got %v, want %v from the %s", err, c.want, c.struct_)
			}
		})
	}
}

// findAllocated returns the first allocated BAT entry of an image made by
// makeImage (BAT at 1536).
func findAllocated(b []byte) []byte {
	for i := 1536; ; i += 4 {
		if binary.BigEndian.Uint32(b[i:]) != batUnused {
			return b[i : i+4]
		}
	}
}

func put(b []byte, v uint64, n int) {
	switch n {
	case 4:
		binary.BigEndian.PutUint32(b, uint32(v))
	case 8:
		binary.BigEndian.PutUint64(b, v)
	}
}

// A fixed image with the 511-byte footer of old Virtual PC versions.
func TestFooter511(t *testing.T) {
	dir := t.TempDir()
	src, content := makeImage(t, dir, "f.vhd", CreateOptions{Type: Fixed, Size: 1 << 20})
	whole, err := os.ReadFile(src)
	if err != nil {
		t.Fatal(err)
	}
	short := whole[:len(whole)-1] // the last footer byte is reserved (zero)
	p := filepath.Join(dir, "short.vhd")
	if err := os.WriteFile(p, short, 0o644); err != nil {
		t.Fatal(err)
	}
	img, err := Open(p, OpenOptions{})
	if err != nil {
		t.Fatal(err)
	}
	if got := readAll(t, img); !bytes.Equal(got, content) {
		t.Fatal("511-byte footer image reads wrong")
	}
	mustWrite(t, img, []byte("tail"), img.Size()-4)
	mustClose(t, img)
	after, _ := os.ReadFile(p)
	if len(after) != len(short) || !bytes.Equal(after[len(after)-511:], short[len(short)-511:]) {
		t.Fatal("writing moved or changed the 511-byte footer")
	}
}
