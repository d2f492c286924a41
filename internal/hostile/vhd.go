package hostile

import (
	"encoding/binary"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"unicode/utf16"

	"github.com/vhdkit/vhdkit/vhd"
	"github.com/vhdkit/vhdkit/vhdx"
)

// The VHD structures the generator edits (big-endian; vhd/format.go draws
// them), with their offsets named as in the VHD specification.
const (
	vhdFooterSize = 512
	vhdHeaderSize = 1024

	// footer fields
	ftFeatures, ftVersion, ftDataOffset, ftCreatorApp = 8, 12, 16, 28
	ftOriginalSize, ftCurrentSize, ftGeometry         = 40, 48, 56
	ftDiskType, ftChecksum, ftUniqueID, ftSavedState  = 60, 64, 68, 84

	// dynamic header fields
	dhTableOffset, dhVersion, dhMaxEntries, dhBlockSize = 16, 24, 28, 32
	dhChecksum, dhParentID, dhParentName, dhLocators    = 36, 40, 64, 576
	dhLocatorSize                                       = 24
)

// vhdSum is the one's complement of the byte sum of s, its checksum field
// at at taken as zero.
func vhdSum(s []byte, at int) uint32 {
	var sum uint32
	for i, c := range s {
		if i < at || i >= at+4 {
			sum += uint32(c)
		}
	}
	return ^sum
}

func sealFooter(f []byte) {
	binary.BigEndian.PutUint32(f[ftChecksum:], vhdSum(f[:vhdFooterSize], ftChecksum))
}
func sealHeader(h []byte) {
	binary.BigEndian.PutUint32(h[dhChecksum:], vhdSum(h[:vhdHeaderSize], dhChecksum))
}

// vhdLayout is where a valid seed keeps its structures.
type vhdLayout struct {
	footer            int64 // the end footer
	header            int64 // -1 for a fixed image
	bat, entries      int64
	blockSize, bitmap int64
	uniqueID          [16]byte
}

func parseVHD(b []byte) vhdLayout {
	be := binary.BigEndian
	l := vhdLayout{footer: int64(len(b)) - vhdFooterSize, header: -1}
	ft := b[l.footer:]
	copy(l.uniqueID[:], ft[ftUniqueID:])
	if be.Uint32(ft[ftDiskType:]) == uint32(vhd.Fixed) {
		return l
	}
	l.header = int64(be.Uint64(ft[ftDataOffset:]))
	h := b[l.header:]
	l.bat, l.entries = int64(be.Uint64(h[dhTableOffset:])), int64(be.Uint32(h[dhMaxEntries:]))
	l.blockSize = int64(be.Uint32(h[dhBlockSize:]))
	l.bitmap = (l.blockSize/512/8 + 511) &^ 511
	return l
}

// blocks returns the file offsets of the seed's allocated blocks.
func (l vhdLayout) blocks(b []byte) []int64 {
	var out []int64
	for i := range l.entries {
		if e := binary.BigEndian.Uint32(b[l.bat+4*i:]); e != 0xFFFFFFFF {
			out = append(out, int64(e)*512)
		}
	}
	return out
}

// footers applies edit to the end footer and to the copy at 0 (dynamic
// and differencing images), resealing each.
func (l vhdLayout) footers(edit func(f []byte)) func([]byte) {
	return func(b []byte) {
		at := []int64{l.footer}
		if l.header >= 0 {
			at = append(at, 0)
		}
		for _, off := range at {
			edit(b[off : off+vhdFooterSize])
			sealFooter(b[off:])
		}
	}
}

// dynHeader applies edit to the dynamic header and reseals it.
func (l vhdLayout) dynHeader(edit func(h []byte)) func([]byte) {
	return func(b []byte) {
		h := b[l.header : l.header+vhdHeaderSize]
		edit(h)
		sealHeader(h)
	}
}

// vhdSeed creates an image with vhd.Create in dir (a scratch folder when
// ""), writes into it and returns its bytes after Close.
func vhdSeed(dir, name string, opts vhd.CreateOptions, writes map[int64]int) ([]byte, error) {
	if dir == "" {
		d, err := os.MkdirTemp("", "hostile-seed")
		if err != nil {
			return nil, err
		}
		defer os.RemoveAll(d)
		dir = d
	}
	path := filepath.Join(dir, name)
	im, err := vhd.Create(path, opts)
	if err != nil {
		return nil, err
	}
	if err := writePattern(im.WriteAt, writes); err != nil {
		im.Close()
		return nil, err
	}
	if err := im.Close(); err != nil {
		return nil, err
	}
	return os.ReadFile(path)
}

// vhdWrites are the seeds' data: blocks 0 and 2 of an 8 MiB disk of 2 MiB
// blocks.
var vhdWrites = map[int64]int{4096: 64 << 10, 4<<20 + 512: 4096}

// vhdSingleFile adds truncations and mutations of single VHD files: a
// dynamic and a fixed seed.
func vhdSingleFile(c *corpus) error {
	dyn, err := vhdSeed("", "seed.vhd", vhd.CreateOptions{Size: 8 << 20}, vhdWrites)
	if err != nil {
		return err
	}
	fixed, err := vhdSeed("", "seed.vhd", vhd.CreateOptions{Type: vhd.Fixed, Size: 1 << 20, Sparse: true}, map[int64]int{0: 4096})
	if err != nil {
		return err
	}
	l, fl := parseVHD(dyn), parseVHD(fixed)
	n := int64(len(dyn))
	bounds := []int64{8, vhdFooterSize, l.header + dhLocators, l.header + vhdHeaderSize, l.bat, l.bat + 4*l.entries, l.footer, n - 8}
	for _, off := range l.blocks(dyn) {
		bounds = append(bounds, off, off+l.bitmap, off+l.bitmap+4096, off+l.bitmap+l.blockSize)
	}
	for _, k := range truncations(n, bounds, c.opts.Dense) {
		if err := c.single("vhd-truncate", fmt.Sprintf("dynamic-%d", k), fmt.Sprintf("dynamic image cut to %d bytes", k), "disk.vhd", dyn[:k]); err != nil {
			return err
		}
	}
	for _, k := range truncations(int64(len(fixed)), []int64{8, fl.footer, fl.footer + 8, int64(len(fixed)) - 1}, false) {
		if err := c.single("vhd-truncate", fmt.Sprintf("fixed-%d", k), fmt.Sprintf("fixed image cut to %d bytes", k), "disk.vhd", fixed[:k]); err != nil {
			return err
		}
	}

	be := binary.BigEndian
	ft := l.footers
	hd := l.dynHeader
	u32 := func(at int, v uint32) func([]byte) { return func(s []byte) { be.PutUint32(s[at:], v) } }
	u64 := func(at int, v uint64) func([]byte) { return func(s []byte) { be.PutUint64(s[at:], v) } }
	bat := func(i int64, v uint32) func([]byte) { return func(b []byte) { be.PutUint32(b[l.bat+4*i:], v) } }
	blocks := l.blocks(dyn)
	ms := []struct {
		class, name, note string
		edit              func([]byte)
	}{
		{"vhd-footer", "cookie", "footer cookie wrong", ft(func(f []byte) { copy(f, "conectiy") })},
		{"vhd-footer", "version-2", "footer version 2.0", ft(u32(ftVersion, 0x00020000))},
		{"vhd-footer", "data-offset-0", "header at offset 0", ft(u64(ftDataOffset, 0))},
		{"vhd-footer", "data-offset-huge", "header at 2^62", ft(u64(ftDataOffset, 1<<62))},
		{"vhd-footer", "data-offset-max", "header at 2^64 - 1", ft(u64(ftDataOffset, ^uint64(0)))},
		{"vhd-footer", "data-offset-eof", "header at the end footer", ft(u64(ftDataOffset, uint64(l.footer)))},
		{"vhd-footer", "data-offset-bat", "header on the BAT", ft(u64(ftDataOffset, uint64(l.bat)))},
		{"vhd-footer", "type-0", "disk type 0", ft(u32(ftDiskType, 0))},
		{"vhd-footer", "type-5", "disk type 5", ft(u32(ftDiskType, 5))},
		{"vhd-footer", "type-fixed", "a dynamic image's footers say fixed", ft(u32(ftDiskType, uint32(vhd.Fixed)))},
		{"vhd-footer", "type-differencing", "a dynamic image's footers say differencing", ft(u32(ftDiskType, uint32(vhd.Differencing)))},
		{"vhd-footer", "size-max", "current size 2040 GiB over a BAT of 4 entries", ft(u64(ftCurrentSize, vhd.MaxSize))},
		{"vhd-footer", "size-max-plus", "current size 2040 GiB + 512", ft(u64(ftCurrentSize, vhd.MaxSize+512))},
		{"vhd-footer", "size-2-64", "current size 2^64 - 512", ft(u64(ftCurrentSize, ^uint64(511)))},
		{"vhd-footer", "size-0", "current size 0", ft(u64(ftCurrentSize, 0))},
		{"vhd-footer", "size-odd", "current size 8 MiB + 1", ft(u64(ftCurrentSize, 8<<20+1))},
		{"vhd-footer", "vpc-geometry-0", "creator Virtual PC, geometry 0/0/0", ft(func(f []byte) { copy(f[ftCreatorApp:], "vpc "); be.PutUint32(f[ftGeometry:], 0) })},
		{"vhd-footer", "vpc-geometry-max", "creator Virtual PC, geometry 65535/16/255", ft(func(f []byte) { copy(f[ftCreatorApp:], "vpc "); be.PutUint32(f[ftGeometry:], 0xFFFF10FF) })},
		{"vhd-footer", "saved-state", "saved state set", ft(func(f []byte) { f[ftSavedState] = 1 })},
		{"vhd-footer", "end-only", "end footer's type 5, the copy valid", func(b []byte) { be.PutUint32(b[l.footer+ftDiskType:], 5); sealFooter(b[l.footer:]) }},
		{"vhd-footer", "copy-only", "the copy's size 2040 GiB, the end valid", func(b []byte) { be.PutUint64(b[ftCurrentSize:], vhd.MaxSize); sealFooter(b) }},
		{"vhd-footer", "copies-differ", "end footer cookie gone, the copy with another size", func(b []byte) {
			copy(b[l.footer:], "xxxxxxxx")
			be.PutUint64(b[ftCurrentSize:], 1<<40)
			sealFooter(b)
		}},

		{"vhd-header", "cookie", "header cookie wrong", hd(func(h []byte) { copy(h, "cxsparsf") })},
		{"vhd-header", "version-2", "header version 2.0", hd(u32(dhVersion, 0x00020000))},
		{"vhd-header", "entries-limit", "64 Mi BAT entries, the BAT not in the file", hd(u32(dhMaxEntries, 64<<20))},
		{"vhd-header", "entries-max", "2^32 - 1 BAT entries", hd(u32(dhMaxEntries, ^uint32(0)))},
		{"vhd-header", "entries-0", "no BAT entry", hd(u32(dhMaxEntries, 0))},
		{"vhd-header", "entries-short", "2 BAT entries for 4 blocks", hd(u32(dhMaxEntries, 2))},
		{"vhd-header", "entries-over-blocks", "a BAT that runs over the blocks", hd(u32(dhMaxEntries, uint32((l.footer-l.bat)/4)))},
		{"vhd-header", "block-size-0", "block size 0", hd(u32(dhBlockSize, 0))},
		{"vhd-header", "block-size-3", "block size 3", hd(u32(dhBlockSize, 3))},
		{"vhd-header", "block-size-512", "block size 512 under 4 BAT entries", hd(u32(dhBlockSize, 512))},
		{"vhd-header", "block-size-2g", "block size 2 GiB", hd(u32(dhBlockSize, 1<<31))},
		{"vhd-header", "block-size-256m", "block size 256 MiB over blocks laid out for 2 MiB", hd(u32(dhBlockSize, 256<<20))},
		{"vhd-header", "table-0", "BAT at offset 0", hd(u64(dhTableOffset, 0))},
		{"vhd-header", "table-huge", "BAT at 2^62", hd(u64(dhTableOffset, 1<<62))},
		{"vhd-header", "table-footer", "BAT on the end footer", hd(u64(dhTableOffset, uint64(l.footer)))},
		{"vhd-header", "table-header", "BAT on the header", hd(u64(dhTableOffset, uint64(l.header)))},
		{"vhd-header", "locator-dynamic", "a dynamic image with a W2ku locator of 2^32 - 1 bytes", hd(func(h []byte) {
			e := h[dhLocators:]
			copy(e, "W2ku")
			be.PutUint32(e[8:], ^uint32(0))
			be.PutUint64(e[16:], uint64(l.bat))
		})},

		{"vhd-bat", "beyond-eof", "block 0 at sector 2^32 - 2", bat(0, 0xFFFFFFFE)},
		{"vhd-bat", "on-footer-copy", "block 1 at sector 0", bat(1, 0)},
		{"vhd-bat", "on-header", "block 1 on the header", bat(1, uint32(l.header/512))},
		{"vhd-bat", "on-bat", "block 1 on the BAT", bat(1, uint32(l.bat/512))},
		{"vhd-bat", "on-end-footer", "block 1 on the end footer", bat(1, uint32(l.footer/512))},
		{"vhd-bat", "same-block", "blocks 0 and 1 at one offset", bat(1, uint32(blocks[0]/512))},
		{"vhd-bat", "all-same-block", "every block at one offset", func(b []byte) {
			for i := range l.entries {
				be.PutUint32(b[l.bat+4*i:], uint32(blocks[0]/512))
			}
		}},
		{"vhd-bat", "overlap-half", "block 1 over the second half of block 0", bat(1, uint32((blocks[0]+l.blockSize/2)/512))},
		{"vhd-bat", "all-zero", "every entry 0", func(b []byte) { clear(b[l.bat : l.bat+4*l.entries]) }},
	}
	for _, m := range ms {
		if err := c.single(m.class, m.name, m.note, "disk.vhd", patched(dyn, m.edit)); err != nil {
			return err
		}
	}
	// 2040 GiB with the BAT it needs (1 Mi entries, 4 MiB) in a sparse
	// file, the blocks moved behind it: read for its size alone.
	{
		entries := int64(vhd.MaxSize) / l.blockSize
		batEnd := l.bat + (4*entries+511)&^511
		head := patched(dyn[:l.bat], l.dynHeader(u32(dhMaxEntries, uint32(entries))),
			func(b []byte) { be.PutUint64(b[ftCurrentSize:], vhd.MaxSize); sealFooter(b) }) // the copy at 0
		pieces := map[int64][]byte{0: head}
		batRaw := make([]byte, batEnd-l.bat)
		for i := range batRaw {
			batRaw[i] = 0xFF
		}
		next := batEnd
		for i := range l.entries {
			if e := be.Uint32(dyn[l.bat+4*i:]); e != 0xFFFFFFFF {
				span := l.bitmap + l.blockSize
				pieces[next] = dyn[int64(e)*512 : int64(e)*512+span]
				be.PutUint32(batRaw[4*i:], uint32(next/512))
				next += span
			}
		}
		pieces[l.bat] = batRaw
		foot := patched(dyn[l.footer:], func(f []byte) { be.PutUint64(f[ftCurrentSize:], vhd.MaxSize); sealFooter(f) })
		pieces[next] = foot
		rel, err := c.dir("vhd-header", "size-max-bat-fits")
		if err != nil {
			return err
		}
		if err := writePieces(c.abs(filepath.Join(rel, "disk.vhd")), next+vhdFooterSize, pieces); err != nil {
			return err
		}
		c.cases = append(c.cases, Case{Class: "vhd-header", Name: "size-max-bat-fits",
			Note: "2040 GiB with its 4 MiB BAT", Image: filepath.Join(rel, "disk.vhd")})
	}
	fft := fl.footers
	for _, m := range []struct {
		name, note string
		edit       func([]byte)
	}{
		{"fixed-size-max", "a fixed image of 1 MiB whose footer says 2040 GiB", fft(u64(ftCurrentSize, vhd.MaxSize))},
		{"fixed-size-more", "a fixed image of 1 MiB whose footer says 2 MiB", fft(u64(ftCurrentSize, 2<<20))},
		{"fixed-type-dynamic", "a fixed image whose footer says dynamic, header at 0", fft(func(f []byte) { be.PutUint32(f[ftDiskType:], uint32(vhd.Dynamic)); be.PutUint64(f[ftDataOffset:], 512) })},
	} {
		if err := c.single("vhd-footer", m.name, m.note, "disk.vhd", patched(fixed, m.edit)); err != nil {
			return err
		}
	}
	return nil
}

// vhdLocator is one locator entry to write: a platform code and its data.
type vhdLocator struct {
	code string // "W2ru", "W2ku", "MacX", ...
	data []byte
}

func utf16le(s string) []byte {
	var b []byte
	for _, c := range utf16.Encode([]rune(s)) {
		b = binary.LittleEndian.AppendUint16(b, c)
	}
	return b
}

// withParent returns a differencing image's bytes with its parent link
// replaced: the parent's unique id, the header's parent name, and locs,
// whose data go before the end footer (the file grows by it).
func withParent(b []byte, parentID [16]byte, name string, locs []vhdLocator) []byte {
	l := parseVHD(b)
	be := binary.BigEndian
	foot := append([]byte(nil), b[l.footer:]...)
	out := append([]byte(nil), b[:l.footer]...)
	h := out[l.header : l.header+vhdHeaderSize]
	copy(h[dhParentID:], parentID[:])
	clear(h[dhParentName : dhParentName+512])
	for i, c := range utf16.Encode([]rune(name)) {
		if i < 255 {
			be.PutUint16(h[dhParentName+2*i:], c)
		}
	}
	clear(h[dhLocators : dhLocators+8*dhLocatorSize])
	for i, loc := range locs {
		e := h[dhLocators+dhLocatorSize*i:]
		space := (len(loc.data) + 511) &^ 511
		copy(e[0:4], loc.code)
		be.PutUint32(e[4:], uint32(space))
		be.PutUint32(e[8:], uint32(len(loc.data)))
		be.PutUint64(e[16:], uint64(len(out)))
		out = append(out, loc.data...)
		out = append(out, make([]byte, space-len(loc.data))...)
	}
	sealHeader(h)
	return append(out, foot...)
}

// withUniqueID returns b with both footers' unique id set to id.
func withUniqueID(b []byte, id [16]byte) []byte {
	l := parseVHD(b)
	return patched(b, l.footers(func(f []byte) { copy(f[ftUniqueID:], id[:]) }))
}

// vhdChains adds differencing VHDs whose locators are malformed or lead
// to something other than their parent, chains that loop, and a chain
// 1000 deep.
func vhdChains(c *corpus) error {
	dir, err := os.MkdirTemp("", "hostile-seed")
	if err != nil {
		return err
	}
	defer os.RemoveAll(dir)
	parent, err := vhdSeed(dir, "p.vhd", vhd.CreateOptions{Size: 8 << 20}, vhdWrites)
	if err != nil {
		return err
	}
	child, err := vhdSeed(dir, "c.vhd", vhd.CreateOptions{Parent: filepath.Join(dir, "p.vhd")}, map[int64]int{2 << 20: 4096})
	if err != nil {
		return err
	}
	pl, cl := parseVHD(parent), parseVHD(child)
	vhdxBytes, err := vhdxSeed(vhdx.CreateOptions{Size: 8 << 20, BlockSize: 1 << 20}, dynamicWrites)
	if err != nil {
		return err
	}
	rel := func(name string) []vhdLocator { return []vhdLocator{{"W2ru", utf16le(`.\` + name)}} }
	clean := withParent(child, pl.uniqueID, "p.vhd", rel("p.vhd"))
	ms := []struct {
		name, note string
		child      []byte
		fs         files
	}{
		{"length-max", "a W2ru locator of 2^32 - 1 bytes", patched(clean, parseVHD(clean).dynHeader(func(h []byte) { binary.BigEndian.PutUint32(h[dhLocators+8:], ^uint32(0)) })), nil},
		{"length-odd", "a W2ru locator of odd length", patched(clean, parseVHD(clean).dynHeader(func(h []byte) { binary.BigEndian.PutUint32(h[dhLocators+8:], 7) })), nil},
		{"offset-huge", "locator data at 2^62", patched(clean, parseVHD(clean).dynHeader(func(h []byte) { binary.BigEndian.PutUint64(h[dhLocators+16:], 1<<62) })), nil},
		{"offset-0", "locator data at offset 0", patched(clean, parseVHD(clean).dynHeader(func(h []byte) { binary.BigEndian.PutUint64(h[dhLocators+16:], 0) })), nil},
		{"eight-same", "eight locators on the same data", withParent(child, pl.uniqueID, "p.vhd", []vhdLocator{
			{"W2ru", utf16le(`.\p.vhd`)}, {"W2ru", utf16le(`.\p.vhd`)}, {"W2ku", utf16le(`.\p.vhd`)}, {"W2ku", utf16le(`.\p.vhd`)},
			{"Wi2r", []byte(`.\p.vhd`)}, {"Wi2k", []byte(`.\p.vhd`)}, {"MacX", []byte("file://p.vhd")}, {"W2ru", utf16le(`.\p.vhd`)}}), nil},
		{"macx-bad-url", "a MacX locator that is no URL", withParent(child, pl.uniqueID, "p.vhd", []vhdLocator{{"MacX", []byte("%zz://\x00\x01")}}), nil},
		{"latin1", "a Wi2r locator in Latin-1", withParent(child, pl.uniqueID, "p.vhd", []vhdLocator{{"Wi2r", []byte(".\\p\xe9.vhd")}}), nil},
		{"long", "a W2ru path of 32000 characters", withParent(child, pl.uniqueID, "p.vhd", []vhdLocator{{"W2ru", utf16le(strings.Repeat(`a\`, 16000) + "p.vhd")}}), nil},
		{"id-other", "the parent's unique id is another", withParent(child, [16]byte{1, 2, 3}, "p.vhd", rel("p.vhd")), nil},
		{"name-only", "no locator, only the parent name", withParent(child, pl.uniqueID, "p.vhd", nil), nil},
		{"nothing", "no locator, no parent name", withParent(child, pl.uniqueID, "", nil), nil},
		{"self", "its own parent", withParent(child, cl.uniqueID, "c.vhd", rel("c.vhd")), nil},
		{"fifo", "a FIFO where the parent should be", withParent(child, pl.uniqueID, "fifo.vhd", rel("fifo.vhd")), files{"fifo.vhd": nil}},
		{"directory", "a folder where the parent should be", withParent(child, pl.uniqueID, "dir.vhd", rel("dir.vhd")), files{"dir.vhd/": nil}},
		{"dev-zero", "/dev/zero as the parent", withParent(child, pl.uniqueID, "/dev/zero", []vhdLocator{{"W2ku", utf16le("/dev/zero")}}), nil},
		{"vhdx-parent", "a VHDX where the parent should be", withParent(child, pl.uniqueID, "x.vhd", rel("x.vhd")), files{"x.vhd": vhdxBytes}},
	}
	for _, m := range ms {
		fs := files{"p.vhd": parent, "c.vhd": m.child}
		for n, b := range m.fs {
			fs[n] = b
		}
		if err := c.multi("vhd-locator", m.name, m.note, "c.vhd", fs, nil); err != nil {
			return err
		}
	}
	// Truncations of the child: its locator data and its block.
	cc := parseVHD(clean)
	var bounds []int64
	for _, off := range cc.blocks(clean) {
		bounds = append(bounds, off, off+cc.bitmap, off+cc.bitmap+cc.blockSize)
	}
	bounds = append(bounds, cc.footer, cc.footer-512)
	for _, k := range truncations(int64(len(clean)), bounds, false) {
		if err := c.multi("vhd-truncate", fmt.Sprintf("child-%d", k), fmt.Sprintf("differencing child cut to %d bytes", k), "c.vhd",
			files{"p.vhd": parent, "c.vhd": clean[:k]}, nil); err != nil {
			return err
		}
	}

	// A->B->A.
	ida, idb := [16]byte{'l', 'o', 'o', 'p', 'a'}, [16]byte{'l', 'o', 'o', 'p', 'b'}
	a := withUniqueID(withParent(child, idb, "b.vhd", rel("b.vhd")), ida)
	b := withUniqueID(withParent(child, ida, "a.vhd", rel("a.vhd")), idb)
	if err := c.multi("chain-loop", "vhd-a-b-a", "a.vhd's parent is b.vhd, whose parent is a.vhd", "a.vhd",
		files{"p.vhd": parent, "a.vhd": a, "b.vhd": b}, nil); err != nil {
		return err
	}
	// 1000 deep, refused; 250 deep, read through every layer.
	for _, depth := range []int{1000, 250} {
		err := c.multi("chain-deep", fmt.Sprintf("vhd-%d", depth), fmt.Sprintf("a chain of %d differencing VHDs", depth), fmt.Sprintf("d%04d.vhd", depth-1),
			files{"p.vhd": parent}, func(dir string) error {
				id, name := pl.uniqueID, "p.vhd"
				for i := range depth {
					var g [16]byte
					copy(g[:], "deep")
					binary.BigEndian.PutUint32(g[12:], uint32(i))
					next := fmt.Sprintf("d%04d.vhd", i)
					if err := writeSparse(filepath.Join(dir, next), withUniqueID(withParent(child, id, name, rel(name)), g)); err != nil {
						return err
					}
					id, name = g, next
				}
				return nil
			})
		if err != nil {
			return err
		}
	}
	return nil
}

// vhdCreate8M is how the VHD seeds are made: dynamic, 8 MiB, 2 MiB blocks.
var vhdCreate8M = vhd.CreateOptions{Size: 8 << 20}

func vhdChildOf(parent string) vhd.CreateOptions { return vhd.CreateOptions{Parent: parent} }
