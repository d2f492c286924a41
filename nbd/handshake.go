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
	"strings"
	"sync"
	"sync/atomic"
	"time"
	"unicode/utf8"
)

// Errors that end a connection during option haggling. The spec lets the
// server hang up on a client that breaks a MUST.
var (
	errBadMagic       = errors.New("nbd: bad magic")
	errClientFlags    = errors.New("nbd: unknown client flags")
	errAbort          = errors.New("nbd: client aborted negotiation")
	errExportName     = errors.New("nbd: NBD_OPT_EXPORT_NAME for an unavailable export")
	errTLSPipelined   = errors.New("nbd: client sent data before the TLS handshake")
	errShutdownInHand = errors.New("nbd: server shutting down")
)

// handshakeLimitError ends a handshake that sent more options or bytes
// than a real client does (Server.handshakeLimits). The server closes
// the connection without reading further: a client that floods options
// need not read their replies, so one more reply could block until the
// handshake timeout.
type handshakeLimitError struct {
	options, maxOptions int    // options received, the refused one included
	bytes, maxBytes     uint64 // bytes received or announced
}

func (e *handshakeLimitError) Error() string {
	return fmt.Sprintf("nbd: handshake refused after %d options and %d bytes (limits %d options, %d bytes)",
		e.options, e.bytes, e.maxOptions, e.maxBytes)
}

// Metadata context kinds; the value doubles as the context ID sent in
// NBD_REP_META_CONTEXT and block status chunks.
type metaKind uint32

const (
	metaBaseAllocation metaKind = 1
	metaAllocDepth     metaKind = 2
)

func (k metaKind) String() string {
	if k == metaBaseAllocation {
		return ContextBaseAllocation
	}
	return ContextAllocDepth
}

// conn is one client connection: the option haggling state here, the
// transmission state in transmission.go.
type conn struct {
	srv *Server
	raw net.Conn      // the accepted socket: deadlines and hard close
	rw  net.Conn      // raw, or the TLS connection on top of it
	br  *bufio.Reader // reads from rw
	tls *tls.Conn

	mu       sync.Mutex // guards stopping against deadline changes, and x
	stopping bool
	done     chan struct{} // closed when the connection has ended
	// dead is set once the socket is closed under the connection (abort,
	// or a reply that failed to go out): no reply can reach the client
	// any more, so the requests it sent are not executed.
	dead atomic.Bool

	// Negotiated during option haggling.
	noZeroes   bool
	structured bool
	meta       []metaKind
	metaExport string // export the meta contexts were selected for
	optBuf     []byte

	// Transmission state.
	x        *export // the export chosen, set under mu (Server.Clients reads it)
	size     uint64
	minBlock uint64 // enforced alignment; 1 unless the client agreed
	tflags   uint16
	wmu      sync.Mutex // one reply at a time on the wire
	writeErr error      // first write failure, under wmu
	wbufs    [][]byte   // reply vector, under wmu
	wvec     net.Buffers
	budget   budget
}

func newConn(s *Server, c net.Conn) *conn {
	return &conn{srv: s, raw: c, rw: c, br: bufio.NewReaderSize(c, 64<<10), done: make(chan struct{})}
}

// serve runs the connection to its end and closes it.
func (c *conn) serve() error {
	defer c.close()
	if err := c.negotiate(); err != nil {
		if errors.Is(err, errAbort) {
			return nil
		}
		return err
	}
	return c.transmit()
}

func (c *conn) close() {
	if c.tls != nil {
		// Sends close_notify (with its own deadline) and closes raw.
		c.tls.Close()
		return
	}
	c.raw.Close()
}

// stopReading makes the blocked or next read fail, for Shutdown: requests
// already read still complete and get their replies.
func (c *conn) stopReading() {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.stopping = true
	c.raw.SetReadDeadline(time.Unix(1, 0))
}

// abort closes the socket under every reader and writer; the requests
// read and not yet running are dropped.
func (c *conn) abort() {
	c.dead.Store(true)
	c.mu.Lock()
	defer c.mu.Unlock()
	c.stopping = true
	c.raw.Close()
}

// setReadDeadline changes the read deadline unless stopReading already
// forced it into the past.
func (c *conn) setReadDeadline(t time.Time) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if !c.stopping {
		c.raw.SetReadDeadline(t)
	}
}

// negotiate runs the fixed newstyle handshake and option haggling. It
// returns nil once the client has chosen an export and the transmission
// phase begins.
func (c *conn) negotiate() error {
	deadline := time.Now().Add(c.srv.handshakeTimeout())
	c.setReadDeadline(deadline)
	c.raw.SetWriteDeadline(deadline)

	var b [18]byte
	binary.BigEndian.PutUint64(b[0:], magicInit)
	binary.BigEndian.PutUint64(b[8:], magicOpt)
	binary.BigEndian.PutUint16(b[16:], flagFixedNewstyle|flagNoZeroes)
	if _, err := c.rw.Write(b[:18]); err != nil {
		return err
	}
	if _, err := io.ReadFull(c.br, b[:4]); err != nil {
		return err
	}
	cf := binary.BigEndian.Uint32(b[:4])
	if cf&^(clientFlagFixedNewstyle|clientFlagNoZeroes) != 0 {
		return errClientFlags
	}
	c.noZeroes = cf&clientFlagNoZeroes != 0

	maxOptions, maxBytes := c.srv.handshakeLimits()
	var options int
	var optBytes uint64
	for {
		var h [optHeaderLen]byte
		if _, err := io.ReadFull(c.br, h[:]); err != nil {
			if c.srv.closing.Load() {
				return errShutdownInHand
			}
			return err
		}
		if binary.BigEndian.Uint64(h[0:]) != magicOpt {
			return errBadMagic
		}
		opt := binary.BigEndian.Uint32(h[8:])
		n := binary.BigEndian.Uint32(h[12:])
		// The bounds of one handshake, checked before the option's data
		// is read: its length is the client's word.
		options++
		optBytes += optHeaderLen + uint64(n)
		if options > maxOptions || optBytes > maxBytes {
			return &handshakeLimitError{options, maxOptions, optBytes, maxBytes}
		}
		if n > maxOptionData {
			// Skip the data to stay in step with the client; the
			// handshake deadline bounds how long that may take.
			if _, err := io.CopyN(io.Discard, c.br, int64(n)); err != nil {
				return err
			}
			if opt == optExportName {
				return errExportName
			}
			if err := c.optError(opt, repErrTooBig, "option data too long"); err != nil {
				return err
			}
			continue
		}
		if cap(c.optBuf) < int(n) {
			c.optBuf = make([]byte, n)
		}
		data := c.optBuf[:n]
		if _, err := io.ReadFull(c.br, data); err != nil {
			return err
		}
		done, err := c.option(opt, data)
		if err != nil || done {
			if done {
				c.optBuf = nil
				c.setReadDeadline(time.Time{})
				c.raw.SetWriteDeadline(time.Time{})
			}
			return err
		}
	}
}

// option handles one option; done reports entry into transmission.
func (c *conn) option(opt uint32, data []byte) (done bool, err error) {
	if c.srv.closing.Load() && opt != optAbort {
		if opt == optExportName {
			return false, errShutdownInHand
		}
		return false, c.optError(opt, repErrShutdown, "server is shutting down")
	}
	if c.srv.TLSRequired && c.tls == nil {
		switch opt {
		case optStartTLS, optAbort:
		case optExportName:
			return false, errExportName
		default:
			return false, c.optError(opt, repErrTLSReqd, "TLS is required")
		}
	}
	switch opt {
	case optExportName:
		return c.optExportName(data)
	case optAbort:
		c.optReply(opt, repAck)
		return false, errAbort
	case optList:
		return false, c.optList(data)
	case optStartTLS:
		return false, c.optStartTLS(data)
	case optInfo, optGo:
		return c.optInfoGo(opt, data)
	case optStructuredReply:
		if len(data) != 0 {
			return false, c.optError(opt, repErrInvalid, "structured reply option takes no data")
		}
		c.structured = true
		return false, c.optReply(opt, repAck)
	case optListMetaContext, optSetMetaContext:
		return false, c.optMetaContext(opt, data)
	}
	return false, c.optError(opt, repErrUnsup, fmt.Sprintf("option %d not supported", opt))
}

// optReply sends one option reply whose payload is the concatenation of
// parts.
func (c *conn) optReply(opt, typ uint32, parts ...[]byte) error {
	n := 0
	for _, p := range parts {
		n += len(p)
	}
	b := make([]byte, optReplyHeaderLen, optReplyHeaderLen+n)
	encodeOptReplyHeader(b, opt, typ, uint32(n))
	for _, p := range parts {
		b = append(b, p...)
	}
	_, err := c.rw.Write(b)
	return err
}

// optError sends an error reply. Its message, which may quote what the
// client sent, is cut to the protocol's limit for strings at a character
// boundary.
func (c *conn) optError(opt, typ uint32, msg string) error {
	if len(msg) > maxString {
		cut := maxString
		for cut > 0 && !utf8.RuneStart(msg[cut]) {
			cut--
		}
		msg = msg[:cut]
	}
	return c.optReply(opt, typ, []byte(msg))
}

func (c *conn) optExportName(data []byte) (bool, error) {
	if len(data) > maxString {
		return false, errExportName
	}
	x := c.srv.lookup(string(data))
	if x == nil {
		return false, errExportName
	}
	// Old clients do not negotiate block sizes, so no alignment is
	// enforced; images handle unaligned I/O themselves.
	if !c.enter(x, false) {
		return false, errExportName
	}
	b := make([]byte, 10, 10+exportNameReplyZero)
	binary.BigEndian.PutUint64(b[0:], c.size)
	binary.BigEndian.PutUint16(b[8:], c.tflags)
	if !c.noZeroes {
		b = b[:10+exportNameReplyZero]
	}
	_, err := c.rw.Write(b)
	return true, err
}

func (c *conn) optList(data []byte) error {
	if len(data) != 0 {
		return c.optError(optList, repErrInvalid, "list option takes no data")
	}
	for _, x := range c.srv.exportList() {
		var n [4]byte
		binary.BigEndian.PutUint32(n[:], uint32(len(x.Name)))
		if err := c.optReply(optList, repServer, n[:], []byte(x.Name), []byte(x.Description)); err != nil {
			return err
		}
	}
	return c.optReply(optList, repAck)
}

func (c *conn) optStartTLS(data []byte) error {
	switch {
	case c.srv.TLSConfig == nil:
		return c.optError(optStartTLS, repErrUnsup, "TLS not configured")
	case len(data) != 0:
		return c.optError(optStartTLS, repErrInvalid, "starttls option takes no data")
	case c.tls != nil:
		return c.optError(optStartTLS, repErrInvalid, "TLS already active")
	}
	if err := c.optReply(optStartTLS, repAck); err != nil {
		return err
	}
	// The client must wait for the ACK before starting TLS, so nothing
	// may be buffered yet; anything there is plaintext we must not trust.
	if c.br.Buffered() != 0 {
		return errTLSPipelined
	}
	tc := tls.Server(c.raw, c.srv.TLSConfig)
	if err := tc.HandshakeContext(context.Background()); err != nil {
		return fmt.Errorf("nbd: TLS handshake: %w", err)
	}
	c.tls, c.rw = tc, tc
	c.br.Reset(tc)
	// The spec: nothing negotiated before STARTTLS survives it.
	c.structured = false
	c.meta, c.metaExport = nil, ""
	return nil
}

func (c *conn) optInfoGo(opt uint32, data []byte) (bool, error) {
	r := optReader{b: data}
	name := r.str(r.u32())
	nreq := r.u16()
	var wantName, wantDesc, wantBlock bool
	for i := 0; i < int(nreq) && !r.bad; i++ {
		switch r.u16() {
		case infoName:
			wantName = true
		case infoDescription:
			wantDesc = true
		case infoBlockSize:
			wantBlock = true
		}
	}
	if r.bad || len(r.b) != 0 {
		return false, c.optError(opt, repErrInvalid, "malformed info request")
	}
	x := c.srv.lookup(name)
	if x == nil {
		return false, c.optError(opt, repErrUnknown, fmt.Sprintf("no export %q", name))
	}
	size, ok := x.imageSize()
	if !ok {
		return false, c.optError(opt, repErrUnknown, fmt.Sprintf("no export %q", name))
	}

	var b [14]byte
	binary.BigEndian.PutUint16(b[0:], infoExport)
	binary.BigEndian.PutUint64(b[2:], uint64(size))
	binary.BigEndian.PutUint16(b[10:], x.transmissionFlags(c.structured))
	if err := c.optReply(opt, repInfo, b[:12]); err != nil {
		return false, err
	}
	if wantName {
		binary.BigEndian.PutUint16(b[0:], infoName)
		if err := c.optReply(opt, repInfo, b[:2], []byte(x.Name)); err != nil {
			return false, err
		}
	}
	if wantDesc && x.Description != "" {
		binary.BigEndian.PutUint16(b[0:], infoDescription)
		if err := c.optReply(opt, repInfo, b[:2], []byte(x.Description)); err != nil {
			return false, err
		}
	}
	// Block sizes are sent even unasked: clients ignore what they do not
	// understand, and tools like nbdinfo show them.
	min, pref, max := x.blockSizes()
	binary.BigEndian.PutUint16(b[0:], infoBlockSize)
	binary.BigEndian.PutUint32(b[2:], min)
	binary.BigEndian.PutUint32(b[6:], pref)
	binary.BigEndian.PutUint32(b[10:], max)
	if err := c.optReply(opt, repInfo, b[:14]); err != nil {
		return false, err
	}
	if opt == optInfo {
		return false, c.optReply(opt, repAck)
	}
	// Contexts chosen for another export do not carry over.
	if c.metaExport != name {
		c.meta = nil
	}
	if !c.enter(x, wantBlock) {
		// Removed since the lookup above.
		return false, c.optError(opt, repErrUnknown, fmt.Sprintf("no export %q", name))
	}
	return true, c.optReply(opt, repAck)
}

// enter fixes the export and its parameters for the transmission phase.
// It fails when the export was removed meanwhile: attaching happens under
// the server's lock, so RemoveExport sees every connection attached.
func (c *conn) enter(x *export, blockSizeAgreed bool) bool {
	size, ok := x.imageSize()
	if !ok {
		return false
	}
	c.srv.mu.Lock()
	if x.removed {
		c.srv.mu.Unlock()
		return false
	}
	c.mu.Lock()
	c.x = x
	c.mu.Unlock()
	c.srv.mu.Unlock()
	c.size = uint64(size)
	c.tflags = x.transmissionFlags(c.structured)
	c.minBlock = 1
	if blockSizeAgreed {
		// The client promised to honour the minimum block size, so a
		// misaligned request is its bug and gets EINVAL.
		c.minBlock = uint64(x.minBlock)
	}
	if !c.structured {
		c.meta = nil
	}
	return true
}

func (c *conn) optMetaContext(opt uint32, data []byte) error {
	set := opt == optSetMetaContext
	if set {
		// A SET replaces the selection even when it fails.
		c.meta, c.metaExport = nil, ""
		if !c.structured {
			return c.optError(opt, repErrInvalid, "negotiate structured replies first")
		}
	}
	r := optReader{b: data}
	name := r.str(r.u32())
	nq := r.u32()
	var queries []string
	for i := uint32(0); i < nq && !r.bad; i++ {
		q := r.str(r.u32())
		queries = append(queries, q)
	}
	if r.bad || len(r.b) != 0 {
		return c.optError(opt, repErrInvalid, "malformed meta context request")
	}
	if c.srv.lookup(name) == nil {
		return c.optError(opt, repErrUnknown, fmt.Sprintf("no export %q", name))
	}
	var found []metaKind
	add := func(k metaKind) {
		for _, f := range found {
			if f == k {
				return
			}
		}
		found = append(found, k)
	}
	if len(queries) == 0 && !set {
		add(metaBaseAllocation)
		add(metaAllocDepth)
	}
	for _, q := range queries {
		if !strings.Contains(q, ":") {
			return c.optError(opt, repErrInvalid, fmt.Sprintf("query %q has no namespace", q))
		}
		switch {
		case q == ContextBaseAllocation, q == "base:" && !set:
			add(metaBaseAllocation)
		case q == ContextAllocDepth, q == "qemu:" && !set:
			add(metaAllocDepth)
		}
		// Unknown namespaces and leaves are ignored, as the spec asks.
	}
	for _, k := range found {
		var id [4]byte
		if set {
			binary.BigEndian.PutUint32(id[:], uint32(k))
		}
		if err := c.optReply(opt, repMetaContext, id[:], []byte(k.String())); err != nil {
			return err
		}
	}
	if set {
		c.meta, c.metaExport = found, name
	}
	return c.optReply(opt, repAck)
}
