package main

import (
	"context"
	"crypto/tls"
	"errors"
	"flag"
	"fmt"
	"io/fs"
	"log/slog"
	"net"
	"net/url"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/vhdkit/vhdkit/nbd"
)

// nbdDefaultListen is where "vhdkit nbd" listens when told nothing else:
// loopback only, on NBD's registered port.
const nbdDefaultListen = "127.0.0.1:10809"

// nbdShutdownTimeout bounds the graceful part of a shutdown: a client that
// stops reading replies must not keep the image open for ever.
const nbdShutdownTimeout = 30 * time.Second

func nbdCommand() *command {
	return &command{
		name:     "nbd",
		synopsis: "[flags] FILE",
		summary:  "serve a virtual disk (or a differencing chain) over NBD, like qemu-nbd",
		help: `Serves FILE, a differencing image with its whole chain, to NBD clients (QEMU,
the Linux kernel's nbd-client, libnbd's nbdinfo, nbdcopy and nbdsh, fio)
until SIGINT or SIGTERM. Then it finishes the requests in flight (for up to
30 seconds), flushes and closes the image, which is then consistent.

It listens on 127.0.0.1:10809 unless given --socket or --listen, or a
listening socket through systemd-style socket activation (LISTEN_PID and
LISTEN_FDS=1, the socket on fd 3), which is how "nbdinfo [ CMD ]" and
"nbdcopy [ CMD ] ..." start a server of their own. Otherwise it prints the
URI clients connect to as one line on stdout once it is listening. An
existing unix socket at --socket that nobody answers on is replaced.

The export is called NAME and is also the default export (the empty name),
so clients that ask for no name get it too. Every connection shares the
one open image (the export allows multiple connections) and a flush on any
of them makes every acknowledged write durable. --read-only opens the chain
without modifying any file and refuses writes with EPERM.

With --tls-cert and --tls-key, clients may upgrade to TLS (STARTTLS);
--tls-required refuses clients that do not.

What clients can make the server hold is bounded: --connection-memory of
request and reply payload per connection (64M; at least 32M, the largest
request), --handshake-timeout for a handshake (30s; also at most 1024
options and 4 MiB of them), and --max-connections clients at once (1024;
one more is closed before the greeting and logged). In all, at most
max-connections x (connection-memory + 256 KiB).

Examples:
  vhdkit nbd --socket /run/disk.sock disk.vhdx
  qemu-system-x86_64 ... -blockdev driver=nbd,server.type=unix,server.path=/run/disk.sock,node-name=d0 -device virtio-blk-pci,drive=d0
  vhdkit nbd --listen 0.0.0.0:10809 --export disk --read-only child.avhdx
  nbdinfo --json [ vhdkit nbd disk.vhdx ]
  nbdcopy [ vhdkit nbd --read-only disk.vhdx ] disk.raw
`,
		setup: func(fs *flag.FlagSet) func(context.Context, *cli, []string) error {
			var o nbdOptions
			fs.BoolVar(&o.readOnly, "read-only", false, "open the image read-only and refuse writes")
			fs.StringVar(&o.socket, "socket", "", "listen on the unix socket `PATH`")
			fs.StringVar(&o.listen, "listen", "", "listen on TCP `HOST:PORT` (default "+nbdDefaultListen+")")
			fs.StringVar(&o.export, "export", "", "export `NAME` (the image is also the default export)")
			fs.StringVar(&o.tlsCert, "tls-cert", "", "offer TLS with the PEM certificate (chain) in `FILE`")
			fs.StringVar(&o.tlsKey, "tls-key", "", "the PEM private key of --tls-cert in `FILE`")
			fs.BoolVar(&o.tlsRequired, "tls-required", false, "refuse clients that do not start TLS")
			o.limits.addFlags(fs, "")
			addInputFlags(fs, &o.in, false)
			return func(ctx context.Context, c *cli, args []string) error {
				if len(args) != 1 {
					return usagef("want exactly one FILE, got %d arguments", len(args))
				}
				return c.serveNBD(ctx, o, args[0])
			}
		},
	}
}

// nbdOptions are the flags of "vhdkit nbd".
type nbdOptions struct {
	readOnly        bool
	socket, listen  string
	export          string
	tlsCert, tlsKey string
	tlsRequired     bool
	limits          nbdLimits
	in              input // --format
}

// nbdLimits are the flags that bound what NBD clients can make a server
// hold (nbd.Server's MaxConns, HandshakeTimeout, ConnMemory), for both
// "vhdkit nbd" and "vhdkit serve" (there prefixed "nbd-").
type nbdLimits struct {
	prefix           string // of the flag names, for messages
	maxConns         int
	handshakeTimeout time.Duration
	connMemory       sizeValue
}

func (l *nbdLimits) addFlags(fs *flag.FlagSet, prefix string) {
	l.prefix = prefix
	fs.IntVar(&l.maxConns, prefix+"max-connections", 1024, "serve at most `N` clients at once; one more is closed before the greeting")
	fs.DurationVar(&l.handshakeTimeout, prefix+"handshake-timeout", 30*time.Second, "close a client that has not chosen an export within `DURATION`")
	fs.Var(&l.connMemory, prefix+"connection-memory", "hold at most `SIZE` of request and reply payload per client (default 64M, at least 32M)")
}

// apply checks the flags and sets them on srv.
func (l *nbdLimits) apply(srv *nbd.Server) error {
	if l.maxConns < 1 {
		return usagef("--%smax-connections %d: want at least 1", l.prefix, l.maxConns)
	}
	if l.handshakeTimeout <= 0 {
		return usagef("--%shandshake-timeout %v: want a positive duration", l.prefix, l.handshakeTimeout)
	}
	if l.connMemory.set && l.connMemory.n < nbd.MaxPayload {
		// A connection must be able to hold the largest request.
		return usagef("--%sconnection-memory %s: want at least 32M (a request may carry 32 MiB)", l.prefix, formatSize(l.connMemory.n))
	}
	if int64(int(l.connMemory.n)) != l.connMemory.n {
		return usagef("--%sconnection-memory %s: too large", l.prefix, formatSize(l.connMemory.n))
	}
	srv.MaxConns = l.maxConns
	srv.HandshakeTimeout = l.handshakeTimeout
	srv.ConnMemory = int(l.connMemory.n) // 0, the server's default, when not set
	return nil
}

func (c *cli) serveNBD(ctx context.Context, o nbdOptions, path string) (err error) {
	if o.socket != "" && o.listen != "" {
		return usagef("--socket and --listen exclude each other")
	}
	if (o.tlsCert == "") != (o.tlsKey == "") {
		return usagef("--tls-cert and --tls-key go together")
	}
	if o.tlsRequired && o.tlsCert == "" {
		return usagef("--tls-required needs --tls-cert and --tls-key")
	}
	activated, err := activatedListener()
	if err != nil {
		return err
	}
	if activated != nil {
		defer activated.Close() // Serve closes it too; closing twice is harmless
		if o.socket != "" || o.listen != "" {
			return usagef("a socket passed by socket activation (LISTEN_FDS) excludes --socket and --listen")
		}
	}

	srv := &nbd.Server{
		Logger: slog.New(slog.NewTextHandler(c.stderr, &slog.HandlerOptions{Level: slog.LevelWarn})),
	}
	if err := o.limits.apply(srv); err != nil {
		return err
	}
	if o.tlsCert != "" {
		cert, err := tls.LoadX509KeyPair(o.tlsCert, o.tlsKey)
		if err != nil {
			return fmt.Errorf("TLS certificate: %w", err)
		}
		srv.TLSConfig = &tls.Config{Certificates: []tls.Certificate{cert}, MinVersion: tls.VersionTLS12}
		srv.TLSRequired = o.tlsRequired
	}

	img, err := o.in.open(c, path, o.readOnly)
	if err != nil {
		return err
	}
	defer func() {
		if cerr := img.Close(); cerr != nil && err == nil {
			err = fmt.Errorf("close %s: %w", path, cerr)
		}
	}()
	for _, name := range uniqueNames(o.export, "") {
		e := nbd.Export{Name: name, Description: filepath.Base(path), Image: img, ReadOnly: o.readOnly}
		if err := srv.AddExport(e); err != nil {
			return err
		}
	}

	l := activated
	if l == nil {
		if l, err = nbdListen(o); err != nil {
			return err
		}
		fmt.Fprintln(c.stdout, nbdURI(l, o.export, srv.TLSConfig != nil))
	}

	serveErr := make(chan error, 1)
	go func() { serveErr <- srv.Serve(l) }()
	select {
	case <-ctx.Done():
	case err = <-serveErr:
		// The listener broke; stop serving the clients we have too.
		err = fmt.Errorf("accept: %w", err)
	}
	sctx, cancel := context.WithTimeout(context.Background(), nbdShutdownTimeout)
	defer cancel()
	serr := srv.Shutdown(sctx)
	if errors.Is(serr, context.DeadlineExceeded) {
		serr = fmt.Errorf("clients still busy after %v were disconnected: %w", nbdShutdownTimeout, serr)
	}
	if err == nil {
		<-serveErr // ErrServerClosed, now that Shutdown closed the listener
	}
	return errors.Join(err, serr)
}

// uniqueNames returns the distinct names among names, in order.
func uniqueNames(names ...string) []string {
	var out []string
	for _, n := range names {
		dup := false
		for _, o := range out {
			dup = dup || o == n
		}
		if !dup {
			out = append(out, n)
		}
	}
	return out
}

// activatedListener returns the listening socket handed over by
// systemd-style socket activation: LISTEN_PID names this process and
// LISTEN_FDS=1 says the socket is fd 3. It returns nil when the
// environment passes nothing to this process. The variables are removed
// so that they do not reach anything this process starts.
func activatedListener() (net.Listener, error) {
	pid, err := strconv.Atoi(os.Getenv("LISTEN_PID"))
	if err != nil || pid != os.Getpid() {
		return nil, nil
	}
	n := os.Getenv("LISTEN_FDS")
	for _, v := range []string{"LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"} {
		os.Unsetenv(v)
	}
	if n != "1" {
		return nil, fmt.Errorf("socket activation passed LISTEN_FDS=%q; vhdkit nbd takes exactly one socket", n)
	}
	const fd = 3 // SD_LISTEN_FDS_START
	syscall.CloseOnExec(fd)
	f := os.NewFile(fd, "LISTEN_FDS socket")
	l, err := net.FileListener(f) // a duplicate of fd 3
	f.Close()
	if err != nil {
		return nil, fmt.Errorf("socket activation: fd 3 is not a listening socket: %w", err)
	}
	return l, nil
}

// nbdListen opens the listener the flags ask for.
func nbdListen(o nbdOptions) (net.Listener, error) {
	if o.socket == "" {
		addr := o.listen
		if addr == "" {
			addr = nbdDefaultListen
		}
		return net.Listen("tcp", addr)
	}
	if err := removeStaleSocket(o.socket); err != nil {
		return nil, err
	}
	return net.Listen("unix", o.socket) // removed again when the listener closes
}

// removeStaleSocket removes a unix socket at path that no server answers
// on (left by a server that was killed), and refuses anything else there.
func removeStaleSocket(path string) error {
	fi, err := os.Lstat(path)
	if errors.Is(err, fs.ErrNotExist) {
		return nil
	}
	if err != nil {
		return err
	}
	if fi.Mode().Type() != fs.ModeSocket {
		return fmt.Errorf("%s exists and is not a socket", path)
	}
	conn, err := net.DialTimeout("unix", path, 5*time.Second)
	if err == nil {
		conn.Close()
		return fmt.Errorf("%s: another server is listening on it", path)
	}
	if !errors.Is(err, syscall.ECONNREFUSED) {
		return fmt.Errorf("%s: %w", path, err)
	}
	return os.Remove(path)
}

// nbdURI is the NBD URI (as libnbd and QEMU take) of the export on l.
func nbdURI(l net.Listener, export string, tlsOffered bool) string {
	u := url.URL{Scheme: "nbd", Path: "/" + export}
	if tlsOffered {
		u.Scheme = "nbds"
	}
	if a, ok := l.Addr().(*net.UnixAddr); ok {
		u.Scheme += "+unix"
		u.RawQuery = "socket=" + escapeSocketPath(a.Name)
	} else {
		u.Host = l.Addr().String()
	}
	return u.String()
}

// escapeSocketPath quotes a socket path for a URI query only where needed,
// so that ordinary paths stay readable.
func escapeSocketPath(p string) string {
	for _, r := range p {
		if !(r >= 'a' && r <= 'z' || r >= 'A' && r <= 'Z' || r >= '0' && r <= '9' || strings.ContainsRune("/._-~", r)) {
			return url.QueryEscape(p)
		}
	}
	return p
}
