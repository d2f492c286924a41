package hostile

import (
	"encoding/binary"
	"fmt"
	"hash/crc32"
	"unicode/utf16"

	"github.com/vhdkit/vhdkit/vhdx"
)

// The VHDX structures the generator edits, with their offsets named as in
// MS-VHDX (vhdx/format.go, vhdx/header.go, vhdx/metadata.go, vhdx/log.go
// draw them); the vhdx package keeps its codecs to itself, so these are
// written here from the spec.
const (
	vhdxFileIdent    = 0
	vhdxHeader1      = 64 << 10
	vhdxHeader2      = 128 << 10
	vhdxRegion1      = 192 << 10
	vhdxRegion2      = 256 << 10
	vhdxHeaderSize   = 4 << 10  // checksummed part of a header
	vhdxRegionSize   = 64 << 10 // checksummed region table
	vhdxMetaTable    = 64 << 10 // metadata table at the start of its region
	vhdxLogSector    = 4 << 10
	vhdxChecksumAt   = 4 // CRC-32C field of headers, region tables, log entries
	vhdxFirstMiB     = 1 << 20
	vhdxLogEntryHead = 64
	vhdxLogDescSize  = 32

	// header fields
	hdrSeq, hdrFileWriteGUID, hdrDataWriteGUID, hdrLogGUID = 8, 16, 32, 48
	hdrLogVersion, hdrVersion, hdrLogLength, hdrLogOffset  = 64, 66, 68, 72

	// region table: 8 entry count, entries of 32 bytes from 16
	rtCount, rtEntries, rtEntrySize = 8, 16, 32

	// metadata table: 10 entry count, entries of 32 bytes from 32
	mtCount, mtEntries, mtEntrySize = 10, 32, 32

	// log entry header
	leLength, leTail, leSeq, leDescCount, leGUID, leFlushed, leLast = 8, 12, 16, 24, 32, 48, 56
)

func mustGUID(s string) vhdx.GUID {
	g, err := vhdx.ParseGUID(s)
	if err != nil {
		panic(err)
	}
	return g
}

var (
	regionBAT      = mustGUID("2DC27766-F623-4200-9D64-115E9BFD4A08")
	regionMetadata = mustGUID("8B7CA206-4790-4B9A-B8FE-575F050F886E")

	itemFileParameters     = mustGUID("CAA16737-FA36-4D43-B3B6-33F0AA44E76B")
	itemVirtualDiskSize    = mustGUID("2FA54224-CD1B-4876-B211-5DBED83BF4B8")
	itemLogicalSectorSize  = mustGUID("8141BF1D-A96F-4709-BA47-F233A8FAAB5F")
	itemPhysicalSectorSize = mustGUID("CDA348C7-445D-4471-9CC9-E9885251C556")
	itemParentLocator      = mustGUID("A8D35F2D-B30B-454D-ABF7-D3D84834AB0C")

	locatorTypeVHDX = mustGUID("B04AEFB7-D19E-4A81-B789-25B8E9445913")
)

var castagnoli = crc32.MakeTable(crc32.Castagnoli)

// sealCRC32C recomputes the CRC-32C of the structure s, whose checksum
// field is at vhdxChecksumAt.
func sealCRC32C(s []byte) {
	binary.LittleEndian.PutUint32(s[vhdxChecksumAt:], 0)
	binary.LittleEndian.PutUint32(s[vhdxChecksumAt:], crc32.Checksum(s, castagnoli))
}

// vhdxLayout is where a valid seed keeps its structures.
type vhdxLayout struct {
	header         int64 // offset of the current header
	logOff, logLen int64
	batOff, batLen int64
	metaOff        int64
	metaLen        int64
	items          map[vhdx.GUID]metaItem
	blockSize      int64
	dataWriteGUID  vhdx.GUID
}

// metaItem is one row of the metadata table.
type metaItem struct {
	entry    int64 // file offset of its table entry
	off, len int64 // file offset and length of its data
}

// parseVHDX reads the layout of a seed, which vhdkit made and is valid.
func parseVHDX(b []byte) (vhdxLayout, error) {
	var l vhdxLayout
	le := binary.LittleEndian
	l.header = vhdxHeader1
	if le.Uint64(b[vhdxHeader2+hdrSeq:]) > le.Uint64(b[vhdxHeader1+hdrSeq:]) {
		l.header = vhdxHeader2
	}
	h := b[l.header:]
	copy(l.dataWriteGUID[:], h[hdrDataWriteGUID:])
	l.logLen, l.logOff = int64(le.Uint32(h[hdrLogLength:])), int64(le.Uint64(h[hdrLogOffset:]))
	rt := b[vhdxRegion1:]
	for i := range int64(le.Uint32(rt[rtCount:])) {
		e := rt[rtEntries+rtEntrySize*i:]
		var id vhdx.GUID
		copy(id[:], e[0:16])
		off, n := int64(le.Uint64(e[16:])), int64(le.Uint32(e[24:]))
		switch id {
		case regionBAT:
			l.batOff, l.batLen = off, n
		case regionMetadata:
			l.metaOff, l.metaLen = off, n
		}
	}
	if l.batOff == 0 || l.metaOff == 0 || int64(len(b)) < l.metaOff+vhdxMetaTable {
		return l, fmt.Errorf("hostile: seed without BAT or metadata region")
	}
	mt := b[l.metaOff:]
	l.items = map[vhdx.GUID]metaItem{}
	for i := range int64(le.Uint16(mt[mtCount:])) {
		e := mt[mtEntries+mtEntrySize*i:]
		var id vhdx.GUID
		copy(id[:], e[0:16])
		l.items[id] = metaItem{entry: l.metaOff + mtEntries + mtEntrySize*i,
			off: l.metaOff + int64(le.Uint32(e[16:])), len: int64(le.Uint32(e[20:]))}
	}
	fp, ok := l.items[itemFileParameters]
	if !ok {
		return l, fmt.Errorf("hostile: seed without file parameters")
	}
	l.blockSize = int64(le.Uint32(b[fp.off:]))
	return l, nil
}

// bothHeaders applies edit to each header and reseals it.
func bothHeaders(edit func(h []byte)) func([]byte) {
	return func(b []byte) {
		for _, off := range []int64{vhdxHeader1, vhdxHeader2} {
			h := b[off : off+vhdxHeaderSize]
			edit(h)
			sealCRC32C(h)
		}
	}
}

// bothRegionTables applies edit to each region table and reseals it.
func bothRegionTables(edit func(rt []byte)) func([]byte) {
	return func(b []byte) {
		for _, off := range []int64{vhdxRegion1, vhdxRegion2} {
			rt := b[off : off+vhdxRegionSize]
			edit(rt)
			sealCRC32C(rt)
		}
	}
}

// regionEntry returns the region table entry (within rt) of region id.
func regionEntry(rt []byte, id vhdx.GUID) []byte {
	for i := range int(binary.LittleEndian.Uint32(rt[rtCount:])) {
		e := rt[rtEntries+rtEntrySize*i:]
		if [16]byte(e[0:16]) == id {
			return e[:rtEntrySize]
		}
	}
	panic("hostile: seed region table without region " + id.String())
}

// vhdxLocator is a parent locator item: key/value pairs in file order.
type vhdxLocator [][2]string

// marshal encodes the locator (MS-VHDX 2.6.2.6): 0 LocatorType, 18
// KeyValueCount, 20 + 12*i: KeyOffset, ValueOffset (u32), KeyLength,
// ValueLength (u16); strings UTF-16LE after the entries.
func (l vhdxLocator) marshal() []byte {
	b := make([]byte, 20+12*len(l))
	copy(b[0:], locatorTypeVHDX[:])
	binary.LittleEndian.PutUint16(b[18:], uint16(len(l)))
	put := func(s string) (uint32, uint16) {
		o := uint32(len(b))
		for _, c := range utf16.Encode([]rune(s)) {
			b = binary.LittleEndian.AppendUint16(b, c)
		}
		return o, uint16(uint32(len(b)) - o)
	}
	for i, kv := range l {
		ko, kl := put(kv[0])
		vo, vl := put(kv[1])
		e := b[20+12*i:]
		binary.LittleEndian.PutUint32(e[0:], ko)
		binary.LittleEndian.PutUint32(e[4:], vo)
		binary.LittleEndian.PutUint16(e[8:], kl)
		binary.LittleEndian.PutUint16(e[10:], vl)
	}
	return b
}

// setLocator replaces the parent locator item of a differencing seed with
// loc (raw bytes), growing the item in place: it is the last item of the
// 1 MiB metadata region vhdkit writes, so there is room.
func setLocator(l vhdxLayout, loc []byte) func([]byte) {
	return func(b []byte) {
		it, ok := l.items[itemParentLocator]
		if !ok {
			panic("hostile: seed without a parent locator")
		}
		clear(b[it.off : it.off+it.len])
		copy(b[it.off:], loc)
		binary.LittleEndian.PutUint32(b[it.entry+20:], uint32(len(loc)))
	}
}

// guidString is a GUID as parent_linkage holds it.
func guidString(g vhdx.GUID) string { return "{" + g.String() + "}" }
