package nbd

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"sort"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/vhdkit/vhdkit/disk"
)

// ErrServerClosed is returned by Serve and ServeConn after Shutdown or Close.
var ErrServerClosed = errors.New("nbd: server closed")

// ErrTooManyConnections is ServeConn's error for a connection beyond
// Server.MaxConns, closed before the greeting.
var ErrTooManyConnections = errors.New("nbd: too many connections")

// Export is one named disk offered by a Server.
type Export struct {
	// Name is what clients ask for. The empty name is the default export
	// (nbd+unix:///?socket=… asks for it).
	Name string
	// Description is shown by clients that list exports (optional).
	Description string
	// Image is the disk served. Every connection to the export shares it,
	// so a FLUSH on any connection covers writes acknowledged on all of
	// them (the export advertises NBD_FLAG_CAN_MULTI_CONN). The server
	// never closes it.
	Image disk.Image
	// ReadOnly refuses writes, trims and zeroing with EPERM.
	ReadOnly bool
}

// export is an Export with its optional capabilities resolved once.
type export struct {
	Export
	trimmer  disk.Trimmer
	zeroer   disk.Zeroer
	extenter disk.Extenter
	minBlock uint32

	// use is held shared by whatever runs on Image (a request's image
	// calls, never the sending of its reply, which a client can stall)
	// and exclusively by RemoveExport while it marks the export gone, so
	// that once RemoveExport returns nothing reaches Image: its owner may
	// close it.
	use  sync.RWMutex
	gone bool // under use
	// leaving is set when RemoveExport begins, so that a long request
	// (zeroing a large range with buffers) stops instead of holding it up.
	leaving atomic.Bool
	// removed is set under Server.mu with the export's removal from the
	// map: no connection attaches to it afterwards.
	removed bool
}

// acquire reports whether the image may be used, and if so holds it until
// release.
func (x *export) acquire() bool {
	x.use.RLock()
	if x.gone {
		x.use.RUnlock()
		return false
	}
	return true
}

func (x *export) release() { x.use.RUnlock() }

// imageSize is the image's size, unless the export is gone.
func (x *export) imageSize() (int64, bool) {
	if !x.acquire() {
		return 0, false
	}
	defer x.release()
	return x.Image.Size(), true
}

// errExportGone is the message of requests refused once their export was
// removed.
const errExportGone = "export removed"

func newExport(e Export) (*export, error) {
	if e.Image == nil {
		return nil, errors.New("nbd: export has no image")
	}
	if len(e.Name) > maxString || len(e.Description) > maxString {
		return nil, errors.New("nbd: export name or description longer than 4096 bytes")
	}
	x := &export{Export: e, minBlock: 512}
	x.trimmer, _ = e.Image.(disk.Trimmer)
	x.zeroer, _ = e.Image.(disk.Zeroer)
	x.extenter, _ = e.Image.(disk.Extenter)
	if ss, ok := e.Image.(disk.SectorSizer); ok {
		n := ss.LogicalSectorSize()
		if n < 1 || n > 65536 || n&(n-1) != 0 {
			return nil, fmt.Errorf("nbd: logical sector size %d is not a power of two up to 64 KiB", n)
		}
		x.minBlock = uint32(n)
	}
	return x, nil
}

// transmissionFlags are the export's flags for a connection; DF depends
// on whether that connection negotiated structured replies.
func (x *export) transmissionFlags(structured bool) uint16 {
	f := uint16(FlagHasFlags | FlagSendFlush | FlagSendFUA | FlagCanMultiConn | FlagSendCache)
	if x.ReadOnly {
		f |= FlagReadOnly
	} else {
		// TRIM without a Trimmer is accepted as a no-op (it is a hint);
		// WRITE_ZEROES without a Zeroer writes zero buffers, and then
		// FAST_ZERO fails quickly with ENOTSUP as the spec asks.
		f |= FlagSendTrim | FlagSendWriteZeroes | FlagSendFastZero
	}
	if structured {
		f |= FlagSendDF
	}
	return f
}

func (x *export) blockSizes() (min, pref, max uint32) {
	pref = preferredBlock
	if x.minBlock > pref {
		pref = x.minBlock
	}
	return x.minBlock, pref, MaxPayload
}

// Server serves exports over the NBD protocol (fixed newstyle handshake,
// structured replies, metadata contexts, STARTTLS).
//
// Set the configuration fields before the first Serve; add exports at any
// time. A Server must not be copied after first use.
type Server struct {
	// TLSConfig, when set, lets clients upgrade with NBD_OPT_STARTTLS.
	// It needs at least one certificate.
	TLSConfig *tls.Config
	// TLSRequired refuses every option but STARTTLS and ABORT until TLS
	// is up (the spec's FORCEDTLS mode). It needs TLSConfig.
	TLSRequired bool
	// Logger receives connection-level events; nil discards them.
	Logger *slog.Logger
	// HandshakeTimeout bounds the whole option haggling phase of a
	// connection, so idle or slow clients cannot pin it; 0 means 30 s.
	// (The number of options and their bytes are bounded too, by
	// constants.) The transmission phase has no timeout: guests may idle
	// for days.
	HandshakeTimeout time.Duration
	// Workers is the number of requests one connection executes
	// concurrently; 0 means 16. Further requests wait in the socket.
	Workers int
	// ConnMemory bounds the payload bytes (write data being executed,
	// read data being sent, block status replies and the extents they
	// are made from) held by one connection; 0 means 64 MiB. Values
	// below MaxPayload are raised to it.
	ConnMemory int
	// MaxConns bounds the connections served at once; 0 means 1024.
	// One more is closed before the greeting (clients see the
	// connection end) and logged. With ConnMemory it bounds what all
	// clients together can make the server hold: MaxConns × ConnMemory
	// of payload, plus less than 256 KiB of buffers and goroutines each
	// (see the package documentation).
	MaxConns int

	mu        sync.Mutex
	exports   map[string]*export
	listeners map[net.Listener]struct{}
	conns     map[*conn]struct{}
	closing   atomic.Bool
	idle      chan struct{} // closed and replaced when conns becomes empty
}

// AddExport makes e available to new connections. The name must be unused.
func (s *Server) AddExport(e Export) error {
	x, err := newExport(e)
	if err != nil {
		return err
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.exports == nil {
		s.exports = make(map[string]*export)
	}
	if _, dup := s.exports[e.Name]; dup {
		return fmt.Errorf("nbd: export %q already exists", e.Name)
	}
	s.exports[e.Name] = x
	return nil
}

// RemoveExport removes the export, after which nothing reaches its image:
// the caller may close it once RemoveExport returns. New connections no
// longer find it; connections using it, or half way through choosing it,
// stop reading requests (as Disconnect does) and end once the requests
// they have read are answered: the requests running on the image finish,
// and RemoveExport waits for them; the others fail with ESHUTDOWN. It
// reports whether the export existed.
func (s *Server) RemoveExport(name string) bool {
	// 1. Out of the map, and marked so that a connection which looked it
	//    up before cannot attach to it any more.
	s.mu.Lock()
	x := s.exports[name]
	if x == nil {
		s.mu.Unlock()
		return false
	}
	delete(s.exports, name)
	x.removed = true
	var users []*conn
	for c := range s.conns {
		c.mu.Lock()
		if c.x == x {
			users = append(users, c)
		}
		c.mu.Unlock()
	}
	s.mu.Unlock()
	// 2. Its connections read no further requests.
	x.leaving.Store(true)
	for _, c := range users {
		c.stopReading()
	}
	// 3. Wait for the image calls running, and mark the export gone: the
	//    requests still queued, and the replies being sent, do not touch
	//    the image.
	x.use.Lock()
	x.gone = true
	x.use.Unlock()
	return true
}

// Clients counts the connections in the transmission phase on the export
// name: the clients that may read or write it. Connections still ending
// after their export was removed are not counted: they reach no image.
func (s *Server) Clients(name string) int {
	return len(s.clientsOf(name))
}

func (s *Server) clientsOf(name string) []*conn {
	s.mu.Lock()
	defer s.mu.Unlock()
	x := s.exports[name]
	if x == nil {
		return nil
	}
	var out []*conn
	for c := range s.conns {
		c.mu.Lock()
		if c.x == x {
			out = append(out, c)
		}
		c.mu.Unlock()
	}
	return out
}

// Disconnect ends the connections to the export name, as Shutdown ends
// all of them: it stops reading their requests, lets those already read
// finish and send their replies, and waits for the connections to close;
// when ctx ends first, it closes the rest abruptly. It reports how many
// connections it ended. The export itself stays (RemoveExport hides it).
func (s *Server) Disconnect(ctx context.Context, name string) int {
	conns := s.clientsOf(name)
	for _, c := range conns {
		c.stopReading()
	}
	for _, c := range conns {
		select {
		case <-c.done:
		case <-ctx.Done():
			c.abort()
			<-c.done
		}
	}
	return len(conns)
}

func (s *Server) lookup(name string) *export {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.exports[name]
}

// exportList returns the exports sorted by name, for NBD_OPT_LIST.
func (s *Server) exportList() []*export {
	s.mu.Lock()
	list := make([]*export, 0, len(s.exports))
	for _, x := range s.exports {
		list = append(list, x)
	}
	s.mu.Unlock()
	sort.Slice(list, func(i, j int) bool { return list[i].Name < list[j].Name })
	return list
}

func (s *Server) logger() *slog.Logger {
	if s.Logger != nil {
		return s.Logger
	}
	return slog.New(slog.DiscardHandler)
}

func (s *Server) handshakeTimeout() time.Duration {
	if s.HandshakeTimeout > 0 {
		return s.HandshakeTimeout
	}
	return 30 * time.Second
}

// handshakeLimits are the most options, and bytes of options, one
// handshake may send: maxHandshakeOptions and maxHandshakeBytes, and room
// for a client that asks about every export.
func (s *Server) handshakeLimits() (options int, bytes uint64) {
	s.mu.Lock()
	n := len(s.exports)
	s.mu.Unlock()
	return maxHandshakeOptions + n*perExportOptions, maxHandshakeBytes + uint64(n)*perExportBytes
}

func (s *Server) workers() int {
	if s.Workers > 0 {
		return s.Workers
	}
	return 16
}

func (s *Server) maxConns() int {
	if s.MaxConns > 0 {
		return s.MaxConns
	}
	return 1024
}

func (s *Server) connMemory() int64 {
	n := int64(s.ConnMemory)
	if n == 0 {
		n = 64 << 20
	}
	if n < MaxPayload {
		n = MaxPayload
	}
	return n
}

// Serve accepts connections on l and serves each in its own goroutine
// until Shutdown or Close, then returns ErrServerClosed. Any listener
// works: a unix or TCP socket, or one inherited through systemd socket
// activation (net.FileListener on fd 3). Serve closes l when it returns.
func (s *Server) Serve(l net.Listener) error {
	if s.TLSRequired && s.TLSConfig == nil {
		l.Close()
		return errors.New("nbd: TLSRequired without TLSConfig")
	}
	if !s.trackListener(l, true) {
		l.Close()
		return ErrServerClosed
	}
	defer s.trackListener(l, false)
	defer l.Close()
	var backoff time.Duration
	for {
		c, err := l.Accept()
		if err != nil {
			if s.closing.Load() {
				return ErrServerClosed
			}
			if temporaryAcceptError(err) {
				// Out of file descriptors and the like: wait, do not spin.
				backoff = min(max(2*backoff, 5*time.Millisecond), time.Second)
				s.logger().Warn("nbd: accept", "err", err, "retry", backoff)
				time.Sleep(backoff)
				continue
			}
			return err
		}
		backoff = 0
		go s.ServeConn(c)
	}
}

// ServeConn serves one already-connected client (for instance a socket
// passed by inetd-style activation) and returns when it disconnects. It
// closes c.
func (s *Server) ServeConn(c net.Conn) error {
	if s.TLSRequired && s.TLSConfig == nil {
		c.Close()
		return errors.New("nbd: TLSRequired without TLSConfig")
	}
	cn := newConn(s, c)
	if err := s.trackConn(cn, true); err != nil {
		if errors.Is(err, ErrTooManyConnections) {
			s.logger().Warn("nbd: connection refused", "remote", remoteName(c), "connections", s.maxConns())
		}
		c.Close()
		return err
	}
	defer s.trackConn(cn, false)
	err := cn.serve()
	var limit *handshakeLimitError
	switch {
	case errors.As(err, &limit):
		s.logger().Warn("nbd: connection refused", "remote", remoteName(c), "err", err)
	case err != nil && !s.closing.Load():
		s.logger().Debug("nbd: connection ended", "remote", remoteName(c), "err", err)
	}
	return err
}

// temporaryAcceptError reports errors after which accepting again can
// succeed: out of file descriptors or a timeout.
func temporaryAcceptError(err error) bool {
	var ne net.Error
	if errors.As(err, &ne) && ne.Timeout() {
		return true
	}
	return errors.Is(err, syscall.EMFILE) || errors.Is(err, syscall.ENFILE) ||
		errors.Is(err, syscall.ENOBUFS) || errors.Is(err, syscall.ENOMEM) ||
		errors.Is(err, syscall.ECONNABORTED)
}

func remoteName(c net.Conn) string {
	if a := c.RemoteAddr(); a != nil && a.String() != "" {
		return a.String()
	}
	return "local"
}

func (s *Server) trackListener(l net.Listener, add bool) bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	if add {
		if s.closing.Load() {
			return false
		}
		if s.listeners == nil {
			s.listeners = make(map[net.Listener]struct{})
		}
		s.listeners[l] = struct{}{}
	} else {
		delete(s.listeners, l)
	}
	return true
}

func (s *Server) trackConn(c *conn, add bool) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	if add {
		if s.closing.Load() {
			return ErrServerClosed
		}
		if len(s.conns) >= s.maxConns() {
			return ErrTooManyConnections
		}
		if s.conns == nil {
			s.conns = make(map[*conn]struct{})
		}
		s.conns[c] = struct{}{}
		return nil
	}
	delete(s.conns, c)
	close(c.done)
	if len(s.conns) == 0 && s.idle != nil {
		close(s.idle)
		s.idle = nil
	}
	return nil
}

// beginClose stops accepting and returns the live connections.
func (s *Server) beginClose() []*conn {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.closing.Store(true)
	for l := range s.listeners {
		l.Close()
	}
	conns := make([]*conn, 0, len(s.conns))
	for c := range s.conns {
		conns = append(conns, c)
	}
	return conns
}

// waitIdle returns a channel closed once no connection is left.
func (s *Server) waitIdle() <-chan struct{} {
	s.mu.Lock()
	defer s.mu.Unlock()
	if len(s.conns) == 0 {
		ch := make(chan struct{})
		close(ch)
		return ch
	}
	if s.idle == nil {
		s.idle = make(chan struct{})
	}
	return s.idle
}

// Shutdown stops the server gracefully: it closes the listeners, stops
// reading new requests, lets every request already read finish and send
// its reply, closes the connections, then flushes every export's image.
// If ctx ends first, the remaining connections are closed abruptly and
// Shutdown returns ctx.Err() (after still flushing the images). Images
// are not closed: they belong to the caller.
func (s *Server) Shutdown(ctx context.Context) error {
	for _, c := range s.beginClose() {
		c.stopReading()
	}
	var err error
	select {
	case <-s.waitIdle():
	case <-ctx.Done():
		err = ctx.Err()
		for _, c := range s.beginClose() {
			c.abort()
		}
		<-s.waitIdle()
	}
	return errors.Join(err, s.flushAll())
}

// Close closes the listeners and every connection at once, without
// waiting for requests in flight, and without flushing.
func (s *Server) Close() error {
	for _, c := range s.beginClose() {
		c.abort()
	}
	<-s.waitIdle()
	return nil
}

func (s *Server) flushAll() error {
	s.mu.Lock()
	var errs []error
	seen := make(map[disk.Image]bool)
	list := make([]*export, 0, len(s.exports))
	for _, x := range s.exports {
		list = append(list, x)
	}
	s.mu.Unlock()
	for _, x := range list {
		if x.ReadOnly || seen[x.Image] || !x.acquire() {
			continue // a removed export's image may be closed already
		}
		seen[x.Image] = true
		if err := x.Image.Flush(); err != nil {
			errs = append(errs, fmt.Errorf("nbd: flush export %q: %w", x.Name, err))
		}
		x.release()
	}
	return errors.Join(errs...)
}
