package partition

import (
	"bytes"
	"encoding/binary"
	"fmt"
	"hash/crc32"
	"io"
	"strings"
	"unicode/utf16"
)

// The GPT header (UEFI 2.10, 5.3.2), little-endian:
//
//	+0   "EFI PART"
//	+8   revision (1.0: 0x00010000)
//	+12  header size (92 up to the sector size)
//	+16  CRC32 of the header's size bytes, this field as zero
//	+20  reserved
//	+24  MyLBA: where this header is (1 for the primary)
//	+32  AlternateLBA: where the other header is
//	+40  FirstUsableLBA
//	+48  LastUsableLBA
//	+56  disk GUID
//	+72  PartitionEntryLBA: where this header's entry array starts
//	+80  number of entries
//	+84  size of an entry (128 × 2^n)
//	+88  CRC32 of the entry array
//
// An entry: +0 type GUID (zero: unused), +16 partition GUID, +32 first LBA,
// +40 last LBA (inclusive), +48 attributes, +56 name (36 UTF-16LE units).
const (
	gptSignature   = "EFI PART"
	gptRevision1   = 0x00010000
	gptHeaderMin   = 92
	gptEntryMin    = 128
	gptPrimaryLBA  = 1
	gptNameOffset  = 56
	gptNameUnits   = 36
	offMyLBA       = 24
	offAlternate   = 32
	offFirstUsable = 40
	offLastUsable  = 48
	offEntryLBA    = 72
	offHeaderCRC   = 16
)

// gptTable is a checked primary GPT.
type gptTable struct {
	ss          int64  // sector size
	arraySecs   int64  // sectors the entry array fills
	header      []byte // the primary header's sector as read
	headerSize  int
	alternate   uint64
	firstUsable uint64
	lastUsable  uint64
	entryLBA    uint64
	entries     []byte // the entry array, count × size bytes
	partitions  []Partition
}

// backupSectors is what the backup takes at the disk's end: its entry
// array and its header.
func (g *gptTable) backupSectors() int64 { return g.arraySecs + 1 }

// readGPT reads and checks the primary GPT of t's disk. An error wrapping
// ErrNoTable says there is no GPT signature at LBA 1.
func readGPT(r io.ReaderAt, t *Table) (*gptTable, error) {
	ss := int64(t.SectorSize)
	total := t.totalSectors()
	hdrOff := gptPrimaryLBA * ss
	h := make([]byte, ss)
	if err := readFull(r, h, hdrOff); err != nil {
		return nil, err
	}
	if string(h[:8]) != gptSignature {
		// A GPT laid out for the other sector size is not one to guess at:
		// every LBA in it would be read in the wrong unit.
		other := int64(4096)
		if ss == 4096 {
			other = 512
		}
		sig := make([]byte, 8)
		if other < t.DiskSize && readFull(r, sig, other) == nil && string(sig) == gptSignature {
			return nil, formatErr(ErrSectorSize, "GPT header", other, "the GPT is laid out for %d-byte sectors, but the disk's are %d bytes", other, ss)
		}
		return nil, formatErr(ErrNoTable, "GPT header", hdrOff, "no %q signature at LBA 1", gptSignature)
	}
	le := binary.LittleEndian
	if rev := le.Uint32(h[8:]); rev != gptRevision1 {
		return nil, formatErr(ErrUnsupported, "GPT header", hdrOff, "revision %#08x (only 1.0 is known)", rev)
	}
	size := le.Uint32(h[12:])
	if size < gptHeaderMin || int64(size) > ss {
		return nil, formatErr(ErrFormat, "GPT header", hdrOff, "header size %d not in [%d, %d]", size, gptHeaderMin, ss)
	}
	if got, want := le.Uint32(h[offHeaderCRC:]), headerCRC(h[:size]); got != want {
		return nil, formatErr(ErrChecksum, "GPT header", hdrOff, "CRC32 %#08x, computed %#08x", got, want)
	}
	g := &gptTable{ss: ss, header: h, headerSize: int(size),
		alternate:   le.Uint64(h[offAlternate:]),
		firstUsable: le.Uint64(h[offFirstUsable:]),
		lastUsable:  le.Uint64(h[offLastUsable:]),
		entryLBA:    le.Uint64(h[offEntryLBA:]),
	}
	count, entrySize := le.Uint32(h[80:]), le.Uint32(h[84:])
	// Both are uint32, so their product cannot overflow a uint64.
	arrayBytes := uint64(count) * uint64(entrySize)
	g.arraySecs = int64((arrayBytes + uint64(ss) - 1) / uint64(ss))
	uTotal := uint64(total)
	switch {
	case le.Uint64(h[offMyLBA:]) != gptPrimaryLBA:
		return nil, formatErr(ErrFormat, "GPT header", hdrOff, "MyLBA %d, not 1", le.Uint64(h[offMyLBA:]))
	case entrySize < gptEntryMin || entrySize%gptEntryMin != 0 || (entrySize/gptEntryMin)&(entrySize/gptEntryMin-1) != 0:
		return nil, formatErr(ErrFormat, "GPT header", hdrOff, "entry size %d is not 128 times a power of two", entrySize)
	case arrayBytes > MaxEntryArray:
		return nil, formatErr(ErrUnsupported, "GPT header", hdrOff, "%d entries of %d bytes exceed the %d-byte limit", count, entrySize, MaxEntryArray)
	case g.entryLBA < 2 || g.entryLBA >= uTotal:
		return nil, formatErr(ErrFormat, "GPT header", hdrOff, "entry array LBA %d not in [2, %d)", g.entryLBA, total)
	case g.firstUsable < g.entryLBA+uint64(g.arraySecs):
		return nil, formatErr(ErrFormat, "GPT header", hdrOff, "first usable LBA %d lies inside the entry array (LBA %d, %d sectors)", g.firstUsable, g.entryLBA, g.arraySecs)
	case g.lastUsable < g.firstUsable:
		return nil, formatErr(ErrFormat, "GPT header", hdrOff, "last usable LBA %d before the first, %d", g.lastUsable, g.firstUsable)
	case g.lastUsable >= uTotal || uTotal-1-g.lastUsable < uint64(g.backupSectors()):
		return nil, formatErr(ErrFormat, "GPT header", hdrOff, "last usable LBA %d leaves no room for the backup's %d sectors on a disk of %d (a disk cut without moving its GPT)",
			g.lastUsable, g.backupSectors(), total)
	case g.alternate <= g.lastUsable || g.alternate >= uTotal:
		return nil, formatErr(ErrFormat, "GPT header", hdrOff, "backup header LBA %d not between the last usable LBA %d and the disk's end (%d sectors)", g.alternate, g.lastUsable, total)
	}
	arrayOff := int64(g.entryLBA) * ss
	g.entries = make([]byte, arrayBytes)
	if err := readFull(r, g.entries, arrayOff); err != nil {
		return nil, err
	}
	if got, want := le.Uint32(h[88:]), crc32.ChecksumIEEE(g.entries); got != want {
		return nil, formatErr(ErrChecksum, "GPT entry array", arrayOff, "CRC32 %#08x, computed %#08x", got, want)
	}
	for i := range int(count) {
		e := g.entries[i*int(entrySize):][:entrySize]
		if isZero(e[:16]) {
			continue // unused
		}
		first, last := le.Uint64(e[32:]), le.Uint64(e[40:])
		if first < g.firstUsable || last > g.lastUsable || first > last {
			return nil, formatErr(ErrFormat, fmt.Sprintf("GPT entry %d", i+1), arrayOff+int64(i)*int64(entrySize),
				"LBAs %d to %d not within the usable %d to %d", first, last, g.firstUsable, g.lastUsable)
		}
		g.partitions = append(g.partitions, Partition{
			Number: i + 1,
			Start:  int64(first) * ss,
			Length: int64(last-first+1) * ss,
			Type:   guidString(e[0:16]),
			Name:   utf16Name(e[gptNameOffset:min(len(e), gptNameOffset+2*gptNameUnits)]),
		})
	}
	return g, nil
}

// setDiskSize moves the backup GPT to the end of a disk of newTotal
// sectors and points the primary at it; see Table.SetDiskSize for the
// order and why.
func (g *gptTable) setDiskSize(d Disk, t *Table, newTotal int64) error {
	ss := int64(t.SectorSize)
	newLast := uint64(newTotal - 1)
	backupArrayLBA := newLast - uint64(g.arraySecs)
	newLastUsable := backupArrayLBA - 1
	for _, p := range g.partitions {
		if uint64(p.End()/ss) > newLastUsable+1 {
			return fmt.Errorf("partition: %w: partition %d ends at LBA %d, past the last usable LBA %d of a %d-sector disk",
				ErrUnsupported, p.Number, p.End()/ss-1, newLastUsable, newTotal)
		}
	}
	if newLastUsable+1 < g.firstUsable {
		return fmt.Errorf("partition: %w: a %d-sector disk leaves no usable sector after the primary entry array", ErrUnsupported, newTotal)
	}

	// 1. The backup: the entry array, then its header, at the new end.
	array := make([]byte, g.arraySecs*ss)
	copy(array, g.entries)
	if _, err := d.WriteAt(array, int64(backupArrayLBA)*ss); err != nil {
		return fmt.Errorf("partition: writing the backup GPT entries: %w", err)
	}
	backup := g.headerFor(newLast, gptPrimaryLBA, newLastUsable, backupArrayLBA)
	if _, err := d.WriteAt(backup, int64(newLast)*ss); err != nil {
		return fmt.Errorf("partition: writing the backup GPT header: %w", err)
	}
	if err := d.Flush(); err != nil {
		return fmt.Errorf("partition: %w", err)
	}

	// 2. The primary header (one sector) and the protective MBR.
	primary := g.headerFor(gptPrimaryLBA, newLast, newLastUsable, g.entryLBA)
	if _, err := d.WriteAt(primary, gptPrimaryLBA*ss); err != nil {
		return fmt.Errorf("partition: writing the primary GPT header: %w", err)
	}
	m, err := parseMBR(t.sector0[:mbrSize], t.totalSectors(), t.SectorSize)
	if err == nil && m.protective >= 0 && setProtectiveEnd(t.sector0, m, newTotal) {
		if _, err := d.WriteAt(t.sector0, 0); err != nil {
			return fmt.Errorf("partition: writing the protective MBR: %w", err)
		}
	}
	if err := d.Flush(); err != nil {
		return fmt.Errorf("partition: %w", err)
	}

	// 3. An old backup header left inside the new disk, where nothing
	// overwrote it.
	if old := g.alternate; old < backupArrayLBA {
		if _, err := d.WriteAt(make([]byte, ss), int64(old)*ss); err != nil {
			return fmt.Errorf("partition: clearing the old backup GPT header: %w", err)
		}
		if err := d.Flush(); err != nil {
			return fmt.Errorf("partition: %w", err)
		}
	}
	g.header, g.alternate, g.lastUsable = primary, newLast, newLastUsable
	t.DiskSize = newTotal * ss
	return nil
}

// headerFor is the primary header's sector with the fields a header's
// place decides set, and its CRC32 computed again.
func (g *gptTable) headerFor(myLBA, alternate, lastUsable, entryLBA uint64) []byte {
	h := bytes.Clone(g.header)
	le := binary.LittleEndian
	le.PutUint64(h[offMyLBA:], myLBA)
	le.PutUint64(h[offAlternate:], alternate)
	le.PutUint64(h[offLastUsable:], lastUsable)
	le.PutUint64(h[offEntryLBA:], entryLBA)
	le.PutUint32(h[offHeaderCRC:], headerCRC(h[:g.headerSize]))
	return h
}

// headerCRC is the CRC32 of a header with its CRC field taken as zero.
func headerCRC(h []byte) uint32 {
	c := crc32.Update(0, crc32.IEEETable, h[:offHeaderCRC])
	c = crc32.Update(c, crc32.IEEETable, make([]byte, 4))
	return crc32.Update(c, crc32.IEEETable, h[offHeaderCRC+4:])
}

// guidString formats a GUID stored as GPT stores them (the first three
// fields little-endian), as sgdisk prints it.
func guidString(b []byte) string {
	le := binary.LittleEndian
	return fmt.Sprintf("%08X-%04X-%04X-%X-%X", le.Uint32(b[0:]), le.Uint16(b[4:]), le.Uint16(b[6:]), b[8:10], b[10:16])
}

// utf16Name decodes a name of UTF-16LE units, up to the first zero.
func utf16Name(b []byte) string {
	units := make([]uint16, 0, len(b)/2)
	for i := 0; i+1 < len(b); i += 2 {
		u := binary.LittleEndian.Uint16(b[i:])
		if u == 0 {
			break
		}
		units = append(units, u)
	}
	return strings.ToValidUTF8(string(utf16.Decode(units)), "\uFFFD")
}

func isZero(b []byte) bool {
	for _, c := range b {
		if c != 0 {
			return false
		}
	}
	return true
}
