package nbd

import (
	"bufio"
	"context"
	"crypto/tls"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"net"
	"sync"
	"time"

	"github.com/vhdkit/vhdkit/disk"
)

// Error is an error reply to a transmission request.
type Error struct {
	Errno   Errno
	Message string // from a structured error chunk; may be empty
}

func (e *Error) Error() string {
	if e.Message != "" {
		return "nbd: " + e.Message + " (" + e.Errno.Error() + ")"
	}
	return "nbd: " + e.Errno.Error()
}

// Unwrap lets errors.Is(err, nbd.EINVAL) work.
func (e *Error) Unwrap() error { return e.Errno }

// OptionError is an error reply to a handshake option.
type OptionError struct {
	Option  uint32
	Reply   uint32 // NBD_REP_ERR_* value
	Message string
}

func (e *OptionError) Error() string {
	return fmt.Sprintf("nbd: option %d refused with reply %#x: %s", e.Option, e.Reply, e.Message)
}

// ClientOptions configure Dial and NewClient. The zero value connects to
// the default export with structured replies and every metadata context
// the server offers among base:allocation and qemu:allocation-depth.
type ClientOptions struct {
	Export string
	// TLSConfig makes the client start TLS before anything else and fail
	// if the server refuses.
	TLSConfig *tls.Config
	// MetaContexts to select; nil selects base:allocation and
	// qemu:allocation-depth; an empty non-nil slice selects none.
	MetaContexts []string
	// NoStructuredReplies keeps to simple replies (no block status).
	NoStructuredReplies bool
}

// Descriptor is one extent of a block status reply.
type Descriptor struct {
	Length uint32
	Flags  uint32
}

// Client is a connection to one export. It implements disk.Image,
// disk.Trimmer, disk.Zeroer and disk.Extenter, and is safe for
// concurrent use: requests from many goroutines are pipelined on the one
// connection and their replies matched by cookie.
type Client struct {
	conn       net.Conn
	size       int64
	flags      uint16
	minBlock   uint32
	prefBlock  uint32
	maxBlock   uint32
	structured bool
	contexts   map[uint32]string // negotiated context ID → name

	wmu sync.Mutex // one request at a time on the wire

	mu       sync.Mutex
	pending  map[uint64]*call
	inflight sync.WaitGroup // registered calls not yet answered
	cookie   uint64
	err      error // set once the connection is unusable
	closed   bool
	done     chan struct{} // closed when the reply reader exits
}

// Dial connects to an NBD server ("unix" or "tcp") and negotiates.
func Dial(ctx context.Context, network, addr string, opts *ClientOptions) (*Client, error) {
	var d net.Dialer
	conn, err := d.DialContext(ctx, network, addr)
	if err != nil {
		return nil, err
	}
	c, err := NewClient(ctx, conn, opts)
	if err != nil {
		conn.Close()
		return nil, err
	}
	return c, nil
}

// NewClient negotiates over an established connection. On error the
// caller still owns conn.
func NewClient(ctx context.Context, conn net.Conn, opts *ClientOptions) (*Client, error) {
	if opts == nil {
		opts = &ClientOptions{}
	}
	stop := context.AfterFunc(ctx, func() { conn.SetDeadline(time.Unix(1, 0)) })
	defer stop()
	if dl, ok := ctx.Deadline(); ok {
		conn.SetDeadline(dl)
	}
	c := &Client{
		conn:      conn,
		minBlock:  1,
		prefBlock: preferredBlock,
		maxBlock:  MaxPayload,
		contexts:  make(map[uint32]string),
		pending:   make(map[uint64]*call),
		done:      make(chan struct{}),
	}
	h := clientHandshake{c: c, rw: conn}
	if err := h.run(ctx, opts); err != nil {
		if ctx.Err() != nil {
			err = ctx.Err()
		}
		return nil, err
	}
	if !stop() {
		return nil, ctx.Err()
	}
	c.conn.SetDeadline(time.Time{})
	go c.readReplies()
	return c, nil
}

// clientHandshake holds the state of the client's option haggling.
type clientHandshake struct {
	c  *Client
	rw net.Conn
}

func (h *clientHandshake) run(ctx context.Context, opts *ClientOptions) error {
	var b [18]byte
	if _, err := io.ReadFull(h.rw, b[:]); err != nil {
		return err
	}
	if binary.BigEndian.Uint64(b[0:]) != magicInit || binary.BigEndian.Uint64(b[8:]) != magicOpt {
		return errors.New("nbd: server does not speak newstyle NBD")
	}
	sflags := binary.BigEndian.Uint16(b[16:])
	if sflags&flagFixedNewstyle == 0 {
		return errors.New("nbd: server does not support fixed newstyle negotiation")
	}
	cflags := uint32(clientFlagFixedNewstyle)
	if sflags&flagNoZeroes != 0 {
		cflags |= clientFlagNoZeroes
	}
	binary.BigEndian.PutUint32(b[:4], cflags)
	if _, err := h.rw.Write(b[:4]); err != nil {
		return err
	}

	if opts.TLSConfig != nil {
		if _, err := h.simpleOption(optStartTLS, nil); err != nil {
			return err
		}
		tc := tls.Client(h.rw, opts.TLSConfig)
		if err := tc.HandshakeContext(ctx); err != nil {
			return fmt.Errorf("nbd: TLS handshake: %w", err)
		}
		h.rw = tc
		h.c.conn = tc
	}

	if !opts.NoStructuredReplies {
		_, err := h.simpleOption(optStructuredReply, nil)
		var oe *OptionError
		switch {
		case err == nil:
			h.c.structured = true
		case errors.As(err, &oe):
			// Server without structured replies: fine, no block status.
		default:
			return err
		}
	}

	if h.c.structured {
		queries := opts.MetaContexts
		if queries == nil {
			queries = []string{ContextBaseAllocation, ContextAllocDepth}
		}
		if len(queries) > 0 {
			if err := h.setMetaContext(opts.Export, queries); err != nil {
				var oe *OptionError
				if !errors.As(err, &oe) {
					return err
				}
			}
		}
	}
	return h.goExport(opts.Export)
}

func (h *clientHandshake) sendOption(opt uint32, data []byte) error {
	b := make([]byte, optHeaderLen, optHeaderLen+len(data))
	binary.BigEndian.PutUint64(b[0:], magicOpt)
	binary.BigEndian.PutUint32(b[8:], opt)
	binary.BigEndian.PutUint32(b[12:], uint32(len(data)))
	_, err := h.rw.Write(append(b, data...))
	return err
}

// readReply reads one option reply; error replies become *OptionError.
func (h *clientHandshake) readReply(opt uint32) (typ uint32, data []byte, err error) {
	var b [optReplyHeaderLen]byte
	if _, err := io.ReadFull(h.rw, b[:]); err != nil {
		return 0, nil, err
	}
	if binary.BigEndian.Uint64(b[0:]) != magicOptReply || binary.BigEndian.Uint32(b[8:]) != opt {
		return 0, nil, errors.New("nbd: malformed option reply")
	}
	typ = binary.BigEndian.Uint32(b[12:])
	n := binary.BigEndian.Uint32(b[16:])
	if n > maxOptionData {
		return 0, nil, errors.New("nbd: option reply too long")
	}
	data = make([]byte, n)
	if _, err := io.ReadFull(h.rw, data); err != nil {
		return 0, nil, err
	}
	if typ&repFlagError != 0 {
		return typ, data, &OptionError{Option: opt, Reply: typ, Message: string(data)}
	}
	return typ, data, nil
}

// simpleOption sends an option answered by a bare ACK.
func (h *clientHandshake) simpleOption(opt uint32, data []byte) ([]byte, error) {
	if err := h.sendOption(opt, data); err != nil {
		return nil, err
	}
	typ, d, err := h.readReply(opt)
	if err != nil {
		return nil, err
	}
	if typ != repAck {
		return nil, fmt.Errorf("nbd: unexpected reply %d to option %d", typ, opt)
	}
	return d, nil
}

func (h *clientHandshake) setMetaContext(export string, queries []string) error {
	data := binary.BigEndian.AppendUint32(nil, uint32(len(export)))
	data = append(data, export...)
	data = binary.BigEndian.AppendUint32(data, uint32(len(queries)))
	for _, q := range queries {
		data = binary.BigEndian.AppendUint32(data, uint32(len(q)))
		data = append(data, q...)
	}
	if err := h.sendOption(optSetMetaContext, data); err != nil {
		return err
	}
	for {
		typ, d, err := h.readReply(optSetMetaContext)
		if err != nil {
			clear(h.c.contexts)
			return err
		}
		switch typ {
		case repAck:
			return nil
		case repMetaContext:
			if len(d) < 4 {
				return errors.New("nbd: short meta context reply")
			}
			h.c.contexts[binary.BigEndian.Uint32(d)] = string(d[4:])
		}
	}
}

func (h *clientHandshake) goExport(export string) error {
	data := binary.BigEndian.AppendUint32(nil, uint32(len(export)))
	data = append(data, export...)
	// No NBD_INFO_BLOCK_SIZE request: that would promise aligned I/O,
	// and a disk.Image takes any offset. Servers send the sizes anyway.
	data = binary.BigEndian.AppendUint16(data, 0)
	if err := h.sendOption(optGo, data); err != nil {
		return err
	}
	gotExport := false
	for {
		typ, d, err := h.readReply(optGo)
		if err != nil {
			return err
		}
		switch typ {
		case repAck:
			if !gotExport {
				return errors.New("nbd: server sent no export information")
			}
			return nil
		case repInfo:
			if len(d) < 2 {
				return errors.New("nbd: short info reply")
			}
			switch binary.BigEndian.Uint16(d) {
			case infoExport:
				if len(d) != 12 {
					return errors.New("nbd: bad export info")
				}
				size := binary.BigEndian.Uint64(d[2:])
				if size > 1<<62 {
					return errors.New("nbd: export size out of range")
				}
				h.c.size = int64(size)
				h.c.flags = binary.BigEndian.Uint16(d[10:])
				gotExport = true
			case infoBlockSize:
				if len(d) != 14 {
					return errors.New("nbd: bad block size info")
				}
				h.c.minBlock = binary.BigEndian.Uint32(d[2:])
				h.c.prefBlock = binary.BigEndian.Uint32(d[6:])
				h.c.maxBlock = binary.BigEndian.Uint32(d[10:])
				if h.c.minBlock == 0 || h.c.maxBlock == 0 {
					return errors.New("nbd: bad block size info")
				}
			}
		}
	}
}

// Size is the export's size in bytes.
func (c *Client) Size() int64 { return c.size }

// Flags are the export's transmission flags (FlagReadOnly, …).
func (c *Client) Flags() uint16 { return c.flags }

// BlockSizes are the server's minimum, preferred and maximum block sizes.
func (c *Client) BlockSizes() (min, preferred, max uint32) {
	return c.minBlock, c.prefBlock, c.maxBlock
}

// StructuredReplies reports whether structured replies were negotiated.
func (c *Client) StructuredReplies() bool { return c.structured }

// MetaContexts are the metadata contexts the server selected.
func (c *Client) MetaContexts() []string {
	var names []string
	for _, n := range c.contexts {
		names = append(names, n)
	}
	return names
}

// call is one request awaiting its reply. Calls are pooled: a 4 KiB
// read should not cost a handful of allocations.
type call struct {
	req     request
	hdr     [requestLen]byte
	iov     [2][]byte
	nb      net.Buffers
	p       []byte // READ destination
	covered int64  // READ bytes received
	status  map[string][]Descriptor
	err     error
	done    chan struct{} // signalled once per use
}

var callPool = sync.Pool{New: func() any { return &call{done: make(chan struct{}, 1)} }}

func newCall(typ, flags uint16, off int64, length uint32, dst []byte) *call {
	cl := callPool.Get().(*call)
	cl.req = request{typ: typ, flags: flags, off: uint64(off), length: length}
	cl.p = dst
	return cl
}

func putCall(cl *call) {
	cl.p, cl.status, cl.err, cl.covered = nil, nil, nil, 0
	cl.iov = [2][]byte{}
	callPool.Put(cl)
}

// start sends a request and registers it; wait collects the result.
func (c *Client) start(cl *call, payload []byte) error {
	c.mu.Lock()
	if c.err != nil || c.closed {
		err := c.err
		c.mu.Unlock()
		if err == nil {
			err = net.ErrClosed
		}
		return err
	}
	c.cookie++
	cl.req.cookie = c.cookie
	c.pending[cl.req.cookie] = cl
	c.inflight.Add(1)
	c.mu.Unlock()

	encodeRequest(cl.hdr[:], cl.req)
	cl.iov[0], cl.iov[1] = cl.hdr[:], payload
	cl.nb = cl.iov[:1]
	if len(payload) > 0 {
		cl.nb = cl.iov[:2]
	}
	c.wmu.Lock()
	_, err := cl.nb.WriteTo(c.conn)
	c.wmu.Unlock()
	if err != nil {
		// A partial request breaks the stream for everyone.
		c.fail(fmt.Errorf("nbd: send: %w", err))
	}
	return nil
}

func (c *Client) wait(cl *call) error {
	<-cl.done
	return cl.err
}

// do runs one request to completion; the caller must putCall the result.
func (c *Client) do(typ, flags uint16, off int64, length uint32, payload, dst []byte) (*call, error) {
	cl := newCall(typ, flags, off, length, dst)
	if err := c.start(cl, payload); err != nil {
		putCall(cl)
		return nil, err
	}
	if err := c.wait(cl); err != nil {
		putCall(cl)
		return nil, err
	}
	return cl, nil
}

// fail makes the connection unusable and fails every pending request.
func (c *Client) fail(err error) {
	c.mu.Lock()
	if c.err == nil {
		c.err = err
	}
	pending := c.pending
	c.pending = make(map[uint64]*call)
	c.mu.Unlock()
	c.conn.Close()
	for _, cl := range pending {
		if cl.err == nil {
			cl.err = err
		}
		cl.done <- struct{}{}
		c.inflight.Done()
	}
}

// readReplies demultiplexes replies onto pending calls until the
// connection ends.
func (c *Client) readReplies() {
	defer close(c.done)
	// Buffered: a reply header arrives in pieces of 4, 16 and 8 bytes;
	// large data reads bypass the buffer.
	r := &replyReader{c: c, br: bufio.NewReaderSize(c.conn, 64<<10)}
	for {
		if err := r.next(); err != nil {
			c.mu.Lock()
			closed := c.closed
			c.mu.Unlock()
			if closed {
				err = net.ErrClosed
			}
			c.fail(err)
			return
		}
	}
}

type replyReader struct {
	c   *Client
	br  io.Reader
	hdr [chunkHeaderLen]byte
	buf []byte
}

func (r *replyReader) lookup(cookie uint64) (*call, error) {
	r.c.mu.Lock()
	cl := r.c.pending[cookie]
	r.c.mu.Unlock()
	if cl == nil {
		return nil, fmt.Errorf("nbd: reply for unknown cookie %d", cookie)
	}
	return cl, nil
}

func (r *replyReader) finish(cl *call) {
	r.c.mu.Lock()
	delete(r.c.pending, cl.req.cookie)
	r.c.mu.Unlock()
	cl.done <- struct{}{}
	r.c.inflight.Done()
}

func (r *replyReader) payload(n uint32) ([]byte, error) {
	if cap(r.buf) < int(n) {
		r.buf = make([]byte, n)
	}
	b := r.buf[:n]
	_, err := io.ReadFull(r.br, b)
	return b, err
}

func (r *replyReader) next() error {
	if _, err := io.ReadFull(r.br, r.hdr[:4]); err != nil {
		return err
	}
	switch binary.BigEndian.Uint32(r.hdr[:]) {
	case magicSimpleReply:
		if _, err := io.ReadFull(r.br, r.hdr[4:simpleReplyLen]); err != nil {
			return err
		}
		errno := Errno(binary.BigEndian.Uint32(r.hdr[4:]))
		cl, err := r.lookup(binary.BigEndian.Uint64(r.hdr[8:]))
		if err != nil {
			return err
		}
		if errno != 0 {
			cl.err = &Error{Errno: errno}
		} else if cl.req.typ == CmdRead {
			if _, err := io.ReadFull(r.br, cl.p); err != nil {
				return err
			}
		}
		r.finish(cl)
		return nil
	case magicStructuredRepl:
	default:
		return errors.New("nbd: bad reply magic")
	}
	if _, err := io.ReadFull(r.br, r.hdr[4:chunkHeaderLen]); err != nil {
		return err
	}
	flags := binary.BigEndian.Uint16(r.hdr[4:])
	typ := binary.BigEndian.Uint16(r.hdr[6:])
	n := binary.BigEndian.Uint32(r.hdr[16:])
	cl, err := r.lookup(binary.BigEndian.Uint64(r.hdr[8:]))
	if err != nil {
		return err
	}
	if n > MaxPayload+64 && typ != replyTypeOffsetData {
		return errors.New("nbd: reply chunk too long")
	}
	switch {
	case typ == replyTypeNone:
		if n != 0 {
			return errors.New("nbd: bad none chunk")
		}
	case typ == replyTypeOffsetData:
		if cl.req.typ != CmdRead || n < 8 {
			return errors.New("nbd: unexpected data chunk")
		}
		b, err := r.payload(8)
		if err != nil {
			return err
		}
		lo, k, err := cl.span(binary.BigEndian.Uint64(b), uint64(n-8))
		if err != nil {
			return err
		}
		if _, err := io.ReadFull(r.br, cl.p[lo:lo+k]); err != nil {
			return err
		}
		cl.covered += int64(k)
	case typ == replyTypeOffsetHole:
		if cl.req.typ != CmdRead || n != 12 {
			return errors.New("nbd: unexpected hole chunk")
		}
		b, err := r.payload(12)
		if err != nil {
			return err
		}
		lo, k, err := cl.span(binary.BigEndian.Uint64(b), uint64(binary.BigEndian.Uint32(b[8:])))
		if err != nil {
			return err
		}
		clear(cl.p[lo : lo+k])
		cl.covered += int64(k)
	case typ == replyTypeBlockStatus:
		if cl.req.typ != CmdBlockStatus || n < 12 || (n-4)%8 != 0 {
			return errors.New("nbd: unexpected block status chunk")
		}
		b, err := r.payload(n)
		if err != nil {
			return err
		}
		name, ok := r.c.contexts[binary.BigEndian.Uint32(b)]
		if !ok {
			return errors.New("nbd: block status for an unknown context")
		}
		ds := make([]Descriptor, 0, (n-4)/8)
		for p := b[4:]; len(p) >= 8; p = p[8:] {
			ds = append(ds, Descriptor{binary.BigEndian.Uint32(p), binary.BigEndian.Uint32(p[4:])})
		}
		if cl.status == nil {
			cl.status = make(map[string][]Descriptor)
		}
		cl.status[name] = ds
	case typ&(1<<15) != 0:
		if n < 6 {
			return errors.New("nbd: short error chunk")
		}
		b, err := r.payload(n)
		if err != nil {
			return err
		}
		ml := int(binary.BigEndian.Uint16(b[4:]))
		if ml > len(b)-6 {
			return errors.New("nbd: bad error chunk")
		}
		if cl.err == nil {
			cl.err = &Error{Errno: Errno(binary.BigEndian.Uint32(b)), Message: string(b[6 : 6+ml])}
		}
	default:
		return fmt.Errorf("nbd: unknown reply chunk type %d", typ)
	}
	if flags&replyFlagDone != 0 {
		if cl.err == nil && cl.req.typ == CmdRead && cl.covered != int64(len(cl.p)) {
			cl.err = errors.New("nbd: server replied with incomplete read data")
		}
		r.finish(cl)
	}
	return nil
}

// span checks that a content chunk lies inside the read request and
// returns where it goes in the destination.
func (cl *call) span(off, n uint64) (lo, k int, err error) {
	start := cl.req.off
	if n == 0 || off < start || off-start > uint64(len(cl.p)) || n > uint64(len(cl.p))-(off-start) {
		return 0, 0, errors.New("nbd: content chunk outside the request")
	}
	return int(off - start), int(n), nil
}

// pieces runs f over [off, off+n) in pieces of at most max bytes, all in
// flight at once, and returns the first error.
func (c *Client) pieces(off, n, max int64, f func(off, n int64) (*call, error)) error {
	if n <= max {
		cl, err := f(off, n)
		if err != nil {
			return err
		}
		err = c.wait(cl)
		putCall(cl)
		return err
	}
	var calls []*call
	var firstErr error
	for n > 0 && firstErr == nil {
		k := min(n, max)
		cl, err := f(off, k)
		if err != nil {
			firstErr = err
			break
		}
		calls = append(calls, cl)
		off += k
		n -= k
	}
	for _, cl := range calls {
		if err := c.wait(cl); err != nil && firstErr == nil {
			firstErr = err
		}
		putCall(cl)
	}
	return firstErr
}

func (c *Client) startCall(typ, flags uint16, off, n int64, payload, dst []byte) (*call, error) {
	cl := newCall(typ, flags, off, uint32(n), dst)
	if err := c.start(cl, payload); err != nil {
		putCall(cl)
		return nil, err
	}
	return cl, nil
}

// ReadAt reads len(p) bytes at off, splitting at the server's maximum
// payload.
func (c *Client) ReadAt(p []byte, off int64) (int, error) {
	if err := disk.CheckRange(off, int64(len(p)), c.size); err != nil {
		return 0, err
	}
	err := c.pieces(off, int64(len(p)), int64(c.maxBlock), func(o, n int64) (*call, error) {
		return c.startCall(CmdRead, 0, o, n, nil, p[o-off:o-off+n])
	})
	if err != nil {
		return 0, err
	}
	return len(p), nil
}

// WriteAt writes p at off.
func (c *Client) WriteAt(p []byte, off int64) (int, error) {
	if err := c.Write(p, off, 0); err != nil {
		return 0, err
	}
	return len(p), nil
}

// Write writes p at off with command flags (CmdFlagFUA).
func (c *Client) Write(p []byte, off int64, flags uint16) error {
	if err := disk.CheckRange(off, int64(len(p)), c.size); err != nil {
		return err
	}
	return c.pieces(off, int64(len(p)), int64(c.maxBlock), func(o, n int64) (*call, error) {
		return c.startCall(CmdWrite, flags, o, n, p[o-off:o-off+n], nil)
	})
}

// Flush makes every write acknowledged so far durable.
func (c *Client) Flush() error {
	cl, err := c.do(CmdFlush, 0, 0, 0, nil, nil)
	if err == nil {
		putCall(cl)
	}
	return err
}

// bigPiece splits payload-less commands longer than 32 bits.
const bigPiece = 1 << 30

// Trim discards [off, off+length).
func (c *Client) Trim(off, length int64) error {
	if err := disk.CheckRange(off, length, c.size); err != nil {
		return err
	}
	return c.pieces(off, length, bigPiece, func(o, n int64) (*call, error) {
		return c.startCall(CmdTrim, 0, o, n, nil, nil)
	})
}

// Zero makes [off, off+length) read as zeros, with command flags
// (CmdFlagNoHole, CmdFlagFastZero, CmdFlagFUA).
func (c *Client) Zero(off, length int64, flags uint16) error {
	if err := disk.CheckRange(off, length, c.size); err != nil {
		return err
	}
	return c.pieces(off, length, bigPiece, func(o, n int64) (*call, error) {
		return c.startCall(CmdWriteZeroes, flags, o, n, nil, nil)
	})
}

// WriteZeroes implements disk.Zeroer.
func (c *Client) WriteZeroes(off, length int64, mayUnmap bool) error {
	var flags uint16
	if !mayUnmap {
		flags = CmdFlagNoHole
	}
	return c.Zero(off, length, flags)
}

// Cache tells the server [off, off+length) will be read soon.
func (c *Client) Cache(off, length int64) error {
	if err := disk.CheckRange(off, length, c.size); err != nil {
		return err
	}
	return c.pieces(off, length, bigPiece, func(o, n int64) (*call, error) {
		return c.startCall(CmdCache, 0, o, n, nil, nil)
	})
}

// BlockStatus queries the selected metadata contexts for a range; the
// result maps context name to descriptors starting at off.
func (c *Client) BlockStatus(off int64, length uint32, flags uint16) (map[string][]Descriptor, error) {
	cl, err := c.do(CmdBlockStatus, flags, off, length, nil, nil)
	if err != nil {
		return nil, err
	}
	st := cl.status
	putCall(cl)
	return st, nil
}

// Extents implements disk.Extenter from base:allocation and, when
// negotiated, qemu:allocation-depth. Over NBD the depth of a hole (the
// chain's length) is unknown and reported as 0.
func (c *Client) Extents(off, length int64) ([]disk.Extent, error) {
	if err := disk.CheckRange(off, length, c.size); err != nil {
		return nil, err
	}
	var list []disk.Extent
	end := off + length
	for off < end {
		st, err := c.BlockStatus(off, uint32(min(end-off, bigPiece)), 0)
		if err != nil {
			return nil, err
		}
		alloc, ok := st[ContextBaseAllocation]
		if !ok || len(alloc) == 0 {
			return nil, fmt.Errorf("nbd: no %s from server: %w", ContextBaseAllocation, disk.ErrUnsupported)
		}
		depth := st[ContextAllocDepth]
		// Walk both descriptor lists, cutting at every boundary of either.
		var ai, di int
		var aUsed, dUsed int64
		progressed := false
		for off < end && ai < len(alloc) {
			a := alloc[ai]
			n := int64(a.Length) - aUsed
			e := disk.Extent{Offset: off, Type: disk.Data}
			switch a.Flags & (StateHole | StateZero) {
			case StateHole | StateZero:
				e.Type = disk.Hole
			case StateZero:
				e.Type = disk.Zero
			}
			if depth != nil {
				if di >= len(depth) {
					break
				}
				d := depth[di]
				n = min(n, int64(d.Length)-dUsed)
				if d.Flags > 0 {
					e.Depth = int(d.Flags) - 1
				}
			}
			n = min(n, end-off)
			if n <= 0 {
				break
			}
			e.Length = n
			list = disk.AppendExtent(list, e)
			off += n
			progressed = true
			if aUsed += n; aUsed == int64(a.Length) {
				ai, aUsed = ai+1, 0
			}
			if depth != nil {
				if dUsed += n; dUsed == int64(depth[di].Length) {
					di, dUsed = di+1, 0
				}
			}
		}
		if !progressed {
			return nil, errors.New("nbd: empty block status reply")
		}
	}
	return list, nil
}

// Close disconnects politely (NBD_CMD_DISC) after the requests in flight
// have been answered.
func (c *Client) Close() error {
	c.mu.Lock()
	if c.closed {
		c.mu.Unlock()
		return nil
	}
	c.closed = true
	broken := c.err != nil
	c.mu.Unlock()
	c.inflight.Wait()
	if !broken {
		var b [requestLen]byte
		encodeRequest(b[:], request{typ: CmdDisc})
		c.wmu.Lock()
		c.conn.Write(b[:])
		c.wmu.Unlock()
		// The server closes after DISC; wait for that (bounded) so the
		// server has finished before we return.
		c.conn.SetReadDeadline(time.Now().Add(5 * time.Second))
	}
	<-c.done
	return c.conn.Close()
}
