package vhdx

import (
	"encoding/binary"
	"hash/crc32"
)

// Log entry layout: a 64-byte header, then 32-byte descriptors, padded to a
// 4 KiB multiple, then one 4 KiB data sector per data descriptor.
//
//	entry header:  0 "loge"  4 checksum  8 EntryLength  12 Tail
//	               16 SequenceNumber (u64)  24 DescriptorCount  28 reserved
//	               32 LogGuid  48 FlushedFileOffset  56 LastFileOffset
//	zero desc:     0 "zero"  4 reserved  8 ZeroLength  16 FileOffset  24 Seq
//	data desc:     0 "desc"  4 TrailingBytes (4)  8 LeadingBytes (8)
//	               16 FileOffset  24 Seq
//	data sector:   0 "data"  4 SequenceHigh  8 data (4084)  4092 SequenceLow
//
// A data sector carries bytes 8..4092 of the 4 KiB it restores; the first 8
// and last 4 are in its descriptor. The checksum (CRC-32C) covers the whole
// entry with the checksum field zeroed.
const (
	logEntryHeaderSize = 64
	logDescSize        = 32
)

// page is one 4 KiB metadata page to be written through the log.
type page struct {
	off  int64
	data []byte
}

// The writer's log. The log is split into two halves, slots, and each
// entry starts at the beginning of a slot, the other one than the entry
// before it, and is shorter than the slot:
//
//   - writing an entry never overwrites the one before it, so a crash in
//     the middle leaves that one whole, and a header naming the log's
//     LogGuid always names a valid entry (a strict reader refuses a LogGuid
//     no entry carries, and an entry as long as the log: MS-VHDX 2.3, and
//     OpenVMM's vhdx crate keeps a sector free);
//   - an entry's tail is itself: every entry before it is applied and
//     synced when it is written (see commit), so replay needs it alone;
//   - no entry ends where the other slot begins, so no reader can take
//     the two for one sequence (QEMU chains entries laid end to end
//     without checking their sequence numbers).
//
// The log opens (openLog) with an empty entry, synced before the header
// names its LogGuid, the first time a flush has pages to log; until then
// the header's LogGuid stays zero, whatever was written in place.
type logWriter struct {
	guid GUID // the open log's LogGuid; zero while the log is closed
	slot int  // the slot the next entry goes to: 0 or 1
}

// slotLen is the length of a slot of a log of logLen bytes.
func slotLen(logLen int64) int64 { return logLen / 2 / logSectorSize * logSectorSize }

// entryPages is how many pages fit in one entry of a log of logLen bytes:
// the entry stays a sector shorter than its slot.
func entryPages(logLen int64) int {
	limit := slotLen(logLen) - logSectorSize
	n := int(limit / logSectorSize)
	for n > 0 && entryLen(n) > limit {
		n--
	}
	return n
}

// entryLen is the length of an entry carrying n data pages.
func entryLen(n int) int64 {
	return alignUp(logEntryHeaderSize+int64(n)*logDescSize, logSectorSize) + int64(n)*logSectorSize
}

// marshalEntry builds a log entry restoring pages.
func marshalEntry(pages []page, seq uint64, tail int64, guid GUID, flushed, last int64) []byte {
	descArea := alignUp(logEntryHeaderSize+int64(len(pages))*logDescSize, logSectorSize)
	b := make([]byte, descArea+int64(len(pages))*logSectorSize)
	binary.LittleEndian.PutUint32(b[0:], sigLogEntry)
	binary.LittleEndian.PutUint32(b[8:], uint32(len(b)))
	binary.LittleEndian.PutUint32(b[12:], uint32(tail))
	binary.LittleEndian.PutUint64(b[16:], seq)
	binary.LittleEndian.PutUint32(b[24:], uint32(len(pages)))
	copy(b[32:48], guid[:])
	binary.LittleEndian.PutUint64(b[48:], uint64(flushed))
	binary.LittleEndian.PutUint64(b[56:], uint64(last))
	for i, p := range pages {
		d := b[logEntryHeaderSize+i*logDescSize:]
		binary.LittleEndian.PutUint32(d[0:], sigDataDesc)
		copy(d[4:8], p.data[4092:])
		copy(d[8:16], p.data[0:8])
		binary.LittleEndian.PutUint64(d[16:], uint64(p.off))
		binary.LittleEndian.PutUint64(d[24:], seq)
		s := b[descArea+int64(i)*logSectorSize:]
		binary.LittleEndian.PutUint32(s[0:], sigDataSect)
		binary.LittleEndian.PutUint32(s[4:], uint32(seq>>32))
		copy(s[8:4092], p.data[8:4092])
		binary.LittleEndian.PutUint32(s[4092:], uint32(seq))
	}
	binary.LittleEndian.PutUint32(b[4:], crc32.Checksum(b, castagnoli))
	return b
}
