package vhdx

import (
	"bytes"
	"cmp"
	"container/heap"
	"encoding/binary"
	"fmt"
	"hash/crc32"
	"io"
	"slices"
)

// Log replay (MS-VHDX 2.3.3): finding the active sequence and what
// replaying it does to the file, in time and memory linear in the size of
// the log whatever a hostile file puts in it:
//
//  1. one pass over the log reads the header of a candidate entry at each
//     4 KiB and the CRC-32C of the log up to each 4 KiB. An entry's
//     checksum is then computed from those (CRC-32C composes: crcCombine)
//     instead of reading the entry: candidates may each claim the whole
//     log, and reading each would be quadratic;
//  2. entries whose checksum holds are linked to the entry laid after them
//     with the next sequence number. Each entry has at most one such
//     successor, so the links form a forest, and one walk of it finds,
//     for every entry, whether its tail leads to it (activeSequence);
//  3. only the entries of the active sequence, which lie end to end and
//     together no longer than the log, are read, checksummed again and
//     parsed into writes;
//  4. the writes are reduced to disjoint segments (the last write of each
//     byte wins), so reading through a pending log and replaying it cost
//     one lookup or one write per segment (logSegments).

// logWrite is one change a log entry makes: data (4 KiB) at off, or, when
// data is nil, zeros over [off, off+length).
type logWrite struct {
	off    int64
	length int64
	data   []byte
}

// logEntry is a candidate entry: the fields of its header.
type logEntry struct {
	pos     int64 // offset within the log
	length  int64
	tail    int64
	seq     uint64
	count   int64 // descriptors
	flushed int64
	last    int64
	sum     uint32 // the checksum it carries
	headSum uint32 // CRC-32C of its first 4 KiB with the checksum field zero
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

// parseEntryHeader returns the candidate entry whose first sector is s, at
// log position pos, or nil when s cannot start an entry of this log.
func (l *logReader) parseEntryHeader(s []byte, pos int64) *logEntry {
	if binary.LittleEndian.Uint32(s[0:]) != sigLogEntry || GUID(s[32:48]) != l.guid {
		return nil
	}
	e := &logEntry{
		pos:     pos,
		length:  int64(binary.LittleEndian.Uint32(s[8:])),
		tail:    int64(binary.LittleEndian.Uint32(s[12:])),
		seq:     binary.LittleEndian.Uint64(s[16:]),
		count:   int64(binary.LittleEndian.Uint32(s[24:])),
		flushed: int64(binary.LittleEndian.Uint64(s[48:])),
		last:    int64(binary.LittleEndian.Uint64(s[56:])),
		sum:     binary.LittleEndian.Uint32(s[4:]),
	}
	if e.length == 0 || e.length%logSectorSize != 0 || e.length > l.length ||
		e.tail%logSectorSize != 0 || e.tail >= l.length ||
		logEntryHeaderSize+e.count*logDescSize > e.length || e.flushed < 0 || e.last < 0 {
		return nil
	}
	e.headSum = checksum(s[:logSectorSize], 4)
	return e
}

// scan reads the log once: the candidate entries whose checksum holds, by
// position (nil where none starts).
func (l *logReader) scan() ([]*logEntry, error) {
	sectors := l.length / logSectorSize
	prefix := make([]uint32, sectors+1) // CRC-32C of the log up to each sector
	var cands []*logEntry
	buf := make([]byte, min(l.length, mib))
	for pos := int64(0); pos < l.length; pos += int64(len(buf)) {
		if err := l.read(buf, pos); err != nil {
			return nil, fmt.Errorf("vhdx: reading the log at %#x: %w", l.off+pos, err)
		}
		for i := int64(0); i < int64(len(buf)); i += logSectorSize {
			s := buf[i : i+logSectorSize]
			n := (pos + i) / logSectorSize
			prefix[n+1] = crc32.Update(prefix[n], castagnoli, s)
			if e := l.parseEntryHeader(s, pos+i); e != nil {
				cands = append(cands, e)
			}
		}
	}
	// crcOf is the CRC-32C of k sectors from sector s, wrapping.
	crcOf := func(s, k int64) uint32 {
		rng := func(a, b int64) uint32 { // sectors [a, b), no wrap
			return prefix[b] ^ crcShift(prefix[a], (b-a)*logSectorSize)
		}
		if s+k <= sectors {
			return rng(s, s+k)
		}
		rest := s + k - sectors
		return crcCombine(rng(s, sectors), rng(0, rest), rest*logSectorSize)
	}
	byPos := make([]*logEntry, sectors)
	for _, e := range cands {
		rest := e.length/logSectorSize - 1
		sum := crcCombine(e.headSum, crcOf((e.pos/logSectorSize+1)%sectors, rest), rest*logSectorSize)
		if sum == e.sum {
			byPos[e.pos/logSectorSize] = e
		}
	}
	return byPos, nil
}

// activeSequence returns the log's active sequence, oldest entry first, or
// nil when there is none: of the entries whose tail leads to them through
// entries laid end to end with consecutive sequence numbers, the one with
// the highest sequence number, with the entries from its tail. A sequence
// longer than the log is not one: its entries would overwrite each other.
func (l *logReader) activeSequence(byPos []*logEntry) []*logEntry {
	n := len(byPos)
	sector := func(pos int64) int { return int(pos / logSectorSize) }
	// next[i] is the entry laid after entry i with the next sequence
	// number, -1 if none: a forest whose roots are the entries without one.
	next := make([]int32, n)
	for i, e := range byPos {
		next[i] = -1
		if e == nil {
			continue
		}
		j := sector((e.pos + e.length) % l.length)
		if f := byPos[j]; f != nil && f.seq == e.seq+1 {
			next[i] = int32(j)
		}
	}
	// depth[i] is the number of links from entry i to its root, span[i]
	// the bytes of the entries from i to its root; found iteratively.
	depth := make([]int32, n)
	span := make([]int64, n)
	done := make([]bool, n)
	var stack []int32
	for i := range byPos {
		if byPos[i] == nil || done[i] {
			continue
		}
		for j := int32(i); ; j = next[j] {
			stack = append(stack, j)
			if next[j] < 0 || done[next[j]] {
				break
			}
		}
		for len(stack) > 0 {
			j := stack[len(stack)-1]
			stack = stack[:len(stack)-1]
			if k := next[j]; k >= 0 {
				depth[j], span[j] = depth[k]+1, span[k]+byPos[j].length
			} else {
				span[j] = byPos[j].length
			}
			done[j] = true
		}
	}
	// Entry h is a head when the entry t at its tail leads to it: h is on
	// t's way to the root. Walking each tree from its root down the links
	// backwards keeps the way from the node visited to the root in path
	// (path[depth] is the node at that depth), which answers it for every
	// t at once.
	heads := make([][]int32, n) // heads[t]: entries whose tail is entry t
	children := make([][]int32, n)
	for i, e := range byPos {
		if e == nil {
			continue
		}
		if t := sector(e.tail); byPos[t] != nil {
			heads[t] = append(heads[t], int32(i))
		}
		if next[i] >= 0 {
			children[next[i]] = append(children[next[i]], int32(i))
		}
	}
	best, bestTail := int32(-1), int32(-1)
	var path []int32
	for root := range byPos {
		if byPos[root] == nil || next[root] >= 0 {
			continue
		}
		stack = append(stack[:0], int32(root))
		for len(stack) > 0 {
			t := stack[len(stack)-1]
			stack = stack[:len(stack)-1]
			path = append(path[:depth[t]], t)
			for _, h := range heads[t] {
				if depth[h] > depth[t] || path[depth[h]] != h || span[t]-span[h]+byPos[h].length > l.length {
					continue
				}
				if best < 0 || byPos[h].seq > byPos[best].seq || (byPos[h].seq == byPos[best].seq && h < best) {
					best, bestTail = h, t
				}
			}
			stack = append(stack, children[t]...)
		}
	}
	if best < 0 {
		return nil
	}
	var seq []*logEntry
	for i := bestTail; ; i = next[i] {
		seq = append(seq, byPos[i])
		if i == best {
			return seq
		}
	}
}

// entryWrites reads entry e, checks it again and returns its writes. An
// entry whose checksum holds but whose descriptors break the format is
// refused rather than skipped: no writer makes one.
func (l *logReader) entryWrites(e *logEntry) ([]logWrite, error) {
	where := l.off + e.pos
	b := make([]byte, e.length)
	if err := l.read(b, e.pos); err != nil {
		return nil, fmt.Errorf("vhdx: reading log entry at %#x: %w", where, err)
	}
	if got, want := binary.LittleEndian.Uint32(b[4:]), checksum(b, 4); got != want {
		return nil, checksumErr("log entry", where, got, want)
	}
	var writes []logWrite
	sector := alignUp(logEntryHeaderSize+e.count*logDescSize, logSectorSize)
	for i := int64(0); i < e.count; i++ {
		d := b[logEntryHeaderSize+i*logDescSize:]
		doff := where + logEntryHeaderSize + i*logDescSize
		if binary.LittleEndian.Uint64(d[24:]) != e.seq {
			return nil, formatErr("log descriptor", doff, "sequence number %d in an entry numbered %d", binary.LittleEndian.Uint64(d[24:]), e.seq)
		}
		fileOff := int64(binary.LittleEndian.Uint64(d[16:]))
		if fileOff < 0 || fileOff%logSectorSize != 0 {
			return nil, formatErr("log descriptor", doff, "file offset %#x is not a multiple of 4 KiB", uint64(fileOff))
		}
		switch binary.LittleEndian.Uint32(d[0:]) {
		case sigZeroDesc:
			n := int64(binary.LittleEndian.Uint64(d[8:]))
			if n <= 0 || n%logSectorSize != 0 || n > MaxVirtualSize {
				return nil, formatErr("log descriptor", doff, "zero length %#x is not a multiple of 4 KiB up to 64 TiB", uint64(n))
			}
			writes = append(writes, logWrite{off: fileOff, length: n})
		case sigDataDesc:
			if sector+logSectorSize > e.length {
				return nil, formatErr("log descriptor", doff, "more data descriptors than data sectors")
			}
			s := b[sector : sector+logSectorSize]
			if binary.LittleEndian.Uint32(s[0:]) != sigDataSect ||
				uint64(binary.LittleEndian.Uint32(s[4:]))<<32|uint64(binary.LittleEndian.Uint32(s[4092:])) != e.seq {
				return nil, formatErr("log data sector", where+sector, "bad signature or sequence number")
			}
			sector += logSectorSize
			data := make([]byte, logSectorSize)
			copy(data[0:8], d[8:16])
			copy(data[8:4092], s[8:4092])
			copy(data[4092:], d[4:8])
			writes = append(writes, logWrite{off: fileOff, length: logSectorSize, data: data})
		default:
			return nil, formatErr("log descriptor", doff, "bad signature %q", d[0:4])
		}
	}
	if sector != e.length {
		return nil, formatErr("log entry", where, "%d bytes, but its descriptors and data sectors take %d", e.length, sector)
	}
	return writes, nil
}

// pendingLog is what replaying the active sequence does to the file.
type pendingLog struct {
	writes  []logWrite
	flushed int64 // the file must be at least this long
	last    int64 // after replay the file is at least this long
	entries int
	head    int64 // file offset of the head entry, for errors
}

// readLog returns the pending log of a file whose header is h, or nil when
// there is nothing to replay. fileSize is checked against the log's
// FlushedFileOffset, and every write against the areas a log may update:
// past the headers, outside the log, below max(fileSize, LastFileOffset).
// LastFileOffset itself is checked against the regions the log leaves
// (checkLogTarget), which only replay reveals.
func readLog(r io.ReaderAt, h *header, fileSize int64) (*pendingLog, error) {
	if h.LogGUID.IsZero() {
		return nil, nil
	}
	l := &logReader{r: r, off: int64(h.LogOffset), length: int64(h.LogLength), guid: h.LogGUID}
	if l.length <= 0 || l.length%logSectorSize != 0 {
		return nil, formatErr("log", l.off, "length %d is not a multiple of 4 KiB", l.length)
	}
	byPos, err := l.scan()
	if err != nil {
		return nil, err
	}
	seq := l.activeSequence(byPos)
	if len(seq) == 0 {
		return nil, nil
	}
	head := seq[len(seq)-1]
	p := &pendingLog{flushed: head.flushed, last: head.last, entries: len(seq), head: l.off + head.pos}
	if fileSize < p.flushed {
		return nil, formatErr("log entry", p.head, "file is %d bytes, shorter than the log's flushed file offset %d", fileSize, p.flushed)
	}
	limit := max(fileSize, p.last)
	logStart, logEnd := l.off, l.off+l.length
	for _, e := range seq {
		writes, err := l.entryWrites(e)
		if err != nil {
			return nil, err
		}
		for _, w := range writes {
			if w.off < region1Offset || w.off > limit || w.length > limit-w.off || (w.off < logEnd && logStart < w.off+w.length) {
				return nil, formatErr("log entry", l.off+e.pos, "write [%#x, +%#x) outside the file's updatable area (below %#x, past the headers, outside the log)", w.off, w.length, limit)
			}
		}
		p.writes = append(p.writes, writes...)
	}
	return p, nil
}

// logSegment is a range of the file whose bytes after replay come from
// one write: its data, or zeros when w.data is nil.
type logSegment struct {
	off, end int64
	w        *logWrite
}

// logSegments reduces writes, applied in order, to disjoint segments
// sorted by offset: each byte's last write. A sweep over the writes'
// starts and ends keeps the writes covering the current point in a heap
// by their order, so it takes O(n log n) for n writes however they
// overlap.
func logSegments(writes []logWrite) []logSegment {
	type event struct {
		at    int64
		write int // index; the write starts here, or ends here when end
		end   bool
	}
	events := make([]event, 0, 2*len(writes))
	for i, w := range writes {
		events = append(events, event{w.off, i, false}, event{w.off + w.length, i, true})
	}
	slices.SortFunc(events, func(a, b event) int { return cmp.Compare(a.at, b.at) })
	var active latestFirst
	ended := make([]bool, len(writes))
	var segs []logSegment
	for i := 0; i < len(events); {
		at := events[i].at
		for ; i < len(events) && events[i].at == at; i++ {
			if events[i].end {
				ended[events[i].write] = true
			} else {
				heap.Push(&active, events[i].write)
			}
		}
		for active.Len() > 0 && ended[active[0]] {
			heap.Pop(&active)
		}
		if active.Len() == 0 || i == len(events) {
			continue
		}
		w := &writes[active[0]]
		if n := len(segs); n > 0 && segs[n-1].w == w && segs[n-1].end == at {
			segs[n-1].end = events[i].at
		} else {
			segs = append(segs, logSegment{off: at, end: events[i].at, w: w})
		}
	}
	return segs
}

// latestFirst is a max-heap of write indexes.
type latestFirst []int

func (h latestFirst) Len() int           { return len(h) }
func (h latestFirst) Less(i, j int) bool { return h[i] > h[j] }
func (h latestFirst) Swap(i, j int)      { h[i], h[j] = h[j], h[i] }
func (h *latestFirst) Push(x any)        { *h = append(*h, x.(int)) }
func (h *latestFirst) Pop() any {
	old := *h
	x := old[len(old)-1]
	*h = old[:len(old)-1]
	return x
}

// fileWriter is what replaying needs of a file.
type fileWriter interface {
	io.ReaderAt
	io.WriterAt
	Truncate(int64) error
	Size() (int64, error)
}

// apply performs the pending writes on f, each byte once, then extends the
// file to the log's last file offset. Zeros are written only where the
// file holds something else: past its end it reads as zeros anyway, and a
// hole stays a hole, so replay never takes more space than the log's data
// (a crafted zero descriptor over a sparse file would fill the disk).
func (p *pendingLog) apply(f fileWriter) error {
	size, err := f.Size()
	if err != nil {
		return err
	}
	buf := make([]byte, 64*kib)
	zeros := make([]byte, len(buf))
	for _, s := range logSegments(p.writes) {
		if s.w.data != nil {
			if _, err := f.WriteAt(s.w.data[s.off-s.w.off:s.end-s.w.off], s.off); err != nil {
				return err
			}
			continue
		}
		for off, end := s.off, min(s.end, size); off < end; {
			n := min(int64(len(buf)), end-off)
			if _, err := f.ReadAt(buf[:n], off); err != nil && err != io.EOF {
				return err
			}
			if !bytes.Equal(buf[:n], zeros[:n]) {
				if _, err := f.WriteAt(zeros[:n], off); err != nil {
					return err
				}
			}
			off += n
		}
	}
	if size, err = f.Size(); err != nil {
		return err
	}
	if size < p.last {
		return f.Truncate(p.last)
	}
	return nil
}

// checkLogTarget checks the pending log's LastFileOffset, the size replay
// extends the file to, against the image it leaves: a file no larger than
// its structures could make it, the header section, log, regions, and
// every block and sector bitmap the disk can have, or than it already is.
// An absurd value would make a sparse file of any size.
func (im *Image) checkLogTarget(p *pendingLog, fileSize int64) error {
	if p.last <= fileSize {
		return nil
	}
	g := &im.geo
	limit := int64(mib) + im.logLen + g.dataBlocks*g.blockSize + g.bitmapBlocks*bitmapBlockSize
	for _, r := range im.regs.all() {
		limit += int64(r.Length)
	}
	if p.last > max(fileSize, limit) {
		return formatErr("log entry", p.head, "last file offset %d is past the %d bytes the image's structures can take", p.last, max(fileSize, limit))
	}
	return nil
}

// CRC-32C arithmetic, for checksumming a range from the CRCs of what is
// before it (see scan). A CRC is the remainder of the message times x^32
// modulo the polynomial, so appending n bytes to a message multiplies its
// remainder by x^(8n); these work in the bit-reflected form hash/crc32
// uses.
const castagnoliReversed = 0x82F63B78

// crcMulMod returns a*b modulo the polynomial.
func crcMulMod(a, b uint32) uint32 {
	var p uint32
	for m := uint32(1) << 31; m != 0; m >>= 1 {
		if a&m != 0 {
			p ^= b
		}
		if b&1 != 0 {
			b = b>>1 ^ castagnoliReversed
		} else {
			b >>= 1
		}
	}
	return p
}

// crcPowers[k] is x^(2^k) modulo the polynomial.
var crcPowers = func() (t [80]uint32) {
	t[0] = 1 << 30 // x^1
	for k := 1; k < len(t); k++ {
		t[k] = crcMulMod(t[k-1], t[k-1])
	}
	return t
}()

// crcShift returns c times x^(8n): the CRC register after n more bytes of
// zeros, without the conditioning hash/crc32 adds.
func crcShift(c uint32, n int64) uint32 {
	for k := 3; n > 0; k, n = k+1, n>>1 {
		if n&1 != 0 {
			c = crcMulMod(crcPowers[k], c)
		}
	}
	return c
}

// crcCombine returns the CRC-32C of a message whose first part has CRC a
// and whose second part, n bytes long, has CRC b.
func crcCombine(a, b uint32, n int64) uint32 { return crcShift(a, n) ^ b }
