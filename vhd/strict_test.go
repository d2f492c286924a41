package vhd

import (
	"encoding/binary"
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
)

// Every image vhdkit writes passes the strict Check without a finding,
// warnings included.
func TestStrictCleanImages(t *testing.T) {
	dir := t.TempDir()
	for _, c := range []struct {
		name string
		opts CreateOptions
	}{
		{"fixed.vhd", CreateOptions{Type: Fixed, Size: 8 << 20}},
		{"dynamic.vhd", CreateOptions{Size: 8 << 20}},
		{"small-blocks.vhd", CreateOptions{Size: 1<<20 + 512, BlockSize: 4096}},
		{"exact.vhd", CreateOptions{Size: uint64(chsExact(3 << 20))}},
	} {
		path, _ := makeImage(t, dir, c.name, c.opts)
		if probs, err := Check(path, false); err != nil || len(probs) > 0 {
			t.Errorf("%s: %v %v", c.name, probs, err)
		}
	}
	_, child := makeChain(t, dir)
	if probs, err := Check(child, false); err != nil || len(probs) > 0 {
		t.Errorf("child: %v %v", probs, err)
	}
}

// strictImage is a file to break: a differencing child of a VHD parent
// (Create's layout: footer copy, header at 512, BAT at 1536, the W2ku and
// W2ru locator data, blocks, footer) with 64 KiB blocks, three of them
// allocated.
type strictImage struct {
	dir, base, child string
	b                []byte
}

func newStrictImage(t *testing.T) *strictImage {
	t.Helper()
	dir := t.TempDir()
	base, _ := makeImage(t, dir, "base.vhd", CreateOptions{Size: 1 << 20, BlockSize: 64 << 10})
	child := filepath.Join(dir, "child.vhd")
	img, err := Create(child, CreateOptions{Parent: base, BlockSize: 64 << 10})
	if err != nil {
		t.Fatal(err)
	}
	for _, off := range []int64{0, 70000, 300000} {
		mustWrite(t, img, []byte("child data"), off)
	}
	mustClose(t, img)
	b, err := os.ReadFile(child)
	if err != nil {
		t.Fatal(err)
	}
	return &strictImage{dir, base, child, b}
}

func (s *strictImage) footerAt() int64 { return int64(len(s.b)) - footerSize }

// footers changes both footers (the copy at 0 and the end) and fixes
// their checksums.
func (s *strictImage) footers(change func(f []byte)) {
	for _, at := range []int64{0, s.footerAt()} {
		f := s.b[at : at+footerSize]
		change(f)
		binary.BigEndian.PutUint32(f[footerChecksumAt:], checksum(f, footerChecksumAt))
	}
}

// header changes the dynamic header and fixes its checksum.
func (s *strictImage) header(change func(h []byte)) {
	h := s.b[footerSize : footerSize+headerSize]
	change(h)
	binary.BigEndian.PutUint32(h[headerChecksumAt:], checksum(h, headerChecksumAt))
}

func (s *strictImage) hdr() header { return decodeHeader(s.b[footerSize:]) }

// batEntry returns the offset of BAT entry i and its value.
func (s *strictImage) batEntry(i int64) (int64, uint32) {
	at := int64(s.hdr().TableOffset) + 4*i
	return at, binary.BigEndian.Uint32(s.b[at:])
}

func (s *strictImage) check(t *testing.T) []Problem {
	t.Helper()
	if err := os.WriteFile(s.child, s.b, 0o600); err != nil {
		t.Fatal(err)
	}
	probs, err := Check(s.child, false)
	if err != nil {
		t.Fatalf("Check: %v", err)
	}
	return probs
}

// TestStrictRules breaks one rule at a time in a valid file, checksums
// recomputed, and expects the finding with its rule, structure, offset
// and severity.
func TestStrictRules(t *testing.T) {
	locAt := func(i int) int { return headerLocatorsAt + i*locatorEntrySize }
	for _, c := range []struct {
		name    string
		rule    string
		warning bool
		// change breaks s; it returns the file offset the finding names.
		change func(s *strictImage) int64
	}{
		// Footer.
		{"cookie", "footer.cookie", false, func(s *strictImage) int64 {
			s.footers(func(f []byte) { copy(f, "conectiX") })
			return s.footerAt()
		}},
		{"checksum", "footer.checksum", false, func(s *strictImage) int64 {
			s.b[s.footerAt()+footerChecksumAt] ^= 1
			s.b[footerChecksumAt] ^= 1
			return s.footerAt() + footerChecksumAt
		}},
		{"features", "footer.features", false, func(s *strictImage) int64 {
			s.footers(func(f []byte) { binary.BigEndian.PutUint32(f[8:], 0) })
			return s.footerAt() + 8
		}},
		{"version", "footer.version", false, func(s *strictImage) int64 {
			s.footers(func(f []byte) { binary.BigEndian.PutUint32(f[12:], 0x00010001) })
			return s.footerAt() + 12
		}},
		{"disk type", "footer.disk-type", false, func(s *strictImage) int64 {
			s.footers(func(f []byte) { binary.BigEndian.PutUint32(f[60:], 5) })
			return s.footerAt() + 60
		}},
		{"size", "footer.size", false, func(s *strictImage) int64 {
			s.footers(func(f []byte) { binary.BigEndian.PutUint64(f[48:], MaxSize+512) })
			return s.footerAt() + 48
		}},
		{"geometry beyond the size", "footer.geometry", false, func(s *strictImage) int64 {
			s.footers(func(f []byte) { Geometry{1000, 16, 63}.encode(f[56:]) })
			return s.footerAt() + 56
		}},
		{"geometry short", "footer.geometry-short", true, func(s *strictImage) int64 {
			s.footers(func(f []byte) { Geometry{30, 4, 17}.encode(f[56:]) })
			return s.footerAt() + 56
		}},
		{"saved state", "footer.saved-state", false, func(s *strictImage) int64 {
			s.footers(func(f []byte) { f[84] = 7 })
			return s.footerAt() + 84
		}},
		{"reserved", "footer.reserved", false, func(s *strictImage) int64 {
			s.footers(func(f []byte) { f[300] = 1 })
			return s.footerAt() + 300
		}},
		{"unique id", "footer.unique-id", true, func(s *strictImage) int64 {
			s.footers(func(f []byte) { clear(f[68:84]) })
			return s.footerAt() + 68
		}},
		{"data offset", "footer.data-offset", false, func(s *strictImage) int64 {
			s.footers(func(f []byte) { binary.BigEndian.PutUint64(f[16:], uint64(len(s.b))) })
			return s.footerAt() + 16
		}},
		// Footer copy.
		{"copy of another disk", "footer.copy", false, func(s *strictImage) int64 {
			f := s.b[:footerSize]
			f[70] ^= 1
			binary.BigEndian.PutUint32(f[footerChecksumAt:], checksum(f, footerChecksumAt))
			return 0
		}},
		{"copy damaged", "footer.copy", false, func(s *strictImage) int64 {
			s.b[100] = 1
			return 0
		}},
		{"copy to no header", "footer.copy", false, func(s *strictImage) int64 {
			f := s.b[:footerSize]
			binary.BigEndian.PutUint64(f[16:], 1<<40)
			binary.BigEndian.PutUint32(f[footerChecksumAt:], checksum(f, footerChecksumAt))
			return 16
		}},
		{"end damaged", "footer.end-damaged", true, func(s *strictImage) int64 {
			clear(s.b[s.footerAt():])
			return s.footerAt()
		}},
		// Dynamic header.
		{"header cookie", "header.cookie", false, func(s *strictImage) int64 {
			s.header(func(h []byte) { h[0] = 'X' })
			return footerSize
		}},
		{"header checksum", "header.checksum", false, func(s *strictImage) int64 {
			s.b[footerSize+headerChecksumAt] ^= 1
			return footerSize + headerChecksumAt
		}},
		{"header data offset", "header.data-offset", false, func(s *strictImage) int64 {
			s.header(func(h []byte) { binary.BigEndian.PutUint64(h[8:], 0) })
			return footerSize + 8
		}},
		{"header version", "header.version", false, func(s *strictImage) int64 {
			s.header(func(h []byte) { binary.BigEndian.PutUint32(h[24:], 0x00020000) })
			return footerSize + 24
		}},
		{"header reserved", "header.reserved", false, func(s *strictImage) int64 {
			s.header(func(h []byte) { h[1000] = 1 })
			return footerSize + 1000
		}},
		{"block size", "header.block-size", false, func(s *strictImage) int64 {
			s.header(func(h []byte) { binary.BigEndian.PutUint32(h[headerBlockSizeAt:], 3000) })
			return footerSize + headerBlockSizeAt
		}},
		{"too few BAT entries", "header.max-table-entries", false, func(s *strictImage) int64 {
			s.header(func(h []byte) { binary.BigEndian.PutUint32(h[headerMaxEntAt:], 15) })
			return footerSize + headerMaxEntAt
		}},
		{"too many BAT entries", "header.max-table-entries", true, func(s *strictImage) int64 {
			s.header(func(h []byte) { binary.BigEndian.PutUint32(h[headerMaxEntAt:], 17) })
			return footerSize + headerMaxEntAt
		}},
		{"BAT beyond the file", "header.table-offset", false, func(s *strictImage) int64 {
			s.header(func(h []byte) { binary.BigEndian.PutUint64(h[headerTableOffAt:], uint64(len(s.b))) })
			return footerSize + headerTableOffAt
		}},
		{"BAT over the header", "header.table-offset", false, func(s *strictImage) int64 {
			s.header(func(h []byte) { binary.BigEndian.PutUint64(h[headerTableOffAt:], 1024) })
			return footerSize + headerTableOffAt
		}},
		{"parent id zero", "header.parent-unique-id", true, func(s *strictImage) int64 {
			s.header(func(h []byte) { clear(h[headerParentIDAt : headerParentIDAt+16]) })
			return footerSize + headerParentIDAt
		}},
		// BAT.
		{"block past the end", "bat.bounds", false, func(s *strictImage) int64 {
			at, _ := s.batEntry(1)
			binary.BigEndian.PutUint32(s.b[at:], uint32(len(s.b)/SectorSize))
			return at
		}},
		{"blocks overlap", "bat.overlap", false, func(s *strictImage) int64 {
			_, e := s.batEntry(0)
			at, _ := s.batEntry(4)
			binary.BigEndian.PutUint32(s.b[at:], e+8)
			return at
		}},
		{"block over the BAT", "bat.overlap", false, func(s *strictImage) int64 {
			at, _ := s.batEntry(4)
			binary.BigEndian.PutUint32(s.b[at:], uint32(s.hdr().TableOffset/SectorSize))
			return at
		}},
		{"block over a locator", "bat.overlap", false, func(s *strictImage) int64 {
			at, _ := s.batEntry(4)
			binary.BigEndian.PutUint32(s.b[at:], uint32(s.hdr().Locators[1].DataOffset/SectorSize))
			return at
		}},
		// Parent locators.
		{"platform code", "locator.platform", false, func(s *strictImage) int64 {
			s.header(func(h []byte) { copy(h[locAt(2):], "XXXX") })
			return footerSize + int64(locAt(2))
		}},
		{"locator past the end", "locator.data", false, func(s *strictImage) int64 {
			s.header(func(h []byte) { binary.BigEndian.PutUint64(h[locAt(0)+16:], uint64(len(s.b))) })
			return footerSize + int64(locAt(0)) + 16
		}},
		{"locator longer than its space", "locator.length", false, func(s *strictImage) int64 {
			s.header(func(h []byte) {
				binary.BigEndian.PutUint32(h[locAt(0)+4:], 1)
				binary.BigEndian.PutUint32(h[locAt(0)+8:], 600)
			})
			return footerSize + int64(locAt(0)) + 8
		}},
		{"odd UTF-16", "locator.length", false, func(s *strictImage) int64 {
			s.header(func(h []byte) {
				binary.BigEndian.PutUint32(h[locAt(0)+8:], binary.BigEndian.Uint32(h[locAt(0)+8:])-1)
			})
			return footerSize + int64(locAt(0)) + 8
		}},
		{"locators overlap", "locator.overlap", false, func(s *strictImage) int64 {
			off := s.hdr().Locators[0].DataOffset
			s.header(func(h []byte) { binary.BigEndian.PutUint64(h[locAt(1)+16:], off) })
			return int64(off)
		}},
		{"locator over the BAT", "locator.overlap", false, func(s *strictImage) int64 {
			off := s.hdr().TableOffset
			s.header(func(h []byte) { binary.BigEndian.PutUint64(h[locAt(1)+16:], off) })
			return int64(off)
		}},
		{"no way to the parent", "locator.none", false, func(s *strictImage) int64 {
			s.header(func(h []byte) {
				clear(h[headerParentNmAt:headerLocatorsAt])
				clear(h[headerLocatorsAt : headerLocatorsAt+8*locatorEntrySize])
			})
			return footerSize + headerLocatorsAt
		}},
		// Parent identity.
		{"parent id", "parent", false, func(s *strictImage) int64 {
			s.header(func(h []byte) { h[headerParentIDAt] ^= 1 })
			return -1
		}},
		{"parent not a VHD", "parent", false, func(s *strictImage) int64 {
			os.WriteFile(s.base, make([]byte, 1<<20), 0o600)
			return -1
		}},
	} {
		t.Run(c.name, func(t *testing.T) {
			s := newStrictImage(t)
			off := c.change(s)
			probs := s.check(t)
			i := slices.IndexFunc(probs, func(p Problem) bool { return p.Rule == c.rule && p.Offset == off && p.Warning == c.warning })
			if i < 0 {
				t.Fatalf("no %s finding (warning %v) at %d: %v", c.rule, c.warning, off, probs)
			}
			p := probs[i]
			if p.Struct == "" || !strings.Contains(p.What, p.Struct) && p.Struct != "parent" {
				t.Errorf("finding without its structure: %+v", p)
			}
			// Errors and warnings of other rules are allowed: a broken
			// structure may hide others.
		})
	}
}

// Findings marshal to JSON with stable field names.
func TestStrictJSON(t *testing.T) {
	s := newStrictImage(t)
	s.footers(func(f []byte) { f[300] = 1 })
	probs := s.check(t)
	b, err := json.Marshal(probs)
	if err != nil {
		t.Fatal(err)
	}
	for _, w := range []string{`"offset":`, `"structure":"footer"`, `"rule":"footer.reserved"`, `"message":"footer: reserved bytes`, `"warning":false`} {
		if !strings.Contains(string(b), w) {
			t.Errorf("JSON lacks %s: %s", w, b)
		}
	}
}

// A fixed image whose footer claims more data than the file holds.
func TestStrictFixedSize(t *testing.T) {
	dir := t.TempDir()
	path, _ := makeImage(t, dir, "f.vhd", CreateOptions{Type: Fixed, Size: 1 << 20})
	b, _ := os.ReadFile(path)
	f := b[len(b)-footerSize:]
	binary.BigEndian.PutUint64(f[48:], 2<<20)
	Geometry{60, 4, 17}.encode(f[56:])
	binary.BigEndian.PutUint32(f[footerChecksumAt:], checksum(f, footerChecksumAt))
	os.WriteFile(path, b, 0o600)
	probs, err := Check(path, false)
	if err != nil {
		t.Fatal(err)
	}
	if !slices.ContainsFunc(probs, func(p Problem) bool {
		return p.Rule == "footer.size" && !p.Warning && p.Offset == int64(len(b))-footerSize+48
	}) {
		t.Fatalf("%v", probs)
	}
}

// A BAT that breaks a rule thousands of times yields maxPerRule findings
// of it and one that counts the rest.
func TestStrictCapped(t *testing.T) {
	dir := t.TempDir()
	path, _ := makeImage(t, dir, "d.vhd", CreateOptions{Size: 1 << 20, BlockSize: 512})
	b, _ := os.ReadFile(path)
	h := decodeHeader(b[footerSize:])
	first := uint32(batUnused)
	for i := int64(0); first == batUnused; i++ {
		first = binary.BigEndian.Uint32(b[int64(h.TableOffset)+4*i:])
	}
	for i := range int64(h.MaxTableEntries) {
		binary.BigEndian.PutUint32(b[int64(h.TableOffset)+4*i:], first)
	}
	os.WriteFile(path, b, 0o600)
	probs, err := Check(path, false)
	if err != nil {
		t.Fatal(err)
	}
	n, summary := 0, false
	for _, p := range probs {
		if p.Rule == "bat.overlap" {
			n++
			summary = summary || strings.Contains(p.What, fmt.Sprintf("%d more findings", int(h.MaxTableEntries)-1-maxPerRule))
		}
	}
	if n != maxPerRule+1 || !summary {
		t.Fatalf("%d bat.overlap findings (summary %v) for %d entries on one block", n, summary, h.MaxTableEntries)
	}
}
