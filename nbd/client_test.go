package nbd

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"math/rand/v2"
	"net"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/vhdkit/vhdkit/disk"
)

func TestClientReadWrite(t *testing.T) {
	img := newMemImage(4<<20, 512, nil)
	ts := startServer(t, nil, Export{Name: "d", Image: img})
	c := ts.dial(t, &ClientOptions{Export: "d"})
	if c.Size() != 4<<20 || !c.StructuredReplies() {
		t.Fatalf("size %d structured %v", c.Size(), c.StructuredReplies())
	}
	if min, pref, max := c.BlockSizes(); min != 512 || pref != 4096 || max != MaxPayload {
		t.Fatalf("block sizes %d %d %d", min, pref, max)
	}
	if len(c.MetaContexts()) != 2 {
		t.Fatalf("contexts %v", c.MetaContexts())
	}
	want := make([]byte, 1<<20)
	pattern(want, 512, 1)
	if _, err := c.WriteAt(want, 512); err != nil {
		t.Fatal(err)
	}
	got := make([]byte, len(want))
	if _, err := c.ReadAt(got, 512); err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(got, want) {
		t.Fatal("read back differs")
	}
	if !bytes.Equal(img.snapshot()[512:512+len(want)], want) {
		t.Fatal("image differs")
	}

	before := img.flushes.Load()
	if err := c.Flush(); err != nil {
		t.Fatal(err)
	}
	if err := c.Write(want[:4096], 0, CmdFlagFUA); err != nil {
		t.Fatal(err)
	}
	if n := img.flushes.Load() - before; n != 2 {
		t.Fatalf("flush + FUA write flushed %d times, want 2", n)
	}

	// A read spanning data and a large hole comes back right.
	big := make([]byte, 3<<20)
	for i := range big {
		big[i] = 0xee
	}
	if _, err := c.ReadAt(big, 0); err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(big, img.snapshot()[:3<<20]) {
		t.Fatal("read over holes differs")
	}

	// Reads and writes larger than the maximum payload are split.
	huge := make([]byte, MaxPayload+memChunk)
	pattern(huge, 0, 9)
	img2 := newMemImage(64<<20, 512, nil)
	ts2 := startServer(t, nil, Export{Image: img2})
	c2 := ts2.dial(t, nil)
	if _, err := c2.WriteAt(huge, 0); err != nil {
		t.Fatal(err)
	}
	back := make([]byte, len(huge))
	if _, err := c2.ReadAt(back, 0); err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(back, huge) {
		t.Fatal("split read/write differs")
	}
}

func TestClientTrimZeroExtents(t *testing.T) {
	parent := newMemImage(1<<20, 512, nil)
	data := make([]byte, memChunk)
	pattern(data, 0, 3)
	parent.WriteAt(data, 3*memChunk)
	img := newMemImage(1<<20, 512, parent)
	ts := startServer(t, nil, Export{Image: img})
	c := ts.dial(t, nil)

	if _, err := c.WriteAt(data, 0); err != nil {
		t.Fatal(err)
	}
	if _, err := c.WriteAt(data, 5*memChunk); err != nil {
		t.Fatal(err)
	}
	if err := c.Zero(memChunk, memChunk, CmdFlagNoHole); err != nil {
		t.Fatal(err)
	}
	if err := c.Trim(5*memChunk, memChunk); err != nil {
		t.Fatal(err)
	}
	exts, err := c.Extents(0, img.Size())
	if err != nil {
		t.Fatal(err)
	}
	want, _ := img.Extents(0, img.Size())
	for i := range want {
		if want[i].Type == disk.Hole {
			want[i].Depth = 0 // a client cannot know the chain's length
		}
	}
	if fmt.Sprint(exts) != fmt.Sprint(want) {
		t.Fatalf("extents\n got %v\nwant %v", exts, want)
	}
	// Chunk 3 comes from the parent: depth 1, qemu depth 2.
	st, err := c.BlockStatus(3*memChunk, memChunk, CmdFlagReqOne)
	if err != nil {
		t.Fatal(err)
	}
	if d := st[ContextAllocDepth]; len(d) != 1 || d[0] != (Descriptor{memChunk, 2}) {
		t.Fatalf("allocation depth %v", d)
	}
	if d := st[ContextBaseAllocation]; len(d) != 1 || d[0] != (Descriptor{memChunk, 0}) {
		t.Fatalf("allocation %v", d)
	}
	st, err = c.BlockStatus(6*memChunk, memChunk, 0)
	if err != nil {
		t.Fatal(err)
	}
	if d := st[ContextBaseAllocation]; d[0].Flags != StateHole|StateZero {
		t.Fatalf("hole %v", d)
	}
	if d := st[ContextAllocDepth]; d[0].Flags != 0 {
		t.Fatalf("hole depth %v", d)
	}
	// REQ_ONE never reports past the requested length.
	st, err = c.BlockStatus(6*memChunk, 512, CmdFlagReqOne)
	if err != nil {
		t.Fatal(err)
	}
	if d := st[ContextBaseAllocation]; len(d) != 1 || d[0].Length != 512 {
		t.Fatalf("req_one %v", d)
	}

	// A fast zero works on an image with a Zeroer.
	if err := c.Zero(0, memChunk, CmdFlagFastZero); err != nil {
		t.Fatal(err)
	}
	got := make([]byte, 1<<20)
	c.ReadAt(got, 0)
	if !bytes.Equal(got, img.snapshot()) {
		t.Fatal("contents differ")
	}
}

// TestClientPlainImage covers images without optional interfaces.
func TestClientPlainImage(t *testing.T) {
	mem := newMemImage(1<<20, 512, nil)
	ts := startServer(t, nil, Export{Image: plainImage{mem}})
	c := ts.dial(t, nil)
	data := make([]byte, 3*memChunk)
	pattern(data, 0, 5)
	c.WriteAt(data, 0)
	if err := c.Zero(4096, 8192, 0); err != nil {
		t.Fatal(err)
	}
	clear(data[4096 : 4096+8192])
	if err := c.Zero(0, 4096, CmdFlagFastZero); !errors.Is(err, ENOTSUP) {
		t.Fatalf("fast zero without Zeroer: %v", err)
	}
	if err := c.Trim(0, memChunk); err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(mem.snapshot()[:len(data)], data) {
		t.Fatal("contents differ")
	}
	exts, err := c.Extents(0, mem.Size())
	if err != nil {
		t.Fatal(err)
	}
	if len(exts) != 1 || exts[0].Type != disk.Data || exts[0].Length != mem.Size() {
		t.Fatalf("extents of a plain image %v", exts)
	}
}

func TestClientSimpleReplies(t *testing.T) {
	img := newMemImage(1<<20, 512, nil)
	ts := startServer(t, nil, Export{Image: img})
	c := ts.dial(t, &ClientOptions{NoStructuredReplies: true})
	if c.StructuredReplies() || c.Flags()&FlagSendDF != 0 {
		t.Fatal("structured replies negotiated")
	}
	data := make([]byte, 100000)
	pattern(data, 7, 7)
	if _, err := c.WriteAt(data, 7); err != nil {
		t.Fatal(err)
	}
	got := make([]byte, len(data))
	if _, err := c.ReadAt(got, 7); err != nil || !bytes.Equal(got, data) {
		t.Fatalf("read back: %v", err)
	}
	if _, err := c.BlockStatus(0, 4096, 0); !errors.Is(err, EINVAL) {
		t.Fatalf("block status without contexts: %v", err)
	}
	// The connection is still fine after an error.
	if err := c.Flush(); err != nil {
		t.Fatal(err)
	}
}

func TestClientReadOnly(t *testing.T) {
	img := newMemImage(1<<20, 512, nil)
	ts := startServer(t, nil, Export{Image: img, ReadOnly: true})
	c := ts.dial(t, nil)
	if c.Flags()&FlagReadOnly == 0 || c.Flags()&FlagSendTrim != 0 {
		t.Fatalf("flags %#x", c.Flags())
	}
	if _, err := c.WriteAt(make([]byte, 4096), 0); !errors.Is(err, EPERM) {
		t.Fatalf("write: %v", err)
	}
	if err := c.Trim(0, 4096); !errors.Is(err, EPERM) {
		t.Fatalf("trim: %v", err)
	}
	if err := c.Zero(0, 4096, 0); !errors.Is(err, EPERM) {
		t.Fatalf("zero: %v", err)
	}
	if _, err := c.ReadAt(make([]byte, 4096), 0); err != nil {
		t.Fatal(err)
	}
	if img.writes.Load() != 0 {
		t.Fatal("read-only image written")
	}
}

// TestManyInFlight runs many concurrent requests over several connections
// to one export, out of order, and checks the result against a model.
func TestManyInFlight(t *testing.T) {
	const (
		size    = 8 << 20
		workers = 32
		ops     = 60
		region  = size / workers
	)
	img := newMemImage(size, 512, nil)
	ts := startServer(t, func(s *Server) { s.Workers = 8 }, Export{Image: img})
	clients := []*Client{ts.dial(t, nil), ts.dial(t, nil), ts.dial(t, nil)}
	model := make([]byte, size)
	var wg sync.WaitGroup
	errc := make(chan error, workers)
	for w := range workers {
		wg.Add(1)
		go func() {
			defer wg.Done()
			c := clients[w%len(clients)]
			rng := rand.New(rand.NewPCG(uint64(w), 1))
			base := int64(w * region)
			mine := model[base : base+region]
			buf := make([]byte, 64<<10)
			for range ops {
				off := rng.Int64N(region/512) * 512
				n := min(int64(1+rng.IntN(128))*512, region-off)
				var err error
				switch rng.IntN(6) {
				case 0, 1:
					pattern(buf[:n], base+off, byte(rng.Uint32()))
					_, err = c.WriteAt(buf[:n], base+off)
					copy(mine[off:], buf[:n])
				case 2:
					err = c.Zero(base+off, n, uint16(rng.IntN(2))*CmdFlagNoHole)
					clear(mine[off : off+n])
				case 3:
					err = c.Flush()
				default:
					if _, err = c.ReadAt(buf[:n], base+off); err == nil && !bytes.Equal(buf[:n], mine[off:off+n]) {
						err = fmt.Errorf("worker %d: read at %d differs", w, base+off)
					}
				}
				if err != nil {
					errc <- err
					return
				}
			}
		}()
	}
	wg.Wait()
	close(errc)
	for err := range errc {
		t.Fatal(err)
	}
	if !bytes.Equal(img.snapshot(), model) {
		t.Fatal("image differs from model")
	}
}

// gateImage blocks writes until released, to hold requests in flight.
type gateImage struct {
	*memImage
	entered chan struct{}
	release chan struct{}
}

func (g *gateImage) WriteAt(p []byte, off int64) (int, error) {
	g.entered <- struct{}{}
	<-g.release
	return g.memImage.WriteAt(p, off)
}

func TestShutdownDrains(t *testing.T) {
	const inflight = 6
	g := &gateImage{newMemImage(1<<20, 512, nil), make(chan struct{}, inflight), make(chan struct{})}
	ts := startServer(t, nil, Export{Image: g})
	c := ts.dial(t, nil)
	errs := make(chan error, inflight)
	for i := range inflight {
		go func() {
			b := make([]byte, 4096)
			pattern(b, int64(i)*4096, 1)
			_, err := c.WriteAt(b, int64(i)*4096)
			errs <- err
		}()
	}
	for range inflight {
		<-g.entered
	}
	flushes := g.flushes.Load()
	done := make(chan error, 1)
	go func() { done <- ts.Shutdown(context.Background()) }()
	close(g.release)
	for range inflight {
		if err := <-errs; err != nil {
			t.Fatalf("in-flight write failed: %v", err)
		}
	}
	if err := <-done; err != nil {
		t.Fatal(err)
	}
	if g.flushes.Load() == flushes {
		t.Fatal("shutdown did not flush")
	}
	if err := c.Flush(); err == nil {
		t.Fatal("request after shutdown succeeded")
	}
	if _, err := net.Dial("unix", ts.sock); err == nil {
		t.Fatal("listener still accepting")
	}
}

func TestShutdownTimeout(t *testing.T) {
	g := &gateImage{newMemImage(1<<20, 512, nil), make(chan struct{}, 1), make(chan struct{})}
	ts := startServer(t, nil, Export{Image: g})
	c := ts.dial(t, nil)
	errc := make(chan error, 1)
	go func() {
		_, err := c.WriteAt(make([]byte, 512), 0)
		errc <- err
	}()
	<-g.entered
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	done := make(chan error, 1)
	go func() { done <- ts.Shutdown(ctx) }()
	// The blocked write cannot finish, so the client sees the hard close.
	if err := <-errc; err == nil {
		t.Fatal("write succeeded across an abrupt shutdown")
	}
	close(g.release)
	if err := <-done; !errors.Is(err, context.Canceled) {
		t.Fatalf("shutdown: %v", err)
	}
}

func TestTLSRequiredOwnClient(t *testing.T) {
	srvCfg, cliCfg, _ := testTLS(t)
	img := newMemImage(1<<20, 512, nil)
	ts := startServer(t, func(s *Server) { s.TLSConfig, s.TLSRequired = srvCfg, true }, Export{Image: img})
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	_, err := Dial(ctx, "unix", ts.sock, nil)
	var oe *OptionError
	if !errors.As(err, &oe) || oe.Reply != repErrTLSReqd {
		t.Fatalf("plain client against TLS-only server: %v", err)
	}
	c := ts.dial(t, &ClientOptions{TLSConfig: cliCfg})
	data := make([]byte, 70000)
	pattern(data, 0, 2)
	if _, err := c.WriteAt(data, 1000); err != nil {
		t.Fatal(err)
	}
	got := make([]byte, len(data))
	if _, err := c.ReadAt(got, 1000); err != nil || !bytes.Equal(got, data) {
		t.Fatalf("read over TLS: %v", err)
	}
	if _, err := c.BlockStatus(0, 1<<20, 0); err != nil {
		t.Fatal(err)
	}
	// Optional TLS: a server with TLS but not required serves both.
	ts2 := startServer(t, func(s *Server) { s.TLSConfig = srvCfg }, Export{Image: img})
	ts2.dial(t, nil)
	ts2.dial(t, &ClientOptions{TLSConfig: cliCfg})
}

// durableImage records, at each Flush, what a crash would keep.
type durableImage struct {
	*memImage
	mu      sync.Mutex
	durable []byte
}

func (d *durableImage) Flush() error {
	snap := d.snapshot()
	d.mu.Lock()
	d.durable = snap
	d.mu.Unlock()
	return d.memImage.Flush()
}

// TestMultiConnFlush: with one shared image per export, a FLUSH on one
// connection makes a write acknowledged on another durable and visible.
func TestMultiConnFlush(t *testing.T) {
	img := &durableImage{memImage: newMemImage(1<<20, 512, nil)}
	ts := startServer(t, nil, Export{Image: img})
	a, b := ts.dial(t, nil), ts.dial(t, nil)
	if a.Flags()&FlagCanMultiConn == 0 {
		t.Fatal("CAN_MULTI_CONN not advertised")
	}
	data := make([]byte, 8192)
	pattern(data, 0, 4)
	if _, err := a.WriteAt(data, 4096); err != nil {
		t.Fatal(err)
	}
	if err := b.Flush(); err != nil {
		t.Fatal(err)
	}
	img.mu.Lock()
	durable := img.durable
	img.mu.Unlock()
	if !bytes.Equal(durable[4096:4096+8192], data) {
		t.Fatal("write on one connection not durable after flush on another")
	}
	got := make([]byte, len(data))
	if _, err := b.ReadAt(got, 4096); err != nil || !bytes.Equal(got, data) {
		t.Fatalf("write not visible on the other connection: %v", err)
	}
}

// faultImage fails I/O beyond half the disk.
type faultImage struct{ *memImage }

func (f faultImage) ReadAt(p []byte, off int64) (int, error) {
	if off+int64(len(p)) > f.size/2 {
		return 0, syscall.EIO
	}
	return f.memImage.ReadAt(p, off)
}

func (f faultImage) WriteAt(p []byte, off int64) (int, error) {
	if off+int64(len(p)) > f.size/2 {
		return 0, fmt.Errorf("allocating: %w", syscall.ENOSPC)
	}
	return f.memImage.WriteAt(p, off)
}

func TestImageErrors(t *testing.T) {
	img := faultImage{newMemImage(1<<20, 512, nil)}
	ts := startServer(t, nil, Export{Image: img})
	for _, structured := range []bool{true, false} {
		c := ts.dial(t, &ClientOptions{NoStructuredReplies: !structured})
		if _, err := c.ReadAt(make([]byte, 4096), 1<<19); !errors.Is(err, EIO) {
			t.Fatalf("read error: %v", err)
		}
		if _, err := c.WriteAt(make([]byte, 4096), 1<<19); !errors.Is(err, ENOSPC) {
			t.Fatalf("write error: %v", err)
		}
		if _, err := c.ReadAt(make([]byte, 4096), 0); err != nil {
			t.Fatalf("read after errors: %v", err)
		}
	}
}

// TestShutdownHandshake: connections still negotiating are closed and do
// not hold Shutdown up.
func TestShutdownHandshake(t *testing.T) {
	ts := startServer(t, nil, Export{Image: newMemImage(1<<20, 512, nil)})
	r := dialRaw(t, ts.sock)
	r.greet(clientFlagFixedNewstyle)
	r.option(optList, nil)
	r.expectOpt(optList, repServer)
	r.expectOpt(optList, repAck)
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if err := ts.Shutdown(ctx); err != nil {
		t.Fatal(err)
	}
	r.expectClosed()
}

func TestHandshakeTimeout(t *testing.T) {
	ts := startServer(t, func(s *Server) { s.HandshakeTimeout = 50 * time.Millisecond }, Export{Image: newMemImage(1<<20, 512, nil)})
	r := dialRaw(t, ts.sock)
	r.read(18)
	r.expectClosed() // the client never sent its flags
	ts.dial(t, nil).Flush()
}
