package main

import (
	"bytes"
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"math/rand/v2"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/vhdkit/vhdkit/internal/api"
	"github.com/vhdkit/vhdkit/internal/guest"
	"github.com/vhdkit/vhdkit/internal/host"
	"github.com/vhdkit/vhdkit/nbd"
	"github.com/vhdkit/vhdkit/vhdx"
)

func demoCommand() *command {
	return &command{
		name:     "demo",
		synopsis: "[--no-guest] [DIR]",
		summary:  "walk through a running machine's checkpoint and its live merge",
		help: `Runs the mission in a minute, printing each step with the equivalent command.
It starts a host in-process (as "vhdkit serve" does) and creates a machine
with a small Linux guest (the test kit's Debian kernel and a busybox
initramfs: .ci/guest-kit fetches them), starts it under QEMU, lets it write,
takes a standard checkpoint (the guest paused, its memory saved, its disk
moved to an .avhdx), deletes the checkpoint while the guest writes (a live
merge, with a progress bar), shows the machine back on its .vhdx, stops it
with the ACPI power button and verifies every byte the guest wrote.

Without QEMU or the guest kit (or with --no-guest), an NBD client plays the
machine: it writes through the disk's export, and the same checkpoint,
live merge and verification follow.

It works in a fresh temporary directory, removed at the end, or in DIR,
where the files are kept (DIR must not hold a demo yet).

Examples:
  vhdkit demo
  vhdkit demo ./demo-files
  vhdkit demo --no-guest
`,
		setup: func(fs *flag.FlagSet) func(context.Context, *cli, []string) error {
			noGuest := fs.Bool("no-guest", false, "play the machine with an NBD client instead of booting a guest under QEMU")
			return func(ctx context.Context, c *cli, args []string) error {
				if len(args) > 1 {
					return usagef("want at most one DIR, got %d arguments", len(args))
				}
				dir := ""
				if len(args) == 1 {
					dir = args[0]
				}
				return c.demo(ctx, dir, *noGuest)
			}
		},
	}
}

const (
	demoDiskSize  = 256 << 20
	demoFirst     = 64 << 20 // written before the checkpoint
	demoSecond    = 96 << 20 // written after it, before the merge
	demoWriteSize = 64 << 10 // one write of the writer
	demoMergeRate = 64 << 20 // the merge's bandwidth, so it can be watched
	demoWritePace = time.Millisecond
)

// demoWriter is the demo's guest: it writes through its own NBD
// connection and keeps the model of what the disk must hold.
type demoWriter struct {
	c     *nbd.Client
	rng   *rand.Rand
	mu    sync.Mutex
	model []byte
	n     int           // acknowledged writes
	slow  time.Duration // the slowest write
}

func (w *demoWriter) write(off int64, p []byte) error {
	start := time.Now()
	if _, err := w.c.WriteAt(p, off); err != nil {
		return err
	}
	d := time.Since(start)
	w.mu.Lock()
	copy(w.model[off:], p)
	w.n++
	w.slow = max(w.slow, d)
	w.mu.Unlock()
	return nil
}

// fill writes n bytes in demoWriteSize pieces at random offsets below
// limit, then flushes.
func (w *demoWriter) fill(n, limit int64) error {
	buf := make([]byte, demoWriteSize)
	for done := int64(0); done < n; done += demoWriteSize {
		off := w.rng.Int64N(limit/demoWriteSize) * demoWriteSize
		demoData(w.rng, buf)
		if err := w.write(off, buf); err != nil {
			return err
		}
	}
	return w.c.Flush()
}

// run writes until stop closes, one write per demoWritePace.
func (w *demoWriter) run(stop <-chan struct{}) <-chan error {
	errc := make(chan error, 1)
	go func() {
		buf := make([]byte, demoWriteSize)
		tick := time.NewTicker(demoWritePace)
		defer tick.Stop()
		for i := 0; ; i++ {
			select {
			case <-stop:
				errc <- w.c.Flush()
				return
			case <-tick.C:
			}
			off := w.rng.Int64N(demoDiskSize/demoWriteSize) * demoWriteSize
			demoData(w.rng, buf)
			if err := w.write(off, buf); err != nil {
				errc <- err
				return
			}
			if i%64 == 63 {
				if err := w.c.Flush(); err != nil {
					errc <- err
					return
				}
			}
		}
	}()
	return errc
}

// demoData fills p with random bytes, one in eight pieces zeros.
func demoData(rng *rand.Rand, p []byte) {
	if rng.IntN(8) == 0 {
		clear(p)
		return
	}
	for i := 0; i+8 <= len(p); i += 8 {
		v := rng.Uint64()
		for k := range 8 {
			p[i+k] = byte(v >> (8 * k))
		}
	}
}

// demoSession is one run of the demo: its folders, its in-process host
// and the numbered steps it prints.
type demoSession struct {
	c       *cli
	ctx     context.Context
	data    string // the host's data directory
	vmDir   string // the demo machine's folder
	nbdSock string
	step    int
	started time.Time
	stopAPI func()
	h       *host.Host
	srv     *nbd.Server
}

// say starts step title.
func (s *demoSession) say(title string) {
	s.step++
	if s.step > 1 {
		fmt.Fprintln(s.c.stdout)
	}
	fmt.Fprintf(s.c.stdout, "== %d. %s\n", s.step, title)
}

// vhdkit runs a client verb in-process against the demo's host, echoing
// it like a shell would; progress goes to stderr as well.
func (s *demoSession) vhdkit(progress io.Writer, args ...string) error {
	fmt.Fprintf(s.c.stdout, "$ vhdkit %s\n", strings.Join(args, " "))
	var stderr bytes.Buffer
	errw := io.Writer(&stderr)
	if progress != nil {
		errw = io.MultiWriter(progress, &stderr)
	}
	if code := run(s.ctx, append(args, "--data", s.data), s.c.stdout, errw); code != 0 {
		msg := strings.TrimSpace(stderr.String())
		return fmt.Errorf("step %d failed: %s", s.step, strings.TrimPrefix(msg, "vhdkit: "))
	}
	return nil
}

// listFiles prints the machine's disk files with their sizes.
func (s *demoSession) listFiles() {
	files, _ := filepath.Glob(filepath.Join(s.vmDir, "*"))
	for _, f := range files {
		fi, err := os.Stat(f)
		if err != nil || !fi.Mode().IsRegular() {
			continue
		}
		used := fi.Size()
		if st, ok := fi.Sys().(*syscall.Stat_t); ok {
			used = st.Blocks * 512
		}
		fmt.Fprintf(s.c.stdout, "  %-22s %10s file, %10s on disk\n", filepath.Base(f), humanBytes(fi.Size()), humanBytes(used))
	}
}

// stopHost stops serving and closes the host (idempotently).
func (s *demoSession) stopHost() error {
	if s.h == nil {
		return nil
	}
	s.stopAPI()
	sctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	err := errors.Join(s.srv.Shutdown(sctx), s.h.Close())
	s.h = nil
	return err
}

// lastJob is the host's newest job: the merge a delete started.
func (s *demoSession) lastJob() (api.Job, error) {
	jobs, err := (&api.Client{DataDir: s.data}).Jobs(s.ctx)
	if err != nil || len(jobs) == 0 {
		return api.Job{}, fmt.Errorf("listing jobs: %v", err)
	}
	return jobs[len(jobs)-1], nil
}

// verifyFile stops the host and checks that the machine's .vhdx holds
// want and passes the strict check.
func (s *demoSession) verifyFile(want []byte) error {
	if err := s.stopHost(); err != nil {
		return err
	}
	base := filepath.Join(s.vmDir, "disk0.vhdx")
	im, err := vhdx.Open(base, vhdx.OpenOptions{ReadOnly: true})
	if err != nil {
		return err
	}
	got := make([]byte, len(want))
	_, err = im.ReadAt(got, 0)
	im.Close()
	if err != nil {
		return err
	}
	if i := firstDifference(got, want); i < len(got) {
		return fmt.Errorf("%s differs from what was written at offset %d", base, i)
	}
	fmt.Fprintf(s.c.stdout, "  host stopped; all %s of %s read from the file: identical\n", formatSize(int64(len(want))), filepath.Base(base))
	probs, err := vhdx.Check(base, false)
	if err != nil {
		return err
	}
	if len(probs) > 0 {
		return fmt.Errorf("check %s: %v", base, probs[0])
	}
	fmt.Fprintf(s.c.stdout, "  vhdkit check %s: no problems found\n", filepath.Base(base))
	return nil
}

func (c *cli) demo(ctx context.Context, dir string, noGuest bool) (err error) {
	if dir == "" {
		dir, err = os.MkdirTemp("", "vhdkit-demo-")
		if err != nil {
			return err
		}
		defer func() {
			if rerr := os.RemoveAll(dir); err == nil && rerr != nil {
				err = rerr
			}
			if err == nil {
				fmt.Fprintf(c.stdout, "\nRemoved %s. Run \"vhdkit demo DIR\" to keep the files.\n", dir)
			}
		}()
	} else if err := os.MkdirAll(dir, 0o755); err != nil {
		return err
	}
	if dir, err = filepath.Abs(dir); err != nil {
		return err
	}
	data := filepath.Join(dir, "vhdkit-data")
	if _, err := os.Stat(data); err == nil {
		return fmt.Errorf("%s already holds a demo (remove it, or name another DIR)", data)
	}
	s := &demoSession{c: c, ctx: ctx, data: data, vmDir: filepath.Join(data, "vms", "demo"),
		nbdSock: filepath.Join(data, "nbd.sock"), started: time.Now(), srv: &nbd.Server{}}
	kit, kitErr := guest.Find()
	if noGuest {
		kit, kitErr = nil, errors.New("--no-guest")
	}

	fmt.Fprintf(c.stdout, "vhdkit demo in %s\n\n", dir)
	s.say("Start a host, as \"vhdkit serve --data " + data + "\" does")
	if s.h, err = host.Open(data, host.Options{NBD: s.srv, NBDSocket: s.nbdSock, Logger: slog.New(slog.NewTextHandler(io.Discard, nil))}); err != nil {
		return err
	}
	defer s.stopHost()
	apiL, err := s.h.ListenAPI()
	if err != nil {
		return err
	}
	if s.stopAPI, err = serveDemo(s.h, s.srv, apiL, s.nbdSock); err != nil {
		return err
	}
	fmt.Fprintf(c.stdout, "  API on %s, disks on nbd+unix:///NAME?socket=%s\n", filepath.Join(data, api.SocketName), s.nbdSock)
	fmt.Fprintf(c.stdout, "  (the commands below run with VHDKIT_DATA=%s)\n", data)
	if kitErr != nil {
		fmt.Fprintf(c.stdout, "  no guest to boot (%v):\n  an NBD client plays the running machine. Run .ci/guest-kit to get one.\n", kitErr)
		return s.nbdStory()
	}
	return s.machineStory(kit, dir)
}

// nbdStory is the demo without QEMU: a writer on an NBD connection plays
// the running machine.
func (s *demoSession) nbdStory() error {
	c, ctx := s.c, s.ctx
	s.say("Create a machine with a 256 MiB disk (a dynamic VHDX)")
	if err := s.vhdkit(nil, "vm", "create", "demo", "--disk", "256M"); err != nil {
		return err
	}

	s.say("Write 64 MiB through NBD, as a guest would")
	nc, err := nbd.Dial(ctx, "unix", s.nbdSock, &nbd.ClientOptions{Export: "demo"})
	if err != nil {
		return err
	}
	defer nc.Close()
	w := &demoWriter{c: nc, rng: rand.New(rand.NewPCG(1, 2)), model: make([]byte, demoDiskSize)}
	if err := w.fill(demoFirst, demoDiskSize); err != nil {
		return err
	}
	fmt.Fprintf(c.stdout, "  %d writes of %s at random offsets, flushed (qemu-io, a VM or nbdcopy would do the same)\n", w.n, formatSize(demoWriteSize))

	s.say("Take a checkpoint: the .vhdx is frozen, new writes go to a differencing .avhdx")
	if err := s.vhdkit(nil, "checkpoint", "create", "demo", "--name", "before-upgrade"); err != nil {
		return err
	}
	s.listFiles()

	s.say("Keep writing: 96 MiB more land in the .avhdx")
	before := w.n
	if err := w.fill(demoSecond, demoDiskSize); err != nil {
		return err
	}
	fmt.Fprintf(c.stdout, "  %d more writes\n", w.n-before)
	s.listFiles()

	s.say("Delete the checkpoint while the writer goes on: a live merge")
	fmt.Fprintf(c.stdout, "  (a writer issues a %s write every %v throughout; --bandwidth lets you watch the merge)\n", formatSize(demoWriteSize), demoWritePace)
	stop := make(chan struct{})
	before = w.n
	errc := w.run(stop)
	mergeStart := time.Now()
	err = s.vhdkit(c.stderr, "checkpoint", "delete", "demo", "before-upgrade", "--wait", "--progress", "--bandwidth", "64M")
	mergeTime := time.Since(mergeStart)
	time.Sleep(200 * time.Millisecond) // the writer goes on over the merged disk
	close(stop)
	if werr := <-errc; err == nil {
		err = werr
	}
	if err != nil {
		return err
	}
	job, err := s.lastJob()
	if err != nil {
		return err
	}
	fmt.Fprintf(c.stdout, "  merged %s in %.1fs; the writer did %d writes meanwhile, the slowest took %v; I/O was held %.1f ms at the switch\n",
		humanBytes(job.Done), mergeTime.Seconds(), w.n-before, w.slow.Round(time.Millisecond), job.StallMS)

	s.say("The disk runs on its .vhdx again; the .avhdx is gone")
	if err := s.vhdkit(nil, "vm", "show", "demo"); err != nil {
		return err
	}
	s.listFiles()

	s.say("Verify every byte")
	got := make([]byte, demoDiskSize)
	for off := 0; off < len(got); off += 16 << 20 {
		if _, err := nc.ReadAt(got[off:off+16<<20], int64(off)); err != nil {
			return err
		}
	}
	if i := firstDifference(got, w.model); i < len(got) {
		return fmt.Errorf("the disk differs from what was written at offset %d", i)
	}
	fmt.Fprintf(c.stdout, "  read through NBD: all %s match the %d acknowledged writes\n", formatSize(demoDiskSize), w.n)
	nc.Close()
	if err := s.verifyFile(w.model); err != nil {
		return err
	}
	fmt.Fprintf(c.stdout, "\nDemo finished in %.1fs: a checkpoint taken and merged back live under %d writes, no write lost.\n",
		time.Since(s.started).Seconds(), w.n)
	return nil
}

// serveDemo serves the host's API on apiL and NBD on nbdSock; the
// function it returns closes both listeners (idempotently).
func serveDemo(h *host.Host, srv *nbd.Server, apiL net.Listener, nbdSock string) (func(), error) {
	nbdL, err := net.Listen("unix", nbdSock)
	if err != nil {
		apiL.Close()
		return nil, err
	}
	hs := &http.Server{Handler: h.Handler(), ReadHeaderTimeout: 10 * time.Second}
	go hs.Serve(apiL)
	go srv.Serve(nbdL)
	var once sync.Once
	return func() {
		once.Do(func() {
			hs.Close()
			nbdL.Close()
		})
	}, nil
}

func firstDifference(a, b []byte) int {
	for i := range min(len(a), len(b)) {
		if a[i] != b[i] {
			return i
		}
	}
	return min(len(a), len(b))
}
