package nbd

import (
	"encoding/binary"
	"errors"
	"io"
	"math/bits"
	"slices"
	"sync"
	"syscall"
	"unsafe"

	"github.com/vhdkit/vhdkit/disk"
)

// Transmission phase, server side.
//
// One goroutine reads requests; it checks each header, reads a WRITE's
// payload into a pooled buffer and hands the request to a fixed pool of
// workers through a channel as deep as the pool. Workers execute against
// the export's image and send their replies, each under the connection's
// write lock in one vectored write, so replies go out in completion
// order. Invalid requests are answered by the reader itself, after it has
// skipped their payload, so the stream never loses its framing.
//
// Memory per connection is bounded by the budget: the reader reserves a
// READ's or WRITE's length, or the most a BLOCK_STATUS may hold, before
// going on; workers give it back after the reply is written. A client
// that stops reading replies therefore stalls only its own connection.
//
// A worker holds its export's image (export.use) only while it calls the
// image, never while it sends, so a stalled client cannot hold up
// RemoveExport. Requests of a connection that died (abort, or a reply
// that could not be sent) are dropped instead of executed: nobody would
// see their replies, and Shutdown's deadline would not bound them.

const (
	// minHoleChunk is the smallest hole sent as NBD_REPLY_TYPE_OFFSET_HOLE;
	// shorter zero runs are cheaper as data than as an extra chunk.
	minHoleChunk = 4096
	// maxReadChunks caps the chunks of one read reply; past it the rest
	// goes as one data chunk.
	maxReadChunks = 256
	// maxStatusQuery caps the range one BLOCK_STATUS describes (so that
	// a descriptor's length fits its 32 bits); the client asks again
	// from where the reply stops.
	maxStatusQuery = 1 << 30
	// maxDescriptors caps the extents in one block status chunk (the
	// spec says at most 2^20; this keeps replies under 512 KiB).
	maxDescriptors = 1 << 16
	// firstStatusWindow is the range the image is first asked about for
	// a BLOCK_STATUS; each further window doubles, up to the range whose
	// extents (no finer than the logical sector) number at most
	// statusWindowExtents. A REQ_ONE request thus costs about the length
	// of its one extent, not of the range asked.
	firstStatusWindow   = 64 << 10
	statusWindowExtents = 1 << 14
	// extentSize is the memory of one extent the image returns.
	extentSize = int64(unsafe.Sizeof(disk.Extent{}))
)

// job is one request on its way through a worker, with the scratch space
// its reply needs. Jobs are pooled.
type job struct {
	req    request
	buf    *[]byte // WRITE payload or READ data, pooled
	held   int64   // budget reserved by the reader
	hdr    [40]byte
	extra  []byte    // headers of multi-chunk replies
	status [2][]byte // block status chunks, one per context
	iov    [][]byte  // backing array for net.Buffers
	segs   []segment
}

var jobPool = sync.Pool{New: func() any { return new(job) }}

func getJob() *job { return jobPool.Get().(*job) }

func putJob(j *job) {
	if j.buf != nil {
		putBuf(j.buf)
		j.buf = nil
	}
	if cap(j.extra) > 64<<10 {
		j.extra = nil // do not pin a rare huge reply
	}
	for i := range j.status {
		if cap(j.status[i]) > 64<<10 {
			j.status[i] = nil
		}
	}
	clear(j.iov)
	j.iov = j.iov[:0]
	j.segs = j.segs[:0]
	j.held = 0
	jobPool.Put(j)
}

// Buffer pool in power-of-two classes from 4 KiB to MaxPayload, so one
// 32 MiB request does not make every later 4 KiB request carry 32 MiB.
const (
	minBufShift = 12
	maxBufShift = 25
)

var bufPools [maxBufShift + 1]sync.Pool

func bufClass(n int) int {
	if n <= 1<<minBufShift {
		return minBufShift
	}
	return bits.Len(uint(n - 1))
}

func getBuf(n int) *[]byte {
	k := bufClass(n)
	if k > maxBufShift {
		b := make([]byte, n)
		return &b
	}
	if p, _ := bufPools[k].Get().(*[]byte); p != nil {
		*p = (*p)[:n]
		return p
	}
	b := make([]byte, n, 1<<k)
	return &b
}

func putBuf(p *[]byte) {
	c := cap(*p)
	k := bits.Len(uint(c)) - 1
	if c != 1<<k || k < minBufShift || k > maxBufShift {
		return
	}
	bufPools[k].Put(p)
}

// zeroBuf returns the zeros written when an image has no Zeroer,
// allocated on first use rather than at every start of a program that
// links the package. Never modified.
var zeroBuf = sync.OnceValue(func() []byte { return make([]byte, 1<<20) })

// budget is a counting semaphore over payload bytes with a single waiter
// (the connection's reader).
type budget struct {
	mu    sync.Mutex
	cond  sync.Cond
	size  int64 // the connection's memory limit; 0 before transmission
	avail int64
}

// init sets the budget once the connection enters transmission. It
// takes the lock because others read the budget to see what the
// connection holds (held).
func (b *budget) init(n int64) {
	b.mu.Lock()
	defer b.mu.Unlock()
	b.size, b.avail = n, n
	b.cond.L = &b.mu
}

// held is the payload memory the connection holds: its reservations.
func (b *budget) held() int64 {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.size - b.avail
}

func (b *budget) acquire(n int64) {
	if n == 0 {
		return
	}
	b.mu.Lock()
	for b.avail < n {
		b.cond.Wait()
	}
	b.avail -= n
	b.mu.Unlock()
}

func (b *budget) release(n int64) {
	if n == 0 {
		return
	}
	b.mu.Lock()
	b.avail += n
	b.mu.Unlock()
	b.cond.Signal()
}

// transmit serves requests until the client disconnects, the connection
// fails or the server stops reading. In-flight requests always finish.
func (c *conn) transmit() error {
	c.budget.init(c.srv.connMemory())
	n := c.srv.workers()
	work := make(chan *job, n)
	var wg sync.WaitGroup
	wg.Add(n)
	for range n {
		go func() {
			defer wg.Done()
			for j := range work {
				c.execute(j)
			}
		}()
	}
	err := c.readLoop(work)
	close(work)
	wg.Wait()
	if errors.Is(err, io.EOF) {
		err = nil // the client hung up between requests
	}
	return err
}

func (c *conn) readLoop(work chan<- *job) error {
	var h [requestLen]byte
	for {
		if _, err := io.ReadFull(c.br, h[:]); err != nil {
			return err
		}
		r, ok := decodeRequest(h[:])
		if !ok {
			// Without the magic we cannot tell where the next request
			// starts; hanging up is the only safe answer.
			return errBadMagic
		}
		if r.typ == CmdDisc {
			return nil
		}
		if errno, msg := c.check(&r); errno != 0 {
			if r.typ == CmdWrite {
				if _, err := io.CopyN(io.Discard, c.br, int64(r.length)); err != nil {
					return err
				}
			}
			if err := c.replyError(r, errno, msg); err != nil {
				return err
			}
			continue
		}
		j := getJob()
		j.req = r
		switch r.typ {
		case CmdRead, CmdWrite:
			j.held = int64(r.length)
		case CmdBlockStatus:
			j.held = c.statusMemory(r.flags&CmdFlagReqOne != 0)
		}
		c.budget.acquire(j.held)
		if r.typ == CmdWrite {
			j.buf = getBuf(int(r.length))
			if _, err := io.ReadFull(c.br, *j.buf); err != nil {
				c.budget.release(j.held)
				putJob(j)
				return err
			}
		}
		work <- j
	}
}

// check validates a request before anything is executed, in the spec's
// order of preference for error values.
func (c *conn) check(r *request) (Errno, string) {
	allowed := uint16(CmdFlagFUA)
	write := false
	switch r.typ {
	case CmdRead:
		if c.structured {
			allowed |= CmdFlagDF
		}
	case CmdWrite, CmdTrim:
		write = true
	case CmdWriteZeroes:
		write = true
		allowed |= CmdFlagNoHole | CmdFlagFastZero
	case CmdFlush, CmdCache:
	case CmdBlockStatus:
		allowed |= CmdFlagReqOne
	default:
		return EINVAL, "unknown command"
	}
	if r.flags&^allowed != 0 {
		return EINVAL, "command flags not valid for this command"
	}
	if write && c.x.ReadOnly {
		return EPERM, "export is read-only"
	}
	if r.typ == CmdFlush {
		return 0, ""
	}
	if r.length > MaxPayload {
		switch r.typ {
		case CmdRead:
			if c.structured {
				return EOVERFLOW, "read longer than the maximum payload"
			}
			return EINVAL, "read longer than the maximum payload"
		case CmdWrite:
			return EINVAL, "write longer than the maximum payload"
		}
		// Commands without payload may cover any length.
	}
	if r.off > c.size || uint64(r.length) > c.size-r.off {
		if r.typ == CmdWrite || r.typ == CmdWriteZeroes {
			return ENOSPC, "request extends past the end of the export"
		}
		return EINVAL, "request extends past the end of the export"
	}
	if m := c.minBlock; m > 1 {
		end := r.off + uint64(r.length)
		if r.off%m != 0 || (uint64(r.length)%m != 0 && end != c.size) {
			return EINVAL, "request not aligned to the minimum block size"
		}
	}
	switch r.typ {
	case CmdBlockStatus:
		if len(c.meta) == 0 {
			return EINVAL, "no metadata context negotiated"
		}
		if r.length == 0 {
			return EINVAL, "block status of zero length"
		}
	case CmdWriteZeroes:
		if r.flags&CmdFlagFastZero != 0 && c.x.zeroer == nil {
			return ENOTSUP, "zeroing is not faster than writing here"
		}
	}
	return 0, ""
}

// execute runs one valid request and replies to it, or drops it when
// the connection is dead.
func (c *conn) execute(j *job) {
	defer func() {
		c.budget.release(j.held)
		putJob(j)
	}()
	if c.dead.Load() {
		return
	}
	if !c.x.acquire() {
		c.replyError(j.req, ESHUTDOWN, errExportGone)
		return
	}
	errno, msg := c.perform(j)
	c.x.release()
	if c.dead.Load() {
		return
	}
	if errno != 0 {
		c.replyError(j.req, errno, msg)
		return
	}
	c.send(j.iov)
}

// perform runs a request on the image and prepares its reply in j.iov;
// it returns the error to reply instead.
func (c *conn) perform(j *job) (Errno, string) {
	r := &j.req
	img := c.x.Image
	off, n := int64(r.off), int64(r.length)
	var err error
	switch r.typ {
	case CmdRead:
		return c.read(j)
	case CmdWrite:
		_, err = img.WriteAt(*j.buf, off)
	case CmdFlush:
		err = img.Flush()
	case CmdTrim:
		// The image may release the range's space (a VHDX unmaps whole
		// blocks); without a Trimmer, TRIM is a hint with no effect.
		if c.x.trimmer != nil && n > 0 {
			err = c.x.trimmer.Trim(off, n)
		}
	case CmdWriteZeroes:
		// Without NO_HOLE the client lets the range be deallocated.
		err = c.writeZeroes(off, n, r.flags&CmdFlagNoHole == 0)
	case CmdCache:
		// A hint with no required effect; images keep their own caches.
	case CmdBlockStatus:
		return c.blockStatus(j)
	}
	if err == nil && r.flags&CmdFlagFUA != 0 && r.typ != CmdFlush && r.typ != CmdCache {
		err = img.Flush()
	}
	if err != nil {
		return errnoOf(err), err.Error()
	}
	c.prepareOK(j)
	return 0, ""
}

func (c *conn) writeZeroes(off, n int64, mayUnmap bool) error {
	if n == 0 {
		return nil
	}
	if c.x.zeroer != nil {
		return c.x.zeroer.WriteZeroes(off, n, mayUnmap)
	}
	zeros := zeroBuf()
	for n > 0 {
		if c.x.leaving.Load() || c.dead.Load() {
			return ESHUTDOWN // nobody waits for the rest
		}
		k := min(n, int64(len(zeros)))
		if _, err := c.x.Image.WriteAt(zeros[:k], off); err != nil {
			return err
		}
		off += k
		n -= k
	}
	return nil
}

// errnoOf maps an image error onto the protocol's few error values.
func errnoOf(err error) Errno {
	var e Errno
	switch {
	case errors.As(err, &e):
		return e
	case errors.Is(err, disk.ErrReadOnly), errors.Is(err, syscall.EROFS), errors.Is(err, syscall.EPERM):
		return EPERM
	case errors.Is(err, disk.ErrOutOfRange):
		return EINVAL
	case errors.Is(err, syscall.ENOSPC), errors.Is(err, syscall.EDQUOT), errors.Is(err, syscall.EFBIG):
		return ENOSPC
	}
	return EIO
}

// segment is a piece of a read reply: data read from the image or a hole.
type segment struct {
	off, n int64
	hole   bool
}

// read answers a READ: with structured replies, zero ranges of the image
// go out as hole chunks and only data is read and sent.
func (c *conn) read(j *job) (Errno, string) {
	r := &j.req
	off, n := int64(r.off), int64(r.length)
	j.segs = j.segs[:0]
	if n > 0 {
		j.segs = append(j.segs, segment{off, n, false})
	}
	if c.structured && r.flags&CmdFlagDF == 0 && c.x.extenter != nil && n >= 2*minHoleChunk {
		c.planRead(j)
	}
	if n > 0 {
		j.buf = getBuf(int(n))
	}
	for _, s := range j.segs {
		if s.hole {
			continue
		}
		p := (*j.buf)[s.off-off : s.off-off+s.n]
		if k, err := c.x.Image.ReadAt(p, s.off); k < len(p) {
			if err == nil {
				err = io.ErrUnexpectedEOF
			}
			return errnoOf(err), err.Error()
		}
	}
	if !c.structured {
		encodeSimpleReply(j.hdr[:], 0, r.cookie)
		j.iov = append(j.iov[:0], j.hdr[:simpleReplyLen])
		if n > 0 {
			j.iov = append(j.iov, *j.buf)
		}
		return 0, ""
	}
	if n == 0 {
		encodeChunkHeader(j.hdr[:], replyFlagDone, replyTypeNone, r.cookie, 0)
		j.iov = append(j.iov[:0], j.hdr[:chunkHeaderLen])
		return 0, ""
	}
	// All data is in memory, so no error can follow: the last content
	// chunk carries the DONE flag.
	const dataHdr, holeHdr = chunkHeaderLen + 8, chunkHeaderLen + 12
	total := 0
	for _, s := range j.segs {
		if s.hole {
			total += holeHdr
		} else {
			total += dataHdr
		}
	}
	j.extra = slices.Grow(j.extra[:0], total)[:total]
	j.iov = j.iov[:0]
	h := j.extra
	for i, s := range j.segs {
		var flags uint16
		if i == len(j.segs)-1 {
			flags = replyFlagDone
		}
		if s.hole {
			encodeChunkHeader(h, flags, replyTypeOffsetHole, r.cookie, 12)
			binary.BigEndian.PutUint64(h[chunkHeaderLen:], uint64(s.off))
			binary.BigEndian.PutUint32(h[chunkHeaderLen+8:], uint32(s.n))
			j.iov = append(j.iov, h[:holeHdr])
			h = h[holeHdr:]
			continue
		}
		encodeChunkHeader(h, flags, replyTypeOffsetData, r.cookie, uint32(8+s.n))
		binary.BigEndian.PutUint64(h[chunkHeaderLen:], uint64(s.off))
		j.iov = append(j.iov, h[:dataHdr], (*j.buf)[s.off-off:s.off-off+s.n])
		h = h[dataHdr:]
	}
	return 0, ""
}

// planRead splits a read into data and hole segments from the image's
// extents. Short zero runs stay data; an extents error just means no holes.
func (c *conn) planRead(j *job) {
	off, n := int64(j.req.off), int64(j.req.length)
	exts, err := c.x.extenter.Extents(off, n)
	if err != nil {
		return
	}
	segs := j.segs[:0]
	pos, end := off, off+n
	emit := func(s segment) {
		if s.n <= 0 {
			return
		}
		if k := len(segs); k > 0 && segs[k-1].hole == s.hole {
			segs[k-1].n += s.n
			return
		}
		segs = append(segs, s)
	}
	for _, e := range exts {
		lo, hi := max(e.Offset, pos), min(e.Offset+e.Length, end)
		if lo != pos || hi <= lo {
			break // not contiguous: trust nothing further
		}
		hole := e.Type != disk.Data && hi-lo >= minHoleChunk && len(segs) < maxReadChunks
		emit(segment{lo, hi - lo, hole})
		pos = hi
	}
	emit(segment{pos, end - pos, false})
	j.segs = segs
}

// statusMemory is the most a BLOCK_STATUS holds, reserved from the
// connection's budget: its reply and one window of the image's extents.
func (c *conn) statusMemory(reqOne bool) int64 {
	limit := int64(maxDescriptors)
	if reqOne {
		limit = 1
	}
	return int64(len(c.meta))*(chunkHeaderLen+4+8*limit) + statusWindowExtents*extentSize
}

// blockStatus answers BLOCK_STATUS with one chunk per selected context.
// The image is asked about growing windows from the request's offset, and
// asking stops as soon as the reply is full: with REQ_ONE once every
// context's first extent has ended, otherwise once every context has
// maxDescriptors. The spec lets the reply cover less than the range asked
// (the client asks again from where it stops), so the work and memory of
// a request are bounded by what its reply carries, not by its length.
func (c *conn) blockStatus(j *job) (Errno, string) {
	r := &j.req
	limit := maxDescriptors
	if r.flags&CmdFlagReqOne != 0 {
		limit = 1
	}
	type context struct {
		count int
		last  uint32
		full  bool // a further descriptor does not fit
	}
	var ctx [len(j.status)]context
	for i := range c.meta {
		j.status[i] = append(j.status[i][:0], make([]byte, chunkHeaderLen+4)...)
	}
	// add appends extent e to every context's descriptors, merging it
	// into the last one of equal status; it reports whether any context
	// still takes more.
	add := func(e disk.Extent) bool {
		open := false
		for i, k := range c.meta {
			x := &ctx[i]
			if x.full {
				continue
			}
			st := statusOf(k, e)
			b := j.status[i]
			if x.count > 0 && st == x.last {
				// Lengths stay below 2^32: a reply covers at most
				// maxStatusQuery bytes.
				p := b[len(b)-8:]
				binary.BigEndian.PutUint32(p, binary.BigEndian.Uint32(p)+uint32(e.Length))
				open = true
				continue
			}
			if x.count == limit {
				x.full = true
				continue
			}
			b = binary.BigEndian.AppendUint32(b, uint32(e.Length))
			j.status[i] = binary.BigEndian.AppendUint32(b, st)
			x.count++
			x.last = st
			open = true
		}
		return open
	}

	off := int64(r.off)
	pos, end := off, off+min(int64(r.length), maxStatusQuery)
	window, maxWindow := int64(firstStatusWindow), statusWindowExtents*int64(c.x.minBlock)
	for pos < end {
		n := min(window, end-pos)
		window = min(2*window, maxWindow)
		if c.x.extenter == nil {
			// Without an allocation map everything is data.
			add(disk.Extent{Offset: pos, Length: end - pos, Type: disk.Data})
			break
		}
		exts, err := c.x.extenter.Extents(pos, n)
		if err != nil {
			if pos > off {
				break // answer with what is known so far
			}
			return errnoOf(err), err.Error()
		}
		// Repair whatever the image returned into contiguous extents
		// covering [pos, pos+n): gaps become data, overlaps are cut.
		open := true
		wend := pos + n
		for _, e := range exts {
			lo, hi := max(e.Offset, pos), min(e.Offset+e.Length, wend)
			if hi <= lo {
				continue
			}
			if lo > pos {
				if open = add(disk.Extent{Offset: pos, Length: lo - pos, Type: disk.Data}); !open {
					break
				}
			}
			e.Offset, e.Length = lo, hi-lo
			pos = hi
			if open = add(e); !open {
				break
			}
		}
		if open && pos < wend {
			open = add(disk.Extent{Offset: pos, Length: wend - pos, Type: disk.Data})
			pos = wend
		}
		if !open || c.dead.Load() {
			break
		}
	}

	j.iov = j.iov[:0]
	for i, k := range c.meta {
		var flags uint16
		if i == len(c.meta)-1 {
			flags = replyFlagDone
		}
		chunk := j.status[i]
		encodeChunkHeader(chunk, flags, replyTypeBlockStatus, r.cookie, uint32(len(chunk)-chunkHeaderLen))
		binary.BigEndian.PutUint32(chunk[chunkHeaderLen:], uint32(k))
		j.iov = append(j.iov, chunk)
	}
	return 0, ""
}

// statusOf is an extent's flags in metadata context k.
func statusOf(k metaKind, e disk.Extent) uint32 {
	if k == metaBaseAllocation {
		switch e.Type {
		case disk.Hole:
			return StateHole | StateZero
		case disk.Zero:
			return StateZero
		}
		return 0
	}
	// qemu:allocation-depth: 0 unallocated, 1 this layer, 2 its backing…
	if e.Type == disk.Hole {
		return 0
	}
	return uint32(e.Depth) + 1
}

// prepareOK prepares a success reply without payload.
func (c *conn) prepareOK(j *job) {
	if c.structured {
		encodeChunkHeader(j.hdr[:], replyFlagDone, replyTypeNone, j.req.cookie, 0)
		j.iov = append(j.iov[:0], j.hdr[:chunkHeaderLen])
		return
	}
	encodeSimpleReply(j.hdr[:], 0, j.req.cookie)
	j.iov = append(j.iov[:0], j.hdr[:simpleReplyLen])
}

// replyError sends an error reply, with a message when structured
// replies allow one. It may run on the reader or a worker.
func (c *conn) replyError(r request, errno Errno, msg string) error {
	var b [chunkHeaderLen + 6 + 256]byte
	if !c.structured {
		encodeSimpleReply(b[:], errno, r.cookie)
		return c.send([][]byte{b[:simpleReplyLen]})
	}
	if len(msg) > 256 {
		msg = msg[:256]
	}
	encodeChunkHeader(b[:], replyFlagDone, replyTypeError, r.cookie, uint32(6+len(msg)))
	binary.BigEndian.PutUint32(b[chunkHeaderLen:], uint32(errno))
	binary.BigEndian.PutUint16(b[chunkHeaderLen+4:], uint16(len(msg)))
	n := copy(b[chunkHeaderLen+6:], msg)
	return c.send([][]byte{b[:chunkHeaderLen+6+n]})
}

// send writes one whole reply. After the first write error nothing more
// is sent (a partial reply has broken the framing) and the socket is
// closed so the reader stops too.
func (c *conn) send(iov [][]byte) error {
	c.wmu.Lock()
	defer c.wmu.Unlock()
	if c.writeErr != nil {
		return c.writeErr
	}
	// WriteTo consumes the net.Buffers it is called on; keep it in the
	// conn so that this does not allocate per reply.
	c.wbufs = append(c.wbufs[:0], iov...)
	c.wvec = c.wbufs
	_, err := c.wvec.WriteTo(c.rw)
	clear(c.wbufs) // do not pin pooled buffers until the next reply
	if err != nil {
		c.writeErr = err
		c.abort()
		return err
	}
	return nil
}
