package vhd

import (
	"bytes"
	"errors"
	"flag"
	"io"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"

	"github.com/vhdkit/vhdkit/disk"
	"github.com/vhdkit/vhdkit/storage"
)

// fuzzSamples lists the real VHD samples for seeding; absent samples give
// no seeds except in CI, where they are required. d2v-zerofilled.vhd is
// left out: decompressing its 250 MiB in every fuzz worker costs more than
// its structures add (FuzzFooter gets a d2v-like footer).
var fuzzSamples = []string{
	"hyperv/fixed.vhd.gz", "hyperv/dynamic.vhd.gz", "hyperv/fat-differential.vhd.gz",
	"hyperv/hyperv2012r2-dynamic.vhd.bz2", "qemu-made/dfvfs-ext2.vhd.gz",
	"virtualpc/virtualpc-dynamic.vhd.bz2",
	"synthetic-parents/fat-parent.vhd.gz", "broken/dfvfs-image.vhd.gz", "broken/dfvfs-image-differential.vhd.gz",
}

func haveSamples(f *testing.F) bool {
	wd, _ := os.Getwd()
	for d := wd; filepath.Dir(d) != d; d = filepath.Dir(d) {
		if _, err := os.Stat(filepath.Join(d, "go.mod")); err == nil {
			if _, err := os.Stat(filepath.Join(filepath.Dir(d), "shared", "samples")); err == nil {
				return true
			}
			break
		}
	}
	if inCI() {
		f.Fatal("samples missing (CI=true)")
	}
	return false
}

// sampleStructs calls fn with each sample's bytes: the file (or its first
// and last 256 KiB when larger, with the footer).
func sampleStructs(f *testing.F, fn func(name string, b []byte)) {
	// Fuzz workers get their inputs from the coordinator, and restart
	// now and then: spare them decompressing every sample again.
	if w := flag.Lookup("test.fuzzworker"); w != nil && w.Value.String() == "true" {
		return
	}
	if !haveSamples(f) {
		return
	}
	for _, s := range fuzzSamples {
		b, err := os.ReadFile(sample(f, s))
		if err != nil {
			f.Fatal(err)
		}
		fn(s, b)
	}
}

// ourImage builds a small image with a few blocks in memory; parent, when
// set, makes it a differencing child of that file.
func ourImage(f *testing.F, typ Type, path, parent string) []byte {
	m := storage.NewMemFile(nil)
	img, err := CreateFile(m, path, CreateOptions{Type: typ, Size: 64 << 10, BlockSize: 4096, Parent: parent})
	if err != nil {
		f.Fatal(err)
	}
	for _, off := range []int64{0, 5000, 40960 - 100} {
		if _, err := img.WriteAt(bytes.Repeat([]byte{0xAB}, 700), off); err != nil {
			f.Fatal(err)
		}
	}
	if err := img.Close(); err != nil {
		f.Fatal(err)
	}
	return m.Bytes()
}

func FuzzFooter(f *testing.F) {
	sampleStructs(f, func(_ string, b []byte) {
		f.Add(b[len(b)-footerSize:])
		f.Add(b[:footerSize])
	})
	f.Add(ourImage(f, Dynamic, "/nonexistent/x.vhd", "")[:footerSize])
	d2v := footer{Features: featureReserved, Version: formatVersion, DataOffset: footerSize, CurrentSize: 263454720,
		OriginalSize: 263454720, Geometry: maxGeometry, DiskType: Dynamic}
	copy(d2v.Cookie[:], footerCookie)
	copy(d2v.CreatorApp[:], "d2v\x00")
	raw := d2v.encode()
	f.Add(raw[:])
	f.Add(append([]byte{0}, raw[:footerSize-1]...)) // a 511-byte footer
	f.Fuzz(func(t *testing.T, b []byte) {
		m := storage.NewMemFile(b)
		ft, raw, at, _, err := readFooter(m, int64(len(b)), false)
		if err != nil {
			var fe *FormatError
			if !errors.As(err, &fe) && !errors.Is(err, io.EOF) {
				t.Fatalf("error of type %T: %v", err, err)
			}
			return
		}
		if at < 0 || at > int64(len(b)) {
			t.Fatalf("footer at %d in %d bytes", at, len(b))
		}
		if size, _ := ft.virtualSize(); size < 0 || size > MaxSize || size%SectorSize != 0 {
			t.Fatalf("virtual size %d", size)
		}
		// Encoding what was decoded gives back the fields.
		enc := ft.encode()
		if decodeFooter(enc[:]) != ft || !bytes.Equal(enc[:85], raw[:85]) && checksum(raw[:], footerChecksumAt) == ft.Checksum {
			t.Fatalf("footer does not round-trip")
		}
	})
}

func FuzzHeader(f *testing.F) {
	sampleStructs(f, func(_ string, b []byte) {
		if len(b) >= footerSize+headerSize && string(b[footerSize:footerSize+8]) == headerCookie {
			f.Add(b[footerSize:footerSize+headerSize], int64(len(b)-footerSize))
		}
	})
	d := ourImage(f, Dynamic, "/nonexistent/x.vhd", "")
	f.Add(d[footerSize:footerSize+headerSize], int64(len(d)-footerSize))
	f.Fuzz(func(t *testing.T, b []byte, limit int64) {
		if len(b) < headerSize || limit < 0 {
			return
		}
		h := decodeHeader(b)
		_ = h.parentName()
		if err := h.Validate(limit); err != nil {
			var fe *FormatError
			if !errors.As(err, &fe) {
				t.Fatalf("error of type %T", err)
			}
			return
		}
		if !isPowerOfTwo(uint64(h.BlockSize)) || h.BlockSize > maxBlockSize || h.TableOffset+4*uint64(h.MaxTableEntries) > uint64(limit) {
			t.Fatalf("Validate passed %+v with limit %d", h, limit)
		}
		for _, e := range h.Locators {
			if e.Validate(limit) == nil && e.known() && e.DataLength > 0 && e.DataOffset+uint64(e.DataLength) > uint64(limit) {
				t.Fatalf("locator %+v passed beyond %d", e, limit)
			}
		}
		enc := h.encode()
		if decodeHeader(enc[:]) != h {
			t.Fatal("header does not round-trip")
		}
	})
}

func FuzzLocators(f *testing.F) {
	sampleStructs(f, func(_ string, b []byte) {
		if len(b) < footerSize+headerSize || string(b[footerSize:footerSize+8]) != headerCookie {
			return
		}
		h := decodeHeader(b[footerSize:])
		for _, e := range h.Locators {
			if e.known() && e.DataLength > 0 && e.DataOffset+uint64(e.DataLength) <= uint64(len(b)) {
				f.Add(e.Code, b[e.DataOffset:e.DataOffset+uint64(e.DataLength)], h.parentName())
			}
		}
	})
	f.Add(uint32(platformW2ru), encodeUTF16LE(`.\..\base\parent.vhd`), `C:\vms\parent.vhd`)
	f.Add(uint32(platformW2ku), encodeUTF16LE(`\\server\share\p.vhd`), "")
	f.Add(uint32(platformMacX), []byte("file://localhost/Users/x/p.vhd"), "p.vhd")
	f.Add(uint32(platformWi2k), []byte("C:\\p\xe9.vhd\x00"), "")
	f.Fuzz(func(t *testing.T, code uint32, data []byte, name string) {
		p, err := decodeLocatorPath(code, data)
		if err != nil {
			return
		}
		const dir = "/vms/child"
		for _, c := range parentCandidates(dir, []Locator{{Platform: platformName(code), Path: p}}, name) {
			if !filepath.IsAbs(c) || strings.ContainsRune(c, 0) && !strings.ContainsRune(p+name, 0) {
				t.Fatalf("candidate %q from %q/%q", c, p, name)
			}
		}
	})
}

func FuzzBAT(f *testing.F) {
	sampleStructs(f, func(_ string, b []byte) {
		if len(b) < footerSize+headerSize || string(b[footerSize:footerSize+8]) != headerCookie {
			return
		}
		h := decodeHeader(b[footerSize:])
		end := min(uint64(len(b)), h.TableOffset+4*uint64(h.MaxTableEntries))
		if h.TableOffset < end && h.BlockSize > 0 {
			f.Add(b[h.TableOffset:end], h.BlockSize, int64(len(b)-footerSize), int64(h.TableOffset))
		}
	})
	d := ourImage(f, Dynamic, "/nonexistent/x.vhd", "")
	f.Add(d[1536:1536+64], uint32(4096), int64(len(d)-footerSize), int64(1536))
	f.Fuzz(func(t *testing.T, raw []byte, bs uint32, limit, batOff int64) {
		if !isPowerOfTwo(uint64(bs)) || bs > maxBlockSize || bs < SectorSize || limit < 0 || batOff < 0 || len(raw) > 1<<16 {
			return
		}
		tb := &bat{off: batOff, raw: raw, n: int64(len(raw) / 4)}
		blockSpan := bitmapSize(int64(bs)) + int64(bs)
		reserved := []span{{batOff, batOff + int64(len(raw)), "BAT"}}
		if err := tb.validateBlocks(blockSpan, limit, reserved); err != nil {
			if !errors.Is(err, disk.ErrFormat) {
				t.Fatalf("error %v", err)
			}
			return
		}
		// Passed: no two blocks overlap, none overlaps the BAT, all fit.
		for i := range tb.n {
			a := int64(tb.entry(i))
			if tb.entry(i) == batUnused {
				continue
			}
			if a*SectorSize+blockSpan > limit || a*SectorSize < batOff+int64(len(raw)) && batOff < a*SectorSize+blockSpan {
				t.Fatalf("entry %d (%#x) passed", i, a)
			}
			for j := range i {
				b := int64(tb.entry(j))
				if tb.entry(j) != batUnused && a*SectorSize < b*SectorSize+blockSpan && b*SectorSize < a*SectorSize+blockSpan {
					t.Fatalf("entries %d and %d overlap", i, j)
				}
			}
		}
	})
}

// changedImage is ourImage after change (SetParent, Resize): its header
// and BAT sit at the end of the file.
func changedImage(f *testing.F, typ Type, path, parent string, change func(*Image) error) []byte {
	m := storage.NewMemFile(nil)
	img, err := CreateFile(m, path, CreateOptions{Type: typ, Size: 64 << 10, BlockSize: 4096, Parent: parent})
	if err != nil {
		f.Fatal(err)
	}
	if _, err := img.WriteAt(bytes.Repeat([]byte{0xCD}, 5000), 7000); err != nil {
		f.Fatal(err)
	}
	if err := change(img); err != nil {
		f.Fatal(err)
	}
	if err := img.Close(); err != nil {
		f.Fatal(err)
	}
	return m.Bytes()
}

// FuzzOpen opens whole files: anything goes but a panic, an error that is
// not a FormatError, or reads that disagree with Extents; ReadParentLink
// agrees with what Open found. The seeds are our own small images (the
// samples are too large for the fuzzer's minimization to finish), among
// them a differencing child whose parent sits next to where the fuzzed
// file claims to be, and images whose header SetParent or Resize moved.
func FuzzOpen(f *testing.F) {
	dir := f.TempDir()
	parent := filepath.Join(dir, "parent.vhd")
	if err := os.WriteFile(parent, ourImage(f, Dynamic, parent, ""), 0o644); err != nil {
		f.Fatal(err)
	}
	child := filepath.Join(dir, "child.vhd")
	f.Add(ourImage(f, Dynamic, child, ""))
	f.Add(ourImage(f, Fixed, child, ""))
	f.Add(ourImage(f, Differencing, child, parent))
	f.Add(changedImage(f, Differencing, child, parent, func(img *Image) error { return img.SetParent(parent) }))
	f.Add(changedImage(f, Dynamic, child, "", func(img *Image) error { return img.Resize(100 << 10) }))
	f.Add(changedImage(f, Fixed, child, "", func(img *Image) error { return img.Resize(40 << 10) }))
	f.Fuzz(func(t *testing.T, b []byte) {
		m := storage.NewMemFile(b)
		link, linkErr := readParentLink(m, child)
		if linkErr != nil && !errors.Is(linkErr, disk.ErrFormat) && !errors.Is(linkErr, disk.ErrChecksum) && !errors.Is(linkErr, disk.ErrUnsupported) {
			t.Fatalf("ReadParentLink: error %v", linkErr)
		}
		// The strict Check never fails on content, and finds an error in
		// every file Open refuses.
		probs, err := CheckFile(storage.NewMemFile(b), child)
		if err != nil {
			t.Fatalf("Check: %v", err)
		}
		if img, err := OpenFile(storage.NewMemFile(b), child, OpenOptions{ReadOnly: true}); err != nil {
			if !slices.ContainsFunc(probs, func(p Problem) bool { return !p.Warning }) {
				t.Fatalf("Open refuses the file (%v), Check finds no error: %v", err, probs)
			}
		} else {
			img.Close()
		}
		for _, ignore := range []bool{false, true} {
			img, err := OpenFile(storage.NewMemFile(b), child, OpenOptions{ReadOnly: true, IgnoreChecksum: ignore})
			if err != nil {
				if !errors.Is(err, disk.ErrFormat) && !errors.Is(err, disk.ErrChecksum) &&
					!errors.Is(err, disk.ErrUnsupported) && !errors.Is(err, disk.ErrParentNotFound) && !errors.Is(err, disk.ErrParentMismatch) {
					t.Fatalf("error %v", err)
				}
				continue
			}
			if !ignore {
				info := img.Info()
				switch {
				case linkErr != nil:
					t.Fatalf("Open succeeded, ReadParentLink failed: %v", linkErr)
				case (link != nil) != (info.Type == Differencing):
					t.Fatalf("ReadParentLink %+v for a %s image", link, info.Type)
				case link != nil && (link.UniqueID != info.ParentUniqueID || !slices.Contains(link.Candidates, info.ParentPath)):
					t.Fatalf("ReadParentLink %+v, Open found %s (id %s)", link, info.ParentPath, info.ParentUniqueID)
				}
			}
			size := img.Size()
			exts, err := img.Extents(0, size)
			if err != nil {
				t.Fatal(err)
			}
			buf := make([]byte, 64<<10)
			for _, e := range exts[:min(len(exts), 8)] {
				n := min(e.Length, int64(len(buf)))
				if _, err := img.ReadAt(buf[:n], e.Offset); err != nil && err != io.EOF {
					t.Fatalf("read %+v: %v", e, err)
				}
				if e.Type == disk.Hole && !disk.IsZero(buf[:n]) {
					t.Fatalf("hole %+v reads data", e)
				}
			}
			_ = img.Info()
			img.Close()
		}
	})
}
