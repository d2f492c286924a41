package vhd

import (
	"encoding/binary"
	"fmt"
	"net/url"
	"path"
	"path/filepath"
	"slices"
	"strings"
	"unicode/utf16"
	"unicode/utf8"

	"github.com/vhdkit/vhdkit/storage"
)

// Platform codes of parent locators.
const (
	platformNone = 0
	platformWi2r = 0x57693272 // "Wi2r": deprecated, relative, ANSI
	platformWi2k = 0x5769326B // "Wi2k": deprecated, absolute, ANSI
	platformW2ru = 0x57327275 // "W2ru": relative, UTF-16LE
	platformW2ku = 0x57326B75 // "W2ku": absolute, UTF-16LE
	platformMac  = 0x4D616320 // "Mac ": Mac OS alias blob (not decoded)
	platformMacX = 0x4D616358 // "MacX": file URL, UTF-8
)

// Locator is a decoded parent locator.
type Locator struct {
	Platform string // "W2ru", "W2ku", ...
	Path     string // as stored, decoded to a string
	Offset   int64  // file offset of the data
	Length   uint32
}

func platformName(code uint32) string {
	var b [4]byte
	binary.BigEndian.PutUint32(b[:], code)
	for _, c := range b {
		if c < 0x20 || c > 0x7e {
			return fmt.Sprintf("%#08x", code)
		}
	}
	return string(b[:])
}

// known reports whether the locator's data is a path we decode.
func (e *locatorEntry) known() bool {
	switch e.Code {
	case platformWi2r, platformWi2k, platformW2ru, platformW2ku, platformMacX:
		return true
	}
	return false
}

// Validate checks a path locator's data against limit, the end of the
// file's data. Offsets in its errors are relative to the entry.
func (e *locatorEntry) Validate(limit int64) error {
	if !e.known() || e.DataLength == 0 {
		return nil
	}
	s := "parent locator " + platformName(e.Code)
	if e.DataLength > maxLocatorLength {
		return formatErr(s, 8, "data length %d exceeds %d", e.DataLength, maxLocatorLength)
	}
	if e.DataOffset < footerSize || e.DataOffset > uint64(limit) || uint64(e.DataLength) > uint64(limit)-e.DataOffset {
		return formatErr(s, 16, "data [%#x, +%d) outside the %d data bytes of the file", e.DataOffset, e.DataLength, limit)
	}
	if (e.Code == platformW2ru || e.Code == platformW2ku) && e.DataLength%2 != 0 {
		return formatErr(s, 8, "odd length %d of UTF-16 data", e.DataLength)
	}
	return nil
}

// decodeLocatorPath decodes a locator's data into a path string; NUL
// padding is dropped.
func decodeLocatorPath(code uint32, data []byte) (string, error) {
	var s string
	switch code {
	case platformW2ru, platformW2ku:
		u := make([]uint16, 0, len(data)/2)
		for i := 0; i+1 < len(data); i += 2 {
			u = append(u, binary.LittleEndian.Uint16(data[i:]))
		}
		s = string(utf16.Decode(u))
	case platformWi2r, platformWi2k:
		// ANSI in the creator's code page: keep UTF-8 as is, read
		// anything else as Latin-1.
		if utf8.Valid(data) {
			s = string(data)
		} else {
			r := make([]rune, len(data))
			for i, c := range data {
				r[i] = rune(c)
			}
			s = string(r)
		}
	case platformMacX:
		u, err := url.Parse(strings.TrimRight(string(data), "\x00"))
		if err != nil || (u.Scheme != "file" && u.Scheme != "") {
			return "", fmt.Errorf("MacX locator %q is not a file URL", data)
		}
		s = u.Path
	default:
		return "", fmt.Errorf("platform %s not decoded", platformName(code))
	}
	if i := strings.IndexByte(s, 0); i >= 0 {
		s = s[:i]
	}
	return s, nil
}

// readLocators reads and decodes the path locators of h. Entries with
// other platform codes are skipped.
func readLocators(f storage.File, h *header, headerOff, limit int64) ([]Locator, error) {
	var locs []Locator
	for i := range h.Locators {
		e := &h.Locators[i]
		if err := e.Validate(limit); err != nil {
			return nil, rebase(err, headerOff+headerLocatorsAt+int64(i)*locatorEntrySize)
		}
		if !e.known() || e.DataLength == 0 {
			continue
		}
		data := make([]byte, e.DataLength)
		if err := readFull(f, data, int64(e.DataOffset)); err != nil {
			return nil, err
		}
		p, err := decodeLocatorPath(e.Code, data)
		if err != nil {
			return nil, formatErr("parent locator "+platformName(e.Code), int64(e.DataOffset), "%v", err)
		}
		locs = append(locs, Locator{Platform: platformName(e.Code), Path: p, Offset: int64(e.DataOffset), Length: e.DataLength})
	}
	return locs, nil
}

// parentCandidates lists, best first and without duplicates, the paths
// where the parent may be: each locator mapped to this system, then the
// header's parent name, then the file name of each in the child's folder.
func parentCandidates(childDir string, locs []Locator, parentName string) []string {
	var out []string
	seen := map[string]bool{}
	add := func(p string) {
		if p != "" && !seen[p] {
			seen[p] = true
			out = append(out, p)
		}
	}
	rank := func(platform string) int {
		switch platform {
		case "W2ru":
			return 0
		case "W2ku":
			return 1
		case "Wi2r":
			return 2
		case "Wi2k":
			return 3
		}
		return 4
	}
	ordered := slices.Clone(locs)
	slices.SortStableFunc(ordered, func(a, b Locator) int { return rank(a.Platform) - rank(b.Platform) })
	var names []string
	for _, l := range ordered {
		names = append(names, l.Path)
	}
	names = append(names, parentName)
	for _, n := range names {
		add(mapPath(childDir, n))
	}
	for _, n := range names {
		if b := baseName(n); b != "" {
			add(filepath.Join(childDir, b))
		}
	}
	return out
}

// mapPath maps a stored path to this system: a Unix absolute path stays,
// a relative one (".\base.vhd", "..\x\base.vhd") is taken from the child's
// folder, and one that cannot exist here (drive letter, UNC) is dropped —
// the file name fallback covers it.
func mapPath(childDir, p string) string {
	p = strings.TrimSpace(p)
	if p == "" {
		return ""
	}
	if isWindowsAbs(p) {
		return ""
	}
	s := strings.ReplaceAll(p, `\`, "/")
	if path.IsAbs(s) {
		return filepath.Clean(filepath.FromSlash(s))
	}
	return filepath.Join(childDir, filepath.FromSlash(s))
}

// isWindowsAbs reports a path with a drive letter ("C:\x", "C:x") or a
// UNC prefix (\\server\share).
func isWindowsAbs(p string) bool {
	if len(p) >= 2 && p[1] == ':' && (p[0]|0x20 >= 'a' && p[0]|0x20 <= 'z') {
		return true
	}
	return strings.HasPrefix(p, `\\`) || strings.HasPrefix(p, `//`)
}

// baseName is the last element of a Windows or Unix path.
func baseName(p string) string {
	p = strings.TrimSpace(strings.ReplaceAll(p, `\`, "/"))
	if len(p) >= 2 && p[1] == ':' {
		p = p[2:]
	}
	p = strings.TrimRight(p, "/")
	if p == "" {
		return ""
	}
	b := path.Base(p)
	if b == "." || b == ".." || b == "/" {
		return ""
	}
	return b
}

// encodeUTF16LE encodes a W2ku/W2ru locator.
func encodeUTF16LE(s string) []byte {
	u := utf16.Encode([]rune(s))
	b := make([]byte, 2*len(u))
	for i, c := range u {
		binary.LittleEndian.PutUint16(b[2*i:], c)
	}
	return b
}
