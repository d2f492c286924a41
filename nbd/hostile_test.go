package nbd

import (
	"bytes"
	"encoding/binary"
	"errors"
	"io"
	"net"
	"strings"
	"sync"
	"testing"
	"time"
)

// raw speaks the protocol byte by byte, to send what real clients never
// would.
type raw struct {
	t testing.TB
	c net.Conn
}

func dialRaw(t testing.TB, sock string) *raw {
	t.Helper()
	c, err := net.Dial("unix", sock)
	if err != nil {
		t.Fatal(err)
	}
	c.SetDeadline(time.Now().Add(20 * time.Second))
	t.Cleanup(func() { c.Close() })
	return &raw{t, c}
}

func (r *raw) write(b []byte) {
	r.t.Helper()
	if _, err := r.c.Write(b); err != nil {
		r.t.Fatalf("write: %v", err)
	}
}

func (r *raw) read(n int) []byte {
	r.t.Helper()
	b := make([]byte, n)
	if _, err := io.ReadFull(r.c, b); err != nil {
		r.t.Fatalf("read %d bytes: %v", n, err)
	}
	return b
}

// expectClosed checks that the server hung up (after any pending bytes).
func (r *raw) expectClosed() {
	r.t.Helper()
	_, err := io.Copy(io.Discard, r.c)
	if err != nil && !errors.Is(err, net.ErrClosed) && !isReset(err) {
		r.t.Fatalf("expected the server to close: %v", err)
	}
}

func isReset(err error) bool {
	var op *net.OpError
	return errors.As(err, &op) && !op.Timeout()
}

// greet reads the server greeting and sends client flags.
func (r *raw) greet(flags uint32) {
	r.t.Helper()
	g := r.read(18)
	if binary.BigEndian.Uint64(g) != magicInit || binary.BigEndian.Uint64(g[8:]) != magicOpt ||
		binary.BigEndian.Uint16(g[16:]) != flagFixedNewstyle|flagNoZeroes {
		r.t.Fatalf("greeting % x", g)
	}
	r.write(binary.BigEndian.AppendUint32(nil, flags))
}

func (r *raw) option(opt uint32, data []byte) {
	b := binary.BigEndian.AppendUint64(nil, magicOpt)
	b = binary.BigEndian.AppendUint32(b, opt)
	b = binary.BigEndian.AppendUint32(b, uint32(len(data)))
	r.write(append(b, data...))
}

func (r *raw) optReply(opt uint32) (typ uint32, data []byte) {
	r.t.Helper()
	h := r.read(optReplyHeaderLen)
	if binary.BigEndian.Uint64(h) != magicOptReply || binary.BigEndian.Uint32(h[8:]) != opt {
		r.t.Fatalf("option reply header % x", h)
	}
	return binary.BigEndian.Uint32(h[12:]), r.read(int(binary.BigEndian.Uint32(h[16:])))
}

func (r *raw) expectOpt(opt, want uint32) []byte {
	r.t.Helper()
	typ, data := r.optReply(opt)
	if typ != want {
		r.t.Fatalf("option %d: reply %#x (%q), want %#x", opt, typ, data, want)
	}
	return data
}

func infoData(name string, infos ...uint16) []byte {
	b := binary.BigEndian.AppendUint32(nil, uint32(len(name)))
	b = append(b, name...)
	b = binary.BigEndian.AppendUint16(b, uint16(len(infos)))
	for _, i := range infos {
		b = binary.BigEndian.AppendUint16(b, i)
	}
	return b
}

func metaData(name string, queries ...string) []byte {
	b := binary.BigEndian.AppendUint32(nil, uint32(len(name)))
	b = append(b, name...)
	b = binary.BigEndian.AppendUint32(b, uint32(len(queries)))
	for _, q := range queries {
		b = binary.BigEndian.AppendUint32(b, uint32(len(q)))
		b = append(b, q...)
	}
	return b
}

// goExport finishes the handshake with NBD_OPT_GO and returns the
// transmission flags.
func (r *raw) goExport(name string, infos ...uint16) uint16 {
	r.t.Helper()
	r.option(optGo, infoData(name, infos...))
	var flags uint16
	for {
		typ, data := r.optReply(optGo)
		switch typ {
		case repInfo:
			if binary.BigEndian.Uint16(data) == infoExport {
				flags = binary.BigEndian.Uint16(data[10:])
			}
		case repAck:
			return flags
		default:
			r.t.Fatalf("GO: reply %#x %q", typ, data)
		}
	}
}

// connect does a full handshake, with structured replies and
// base:allocation when structured is set.
func (r *raw) connect(name string, structured bool, infos ...uint16) uint16 {
	r.t.Helper()
	r.greet(clientFlagFixedNewstyle | clientFlagNoZeroes)
	if structured {
		r.option(optStructuredReply, nil)
		r.expectOpt(optStructuredReply, repAck)
		r.option(optSetMetaContext, metaData(name, ContextBaseAllocation))
		r.expectOpt(optSetMetaContext, repMetaContext)
		r.expectOpt(optSetMetaContext, repAck)
	}
	return r.goExport(name, infos...)
}

func (r *raw) request(typ, flags uint16, cookie, off uint64, length uint32, payload []byte) {
	b := make([]byte, requestLen, requestLen+len(payload))
	encodeRequest(b, request{flags: flags, typ: typ, cookie: cookie, off: off, length: length})
	r.write(append(b, payload...))
}

// simpleReply reads a simple reply and returns its error.
func (r *raw) simpleReply(cookie uint64) Errno {
	r.t.Helper()
	h := r.read(simpleReplyLen)
	if binary.BigEndian.Uint32(h) != magicSimpleReply || binary.BigEndian.Uint64(h[8:]) != cookie {
		r.t.Fatalf("simple reply % x, want cookie %d", h, cookie)
	}
	return Errno(binary.BigEndian.Uint32(h[4:]))
}

type chunk struct {
	flags, typ uint16
	cookie     uint64
	payload    []byte
}

func (r *raw) chunk() chunk {
	r.t.Helper()
	h := r.read(chunkHeaderLen)
	if binary.BigEndian.Uint32(h) != magicStructuredRepl {
		r.t.Fatalf("chunk header % x", h)
	}
	return chunk{binary.BigEndian.Uint16(h[4:]), binary.BigEndian.Uint16(h[6:]),
		binary.BigEndian.Uint64(h[8:]), r.read(int(binary.BigEndian.Uint32(h[16:])))}
}

// structuredErr reads one reply (all its chunks) and returns its error.
func (r *raw) structuredErr(cookie uint64) Errno {
	r.t.Helper()
	var errno Errno
	for {
		c := r.chunk()
		if c.cookie != cookie {
			r.t.Fatalf("chunk for cookie %d, want %d", c.cookie, cookie)
		}
		if c.typ&(1<<15) != 0 {
			errno = Errno(binary.BigEndian.Uint32(c.payload))
		}
		if c.flags&replyFlagDone != 0 {
			return errno
		}
	}
}

// TestHostileHandshake feeds the option phase garbage; each bad
// connection is dropped or answered with an error, and the server keeps
// serving a connection opened before and ones opened after.
func TestHostileHandshake(t *testing.T) {
	img := newMemImage(1<<20, 512, nil)
	ts := startServer(t, nil, Export{Name: "d", Image: img})
	before := ts.dial(t, &ClientOptions{Export: "d"})

	t.Run("garbage", func(t *testing.T) {
		r := dialRaw(t, ts.sock)
		r.read(18)
		r.write(bytes.Repeat([]byte{0xff}, 200))
		r.expectClosed()
	})
	t.Run("unknown client flags", func(t *testing.T) {
		r := dialRaw(t, ts.sock)
		r.greet(1 << 7)
		r.expectClosed()
	})
	t.Run("bad option magic", func(t *testing.T) {
		r := dialRaw(t, ts.sock)
		r.greet(clientFlagFixedNewstyle)
		r.write(make([]byte, 16))
		r.expectClosed()
	})
	t.Run("hang up mid option", func(t *testing.T) {
		r := dialRaw(t, ts.sock)
		r.greet(clientFlagFixedNewstyle)
		b := binary.BigEndian.AppendUint64(nil, magicOpt)
		r.write(b[:5])
		r.c.Close()
	})
	t.Run("option errors keep the stream in step", func(t *testing.T) {
		r := dialRaw(t, ts.sock)
		r.greet(clientFlagFixedNewstyle)
		r.option(99, []byte("whatever"))
		r.expectOpt(99, repErrUnsup)
		r.option(99, make([]byte, 1<<20)) // over the option data limit
		r.expectOpt(99, repErrTooBig)
		r.option(optList, []byte{1})
		r.expectOpt(optList, repErrInvalid)
		r.option(optGo, []byte{0, 0, 1, 0, 'd'}) // name longer than the data
		r.expectOpt(optGo, repErrInvalid)
		r.option(optInfo, infoData("nope"))
		r.expectOpt(optInfo, repErrUnknown)
		r.option(optSetMetaContext, metaData("d", ContextBaseAllocation)) // before structured replies
		r.expectOpt(optSetMetaContext, repErrInvalid)
		r.option(optStructuredReply, []byte{1})
		r.expectOpt(optStructuredReply, repErrInvalid)
		r.option(optStartTLS, nil) // no TLS configured
		r.expectOpt(optStartTLS, repErrUnsup)
		r.option(optStructuredReply, nil)
		r.expectOpt(optStructuredReply, repAck)
		r.option(optListMetaContext, append(metaData("d", "base:"), 0xff)) // trailing junk
		r.expectOpt(optListMetaContext, repErrInvalid)
		bad := metaData("d")
		binary.BigEndian.PutUint32(bad[5:], 1<<31) // query count far beyond the data
		r.option(optListMetaContext, bad)
		r.expectOpt(optListMetaContext, repErrInvalid)
		r.option(optListMetaContext, metaData("d", "nosuchns:x", "base:"))
		if name := r.expectOpt(optListMetaContext, repMetaContext); string(name[4:]) != ContextBaseAllocation {
			t.Fatalf("listed %q", name)
		}
		r.expectOpt(optListMetaContext, repAck)
		r.option(optList, nil)
		if d := r.expectOpt(optList, repServer); string(d[4:]) != "d" {
			t.Fatalf("list %q", d)
		}
		r.expectOpt(optList, repAck)
		r.option(optInfo, infoData("d", infoBlockSize, infoName))
		for {
			typ, _ := r.optReply(optInfo)
			if typ == repAck {
				break
			}
		}
		r.goExport("d")
		r.request(CmdFlush, 0, 1, 0, 0, nil)
		if e := r.structuredErr(1); e != 0 {
			t.Fatalf("flush: %v", e)
		}
	})
	t.Run("export name unknown", func(t *testing.T) {
		r := dialRaw(t, ts.sock)
		r.greet(clientFlagFixedNewstyle)
		r.option(optExportName, []byte("nope"))
		r.expectClosed()
	})
	t.Run("export name", func(t *testing.T) {
		r := dialRaw(t, ts.sock)
		r.greet(clientFlagFixedNewstyle) // no NO_ZEROES: 124 zero bytes follow
		r.option(optExportName, []byte("d"))
		b := r.read(10 + 124)
		if binary.BigEndian.Uint64(b) != 1<<20 || !bytes.Equal(b[10:], make([]byte, 124)) {
			t.Fatalf("export name reply % x", b[:10])
		}
		r.request(CmdRead, 0, 7, 4096, 4096, nil)
		if e := r.simpleReply(7); e != 0 {
			t.Fatal(e)
		}
		r.read(4096)
		r.request(CmdDisc, 0, 8, 0, 0, nil)
		r.expectClosed()
	})
	t.Run("abort", func(t *testing.T) {
		r := dialRaw(t, ts.sock)
		r.greet(clientFlagFixedNewstyle)
		r.option(optAbort, nil)
		r.expectOpt(optAbort, repAck)
		r.expectClosed()
	})

	if err := before.Flush(); err != nil {
		t.Fatalf("connection opened before: %v", err)
	}
	after := ts.dial(t, &ClientOptions{Export: "d"})
	if _, err := after.ReadAt(make([]byte, 4096), 0); err != nil {
		t.Fatalf("connection opened after: %v", err)
	}
}

// TestHostileRequests sends invalid requests in the transmission phase:
// each gets the protocol's error, payloads are skipped, and the stream
// stays usable; only a bad magic ends the connection.
func TestHostileRequests(t *testing.T) {
	const size = 1 << 20
	img := newMemImage(size, 4096, nil)
	ts := startServer(t, nil, Export{Name: "d", Image: img}, Export{Name: "ro", Image: img, ReadOnly: true},
		Export{Name: "plain", Image: plainImage{img}})
	other := ts.dial(t, &ClientOptions{Export: "d"})

	for _, structured := range []bool{false, true} {
		name := "simple"
		if structured {
			name = "structured"
		}
		t.Run(name, func(t *testing.T) {
			r := dialRaw(t, ts.sock)
			r.connect("d", structured, infoBlockSize)
			reply := r.simpleReply
			if structured {
				reply = r.structuredErr
			}
			cookie := uint64(100)
			expect := func(want Errno, typ, flags uint16, off uint64, length uint32, payload []byte) {
				t.Helper()
				cookie++
				r.request(typ, flags, cookie, off, length, payload)
				if got := reply(cookie); got != want {
					t.Fatalf("cmd %d flags %#x off %d len %d: got %v (%d), want %v", typ, flags, off, length, got, got, want)
				}
				if want == 0 && typ == CmdRead && !structured {
					r.read(int(length))
				}
			}
			expect(EINVAL, 42, 0, 0, 4096, nil)                   // unknown command
			expect(EINVAL, CmdRead, 1<<7, 0, 4096, nil)           // unknown flag
			expect(EINVAL, CmdRead, CmdFlagNoHole, 0, 4096, nil)  // flag of another command
			expect(EINVAL, CmdRead, 0, size, 4096, nil)           // past the end
			expect(EINVAL, CmdRead, 0, 1<<63, 4096, nil)          // far past the end
			expect(EINVAL, CmdRead, 0, ^uint64(0)-511, 1024, nil) // offset+length wraps
			expect(ENOSPC, CmdWrite, 0, size-4096, 8192, make([]byte, 8192))
			expect(EINVAL, CmdWrite, 0, 512, 4096, make([]byte, 4096)) // misaligned
			expect(EINVAL, CmdWrite, 0, 0, MaxPayload+4096, make([]byte, MaxPayload+4096))
			expect(EINVAL, CmdTrim, 0, 0, size+4096, nil)
			expect(ENOSPC, CmdWriteZeroes, 0, 0, size+4096, nil)
			expect(EINVAL, CmdCache, 0, size, 4096, nil)
			if structured {
				expect(EOVERFLOW, CmdRead, 0, 0, MaxPayload+4096, nil)
				expect(EINVAL, CmdBlockStatus, 0, 0, 0, nil)
				expect(EINVAL, CmdBlockStatus, 0, size, 4096, nil)
				expect(EINVAL, CmdBlockStatus, CmdFlagDF, 0, 4096, nil)
				expect(0, CmdBlockStatus, CmdFlagReqOne, 0, size, nil)
			} else {
				expect(EINVAL, CmdBlockStatus, 0, 0, 4096, nil) // no contexts without structured replies
				expect(EINVAL, CmdRead, 0, 0, MaxPayload+4096, nil)
				expect(EINVAL, CmdRead, CmdFlagDF, 0, 4096, nil) // DF needs structured replies
			}
			// Valid requests still work, including big payload-less ones.
			expect(0, CmdWriteZeroes, 0, 0, size, nil)
			expect(0, CmdRead, 0, 0, 0, nil)
			expect(0, CmdRead, CmdFlagFUA, 0, 4096, nil)
			data := bytes.Repeat([]byte{0x77}, 8192)
			expect(0, CmdWrite, CmdFlagFUA, 8192, 8192, data)
			expect(0, CmdFlush, 0, 0, 0, nil)

			// Many requests without waiting: every reply arrives once.
			const n = 64
			for i := range n {
				r.request(CmdWrite, 0, uint64(1000+i), uint64(i)*4096, 4096, data[:4096])
			}
			seen := map[uint64]bool{}
			for range n {
				var c uint64
				if structured {
					ch := r.chunk()
					if ch.typ != replyTypeNone || ch.flags != replyFlagDone {
						t.Fatalf("write reply chunk %+v", ch)
					}
					c = ch.cookie
				} else {
					h := r.read(simpleReplyLen)
					if binary.BigEndian.Uint32(h[4:]) != 0 {
						t.Fatalf("pipelined write failed: % x", h)
					}
					c = binary.BigEndian.Uint64(h[8:])
				}
				if c < 1000 || c >= 1000+n || seen[c] {
					t.Fatalf("reply for cookie %d", c)
				}
				seen[c] = true
			}

			r.request(CmdRead, 0, 1, 0, 4096, nil)
			r.write([]byte{1, 2, 3, 4}) // a bad magic loses the framing
			if structured {
				r.structuredErr(1)
			} else {
				r.simpleReply(1)
				r.read(4096)
			}
			r.write(make([]byte, 24))
			r.expectClosed()
		})
	}

	t.Run("read-only", func(t *testing.T) {
		r := dialRaw(t, ts.sock)
		r.connect("ro", true)
		r.request(CmdWrite, 0, 1, 0, 4096, make([]byte, 4096))
		if e := r.structuredErr(1); e != EPERM {
			t.Fatalf("write: %v", e)
		}
		r.request(CmdTrim, 0, 2, 0, 4096, nil)
		if e := r.structuredErr(2); e != EPERM {
			t.Fatalf("trim: %v", e)
		}
		r.request(CmdWriteZeroes, CmdFlagFastZero, 3, 0, 4096, nil)
		if e := r.structuredErr(3); e != EPERM {
			t.Fatalf("zero: %v", e)
		}
		r.request(CmdRead, 0, 4, 0, 4096, nil)
		if e := r.structuredErr(4); e != 0 {
			t.Fatalf("read: %v", e)
		}
	})

	t.Run("fast zero without zeroer", func(t *testing.T) {
		r := dialRaw(t, ts.sock)
		r.connect("plain", true)
		r.request(CmdWriteZeroes, CmdFlagFastZero, 1, 0, 4096, nil)
		if e := r.structuredErr(1); e != ENOTSUP {
			t.Fatalf("fast zero: %v", e)
		}
	})

	t.Run("hole chunks", func(t *testing.T) {
		r := dialRaw(t, ts.sock)
		r.connect("d", true)
		r.request(CmdWrite, 0, 1, 0, 4096, bytes.Repeat([]byte{1}, 4096))
		r.structuredErr(1)
		r.request(CmdTrim, 0, 2, memChunk, size-memChunk, nil)
		r.structuredErr(2)
		r.request(CmdRead, 0, 3, 0, 4*memChunk, nil)
		var types []uint16
		for {
			c := r.chunk()
			types = append(types, c.typ)
			if c.flags&replyFlagDone != 0 {
				break
			}
		}
		// Data for chunk 0, one hole for chunks 1 to 3.
		if len(types) != 2 || types[0] != replyTypeOffsetData || types[1] != replyTypeOffsetHole {
			t.Fatalf("read reply chunk types %v", types)
		}
		r.request(CmdRead, CmdFlagDF, 4, 0, 4*memChunk, nil)
		if c := r.chunk(); c.typ != replyTypeOffsetData || len(c.payload) != 8+4*memChunk || c.flags != replyFlagDone {
			t.Fatalf("DF read: type %d len %d", c.typ, len(c.payload))
		}
	})

	if _, err := other.ReadAt(make([]byte, 4096), 0); err != nil {
		t.Fatalf("other connection: %v", err)
	}
	ts.dial(t, &ClientOptions{Export: "d"}).Flush()
}

// TestStuckClient checks that a client which sends but never reads
// replies stalls only its own connection, with bounded memory.
func TestStuckClient(t *testing.T) {
	img := newMemImage(1<<20, 512, nil)
	ts := startServer(t, func(s *Server) { s.ConnMemory = MaxPayload }, Export{Image: img})
	r := dialRaw(t, ts.sock)
	r.connect("", true)
	// Send reads until the socket stops taking them: the server stops
	// reading once its replies back up.
	r.c.SetWriteDeadline(time.Now().Add(500 * time.Millisecond))
	var hdr [requestLen]byte
	for i := uint64(0); ; i++ {
		encodeRequest(hdr[:], request{typ: CmdRead, cookie: i, length: 1 << 20})
		if _, err := r.c.Write(hdr[:]); err != nil {
			break
		}
		if i > 1<<20 {
			t.Fatal("server kept reading requests whose replies nobody reads")
		}
	}
	c := ts.dial(t, nil)
	if _, err := c.ReadAt(make([]byte, 4096), 0); err != nil {
		t.Fatal(err)
	}
}

// TestOptionFlood: a handshake that sends more options, or more bytes of
// options, than the server's bounds is closed, and the refusal is logged;
// up to the bounds every option is answered, and other clients are
// served. Without the bounds a client could haggle for the whole
// handshake timeout.
func TestOptionFlood(t *testing.T) {
	var logged lockedBuffer
	ts := startServer(t, func(s *Server) {
		s.Logger = newTestLogger(&logged)
	}, Export{Name: "d", Image: newMemImage(1<<20, 512, nil)})
	maxOptions, maxBytes := ts.handshakeLimits()

	t.Run("options", func(t *testing.T) {
		r := dialRaw(t, ts.sock)
		r.greet(clientFlagFixedNewstyle | clientFlagNoZeroes)
		for range maxOptions {
			r.option(99, nil)
			r.expectOpt(99, repErrUnsup)
		}
		r.option(99, nil)
		r.expectClosed()
	})
	t.Run("bytes", func(t *testing.T) {
		const size = 1 << 20 // over maxOptionData: skipped, answered TOO_BIG
		r := dialRaw(t, ts.sock)
		r.greet(clientFlagFixedNewstyle | clientFlagNoZeroes)
		fits := int(maxBytes / (optHeaderLen + size))
		for range fits {
			r.option(99, make([]byte, size))
			r.expectOpt(99, repErrTooBig)
		}
		// The header of the next one announces more than the bound: the
		// server closes without reading its data.
		b := binary.BigEndian.AppendUint64(nil, magicOpt)
		b = binary.BigEndian.AppendUint32(b, 99)
		r.write(binary.BigEndian.AppendUint32(b, size))
		r.expectClosed()
	})
	for deadline := time.Now().Add(10 * time.Second); strings.Count(logged.String(), "handshake refused") < 2; time.Sleep(10 * time.Millisecond) {
		if time.Now().After(deadline) {
			t.Fatalf("two refusals not logged: %q", logged.String())
		}
	}
	if _, err := ts.dial(t, &ClientOptions{Export: "d"}).ReadAt(make([]byte, 4096), 0); err != nil {
		t.Fatalf("a client after the floods: %v", err)
	}
}

// lockedBuffer is a bytes.Buffer safe for a logger and a test reading it.
type lockedBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (l *lockedBuffer) Write(p []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.Write(p)
}

func (l *lockedBuffer) String() string {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.String()
}
