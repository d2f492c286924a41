package partition

import (
	"bytes"
	"encoding/binary"
	"fmt"
)

// The MBR: boot code, four 16-byte entries at 446, the signature at 510.
//
//	entry  +0  status: 0x80 bootable, 0x00 not (anything else: not an MBR)
//	       +1  CHS of the first sector (ignored: LBAs are what count)
//	       +4  type: 0x00 unused, 0xEE GPT protective, 0x05/0x0F/0x85 extended, …
//	       +5  CHS of the last sector (ignored)
//	       +8  first LBA (uint32 LE)
//	       +12 number of sectors (uint32 LE)
const (
	mbrSize           = 512
	mbrEntriesOffset  = 446
	mbrEntrySize      = 16
	mbrSignatureOff   = 510
	mbrTypeProtective = 0xEE
	mbrMaxSectors     = 0xFFFFFFFF // what a protective entry says for a larger disk
)

// mbrTable is what parseMBR found.
type mbrTable struct {
	partitions []Partition // used entries other than the protective one
	protective int         // slot of the first 0xEE entry, or -1
}

// fileSystemBoot names the file system whose boot sector b is, or "": a
// disk formatted without partitions has the 0x55AA signature too, and its
// boot parameters would read as nonsense entries.
func fileSystemBoot(b []byte) string {
	switch {
	case bytes.Equal(b[3:11], []byte("NTFS    ")):
		return "NTFS"
	case bytes.Equal(b[3:11], []byte("EXFAT   ")):
		return "exFAT"
	case bytes.Equal(b[0x52:0x5a], []byte("FAT32   ")):
		return "FAT32"
	case bytes.HasPrefix(b[0x36:0x3e], []byte("FAT")):
		return "FAT"
	}
	return ""
}

// parseMBR reads the MBR in b (512 bytes) of a disk of totalSectors
// logical sectors of ss bytes. An error wrapping ErrNoTable says b is no
// MBR.
func parseMBR(b []byte, totalSectors int64, ss int) (mbrTable, error) {
	m := mbrTable{protective: -1}
	if b[mbrSignatureOff] != 0x55 || b[mbrSignatureOff+1] != 0xAA {
		return m, formatErr(ErrNoTable, "MBR", 0, "no 0x55AA signature: no partition table")
	}
	if fs := fileSystemBoot(b); fs != "" {
		return m, formatErr(ErrNoTable, "MBR", 0, "LBA 0 is the boot sector of a %s file system, not a partition table", fs)
	}
	for i := range 4 {
		off := mbrEntriesOffset + i*mbrEntrySize
		e := b[off : off+mbrEntrySize]
		structure := fmt.Sprintf("MBR entry %d", i+1)
		if e[0] != 0x00 && e[0] != 0x80 {
			// As Linux decides: such a sector is boot code, not a table.
			return m, formatErr(ErrNoTable, structure, int64(off), "status %#02x is neither 0x00 nor 0x80: LBA 0 holds no partition table", e[0])
		}
		typ := e[4]
		first := int64(binary.LittleEndian.Uint32(e[8:]))
		count := int64(binary.LittleEndian.Uint32(e[12:]))
		if typ == 0 || count == 0 {
			continue // unused
		}
		if first == 0 {
			return m, formatErr(ErrFormat, structure, int64(off), "type %#02x starts at LBA 0, over the MBR itself", typ)
		}
		if typ == mbrTypeProtective {
			if m.protective < 0 {
				m.protective = i
			}
			continue
		}
		if first+count > totalSectors {
			return m, formatErr(ErrFormat, structure, int64(off), "type %#02x: LBA %d + %d sectors runs past the disk's %d sectors", typ, first, count, totalSectors)
		}
		m.partitions = append(m.partitions, Partition{
			Number: i + 1,
			Start:  first * int64(ss),
			Length: count * int64(ss),
			Type:   fmt.Sprintf("0x%02x", typ),
		})
	}
	return m, nil
}

// setProtectiveEnd makes the protective entry of the MBR m read from b
// end at the last LBA of a disk of newTotal sectors, as the spec wants it
// (fdisk and sgdisk call anything else a size mismatch). A hybrid MBR's
// 0xEE entry, beside other partitions, is its author's choice: it only
// changes when it would run past the new end. It reports whether b
// changed.
func setProtectiveEnd(b []byte, m mbrTable, newTotal int64) bool {
	e := b[mbrEntriesOffset+m.protective*mbrEntrySize:][:mbrEntrySize]
	first := int64(binary.LittleEndian.Uint32(e[8:]))
	count := int64(binary.LittleEndian.Uint32(e[12:]))
	hybrid := len(m.partitions) > 0
	if first != 1 || (hybrid && first+count <= newTotal) {
		return false
	}
	want := uint32(min(newTotal-1, mbrMaxSectors))
	if int64(want) == count {
		return false
	}
	binary.LittleEndian.PutUint32(e[12:], want)
	return true
}
