package vhdx

import (
	"encoding/binary"
	"hash/crc32"
	"io"
	"sort"
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
	// maxLogEntry caps the size of one entry we are willing to read: far
	// above what any writer produces (Hyper-V's logs are 1 MiB) and small
	// enough that a hostile length cannot exhaust memory.
	maxLogEntry = 64 * mib
)

// logWrite is one change a log entry makes: data (4 KiB) at off, or, when
// data is nil, zeros over [off, off+length).
type logWrite struct {
	off    int64
	length int64
	data   []byte
}

// logEntry is a parsed, checksum-verified entry.
type logEntry struct {
	pos     int64 // offset within the log
	length  int64
	tail    int64
	seq     uint64
	flushed int64
	last    int64
	writes  []logWrite
}

// logReader reads the circular log region.
type logReader struct {
	r      io.ReaderAt
	off    int64 // file offset of the log
	length int64
	guid   GUID
}

// read fills p from log position pos, wrapping at the end of the log.
func (l *logReader) read(p []byte, pos int64) error {
	for len(p) > 0 {
		pos %= l.length
		n := min(int64(len(p)), l.length-pos)
		if _, err := l.r.ReadAt(p[:n], l.off+pos); err != nil {
			return err
		}
		p, pos = p[n:], pos+n
	}
	return nil
}

// entryAt parses the entry at pos; it returns nil when there is no valid
// entry there (a torn, stale or foreign entry is not an error: it is simply
// not part of the log).
func (l *logReader) entryAt(pos int64) *logEntry {
	var h [logEntryHeaderSize]byte
	if l.read(h[:], pos) != nil {
		return nil
	}
	if binary.LittleEndian.Uint32(h[0:]) != sigLogEntry {
		return nil
	}
	var guid GUID
	copy(guid[:], h[32:48])
	length := int64(binary.LittleEndian.Uint32(h[8:]))
	tail := int64(binary.LittleEndian.Uint32(h[12:]))
	count := int64(binary.LittleEndian.Uint32(h[24:]))
	if guid != l.guid || length == 0 || length%logSectorSize != 0 || length > l.length ||
		length > maxLogEntry || tail%logSectorSize != 0 || tail >= l.length ||
		logEntryHeaderSize+count*logDescSize > length {
		return nil
	}
	b := make([]byte, length)
	if l.read(b, pos) != nil {
		return nil
	}
	if binary.LittleEndian.Uint32(b[4:]) != checksum(b, 4) {
		return nil
	}
	e := &logEntry{
		pos: pos, length: length, tail: tail,
		seq:     binary.LittleEndian.Uint64(b[16:]),
		flushed: int64(binary.LittleEndian.Uint64(b[48:])),
		last:    int64(binary.LittleEndian.Uint64(b[56:])),
	}
	if e.flushed < 0 || e.last < 0 {
		return nil
	}
	descArea := alignUp(logEntryHeaderSize+count*logDescSize, logSectorSize)
	sector := descArea
	for i := int64(0); i < count; i++ {
		d := b[logEntryHeaderSize+i*logDescSize:]
		if binary.LittleEndian.Uint64(d[24:]) != e.seq {
			return nil
		}
		fileOff := int64(binary.LittleEndian.Uint64(d[16:]))
		switch binary.LittleEndian.Uint32(d[0:]) {
		case sigZeroDesc:
			n := int64(binary.LittleEndian.Uint64(d[8:]))
			if fileOff < 0 || fileOff%logSectorSize != 0 || n <= 0 || n%logSectorSize != 0 || n > MaxVirtualSize {
				return nil
			}
			e.writes = append(e.writes, logWrite{off: fileOff, length: n})
		case sigDataDesc:
			if fileOff < 0 || fileOff%logSectorSize != 0 || sector+logSectorSize > length {
				return nil
			}
			s := b[sector : sector+logSectorSize]
			sector += logSectorSize
			if binary.LittleEndian.Uint32(s[0:]) != sigDataSect ||
				uint64(binary.LittleEndian.Uint32(s[4:]))<<32|uint64(binary.LittleEndian.Uint32(s[4092:])) != e.seq {
				return nil
			}
			data := make([]byte, logSectorSize)
			copy(data[0:8], d[8:16])
			copy(data[8:4092], s[8:4092])
			copy(data[4092:], d[4:8])
			e.writes = append(e.writes, logWrite{off: fileOff, length: logSectorSize, data: data})
		default:
			return nil
		}
	}
	if sector != length {
		return nil // data sectors and descriptors disagree
	}
	return e
}

// activeSequence finds the log's active sequence: of the valid entries, the
// one with the highest sequence number whose tail leads, through entries with
// consecutive sequence numbers laid end to end, to itself. It returns the
// entries oldest first, or nil when nothing is to be replayed.
func (l *logReader) activeSequence() []*logEntry {
	byPos := map[int64]*logEntry{}
	var heads []*logEntry
	for pos := int64(0); pos < l.length; pos += logSectorSize {
		if e := l.entryAt(pos); e != nil {
			byPos[pos] = e
			heads = append(heads, e)
		}
	}
	sort.Slice(heads, func(i, j int) bool { return heads[i].seq > heads[j].seq })
	for _, head := range heads {
		var seq []*logEntry
		e := byPos[head.tail]
		for e != nil && len(seq) <= len(byPos) {
			if len(seq) > 0 && e.seq != seq[len(seq)-1].seq+1 {
				break
			}
			seq = append(seq, e)
			if e == head {
				return seq
			}
			e = byPos[(e.pos+e.length)%l.length]
		}
	}
	return nil
}

// pendingLog is what replaying the active sequence does to the file.
type pendingLog struct {
	writes  []logWrite
	flushed int64 // the file must be at least this long
	last    int64 // after replay the file is at least this long
	entries int
}

// readLog returns the pending log of a file whose header is h, or nil when
// there is nothing to replay. fileSize is checked against the log's
// FlushedFileOffset, and every write against the areas a log may update.
func readLog(r io.ReaderAt, h *header, fileSize int64) (*pendingLog, error) {
	if h.LogGUID.IsZero() {
		return nil, nil
	}
	l := &logReader{r: r, off: int64(h.LogOffset), length: int64(h.LogLength), guid: h.LogGUID}
	seq := l.activeSequence()
	if len(seq) == 0 {
		return nil, nil
	}
	head := seq[len(seq)-1]
	p := &pendingLog{flushed: head.flushed, last: head.last, entries: len(seq)}
	if fileSize < p.flushed {
		return nil, formatErr("log entry", l.off+head.pos, "file is %d bytes, shorter than the log's flushed file offset %d", fileSize, p.flushed)
	}
	limit := max(fileSize, p.last)
	logStart, logEnd := l.off, l.off+l.length
	for _, e := range seq {
		for _, w := range e.writes {
			if w.off < region1Offset || w.off+w.length > limit || (w.off < logEnd && logStart < w.off+w.length) {
				return nil, formatErr("log entry", l.off+e.pos, "write [%#x, +%#x) outside the file's updatable area", w.off, w.length)
			}
			p.writes = append(p.writes, w)
		}
	}
	return p, nil
}

// fileWriter is what replaying needs of a file.
type fileWriter interface {
	io.WriterAt
	Truncate(int64) error
	Size() (int64, error)
}

// apply performs the pending writes on f, then extends the file to the
// log's last file offset.
func (p *pendingLog) apply(f fileWriter) error {
	zero := make([]byte, 64*kib)
	for _, w := range p.writes {
		if w.data != nil {
			if _, err := f.WriteAt(w.data, w.off); err != nil {
				return err
			}
			continue
		}
		for off, end := w.off, w.off+w.length; off < end; {
			n := min(int64(len(zero)), end-off)
			if _, err := f.WriteAt(zero[:n], off); err != nil {
				return err
			}
			off += n
		}
	}
	size, err := f.Size()
	if err != nil {
		return err
	}
	if size < p.last {
		return f.Truncate(p.last)
	}
	return nil
}

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
