package vhdx

import (
	"encoding/binary"
	"unicode/utf16"
)

// header is one of the two 4 KiB headers.
type header struct {
	Seq           uint64
	FileWriteGUID GUID
	DataWriteGUID GUID
	LogGUID       GUID
	LogVersion    uint16
	Version       uint16
	LogLength     uint32
	LogOffset     uint64
}

// Header layout, within its 4 KiB:
//
//	0 signature "head"   4 checksum        8 sequence number
//	16 FileWriteGuid     32 DataWriteGuid  48 LogGuid
//	64 LogVersion (u16)  66 Version (u16)  68 LogLength (u32)
//	72 LogOffset (u64)   80 reserved, zero
func parseHeader(b []byte, name string, off int64) (header, error) {
	var h header
	if len(b) < headerSize {
		return h, formatErr(name, off, "short read")
	}
	b = b[:headerSize]
	if binary.LittleEndian.Uint32(b[0:]) != sigHeader {
		return h, formatErr(name, off, "bad signature %q", b[0:4])
	}
	if got, want := binary.LittleEndian.Uint32(b[4:]), checksum(b, 4); got != want {
		return h, checksumErr(name, off, got, want)
	}
	h.Seq = binary.LittleEndian.Uint64(b[8:])
	copy(h.FileWriteGUID[:], b[16:32])
	copy(h.DataWriteGUID[:], b[32:48])
	copy(h.LogGUID[:], b[48:64])
	h.LogVersion = binary.LittleEndian.Uint16(b[64:])
	h.Version = binary.LittleEndian.Uint16(b[66:])
	h.LogLength = binary.LittleEndian.Uint32(b[68:])
	h.LogOffset = binary.LittleEndian.Uint64(b[72:])
	return h, nil
}

// validate checks the header's fields against the spec and the file size.
func (h *header) validate(name string, off, fileSize int64) error {
	if h.Version != 1 {
		return unsupportedErr(name, off+66, "version %d", h.Version)
	}
	if h.LogVersion != 0 {
		return unsupportedErr(name, off+64, "log version %d", h.LogVersion)
	}
	if h.LogLength == 0 || h.LogLength%mib != 0 {
		return formatErr(name, off+68, "log length %d is not a positive multiple of 1 MiB", h.LogLength)
	}
	if h.LogOffset < mib || h.LogOffset%mib != 0 {
		return formatErr(name, off+72, "log offset %#x is not 1 MiB-aligned past the first 1 MiB", h.LogOffset)
	}
	if h.LogOffset > uint64(fileSize) || uint64(h.LogLength) > uint64(fileSize)-h.LogOffset {
		return formatErr(name, off+72, "log [%#x, +%#x) beyond end of file (%d bytes)", h.LogOffset, h.LogLength, fileSize)
	}
	return nil
}

func (h *header) marshal() []byte {
	b := make([]byte, headerSize)
	binary.LittleEndian.PutUint32(b[0:], sigHeader)
	binary.LittleEndian.PutUint64(b[8:], h.Seq)
	copy(b[16:], h.FileWriteGUID[:])
	copy(b[32:], h.DataWriteGUID[:])
	copy(b[48:], h.LogGUID[:])
	binary.LittleEndian.PutUint16(b[64:], h.LogVersion)
	binary.LittleEndian.PutUint16(b[66:], h.Version)
	binary.LittleEndian.PutUint32(b[68:], h.LogLength)
	binary.LittleEndian.PutUint64(b[72:], h.LogOffset)
	binary.LittleEndian.PutUint32(b[4:], checksum(b, 4))
	return b
}

// marshalFileIdent returns the 64 KiB file type identifier: the signature
// and the creator as UTF-16LE (at most 256 code units).
func marshalFileIdent(creator string) []byte {
	b := make([]byte, 64*kib)
	binary.LittleEndian.PutUint64(b[0:], sigFileIdent)
	u := utf16.Encode([]rune(creator))
	if len(u) > 255 {
		u = u[:255]
	}
	for i, c := range u {
		binary.LittleEndian.PutUint16(b[8+2*i:], c)
	}
	return b
}

// parseCreator decodes the creator field of the file type identifier.
func parseCreator(b []byte) string {
	if len(b) < 8+512 {
		return ""
	}
	var u []uint16
	for i := 8; i < 8+512; i += 2 {
		c := binary.LittleEndian.Uint16(b[i:])
		if c == 0 {
			break
		}
		u = append(u, c)
	}
	return string(utf16.Decode(u))
}

// regionEntry locates one region.
type regionEntry struct {
	GUID     GUID
	Offset   uint64
	Length   uint32
	Required bool
}

// Region table layout (64 KiB, checksummed as a whole):
//
//	0 signature "regi"  4 checksum  8 entry count  12 reserved
//	16 + 32*i: GUID (16), FileOffset (u64), Length (u32), Required (bit 0 of u32)
func parseRegionTable(b []byte, name string, off int64) ([]regionEntry, error) {
	if len(b) < regionTableSize {
		return nil, formatErr(name, off, "short read")
	}
	b = b[:regionTableSize]
	if binary.LittleEndian.Uint32(b[0:]) != sigRegion {
		return nil, formatErr(name, off, "bad signature %q", b[0:4])
	}
	if got, want := binary.LittleEndian.Uint32(b[4:]), checksum(b, 4); got != want {
		return nil, checksumErr(name, off, got, want)
	}
	n := binary.LittleEndian.Uint32(b[8:])
	if n > maxRegionEntries {
		return nil, formatErr(name, off+8, "%d entries, at most %d allowed", n, maxRegionEntries)
	}
	entries := make([]regionEntry, n)
	for i := range entries {
		e := b[16+32*i:]
		copy(entries[i].GUID[:], e[0:16])
		entries[i].Offset = binary.LittleEndian.Uint64(e[16:])
		entries[i].Length = binary.LittleEndian.Uint32(e[24:])
		entries[i].Required = binary.LittleEndian.Uint32(e[28:])&1 != 0
	}
	return entries, nil
}

func marshalRegionTable(entries []regionEntry) []byte {
	b := make([]byte, regionTableSize)
	binary.LittleEndian.PutUint32(b[0:], sigRegion)
	binary.LittleEndian.PutUint32(b[8:], uint32(len(entries)))
	for i, r := range entries {
		e := b[16+32*i:]
		copy(e[0:], r.GUID[:])
		binary.LittleEndian.PutUint64(e[16:], r.Offset)
		binary.LittleEndian.PutUint32(e[24:], r.Length)
		if r.Required {
			binary.LittleEndian.PutUint32(e[28:], 1)
		}
	}
	binary.LittleEndian.PutUint32(b[4:], checksum(b, 4))
	return b
}

// regions is the validated content of a region table.
type regions struct {
	BAT, Metadata regionEntry
	// Other holds the regions this implementation does not know (none
	// required, or the table is refused): their space is not ours, so no
	// block may lie in it.
	Other []regionEntry
}

// all returns every region of the table.
func (r *regions) all() []regionEntry {
	return append([]regionEntry{r.BAT, r.Metadata}, r.Other...)
}

// validateRegions checks entries against the spec and the file size: known
// regions present once, an unknown region marked required refused, and
// every region, known or not, 1 MiB-aligned past the first 1 MiB, inside
// the file and not overlapping another (MS-VHDX 2.2.3.2: all objects in
// the table are non-overlapping; a region we do not know still holds
// someone's data, which a block placed over it would destroy).
func validateRegions(entries []regionEntry, name string, off, fileSize int64) (regions, error) {
	var r regions
	var haveBAT, haveMeta bool
	for i, e := range entries {
		eoff := off + 16 + 32*int64(i)
		switch e.GUID {
		case regionBAT:
			if haveBAT {
				return r, formatErr(name, eoff, "second BAT region")
			}
			haveBAT, r.BAT = true, e
		case regionMetadata:
			if haveMeta {
				return r, formatErr(name, eoff, "second metadata region")
			}
			haveMeta, r.Metadata = true, e
		default:
			if e.Required {
				return r, unsupportedErr(name, eoff, "unknown required region %s", e.GUID)
			}
			r.Other = append(r.Other, e)
		}
		if e.Offset < mib || e.Offset%mib != 0 || e.Length == 0 || e.Length%mib != 0 {
			return r, formatErr(name, eoff, "region %s at %#x length %#x not 1 MiB-aligned", e.GUID, e.Offset, e.Length)
		}
		if e.Offset > uint64(fileSize) || uint64(e.Length) > uint64(fileSize)-e.Offset {
			return r, formatErr(name, eoff, "region %s [%#x, +%#x) beyond end of file (%d bytes)", e.GUID, e.Offset, e.Length, fileSize)
		}
		for j, o := range entries[:i] {
			if o.GUID == e.GUID {
				return r, formatErr(name, eoff, "region %s listed twice", e.GUID)
			}
			if o.Offset < e.Offset+uint64(e.Length) && e.Offset < o.Offset+uint64(o.Length) {
				return r, formatErr(name, eoff, "region %s overlaps entry %d (region %s)", e.GUID, j, o.GUID)
			}
		}
	}
	if !haveBAT {
		return r, formatErr(name, off, "no BAT region")
	}
	if !haveMeta {
		return r, formatErr(name, off, "no metadata region")
	}
	return r, nil
}
