package main

import (
	"bufio"
	"context"
	"crypto/sha256"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"os/exec"
	"path/filepath"
	"runtime/debug"
	"sort"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/vhdkit/vhdkit/internal/hostile"
	"github.com/vhdkit/vhdkit/internal/testenv"
	"github.com/vhdkit/vhdkit/nbd"
)

// Limits every verb must keep on every hostile image. A verb may need
// memory for the BAT a file holds (a 64 TiB VHDX of 1 MiB blocks has a
// 512 MiB BAT, which vhdkit keeps in memory; one copy at a time: check
// held two before it collected its first open's): for an image file
// larger than hostileRSS, the bound grows by the file's length; and by
// 1.5 MiB per file of a long chain (see runHostileCase).
//
// The time limit catches a verb that hangs or blows up, not a slow one:
// the slowest image (check of the 64 TiB BAT, 8 million entries) takes 3 s
// on an idle 2-core machine and 19-20 s at load 10, as CI can be.
const (
	hostileTimeout = 60 * time.Second
	hostileRSS     = 256 << 20
)

// TestHostileCorpus runs every read-only verb — info, info --json, check,
// check --json, map, convert to raw — and a read-only NBD server (read by
// nbdinfo and by our client) on each image of the hostile corpus
// (internal/hostile), each as its own process. Each must exit, rejecting
// the image with a one-line error (exit 1) or reading it (exit 0), within
// hostileTimeout and the memory bound (max RSS from wait4), and leave
// every file of the image's folder, and of the folder its locators lead
// out to, unmodified (content, size, mtime). No verb may open a file in
// that outside folder (inotify: no IN_OPEN or IN_ACCESS), while info with
// --allow-parent-dir naming it reads the image through it (the decoy is a
// valid parent, and the watch sees that open). The figures per class are
// logged as a table. VHDKIT_HOSTILE=all runs every image (CI samples the
// truncations).
func TestHostileCorpus(t *testing.T) {
	bin := vhdkitBinary(t)
	nbdinfo := testenv.Tool(t, "nbdinfo")
	root := filepath.Join(t.TempDir(), "corpus")
	cases, err := hostile.Generate(root, hostile.Options{})
	if err != nil {
		t.Fatal(err)
	}
	// A child's max RSS counts the peak memory of the process that started
	// it (Linux records the old address space's high-water mark at exec,
	// and Go starts children sharing its own): give back what generating
	// the corpus took, reset the high-water mark to what is left
	// (clear_refs 5), and say how much that is.
	debug.FreeOSMemory()
	if err := os.WriteFile("/proc/self/clear_refs", []byte("5"), 0); err != nil {
		t.Logf("cannot reset this process's peak memory (%v): the figures below count it", err)
	}
	t.Logf("the test's own peak resident memory, counted in every figure below: %d MiB", selfHWM()>>20)
	// Every class and every mutation; of the truncation points (a third of
	// the corpus), one in three, or one in eight with -short, unless
	// VHDKIT_HOSTILE=all asks for every one.
	if every := map[bool]int{false: 3, true: 8}[testing.Short()]; os.Getenv("VHDKIT_HOSTILE") != "all" {
		var some []hostile.Case
		k := 0
		for _, c := range cases {
			if strings.HasSuffix(c.Class, "-truncate") {
				if k++; k%every != 1 {
					continue
				}
			}
			some = append(some, c)
		}
		cases = some
	}

	var mu sync.Mutex
	stats := map[string]*classStats{}
	work := make(chan hostile.Case)
	var wg sync.WaitGroup
	for range 2 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			scratch := t.TempDir()
			for c := range work {
				runs := runHostileCase(t, bin, nbdinfo, root, scratch, c)
				mu.Lock()
				s := stats[c.Class]
				if s == nil {
					s = &classStats{}
					stats[c.Class] = s
				}
				s.add(c, runs)
				mu.Unlock()
			}
		}()
	}
	for _, c := range cases {
		work <- c
	}
	close(work)
	wg.Wait()

	var classes []string
	for k := range stats {
		classes = append(classes, k)
	}
	sort.Strings(classes)
	var b strings.Builder
	fmt.Fprintf(&b, "%-14s %6s %5s %5s %8s %8s  %s\n", "class", "images", "runs", "read", "rejected", "max s", "max RSS MiB (verb, image)")
	for _, k := range classes {
		s := stats[k]
		fmt.Fprintf(&b, "%-14s %6d %5d %5d %8d %8.2f  %d (%s, %s); slowest: %s, %s\n", k, s.images, s.runs, s.read, s.rejected,
			s.maxTime.Seconds(), s.maxRSS>>20, s.rssVerb, s.rssImage, s.timeVerb, s.timeImage)
	}
	t.Logf("hostile corpus, %d images:\n%s", len(cases), b.String())
}

// hostileRun is one verb run on one image.
type hostileRun struct {
	verb    string
	code    int // exit code
	elapsed time.Duration
	rss     int64 // bytes
}

type classStats struct {
	images, runs, read, rejected int
	maxTime                      time.Duration
	maxRSS                       int64
	timeVerb, timeImage          string
	rssVerb, rssImage            string
}

func (s *classStats) add(c hostile.Case, runs []hostileRun) {
	s.images++
	for _, r := range runs {
		s.runs++
		if r.code == 0 {
			s.read++
		} else {
			s.rejected++
		}
		if r.elapsed > s.maxTime {
			s.maxTime, s.timeVerb, s.timeImage = r.elapsed, r.verb, c.Name
		}
		if r.rss > s.maxRSS {
			s.maxRSS, s.rssVerb, s.rssImage = r.rss, r.verb, c.Name
		}
	}
}

// runHostileCase runs the verbs on one case and checks what they did.
func runHostileCase(t *testing.T, bin, nbdinfo, root, scratch string, c hostile.Case) []hostileRun {
	img := filepath.Join(root, c.Image)
	dirs := []string{filepath.Dir(img)}
	if c.Outside != "" {
		dirs = append(dirs, filepath.Join(root, c.Outside))
	}
	before := snapshotDirs(t, dirs)
	fi, err := os.Stat(img)
	if err != nil {
		t.Fatal(err)
	}
	limit := int64(hostileRSS)
	if fi.Size() > hostileRSS {
		limit += fi.Size()
	}
	// A differencing VHDX keeps each sector bitmap block it reads (1 MiB
	// per chunk of 2^23 sectors) for as long as it is open, in every layer
	// of the chain: reading one sector through 250 layers holds 250 MiB.
	if n := chainFiles(filepath.Dir(img)); n > 16 {
		limit += int64(n) * 3 << 19
	}

	var watch *dirWatch
	if c.Outside != "" {
		watch = watchDir(t, dirs[1])
	}
	var runs []hostileRun
	check := func(r hostileRun, stderr string) {
		runs = append(runs, r)
		if r.rss > limit {
			t.Errorf("%s: %s: max RSS %d MiB, over %d MiB", c.ID(), r.verb, r.rss>>20, limit>>20)
		}
		if r.code == 0 {
			return
		}
		lines := strings.Split(strings.TrimSpace(stderr), "\n")
		switch {
		case r.code != 1:
			t.Errorf("%s: %s: exit %d (want 0 or 1); stderr:\n%s", c.ID(), r.verb, r.code, trimOutput(stderr))
		case strings.Contains(stderr, "panic") || strings.Contains(stderr, "goroutine "):
			t.Errorf("%s: %s: panicked:\n%s", c.ID(), r.verb, trimOutput(stderr))
		case strings.HasPrefix(r.verb, "check") && strings.TrimSpace(stderr) == "":
			// check reports problems on stdout, one a line.
		case len(lines) != 1 || lines[0] == "":
			t.Errorf("%s: %s: exit 1 with %d lines of error, want one:\n%s", c.ID(), r.verb, len(lines), trimOutput(stderr))
		}
	}
	out := filepath.Join(scratch, "out.raw")
	for _, args := range [][]string{
		{"info", img}, {"info", "--json", img}, {"check", img}, {"check", "--json", img},
		{"map", img}, {"convert", img, out},
	} {
		r, stderr := runVerb(t, bin, args)
		check(r, stderr)
		os.Remove(out)
	}
	r, stderr := serveHostile(t, bin, nbdinfo, img, filepath.Join(scratch, "nbd.sock"))
	check(r, stderr)

	if watch != nil {
		if ev := watch.events(); len(ev) > 0 {
			t.Errorf("%s: the verbs opened files outside the image's folder: %s", c.ID(), strings.Join(ev, ", "))
		}
		// The decoy is a parent that works when allowed: info reads the
		// chain through it, and the watch sees it.
		r, stderr := runVerb(t, bin, []string{"info", "--allow-parent-dir", dirs[1], img})
		if r.code != 0 {
			t.Errorf("%s: info --allow-parent-dir %s: exit %d: %s", c.ID(), c.Outside, r.code, trimOutput(stderr))
		}
		if len(watch.events()) == 0 {
			t.Errorf("%s: info --allow-parent-dir: no open seen in %s (is the watch blind?)", c.ID(), c.Outside)
		}
		watch.close()
	}
	if after := snapshotDirs(t, dirs); after != before {
		t.Errorf("%s: the image's files changed:\nbefore %s\nafter  %s", c.ID(), before, after)
	}
	return runs
}

// chainFiles counts the image files in dir.
func chainFiles(dir string) int {
	ents, _ := os.ReadDir(dir)
	return len(ents)
}

// runVerb runs vhdkit with args, killing it after hostileTimeout.
func runVerb(t *testing.T, bin string, args []string) (hostileRun, string) {
	ctx, cancel := context.WithTimeout(context.Background(), hostileTimeout)
	defer cancel()
	cmd := exec.CommandContext(ctx, bin, args...)
	var stderr strings.Builder
	cmd.Stdout, cmd.Stderr = io.Discard, &stderr
	start := time.Now()
	err := cmd.Run()
	r := hostileRun{verb: verbName(args), elapsed: time.Since(start)}
	if ctx.Err() != nil {
		t.Errorf("%s %s: still running after %v: killed", r.verb, args[len(args)-1], hostileTimeout)
	}
	if cmd.ProcessState == nil {
		t.Fatalf("%s: %v", r.verb, err)
	}
	r.code = cmd.ProcessState.ExitCode()
	r.rss = maxRSS(cmd.ProcessState)
	return r, stderr.String()
}

// verbName is the verb and its flags, without paths.
func verbName(args []string) string {
	var v []string
	for _, a := range args {
		if !strings.Contains(a, "/") {
			v = append(v, a)
		}
	}
	return strings.Join(v, " ")
}

// maxRSS is the largest resident set of an ended process (wait4's rusage;
// Linux reports it in KiB).
func maxRSS(ps *os.ProcessState) int64 {
	if ru, ok := ps.SysUsage().(*syscall.Rusage); ok {
		return ru.Maxrss << 10
	}
	return 0
}

// serveHostile serves img with vhdkit nbd --read-only on a unix socket; if
// it serves, nbdinfo describes the export and a client reads its first,
// middle and last MiB, then the server gets SIGTERM. A server that does
// not end within hostileTimeout of starting, or of SIGTERM, is killed.
func serveHostile(t *testing.T, bin, nbdinfo, img, sock string) (hostileRun, string) {
	os.Remove(sock)
	cmd := exec.Command(bin, "nbd", "--read-only", "--socket", sock, img)
	var stderr strings.Builder
	cmd.Stderr = &stderr
	stdout, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	start := time.Now()
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	r := hostileRun{verb: "nbd --read-only"}
	done := make(chan struct{})
	go func() {
		defer close(done)
		line, _ := bufio.NewReader(stdout).ReadString('\n')
		if line == "" {
			return // it refused the image and ended
		}
		ctx, cancel := context.WithTimeout(context.Background(), hostileTimeout)
		defer cancel()
		info := exec.CommandContext(ctx, nbdinfo, "nbd+unix:///?socket="+sock)
		if out, err := info.CombinedOutput(); err != nil {
			t.Errorf("%s: nbdinfo: %v: %s", img, err, trimOutput(string(out)))
		}
		c, err := nbd.Dial(ctx, "unix", sock, &nbd.ClientOptions{})
		if err != nil {
			t.Errorf("%s: NBD client: %v", img, err)
			return
		}
		defer c.Close()
		size := c.Size()
		buf := make([]byte, min(size, 1<<20))
		for _, off := range []int64{0, size / 2 &^ 511, size - int64(len(buf))} {
			if off < 0 || off+int64(len(buf)) > size {
				continue
			}
			if _, err := c.ReadAt(buf, off); err != nil {
				// An image may hold damage a read finds (a block past
				// the end of the file): the error reaches the client,
				// the server lives on.
				t.Logf("%s: NBD read at %d: %v", img, off, err)
			}
		}
	}()
	select {
	case <-done:
	case <-time.After(hostileTimeout):
		t.Errorf("%s: nbd: the export did not answer within %v", img, hostileTimeout)
	}
	cmd.Process.Signal(syscall.SIGTERM)
	waited := make(chan error, 1)
	go func() { waited <- cmd.Wait() }()
	select {
	case <-waited:
	case <-time.After(hostileTimeout):
		t.Errorf("%s: nbd still running %v after SIGTERM: killed", img, hostileTimeout)
		cmd.Process.Kill()
		<-waited
	}
	<-done
	r.elapsed = time.Since(start)
	r.code = cmd.ProcessState.ExitCode()
	if ws, ok := cmd.ProcessState.Sys().(syscall.WaitStatus); ok && ws.Signaled() && ws.Signal() == syscall.SIGTERM {
		r.code = 0 // served until told to stop
	}
	r.rss = maxRSS(cmd.ProcessState)
	return r, stderr.String()
}

// snapshotDirs describes every file under dirs: path, size, mtime and a
// hash of the content, as one string to compare.
func snapshotDirs(t *testing.T, dirs []string) string {
	var b strings.Builder
	for _, d := range dirs {
		err := filepath.WalkDir(d, func(p string, e fs.DirEntry, err error) error {
			if err != nil {
				return err
			}
			fi, err := e.Info()
			if err != nil {
				return err
			}
			fmt.Fprintf(&b, "%s %v %d %d", p, fi.Mode(), fi.Size(), fi.ModTime().UnixNano())
			if fi.Mode().IsRegular() {
				f, err := os.Open(p)
				if err != nil {
					return err
				}
				h := sha256.New()
				_, err = io.Copy(h, f)
				f.Close()
				if err != nil {
					return err
				}
				fmt.Fprintf(&b, " %x", h.Sum(nil)[:8])
			}
			b.WriteString("; ")
			return nil
		})
		if err != nil {
			t.Fatal(err)
		}
	}
	return b.String()
}

// dirWatch reports the opens and reads of files in a folder (inotify).
type dirWatch struct {
	fd  int
	dir string
}

func watchDir(t *testing.T, dir string) *dirWatch {
	fd, err := unix.InotifyInit1(unix.IN_NONBLOCK | unix.IN_CLOEXEC)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := unix.InotifyAddWatch(fd, dir, unix.IN_OPEN|unix.IN_ACCESS); err != nil {
		unix.Close(fd)
		t.Fatal(err)
	}
	return &dirWatch{fd: fd, dir: dir}
}

// events drains what happened since the last call: "NAME open", "NAME read".
func (w *dirWatch) events() []string {
	var out []string
	buf := make([]byte, 64<<10)
	for {
		n, err := unix.Read(w.fd, buf)
		if n <= 0 || err != nil {
			if err != nil && !errors.Is(err, unix.EAGAIN) {
				out = append(out, "inotify: "+err.Error())
			}
			return out
		}
		for off := 0; off+unix.SizeofInotifyEvent <= n; {
			// struct inotify_event: 0 wd, 4 mask, 8 cookie, 12 len, 16 name
			mask := binary.NativeEndian.Uint32(buf[off+4:])
			nameLen := int(binary.NativeEndian.Uint32(buf[off+12:]))
			name := strings.TrimRight(string(buf[off+unix.SizeofInotifyEvent:off+unix.SizeofInotifyEvent+nameLen]), "\x00")
			what := "open"
			if mask&unix.IN_ACCESS != 0 {
				what = "read"
			}
			out = append(out, filepath.Join(w.dir, name)+" "+what)
			off += unix.SizeofInotifyEvent + nameLen
		}
	}
}

func (w *dirWatch) close() { unix.Close(w.fd) }

// selfHWM is this process's peak resident memory (VmHWM in
// /proc/self/status).
func selfHWM() int64 {
	b, err := os.ReadFile("/proc/self/status")
	if err != nil {
		return 0
	}
	for _, line := range strings.Split(string(b), "\n") {
		if v, ok := strings.CutPrefix(line, "VmHWM:"); ok {
			var kib int64
			fmt.Sscan(v, &kib)
			return kib << 10
		}
	}
	return 0
}

// trimOutput shortens a process's output for an error message.
func trimOutput(s string) string {
	if len(s) > 2000 {
		return s[:2000] + "…"
	}
	return s
}

// TestCheckConfinesParents: check follows a chain's parents only where the
// other verbs do, the image's folder and --allow-parent-dir. It opened a
// parent its locators named anywhere (the format's check opened the chain
// unconfined), read it, and reported "no problems found" for a chain that
// info, map, convert and nbd refuse; now it reports the refused parent
// (exit 1) without opening it, and with --allow-parent-dir naming the
// parent's folder finds no problem.
func TestCheckConfinesParents(t *testing.T) {
	bin := vhdkitBinary(t)
	root := filepath.Join(t.TempDir(), "corpus")
	cases, err := hostile.Generate(root, hostile.Options{})
	if err != nil {
		t.Fatal(err)
	}
	n := 0
	for _, c := range cases {
		if c.Outside == "" {
			continue
		}
		n++
		img, outside := filepath.Join(root, c.Image), filepath.Join(root, c.Outside)
		for _, args := range [][]string{{"check", img}, {"check", "--json", img}} {
			w := watchDir(t, outside)
			cmd := exec.Command(bin, args...)
			out, err := cmd.CombinedOutput()
			ev := w.events()
			w.close()
			if cmd.ProcessState.ExitCode() != 1 || !strings.Contains(string(out), "outside the allowed") {
				t.Errorf("%s: %s: %v, want exit 1 naming the parent outside the allowed folders:\n%s", c.ID(), verbName(args), err, out)
			}
			if len(ev) > 0 {
				t.Errorf("%s: %s opened files outside the image's folder: %s", c.ID(), verbName(args), strings.Join(ev, ", "))
			}
		}
		if out, err := exec.Command(bin, "check", "--allow-parent-dir", outside, img).CombinedOutput(); err != nil {
			t.Errorf("%s: check --allow-parent-dir %s: %v\n%s", c.ID(), c.Outside, err, out)
		}
	}
	if n == 0 {
		t.Fatal("no case with a parent outside its folder")
	}
}
