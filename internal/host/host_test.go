package host

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"log/slog"
	"math/rand/v2"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/vhdkit/vhdkit/internal/api"
	"github.com/vhdkit/vhdkit/internal/testenv"
	"github.com/vhdkit/vhdkit/nbd"
	"github.com/vhdkit/vhdkit/vhdx"
)

// testHost is a Host serving its API and NBD on unix sockets, as the
// daemon does.
type testHost struct {
	*Host
	dir     string
	nbd     *nbd.Server
	nbdSock string
	api     *api.Client
	hs      *http.Server
	opts    Options
}

// shortDir is a temporary directory whose paths fit a unix socket address.
func shortDir(t testing.TB) string {
	d, err := os.MkdirTemp("", "vh")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(d) })
	return d
}

func startHost(t testing.TB, dir string, opts Options) *testHost {
	t.Helper()
	th := &testHost{dir: dir, nbd: &nbd.Server{}, nbdSock: filepath.Join(dir, "nbd.sock"), opts: opts}
	if testing.Verbose() {
		opts.Logger = slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: slog.LevelDebug}))
	}
	opts.NBD = th.nbd
	h, err := Open(dir, opts)
	if err != nil {
		t.Fatal(err)
	}
	th.Host = h
	apiL, err := h.ListenAPI()
	if err != nil {
		t.Fatal(err)
	}
	os.Remove(th.nbdSock)
	nbdL, err := net.Listen("unix", th.nbdSock)
	if err != nil {
		t.Fatal(err)
	}
	th.hs = &http.Server{Handler: h.Handler()}
	go th.hs.Serve(apiL)
	go th.nbd.Serve(nbdL)
	th.api = &api.Client{DataDir: dir}
	return th
}

// stop shuts the host down as the daemon does on SIGTERM.
func (th *testHost) stop(t testing.TB) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	th.hs.Shutdown(ctx)
	if err := th.nbd.Shutdown(ctx); err != nil {
		t.Error(err)
	}
	if err := th.Host.Close(); err != nil {
		t.Error(err)
	}
}

func (th *testHost) dial(t testing.TB, export string) *nbd.Client {
	t.Helper()
	c, err := nbd.Dial(context.Background(), "unix", th.nbdSock, &nbd.ClientOptions{Export: export})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	return c
}

// waitJob polls a job until it ends; a job that pauses on an error fails
// the test.
func (th *testHost) waitJob(t testing.TB, id string) *api.Job {
	t.Helper()
	deadline := time.Now().Add(3 * time.Minute)
	for time.Now().Before(deadline) {
		j, err := th.api.Job(context.Background(), id)
		if err != nil {
			t.Fatal(err)
		}
		if j.Finished() {
			return j
		}
		if j.State == api.JobPaused && j.Reason != "paused by request" {
			t.Fatalf("job %s paused: %s", id, j.Reason)
		}
		time.Sleep(20 * time.Millisecond)
	}
	t.Fatalf("job %s did not finish", id)
	return nil
}

// workload writes random data, zeros and trims through an NBD client and
// keeps the model of what the disk must hold: every acknowledged request.
type workload struct {
	c      *nbd.Client
	rng    *rand.Rand
	mu     sync.Mutex
	model  []byte
	ops    int
	lo, hi int64 // the range written; hi 0: the whole disk
}

func newWorkload(c *nbd.Client, seed uint64) *workload {
	return &workload{c: c, rng: rand.New(rand.NewPCG(seed, seed+1)), model: make([]byte, c.Size())}
}

// step issues one request; every tenth is a flush.
func (w *workload) step() error {
	lo, hi := w.lo, w.hi
	if hi == 0 {
		hi = int64(len(w.model))
	}
	n := (w.rng.Int64N(64) + 1) * 4096
	off := lo + w.rng.Int64N((hi-lo-n)/4096+1)*4096
	buf := make([]byte, n)
	var err error
	w.ops++
	switch w.ops % 10 {
	case 3:
		err = w.c.WriteZeroes(off, n, true)
	case 7:
		err = w.c.Trim(off, n)
	case 9:
		return w.c.Flush()
	default:
		for i := range buf {
			buf[i] = byte(w.rng.Uint32())
		}
		_, err = w.c.WriteAt(buf, off)
	}
	if err != nil {
		return err
	}
	w.mu.Lock()
	copy(w.model[off:], buf)
	w.mu.Unlock()
	return nil
}

// run steps until stop closes.
func (w *workload) run(stop <-chan struct{}) <-chan error {
	errc := make(chan error, 1)
	go func() {
		for {
			select {
			case <-stop:
				errc <- w.c.Flush()
				return
			default:
			}
			if err := w.step(); err != nil {
				errc <- err
				return
			}
		}
	}()
	return errc
}

func (w *workload) fill(t testing.TB, n int) {
	t.Helper()
	for i := 0; i < n; i++ {
		if err := w.step(); err != nil {
			t.Fatal(err)
		}
	}
}

// verify reads the whole disk through c and compares it with the model.
func (w *workload) verify(t testing.TB, c *nbd.Client, what string) {
	t.Helper()
	w.mu.Lock()
	defer w.mu.Unlock()
	got := make([]byte, len(w.model))
	for off := 0; off < len(got); off += 8 << 20 {
		if _, err := c.ReadAt(got[off:min(off+8<<20, len(got))], int64(off)); err != nil {
			t.Fatal(err)
		}
	}
	if i := firstDiff(got, w.model); i >= 0 {
		t.Fatalf("%s: disk differs from what was written at offset %d", what, i)
	}
}

func (w *workload) snapshot() []byte {
	w.mu.Lock()
	defer w.mu.Unlock()
	return bytes.Clone(w.model)
}

func firstDiff(a, b []byte) int {
	if bytes.Equal(a, b) {
		return -1
	}
	for i := range min(len(a), len(b)) {
		if a[i] != b[i] {
			return i
		}
	}
	return min(len(a), len(b))
}

// readFile reads a chain's whole content from its leaf file.
func readFile(t testing.TB, path string) []byte {
	t.Helper()
	im, err := vhdx.Open(path, vhdx.OpenOptions{ReadOnly: true})
	if err != nil {
		t.Fatal(err)
	}
	defer im.Close()
	b := make([]byte, im.Size())
	if _, err := im.ReadAt(b, 0); err != nil {
		t.Fatal(err)
	}
	return b
}

func runTool(t testing.TB, name string, args ...string) string {
	t.Helper()
	out, err := exec.Command(name, args...).CombinedOutput()
	if err != nil {
		t.Fatalf("%s %s: %v\n%s", name, strings.Join(args, " "), err, out)
	}
	return string(out)
}

func avhdxFiles(t testing.TB, dir string) []string {
	t.Helper()
	m, err := filepath.Glob(filepath.Join(dir, "vms", "*", "*.avhdx"))
	if err != nil {
		t.Fatal(err)
	}
	return m
}

// statusOf returns the HTTP status of an API error.
func statusOf(err error) int {
	var se *api.StatusError
	if errors.As(err, &se) {
		return se.Status
	}
	return 0
}

var ctx = context.Background()

// TestLiveMerge is the mission in small: a machine with two disks runs
// writers on both; a checkpoint moves both disks to .avhdx children;
// deleting it merges them back, live, while the writers go on. Every
// acknowledged write reads back, the disks run on their .vhdx again, no
// .avhdx is left, and qemu-img and 7-Zip read the bases as we do.
func TestLiveMerge(t *testing.T) {
	dir := shortDir(t)
	th := startHost(t, dir, Options{})
	v, err := th.api.CreateVM(ctx, api.CreateVM{Name: "web", Disks: []int64{32 << 20, 16 << 20}})
	if err != nil {
		t.Fatal(err)
	}
	if len(v.Disks) != 2 || v.Disks[0].Export != "web" || v.Disks[1].Export != "web/1" {
		t.Fatalf("disks %+v", v.Disks)
	}
	var loads []*workload
	for i, d := range v.Disks {
		w := newWorkload(th.dial(t, d.Export), uint64(i))
		w.fill(t, 200)
		loads = append(loads, w)
	}
	cp, err := th.api.CreateCheckpoint(ctx, "web", api.CreateCheckpoint{Name: "before"})
	if err != nil {
		t.Fatal(err)
	}
	frozen := []([]byte){loads[0].snapshot(), loads[1].snapshot()}
	v, _ = th.api.VM(ctx, "web")
	for i, d := range v.Disks {
		if !strings.HasSuffix(d.Path, ".avhdx") || len(d.Chain) != 2 || d.Chain[1] != cp.Files[i] {
			t.Fatalf("after the checkpoint disk %d runs on %s (chain %v)", i, d.Path, d.Chain)
		}
	}
	stop := make(chan struct{})
	var errcs []<-chan error
	for _, w := range loads {
		w.fill(t, 100)
		errcs = append(errcs, w.run(stop))
	}
	j, err := th.api.DeleteCheckpoint(ctx, "web", "before", false, 0)
	if err != nil {
		t.Fatal(err)
	}
	j = th.waitJob(t, j.ID)
	if j.State != api.JobDone || j.Done != j.Total || j.Total == 0 {
		t.Fatalf("job %+v", j)
	}
	time.Sleep(100 * time.Millisecond) // writes on the merged disks
	close(stop)
	for _, errc := range errcs {
		if err := <-errc; err != nil {
			t.Fatal(err)
		}
	}
	for i, w := range loads {
		w.verify(t, th.dial(t, v.Disks[i].Export), fmt.Sprintf("disk %d after the merge", i))
		if bytes.Equal(w.snapshot(), frozen[i]) {
			t.Fatalf("disk %d: the writers wrote nothing after the checkpoint", i)
		}
	}
	v, _ = th.api.VM(ctx, "web")
	for i, d := range v.Disks {
		if d.Path != cp.Files[i] || len(d.Chain) != 1 || !strings.HasSuffix(d.Path, ".vhdx") {
			t.Fatalf("after the merge disk %d runs on %s (chain %v)", i, d.Path, d.Chain)
		}
	}
	if f := avhdxFiles(t, dir); len(f) != 0 {
		t.Fatalf("files left: %v", f)
	}
	tree, _ := th.api.Checkpoints(ctx, "web")
	if len(tree.Checkpoints) != 0 || tree.Current != "" {
		t.Fatalf("tree %+v", tree)
	}
	th.stop(t)
	for i, w := range loads {
		if i := firstDiff(readFile(t, cp.Files[i]), w.snapshot()); i >= 0 {
			t.Fatalf("%s differs at %d after the host stopped", cp.Files[i], i)
		}
	}
	testenv.Tool(t, "qemu-img")
	for _, f := range cp.Files {
		runTool(t, "qemu-img", "check", "-f", "vhdx", f)
	}
	raw := filepath.Join(dir, "disk0.raw")
	os.WriteFile(raw, loads[0].snapshot(), 0o644)
	runTool(t, "qemu-img", "compare", "-f", "vhdx", "-F", "raw", cp.Files[0], raw)
}
