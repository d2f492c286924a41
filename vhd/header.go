package vhd

import (
	"encoding/binary"
	"unicode/utf16"
)

// header is the 1024-byte dynamic disk header of dynamic and differencing
// images.
type header struct {
	Cookie          [8]byte
	DataOffset      uint64
	TableOffset     uint64
	Version         uint32
	MaxTableEntries uint32
	BlockSize       uint32
	Checksum        uint32
	ParentUniqueID  UUID
	ParentTimeStamp uint32
	Reserved        uint32
	ParentName      [512]byte // UTF-16 big-endian, NUL padded
	Locators        [8]locatorEntry
}

// locatorEntry is one of the header's eight parent locator entries.
type locatorEntry struct {
	Code       uint32 // platform code, "W2ku" etc.
	DataSpace  uint32 // sectors reserved (Hyper-V writes bytes); not used
	DataLength uint32 // bytes of locator data
	Reserved   uint32
	DataOffset uint64 // absolute file offset of the data
}

const (
	headerChecksumAt  = 36
	headerLocatorsAt  = 576
	locatorEntrySize  = 24
	headerParentIDAt  = 40
	headerParentTSAt  = 56
	headerParentNmAt  = 64
	headerMaxEntAt    = 28
	headerBlockSizeAt = 32
	headerTableOffAt  = 16
)

func decodeHeader(b []byte) header {
	var h header
	copy(h.Cookie[:], b[0:8])
	h.DataOffset = binary.BigEndian.Uint64(b[8:])
	h.TableOffset = binary.BigEndian.Uint64(b[16:])
	h.Version = binary.BigEndian.Uint32(b[24:])
	h.MaxTableEntries = binary.BigEndian.Uint32(b[28:])
	h.BlockSize = binary.BigEndian.Uint32(b[32:])
	h.Checksum = binary.BigEndian.Uint32(b[36:])
	copy(h.ParentUniqueID[:], b[40:56])
	h.ParentTimeStamp = binary.BigEndian.Uint32(b[56:])
	h.Reserved = binary.BigEndian.Uint32(b[60:])
	copy(h.ParentName[:], b[64:576])
	for i := range h.Locators {
		e := b[headerLocatorsAt+i*locatorEntrySize:]
		h.Locators[i] = locatorEntry{
			Code:       binary.BigEndian.Uint32(e[0:]),
			DataSpace:  binary.BigEndian.Uint32(e[4:]),
			DataLength: binary.BigEndian.Uint32(e[8:]),
			Reserved:   binary.BigEndian.Uint32(e[12:]),
			DataOffset: binary.BigEndian.Uint64(e[16:]),
		}
	}
	return h
}

// encode returns the header's 1024 bytes with a fresh checksum.
func (h *header) encode() [headerSize]byte {
	var b [headerSize]byte
	copy(b[0:8], h.Cookie[:])
	binary.BigEndian.PutUint64(b[8:], h.DataOffset)
	binary.BigEndian.PutUint64(b[16:], h.TableOffset)
	binary.BigEndian.PutUint32(b[24:], h.Version)
	binary.BigEndian.PutUint32(b[28:], h.MaxTableEntries)
	binary.BigEndian.PutUint32(b[32:], h.BlockSize)
	copy(b[40:56], h.ParentUniqueID[:])
	binary.BigEndian.PutUint32(b[56:], h.ParentTimeStamp)
	binary.BigEndian.PutUint32(b[60:], h.Reserved)
	copy(b[64:576], h.ParentName[:])
	for i, l := range h.Locators {
		e := b[headerLocatorsAt+i*locatorEntrySize:]
		binary.BigEndian.PutUint32(e[0:], l.Code)
		binary.BigEndian.PutUint32(e[4:], l.DataSpace)
		binary.BigEndian.PutUint32(e[8:], l.DataLength)
		binary.BigEndian.PutUint32(e[12:], l.Reserved)
		binary.BigEndian.PutUint64(e[16:], l.DataOffset)
	}
	h.Checksum = checksum(b[:], headerChecksumAt)
	binary.BigEndian.PutUint32(b[36:], h.Checksum)
	return b
}

// Validate checks the header's fields against the spec's limits and the
// BAT against limit, the end of the file's data (where the footer
// starts). Offsets in its errors are relative to the header.
func (h *header) Validate(limit int64) error {
	const s = "dynamic header"
	if string(h.Cookie[:]) != headerCookie {
		return formatErr(s, 0, "cookie %q, want %q", h.Cookie[:], headerCookie)
	}
	if h.Version>>16 != formatVersion>>16 {
		return unsupportedErr(s, 24, "header version %#08x", h.Version)
	}
	if !isPowerOfTwo(uint64(h.BlockSize)) || h.BlockSize < minBlockSize {
		return formatErr(s, headerBlockSizeAt, "block size %d is not a power of two of at least %d", h.BlockSize, minBlockSize)
	}
	if h.BlockSize > maxBlockSize {
		return unsupportedErr(s, headerBlockSizeAt, "block size %d exceeds %d", h.BlockSize, maxBlockSize)
	}
	if h.MaxTableEntries > maxBATEntries {
		return unsupportedErr(s, headerMaxEntAt, "%d BAT entries exceed the limit of %d", h.MaxTableEntries, maxBATEntries)
	}
	if h.TableOffset < footerSize || h.TableOffset > uint64(limit) ||
		uint64(h.MaxTableEntries)*4 > uint64(limit)-h.TableOffset {
		return formatErr(s, headerTableOffAt, "BAT of %d entries at %#x does not fit in the %d bytes before the footer",
			h.MaxTableEntries, h.TableOffset, limit)
	}
	return nil
}

// bitmapSize is the size of a block's sector bitmap: one bit per sector,
// padded to whole sectors.
func bitmapSize(blockSize int64) int64 {
	return alignUp((blockSize/SectorSize+7)/8, SectorSize)
}

// parentName decodes the header's parent name.
func (h *header) parentName() string {
	u := make([]uint16, 0, len(h.ParentName)/2)
	for i := 0; i+1 < len(h.ParentName); i += 2 {
		c := binary.BigEndian.Uint16(h.ParentName[i:])
		if c == 0 {
			break
		}
		u = append(u, c)
	}
	return string(utf16.Decode(u))
}

// setParentName stores name, or its last path element when name does not
// fit in 255 UTF-16 units (the field keeps a terminating NUL).
func (h *header) setParentName(name, base string) {
	u := utf16.Encode([]rune(name))
	if len(u) > len(h.ParentName)/2-1 {
		u = utf16.Encode([]rune(base))
		if len(u) > len(h.ParentName)/2-1 {
			u = u[:len(h.ParentName)/2-1]
		}
	}
	h.ParentName = [512]byte{}
	for i, c := range u {
		binary.BigEndian.PutUint16(h.ParentName[2*i:], c)
	}
}
