package main

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"flag"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"time"

	"github.com/vhdkit/vhdkit/internal/api"
	"github.com/vhdkit/vhdkit/internal/host"
	"github.com/vhdkit/vhdkit/internal/web"
	"github.com/vhdkit/vhdkit/nbd"
)

func serveCommand() *command {
	return &command{
		name:     "serve",
		synopsis: "[--data DIR] [--nbd-socket PATH | --nbd HOST:PORT] [NBD limit flags] [--http HOST:PORT [--http-token-file FILE] [TLS flags]]",
		summary:  "run the host daemon: machines, checkpoints, live merge, NBD exports",
		help: `Runs the vhdkit host until SIGINT or SIGTERM. Its state (machines, disks,
checkpoint trees, jobs) lives in DIR: --data, else $VHDKIT_DATA, else
/var/lib/vhdkit for root and $XDG_STATE_HOME/vhdkit (~/.local/state/vhdkit)
for other users, the directory the vm, checkpoint and job commands look in
too, from any working directory. DIR is created on first use, its folders
mode 0700 and its files 0600; the management API listens on
DIR/vhdkit.sock. One daemon per DIR.

A machine whose files are missing, damaged or locked by another program
comes up "failed" (vhdkit vm show NAME says why) while the others serve;
vhdkit vm repair brings it back.

Each machine's disks are NBD exports: NAME for the first, NAME/1, NAME/2, ...
for the others, on --nbd-socket (default DIR/nbd.sock) or on --nbd, a TCP
address (loopback unless you say otherwise). On shutdown, requests in
flight finish, disks are flushed and closed, and running jobs stop at a
safe point; they resume when the daemon starts again, also after a crash.
What NBD clients can make the daemon hold is bounded as in vhdkit nbd:
--nbd-max-connections (1024), --nbd-handshake-timeout (30s),
--nbd-connection-memory (64M per client).

--http serves the web console (machines, checkpoint trees, live merges
with their progress, disk maps, the host's events) and the same API on a
TCP address: open http://HOST:PORT/ and log in with the token serve
prints, or the one in --http-token-file FILE (made, mode 0600, with a new
token when FILE does not exist). Scripts may send "Authorization: Bearer
TOKEN". An address other than loopback needs --http-token-file: the
console is the host's control plane. --http-tls-cert and --http-tls-key
serve it over HTTPS (otherwise it is plain HTTP: keep it on loopback or
put a TLS proxy in front of it); --http-client-ca FILE also requires a
client certificate signed by a CA in FILE, before the token. Checkpoint
exports through the console go to DIR/exports.

Examples:
  vhdkit serve --data /var/lib/vhdkit
  vhdkit serve --nbd 127.0.0.1:10809
  vhdkit serve --http 127.0.0.1:8080
  qemu-io -f raw 'nbd+unix:///web?socket=/var/lib/vhdkit/nbd.sock'
`,
		setup: func(fs *flag.FlagSet) func(context.Context, *cli, []string) error {
			data := fs.String("data", "", "data `DIR` (default $VHDKIT_DATA, else "+dataDirDefault+")")
			sock := fs.String("nbd-socket", "", "serve NBD on the unix socket `PATH` (default DIR/nbd.sock)")
			tcp := fs.String("nbd", "", "serve NBD on TCP `HOST:PORT` instead")
			verbose := fs.Bool("verbose", false, "log debug messages too")
			var limits nbdLimits
			limits.addFlags(fs, "nbd-")
			var con webConsole
			fs.StringVar(&con.addr, "http", "", "serve the web console and the API on TCP `HOST:PORT` (port 0: any free port)")
			fs.StringVar(&con.tokenFile, "http-token-file", "", "the console's token is in `FILE` (made with a new token if missing)")
			fs.StringVar(&con.tlsCert, "http-tls-cert", "", "serve the console over HTTPS with the PEM certificate (chain) in `FILE`")
			fs.StringVar(&con.tlsKey, "http-tls-key", "", "the PEM private key of --http-tls-cert in `FILE`")
			fs.StringVar(&con.clientCA, "http-client-ca", "", "require client certificates signed by a PEM CA certificate in `FILE`")
			return func(ctx context.Context, c *cli, args []string) error {
				if len(args) != 0 {
					return usagef("serve takes no arguments")
				}
				if *sock != "" && *tcp != "" {
					return usagef("--nbd-socket and --nbd exclude each other")
				}
				if (con.tokenFile != "" || con.tlsCert != "" || con.tlsKey != "" || con.clientCA != "") && con.addr == "" {
					return usagef("--http-token-file and the --http-tls flags go with --http")
				}
				if (con.tlsCert == "") != (con.tlsKey == "") {
					return usagef("--http-tls-cert and --http-tls-key go together")
				}
				if con.clientCA != "" && con.tlsCert == "" {
					return usagef("--http-client-ca needs --http-tls-cert and --http-tls-key")
				}
				if con.addr != "" && !web.Loopback(con.addr) && con.tokenFile == "" {
					return usagef("--http %s is not a loopback address: anyone who reaches it gets the host's control plane; give --http-token-file FILE (and put TLS in front of it), or bind 127.0.0.1", con.addr)
				}
				srv := &nbd.Server{}
				if err := limits.apply(srv); err != nil {
					return err
				}
				level := slog.LevelInfo
				if *verbose {
					level = slog.LevelDebug
				}
				log := slog.New(slog.NewTextHandler(c.stderr, &slog.HandlerOptions{Level: level}))
				dir, how := api.DataDir(*data)
				ready := func(h *host.Host, nbdAddr string) {
					fmt.Fprintf(c.stdout, "vhdkit serving %s (%s): API %s, NBD %s\n", h.Dir(), how,
						filepath.Join(h.Dir(), api.SocketName), nbdAddr)
					for _, v := range h.VMs() {
						if v.State == api.VMFailed {
							fmt.Fprintf(c.stderr, "vhdkit: machine %s is failed: %s\n", v.Name, v.Error)
						}
					}
				}
				con.ready = func(url, token string) {
					if con.tokenFile != "" {
						fmt.Fprintf(c.stdout, "vhdkit console %s (token in %s)\n", url, con.tokenFile)
					} else {
						fmt.Fprintf(c.stdout, "vhdkit console %s token %s\n", url, token)
					}
				}
				srv.Logger = log
				return serve(ctx, dir, srv, *sock, *tcp, con, log, ready)
			}
		},
	}
}

// webConsole says where serve runs the web console: on addr, "" for none.
type webConsole struct {
	addr      string
	tokenFile string
	// HTTPS: the server's certificate and key, and the CA client
	// certificates must be signed by ("" for none).
	tlsCert, tlsKey, clientCA string
	ready                     func(url, token string) // called once it listens
}

// serve runs a host on dir, its disks served by srv, until ctx ends;
// ready is called once it listens.
func serve(ctx context.Context, dir string, srv *nbd.Server, nbdSocket, nbdTCP string, con webConsole, log *slog.Logger, ready func(*host.Host, string)) (err error) {
	if dir, err = filepath.Abs(dir); err != nil {
		return err
	}
	if nbdSocket != "" && !strings.HasPrefix(nbdSocket, "@") {
		if nbdSocket, err = filepath.Abs(nbdSocket); err != nil {
			return err
		}
	}
	if nbdTCP == "" && nbdSocket == "" {
		nbdSocket = filepath.Join(dir, "nbd.sock")
	}
	h, err := host.Open(dir, host.Options{Logger: log, NBD: srv, NBDSocket: nbdSocket})
	if err != nil {
		return err
	}
	defer func() {
		if cerr := h.Close(); cerr != nil {
			err = errors.Join(err, cerr)
		}
	}()
	apiL, err := h.ListenAPI()
	if err != nil {
		return err
	}
	var nbdL net.Listener
	var addr string
	if nbdTCP != "" {
		nbdL, err = net.Listen("tcp", nbdTCP)
		addr = "nbd://" + nbdTCP
	} else {
		if nbdSocket == "" {
			nbdSocket = filepath.Join(dir, "nbd.sock")
		}
		if err = removeStaleSocket(nbdSocket); err == nil {
			nbdL, err = net.Listen("unix", nbdSocket)
		}
		addr = "nbd+unix:///NAME?socket=" + nbdSocket
	}
	if err != nil {
		apiL.Close()
		return fmt.Errorf("NBD: %w", err)
	}
	apiHandler := h.Handler()
	hs := &http.Server{Handler: apiHandler, ReadHeaderTimeout: 10 * time.Second}
	// Event streams last until the client goes: Shutdown ends them.
	hs.RegisterOnShutdown(h.StopStreams)
	errc := make(chan error, 3)
	go func() { errc <- hs.Serve(apiL) }()
	go func() { errc <- srv.Serve(nbdL) }()
	var consoleURL, token string
	if con.addr != "" {
		var ws *http.Server
		ws, consoleURL, token, err = serveConsole(con, dir, apiHandler, h, errc)
		if err != nil {
			hs.Close()
			srv.Shutdown(context.Background())
			return err
		}
		defer func() {
			sctx, cancel := context.WithTimeout(context.Background(), nbdShutdownTimeout)
			defer cancel()
			ws.Shutdown(sctx)
		}()
	}
	if ready != nil {
		ready(h, addr)
	}
	if con.addr != "" && con.ready != nil {
		con.ready(consoleURL, token)
	}
	select {
	case <-ctx.Done():
	case err = <-errc:
		err = fmt.Errorf("listener failed: %w", err)
	}
	log.Info("shutting down")
	sctx, cancel := context.WithTimeout(context.Background(), nbdShutdownTimeout)
	defer cancel()
	hs.Shutdown(sctx)
	if serr := srv.Shutdown(sctx); serr != nil {
		err = errors.Join(err, serr)
	}
	if nbdSocket != "" && nbdTCP == "" && !strings.HasPrefix(nbdSocket, "@") {
		os.Remove(nbdSocket)
	}
	return err
}

// serveConsole serves the web console, with the API behind its token
// check, on con.addr; it returns the console's URL and token.
func serveConsole(con webConsole, dir string, apiHandler http.Handler, h *host.Host, errc chan<- error) (ws *http.Server, url, token string, err error) {
	token = web.NewToken()
	if con.tokenFile != "" {
		if token, err = web.ReadToken(con.tokenFile); err != nil {
			return nil, "", "", err
		}
	}
	handler, err := web.New(apiHandler, token, dir)
	if err != nil {
		return nil, "", "", err
	}
	l, err := net.Listen("tcp", con.addr)
	if err != nil {
		return nil, "", "", fmt.Errorf("console: %w", err)
	}
	ws = &http.Server{Handler: handler, ReadHeaderTimeout: 10 * time.Second}
	ws.RegisterOnShutdown(h.StopStreams)
	if con.tlsCert == "" {
		go func() { errc <- ws.Serve(l) }()
		return ws, "http://" + l.Addr().String() + "/", token, nil
	}
	if ws.TLSConfig, err = consoleTLS(con); err != nil {
		l.Close()
		return nil, "", "", err
	}
	go func() { errc <- ws.ServeTLS(l, "", "") }()
	return ws, "https://" + l.Addr().String() + "/", token, nil
}

// consoleTLS is the console's TLS configuration: its certificate, and
// with a client CA, client certificates required and verified.
func consoleTLS(con webConsole) (*tls.Config, error) {
	cert, err := tls.LoadX509KeyPair(con.tlsCert, con.tlsKey)
	if err != nil {
		return nil, fmt.Errorf("console certificate: %w", err)
	}
	cfg := &tls.Config{Certificates: []tls.Certificate{cert}, MinVersion: tls.VersionTLS12}
	if con.clientCA != "" {
		pem, err := os.ReadFile(con.clientCA)
		if err != nil {
			return nil, fmt.Errorf("console client CA: %w", err)
		}
		pool := x509.NewCertPool()
		if !pool.AppendCertsFromPEM(pem) {
			return nil, fmt.Errorf("console client CA %s: no PEM certificate in it", con.clientCA)
		}
		cfg.ClientCAs, cfg.ClientAuth = pool, tls.RequireAndVerifyClientCert
	}
	return cfg, nil
}
