package vhd

import (
	"bytes"
	"encoding/binary"

	"github.com/vhdkit/vhdkit/storage"
)

// footer is the 512-byte hard disk footer.
type footer struct {
	Cookie         [8]byte
	Features       uint32
	Version        uint32
	DataOffset     uint64
	TimeStamp      uint32
	CreatorApp     [4]byte
	CreatorVersion uint32
	CreatorHostOS  [4]byte
	OriginalSize   uint64
	CurrentSize    uint64
	Geometry       Geometry
	DiskType       Type
	Checksum       uint32
	UniqueID       UUID
	SavedState     uint8
}

const footerChecksumAt = 64

// decodeFooter decodes b, which holds at least 85 bytes.
func decodeFooter(b []byte) footer {
	var f footer
	copy(f.Cookie[:], b[0:8])
	f.Features = binary.BigEndian.Uint32(b[8:])
	f.Version = binary.BigEndian.Uint32(b[12:])
	f.DataOffset = binary.BigEndian.Uint64(b[16:])
	f.TimeStamp = binary.BigEndian.Uint32(b[24:])
	copy(f.CreatorApp[:], b[28:32])
	f.CreatorVersion = binary.BigEndian.Uint32(b[32:])
	copy(f.CreatorHostOS[:], b[36:40])
	f.OriginalSize = binary.BigEndian.Uint64(b[40:])
	f.CurrentSize = binary.BigEndian.Uint64(b[48:])
	f.Geometry = decodeGeometry(b[56:60])
	f.DiskType = Type(binary.BigEndian.Uint32(b[60:]))
	f.Checksum = binary.BigEndian.Uint32(b[64:])
	copy(f.UniqueID[:], b[68:84])
	f.SavedState = b[84]
	return f
}

// encode returns the footer's 512 bytes with a fresh checksum.
func (f *footer) encode() [footerSize]byte {
	var b [footerSize]byte
	copy(b[0:8], f.Cookie[:])
	binary.BigEndian.PutUint32(b[8:], f.Features)
	binary.BigEndian.PutUint32(b[12:], f.Version)
	binary.BigEndian.PutUint64(b[16:], f.DataOffset)
	binary.BigEndian.PutUint32(b[24:], f.TimeStamp)
	copy(b[28:32], f.CreatorApp[:])
	binary.BigEndian.PutUint32(b[32:], f.CreatorVersion)
	copy(b[36:40], f.CreatorHostOS[:])
	binary.BigEndian.PutUint64(b[40:], f.OriginalSize)
	binary.BigEndian.PutUint64(b[48:], f.CurrentSize)
	f.Geometry.encode(b[56:60])
	binary.BigEndian.PutUint32(b[60:], uint32(f.DiskType))
	copy(b[68:84], f.UniqueID[:])
	b[84] = f.SavedState
	f.Checksum = checksum(b[:], footerChecksumAt)
	binary.BigEndian.PutUint32(b[64:], f.Checksum)
	return b
}

// Validate checks the footer's fields; offsets in its errors are relative
// to the footer. The checksum is checked by the reader, which has the raw
// bytes.
func (f *footer) Validate() error {
	const s = "footer"
	if string(f.Cookie[:]) != footerCookie {
		return formatErr(s, 0, "cookie %q, want %q", f.Cookie[:], footerCookie)
	}
	if f.Version>>16 != formatVersion>>16 {
		return unsupportedErr(s, 12, "format version %#08x", f.Version)
	}
	switch f.DiskType {
	case Fixed:
	case Dynamic, Differencing:
		// The header must lie past the footer copy; where it ends is
		// checked against the file by the reader.
		if f.DataOffset < footerSize || f.DataOffset > 1<<62 {
			return formatErr(s, 16, "dynamic header offset %#x", f.DataOffset)
		}
	default:
		return unsupportedErr(s, 60, "disk type %d", uint32(f.DiskType))
	}
	if f.CurrentSize > MaxSize {
		return unsupportedErr(s, 48, "current size %d exceeds the format's limit of 2040 GiB", f.CurrentSize)
	}
	return nil
}

// sizedByGeometry reports whether the creator means the geometry as the
// disk's size: Virtual PC and QEMU before force_size existed.
func (f *footer) sizedByGeometry() bool {
	switch string(f.CreatorApp[:]) {
	case "vpc ", "qemu":
		return true
	}
	return false
}

// virtualSize is the size the disk presents (see the package doc) and
// whether it comes from the geometry. Validate has bounded CurrentSize.
func (f *footer) virtualSize() (size int64, fromCHS bool) {
	cur := int64(f.CurrentSize) / SectorSize * SectorSize
	if f.sizedByGeometry() {
		if chs := f.Geometry.Size(); f.Geometry != maxGeometry && chs <= cur {
			return chs, true
		}
	}
	return cur, false
}

// readFooter finds the footer of a file of the given size: the last 512
// bytes, or the last 511 of an old fixed image, or — when the end of a
// dynamic or differencing image is damaged, as a crash while appending a
// block can leave it — the copy at offset 0. It returns the footer, its
// raw bytes (padded to 512), where it starts and whether it is the copy.
func readFooter(f storage.File, size int64, ignoreChecksum bool) (ft footer, raw [footerSize]byte, at int64, fromCopy bool, err error) {
	if size < footerSize-1 {
		return ft, raw, 0, false, formatErr("footer", 0, "file is %d bytes, too small for a VHD footer", size)
	}
	var endErr error
	if size >= footerSize {
		if err := readFull(f, raw[:], size-footerSize); err != nil {
			return ft, raw, 0, false, err
		}
		at = size - footerSize
	}
	if size < footerSize || !bytes.HasPrefix(raw[:], []byte(footerCookie)) {
		// A 511-byte footer: the cookie sits one byte later.
		var b [footerSize]byte
		if err := readFull(f, b[:footerSize-1], size-(footerSize-1)); err != nil {
			return ft, raw, 0, false, err
		}
		if bytes.HasPrefix(b[:], []byte(footerCookie)) {
			raw, at = b, size-(footerSize-1)
		}
	}
	if endErr = checkFooter(raw, at, ignoreChecksum); endErr == nil {
		ft = decodeFooter(raw[:])
		return ft, raw, at, false, nil
	}
	// Fall back to the copy at 0, which only dynamic and differencing
	// images have.
	var c [footerSize]byte
	if size >= 2*footerSize {
		if err := readFull(f, c[:], 0); err != nil {
			return ft, raw, 0, false, err
		}
		if checkFooter(c, 0, ignoreChecksum) == nil {
			if cf := decodeFooter(c[:]); cf.DiskType != Fixed {
				return cf, c, 0, true, nil
			}
		}
	}
	return ft, raw, 0, false, endErr
}

// checkFooter validates raw footer bytes found at offset at.
func checkFooter(raw [footerSize]byte, at int64, ignoreChecksum bool) error {
	ft := decodeFooter(raw[:])
	if err := ft.Validate(); err != nil {
		return rebase(err, at)
	}
	if sum := checksum(raw[:], footerChecksumAt); sum != ft.Checksum && !ignoreChecksum {
		return checksumErr("footer", at+footerChecksumAt, ft.Checksum, sum)
	}
	return nil
}
