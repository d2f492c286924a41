package nbd

import (
	"bytes"
	"context"
	"encoding/binary"
	"encoding/json"
	"errors"
	"io"
	"runtime"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/vhdkit/vhdkit/disk"
	"github.com/vhdkit/vhdkit/internal/testenv"
)

// Hostile clients against the server's bounds: block status work and
// memory, requests of a dead connection, option error strings, removed
// exports.

// stripeImage is a large disk without storage: after head bytes of data,
// runs of stripe bytes alternate between hole and data, the allocation
// map of a fragmented sparse file. It counts what Extents is asked.
type stripeImage struct {
	size, head, stripe int64
	asked              atomic.Int64 // bytes asked about through Extents
	extents            atomic.Int64 // extents returned
}

func (s *stripeImage) Size() int64  { return s.size }
func (s *stripeImage) Flush() error { return nil }
func (s *stripeImage) Close() error { return nil }
func (s *stripeImage) ReadAt(p []byte, off int64) (int, error) {
	clear(p)
	return len(p), nil
}
func (s *stripeImage) WriteAt(p []byte, off int64) (int, error) { return 0, disk.ErrReadOnly }

// typeAt is the type of the byte at off and where its run ends.
func (s *stripeImage) typeAt(off int64) (disk.ExtentType, int64) {
	if off < s.head {
		return disk.Data, s.head
	}
	k := (off - s.head) / s.stripe
	end := min(s.head+(k+1)*s.stripe, s.size)
	if k%2 == 0 {
		return disk.Hole, end
	}
	return disk.Data, end
}

func (s *stripeImage) Extents(off, n int64) ([]disk.Extent, error) {
	if err := disk.CheckRange(off, n, s.size); err != nil {
		return nil, err
	}
	s.asked.Add(n)
	var list []disk.Extent
	for end := off + n; off < end; {
		typ, next := s.typeAt(off)
		next = min(next, end)
		e := disk.Extent{Offset: off, Length: next - off, Type: typ}
		if typ == disk.Hole {
			e.Depth = 1
		}
		list = append(list, e)
		off = next
	}
	s.extents.Add(int64(len(list)))
	return list, nil
}

// descriptors decodes a block status chunk's payload.
func descriptors(t *testing.T, payload []byte) (id uint32, d []Descriptor) {
	t.Helper()
	if len(payload) < 4 || (len(payload)-4)%8 != 0 {
		t.Fatalf("block status payload of %d bytes", len(payload))
	}
	id = binary.BigEndian.Uint32(payload)
	for p := payload[4:]; len(p) > 0; p = p[8:] {
		d = append(d, Descriptor{Length: binary.BigEndian.Uint32(p), Flags: binary.BigEndian.Uint32(p[4:])})
	}
	return id, d
}

// blockStatusReply reads one block status reply with a single context.
func (r *raw) blockStatusReply(t *testing.T, cookie uint64) []Descriptor {
	t.Helper()
	c := r.chunk()
	if c.cookie != cookie || c.typ != replyTypeBlockStatus || c.flags != replyFlagDone {
		t.Fatalf("block status reply: cookie %d type %#x flags %#x %q", c.cookie, c.typ, c.flags, c.payload)
	}
	_, d := descriptors(t, c.payload)
	return d
}

// TestBlockStatusBounded asks a fragmented 1 GiB export for its whole
// allocation map, as qemu-img map does (REQ_ONE) and as nbdcopy does (no
// flags). The image must be asked about little more than what the reply
// carries: before, every request walked the whole GiB, so a map took
// time quadratic in the number of extents.
func TestBlockStatusBounded(t *testing.T) {
	const size, stripe = 1 << 30, 4096
	img := &stripeImage{size: size, stripe: stripe}
	ts := startServer(t, nil, Export{Image: img})
	r := dialRaw(t, ts.sock)
	r.connect("", true)

	// REQ_ONE: one descriptor, the first hole, and only a little asked.
	r.request(CmdBlockStatus, CmdFlagReqOne, 1, 0, size, nil)
	d := r.blockStatusReply(t, 1)
	if len(d) != 1 || d[0] != (Descriptor{Length: stripe, Flags: StateHole | StateZero}) {
		t.Fatalf("REQ_ONE reply %v, want one hole of %d", d, stripe)
	}
	if a := img.asked.Load(); a > 4<<20 {
		t.Fatalf("one REQ_ONE extent of %d bytes asked the image about %d bytes", stripe, a)
	}

	// Without REQ_ONE: a bounded number of descriptors, exact, and the
	// image asked about not much more than they cover.
	img.asked.Store(0)
	r.request(CmdBlockStatus, 0, 2, stripe, size-stripe, nil)
	d = r.blockStatusReply(t, 2)
	if len(d) == 0 || len(d) > maxDescriptors {
		t.Fatalf("%d descriptors", len(d))
	}
	covered := int64(0)
	for i, x := range d {
		want := Descriptor{Length: stripe}
		if i%2 == 1 {
			want.Flags = StateHole | StateZero
		}
		if x != want {
			t.Fatalf("descriptor %d: %v, want %v", i, x, want)
		}
		covered += int64(x.Length)
	}
	if a := img.asked.Load(); a > 2*covered+32<<20 {
		t.Fatalf("a reply covering %d bytes asked the image about %d bytes", covered, a)
	}

	// A long uniform run still comes back as one long REQ_ONE extent.
	const head = 600 << 20
	img2 := &stripeImage{size: size, head: head, stripe: stripe}
	ts2 := startServer(t, nil, Export{Image: img2})
	r2 := dialRaw(t, ts2.sock)
	r2.connect("", true)
	r2.request(CmdBlockStatus, CmdFlagReqOne, 3, 4096, size-4096, nil)
	if d := r2.blockStatusReply(t, 3); len(d) != 1 || d[0] != (Descriptor{Length: head - 4096}) {
		t.Fatalf("REQ_ONE over a long data run: %v, want data of %d", d, head-4096)
	}
	if a := img2.asked.Load(); a > 2*head {
		t.Fatalf("a REQ_ONE extent of %d bytes asked the image about %d bytes", head, a)
	}
}

// TestBlockStatusMemory is a client that sends block status requests
// for a fragmented export and never reads the replies: the memory the
// server holds for them stays within the connection's memory limit.
// Before, each of the workers held every extent of up to 1 GiB.
func TestBlockStatusMemory(t *testing.T) {
	const size, limit = 512 << 20, MaxPayload
	img := &stripeImage{size: size, stripe: 4096}
	ts := startServer(t, func(s *Server) { s.ConnMemory = limit; s.Workers = 32 }, Export{Image: img})

	var ms runtime.MemStats
	runtime.GC()
	runtime.ReadMemStats(&ms)
	base := ms.HeapAlloc

	r := dialRaw(t, ts.sock)
	r.connect("", true)
	r.c.SetWriteDeadline(time.Now().Add(time.Second))
	var hdr [requestLen]byte
	for i := uint64(0); i < 4096; i++ {
		encodeRequest(hdr[:], request{typ: CmdBlockStatus, cookie: i, length: size})
		if _, err := r.c.Write(hdr[:]); err != nil {
			break
		}
	}
	// The workers take their time on two CPUs: sample the heap for a
	// while and keep the peak.
	peak := uint64(0)
	for range 30 {
		time.Sleep(50 * time.Millisecond)
		runtime.GC()
		runtime.ReadMemStats(&ms)
		peak = max(peak, ms.HeapAlloc)
	}
	if grown := int64(peak) - int64(base); grown > 3*limit {
		t.Fatalf("a client that does not read its block status replies made the heap grow by %d MiB; the connection's limit is %d MiB",
			grown>>20, limit>>20)
	}
	t.Logf("heap grew by at most %d MiB", (int64(peak)-int64(base))>>20)
	// Other clients are served meanwhile.
	c := ts.dial(t, nil)
	if _, err := c.BlockStatus(0, 1<<20, CmdFlagReqOne); err != nil {
		t.Fatal(err)
	}
	r.c.Close()
}

// TestDeadConnectionRequestsDropped pipelines writes behind two that
// hang in the image, then shuts the server down with a deadline already
// past, which closes the connection: only the two running writes reach
// the image; the ones read and queued behind them are dropped, since no
// reply can reach their client. Before, every queued request still ran
// after the connection was gone, so Shutdown could wait far longer than
// its context allowed.
func TestDeadConnectionRequestsDropped(t *testing.T) {
	const workers, sent = 2, 8
	g := &gateImage{newMemImage(1<<20, 512, nil), make(chan struct{}, sent), make(chan struct{})}
	ts := startServer(t, func(s *Server) { s.Workers = workers }, Export{Image: g})
	r := dialRaw(t, ts.sock)
	r.connect("", true)
	data := bytes.Repeat([]byte{0x3c}, 4096)
	for i := range sent {
		r.request(CmdWrite, 0, uint64(i), uint64(i)*4096, 4096, data)
	}
	for range workers {
		<-g.entered
	}
	// Wait until the reader has taken as many writes as it can hold
	// (the workers', the queue's and its own), each reserving its payload.
	c := onlyConn(t, ts.Server)
	mem := ts.connMemory()
	for deadline := time.Now().Add(10 * time.Second); ; {
		c.budget.mu.Lock()
		held := mem - c.budget.avail
		c.budget.mu.Unlock()
		if held >= (2*workers+1)*4096 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("the server read %d bytes of writes, want %d", held, (2*workers+1)*4096)
		}
		time.Sleep(time.Millisecond)
	}

	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	done := make(chan error, 1)
	go func() { done <- ts.Shutdown(ctx) }()
	r.expectClosed()
	close(g.release)
	if err := <-done; !errors.Is(err, context.Canceled) {
		t.Fatalf("shutdown: %v", err)
	}
	if n := g.writes.Load(); n != workers {
		t.Fatalf("%d writes reached the image after their connection was closed, want only the %d running", n, workers)
	}
}

// onlyConn returns the server's one connection.
func onlyConn(t *testing.T, s *Server) *conn {
	t.Helper()
	s.mu.Lock()
	defer s.mu.Unlock()
	if len(s.conns) != 1 {
		t.Fatalf("%d connections, want 1", len(s.conns))
	}
	for c := range s.conns {
		return c
	}
	return nil
}

// TestOptionErrorLength sends names and queries whose quoted form in an
// error message is four times their length: the messages stay within the
// protocol's 4096-byte limit for strings.
func TestOptionErrorLength(t *testing.T) {
	ts := startServer(t, nil, Export{Name: "d", Image: newMemImage(1<<20, 512, nil)})
	r := dialRaw(t, ts.sock)
	r.greet(clientFlagFixedNewstyle | clientFlagNoZeroes)
	long := string(bytes.Repeat([]byte{1}, maxString))
	check := func(what string, msg []byte) {
		t.Helper()
		if len(msg) > maxString {
			t.Fatalf("%s: error message of %d bytes", what, len(msg))
		}
		if len(msg) == 0 {
			t.Fatalf("%s: no error message", what)
		}
	}
	r.option(optInfo, infoData(long))
	check("INFO of an unknown export", r.expectOpt(optInfo, repErrUnknown))
	r.option(optGo, infoData(long))
	check("GO of an unknown export", r.expectOpt(optGo, repErrUnknown))
	r.option(optListMetaContext, metaData(long))
	check("meta contexts of an unknown export", r.expectOpt(optListMetaContext, repErrUnknown))
	r.option(optListMetaContext, metaData("d", long))
	check("a query without namespace", r.expectOpt(optListMetaContext, repErrInvalid))
	r.goExport("d")
}

// closableImage fails the test's check when it is used after Close.
type closableImage struct {
	*gateImage
	closed atomic.Bool
	late   atomic.Int64 // calls after Close
	gate   atomic.Bool  // WriteAt waits at the gate
}

func (c *closableImage) use() {
	if c.closed.Load() {
		c.late.Add(1)
	}
}
func (c *closableImage) Close() error { c.closed.Store(true); return nil }
func (c *closableImage) Size() int64  { c.use(); return c.memImage.Size() }
func (c *closableImage) Flush() error { c.use(); return c.memImage.Flush() }
func (c *closableImage) ReadAt(p []byte, off int64) (int, error) {
	c.use()
	return c.memImage.ReadAt(p, off)
}
func (c *closableImage) WriteAt(p []byte, off int64) (int, error) {
	if c.gate.Load() {
		n, err := c.gateImage.WriteAt(p, off)
		c.use()
		return n, err
	}
	c.use()
	return c.memImage.WriteAt(p, off)
}
func (c *closableImage) Extents(off, n int64) ([]disk.Extent, error) {
	c.use()
	return c.memImage.Extents(off, n)
}
func (c *closableImage) Trim(off, n int64) error { c.use(); return c.memImage.Trim(off, n) }
func (c *closableImage) WriteZeroes(off, n int64, mayUnmap bool) error {
	c.use()
	return c.memImage.WriteZeroes(off, n, mayUnmap)
}

// TestRemovedExport removes an export under a connected client and
// closes its image, as the host does when it deletes a machine: the
// client's requests fail or its connection ends, nothing touches the
// closed image, and RemoveExport waits for the request running on the
// image. Before, the connection kept answering block status from the
// closed image.
func TestRemovedExport(t *testing.T) {
	img := &closableImage{gateImage: &gateImage{newMemImage(4<<20, 512, nil), make(chan struct{}, 4), make(chan struct{})}}
	ts := startServer(t, nil, Export{Name: "vm", Image: img}, Export{Name: "other", Image: newMemImage(1<<20, 512, nil)})
	r := dialRaw(t, ts.sock)
	r.connect("vm", true)
	r.request(CmdWrite, 0, 1, 0, 4096, bytes.Repeat([]byte{9}, 4096))
	if e := r.structuredErr(1); e != 0 {
		t.Fatal(e)
	}
	// A client half way through its handshake, having chosen contexts
	// for the export.
	half := dialRaw(t, ts.sock)
	half.greet(clientFlagFixedNewstyle | clientFlagNoZeroes)
	half.option(optStructuredReply, nil)
	half.expectOpt(optStructuredReply, repAck)
	half.option(optSetMetaContext, metaData("vm", ContextBaseAllocation))
	half.expectOpt(optSetMetaContext, repMetaContext)
	half.expectOpt(optSetMetaContext, repAck)

	// A write hangs in the image when the export is removed.
	img.gate.Store(true)
	r.request(CmdWrite, 0, 2, 4096, 4096, bytes.Repeat([]byte{7}, 4096))
	<-img.entered
	removed := make(chan bool, 1)
	go func() {
		ok := ts.RemoveExport("vm")
		img.Close() // what the host does next
		removed <- ok
	}()
	early := false
	var ok bool
	select {
	case ok = <-removed:
		t.Error("RemoveExport returned while a request was running on the image")
		early = true
	case <-time.After(200 * time.Millisecond):
	}
	close(img.release)
	if !early {
		ok = <-removed
	}
	if !ok {
		t.Fatal("RemoveExport did not find the export")
	}

	// Whatever the client sends now fails or finds the connection gone;
	// none of it reaches the image.
	for i, typ := range []uint16{CmdBlockStatus, CmdRead, CmdWrite, CmdFlush, CmdTrim} {
		var payload []byte
		if typ == CmdWrite {
			payload = make([]byte, 4096)
		}
		b := make([]byte, requestLen, requestLen+len(payload))
		encodeRequest(b, request{typ: typ, cookie: uint64(10 + i), length: 4096})
		if _, err := r.c.Write(append(b, payload...)); err != nil {
			break
		}
	}
	r.c.SetReadDeadline(time.Now().Add(10 * time.Second))
	for {
		var h [chunkHeaderLen]byte
		if err := r.tryRead(h[:]); err != nil {
			break // the server hung up
		}
		n := binary.BigEndian.Uint32(h[16:])
		p := r.read(int(n))
		typ := binary.BigEndian.Uint16(h[6:])
		cookie := binary.BigEndian.Uint64(h[8:])
		if cookie >= 10 && typ&(1<<15) == 0 {
			t.Fatalf("request %d on a removed export succeeded: chunk type %d %q", cookie, typ, p)
		}
	}
	if n := img.late.Load(); n != 0 {
		t.Fatalf("%d calls reached the image after its export was removed and it was closed", n)
	}
	// The client in its handshake cannot reach it either.
	half.option(optGo, infoData("vm"))
	if typ, _ := half.optReply(optGo); typ != repErrUnknown {
		t.Fatalf("GO of a removed export: reply %#x", typ)
	}
	if n := ts.Clients("vm"); n != 0 {
		t.Fatalf("%d clients left on the removed export", n)
	}
	// Other exports are untouched.
	o := ts.dial(t, &ClientOptions{Export: "other"})
	if _, err := o.ReadAt(make([]byte, 512), 0); err != nil {
		t.Fatal(err)
	}
}

// tryRead fills b, or returns the error that stopped it.
func (r *raw) tryRead(b []byte) error {
	_, err := io.ReadFull(r.c, b)
	return err
}

// trimImage records how the server passes TRIM and WRITE_ZEROES on.
type trimImage struct {
	*memImage
	mu    sync.Mutex
	calls []string
}

func (m *trimImage) record(call string) {
	m.mu.Lock()
	defer m.mu.Unlock()
	m.calls = append(m.calls, call)
}

func (m *trimImage) Trim(off, n int64) error {
	m.record("trim")
	return m.memImage.Trim(off, n)
}

func (m *trimImage) WriteZeroes(off, n int64, mayUnmap bool) error {
	if mayUnmap {
		m.record("zero may-unmap")
	} else {
		m.record("zero keep")
	}
	return m.memImage.WriteZeroes(off, n, mayUnmap)
}

// TestTrimAndZeroSemantics checks that TRIM reaches the image's Trim and
// WRITE_ZEROES its WriteZeroes, allowed to release space (unmap) unless
// the client set NO_HOLE: how a VHDX frees its blocks.
func TestTrimAndZeroSemantics(t *testing.T) {
	img := &trimImage{memImage: newMemImage(1<<20, 512, nil)}
	ts := startServer(t, func(s *Server) { s.Workers = 1 }, Export{Image: img})
	r := dialRaw(t, ts.sock)
	r.connect("", true)
	for i, req := range []struct{ typ, flags uint16 }{
		{CmdTrim, 0}, {CmdWriteZeroes, 0}, {CmdWriteZeroes, CmdFlagNoHole},
		{CmdWriteZeroes, CmdFlagFastZero}, {CmdWriteZeroes, CmdFlagNoHole | CmdFlagFastZero}, {CmdTrim, CmdFlagFUA},
	} {
		r.request(req.typ, req.flags, uint64(i), 0, memChunk, nil)
		if e := r.structuredErr(uint64(i)); e != 0 {
			t.Fatalf("request %d: %v", i, e)
		}
	}
	want := []string{"trim", "zero may-unmap", "zero keep", "zero may-unmap", "zero keep", "trim"}
	img.mu.Lock()
	defer img.mu.Unlock()
	if len(img.calls) != len(want) {
		t.Fatalf("calls %q, want %q", img.calls, want)
	}
	for i := range want {
		if img.calls[i] != want[i] {
			t.Fatalf("calls %q, want %q", img.calls, want)
		}
	}
}

// TestQemuImgMapFragmented maps a fragmented export with qemu-img, which
// asks with REQ_ONE from every extent's start: the map is exact and the
// image returns a bounded number of extents per range mapped. Before,
// each request listed every extent to the end of the export (up to
// 1 GiB), so mapping took time quadratic in the number of extents.
func TestQemuImgMapFragmented(t *testing.T) {
	testenv.Tool(t, "qemu-img")
	const size, stripe = 16 << 20, 4096
	img := &stripeImage{size: size, stripe: stripe}
	ts := startServer(t, nil, Export{Name: "d", Image: img, ReadOnly: true})
	type ext struct {
		Start  int64 `json:"start"`
		Length int64 `json:"length"`
		Data   bool  `json:"data"`
	}
	var m []ext
	js := run(t, 120*time.Second, nil, "qemu-img", "map", "-f", "raw", "--output=json", ts.uri("d"))
	if err := json.Unmarshal([]byte(js), &m); err != nil {
		t.Fatalf("%v\n%s", err, js)
	}
	if len(m) != size/stripe {
		t.Fatalf("qemu-img map has %d ranges, want %d", len(m), size/stripe)
	}
	for i, e := range m {
		if e != (ext{int64(i) * stripe, stripe, i%2 == 1}) {
			t.Fatalf("range %d: %+v", i, e)
		}
	}
	if n := img.extents.Load(); n > 64*int64(len(m)) {
		t.Fatalf("mapping %d ranges made the image list %d extents", len(m), n)
	}
}
