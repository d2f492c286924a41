package main

import (
	"bufio"
	"bytes"
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	crand "crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/json"
	"encoding/pem"
	"fmt"
	"io"
	"math/big"
	"math/rand/v2"
	"net"
	"net/http"
	"net/http/httptest"
	"net/url"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/chromedp/chromedp"

	"github.com/vhdkit/vhdkit/internal/api"
	"github.com/vhdkit/vhdkit/internal/guest"
	"github.com/vhdkit/vhdkit/internal/testenv"
	"github.com/vhdkit/vhdkit/nbd"
)

// consoleDaemon is a "vhdkit serve --http" and what it printed.
type consoleDaemon struct {
	*daemon
	url   string // http://127.0.0.1:PORT/
	token string
}

// startConsole runs vhdkit serve with the console on a free loopback
// port and reads the console's address and token from its output.
func startConsole(t *testing.T, data string) *consoleDaemon {
	t.Helper()
	cmd := exec.Command(vhdkitBinary(t), "serve", "--data", data, "--http", "127.0.0.1:0")
	d := &daemon{bin: cmd.Path, cmd: cmd, data: data, nbd: filepath.Join(data, "nbd.sock"), stderr: &lockedBuffer{}, done: make(chan struct{})}
	cmd.Stderr = d.stderr
	stdout, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	lines := make(chan []string, 1)
	go func() {
		r := bufio.NewReader(stdout)
		first, _ := r.ReadString('\n')
		second, _ := r.ReadString('\n')
		lines <- []string{first, second}
		io.Copy(io.Discard, r)
		d.err = cmd.Wait()
		close(d.done)
	}()
	t.Cleanup(func() { d.kill() })
	var got []string
	select {
	case got = <-lines:
	case <-time.After(time.Minute):
		t.Fatalf("vhdkit serve did not start within a minute; stderr:\n%s", d.stderr)
	}
	// "vhdkit console http://127.0.0.1:PORT/ token TOKEN"
	f := strings.Fields(got[1])
	if !strings.HasPrefix(got[0], "vhdkit serving ") || len(f) != 5 || f[1] != "console" || f[3] != "token" {
		<-d.done
		t.Fatalf("vhdkit serve: %v; stdout %q; stderr:\n%s", d.err, got, d.stderr)
	}
	t.Logf("console %s", f[2])
	return &consoleDaemon{daemon: d, url: f[2], token: f[4]}
}

// request sends one API request to the console's TCP listener with the
// headers given and returns the status and body.
func (d *consoleDaemon) request(t *testing.T, method, path, body string, header map[string]string) (int, string) {
	t.Helper()
	req, err := http.NewRequest(method, strings.TrimSuffix(d.url, "/")+path, strings.NewReader(body))
	if err != nil {
		t.Fatal(err)
	}
	for k, v := range header {
		req.Header.Set(k, v)
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	return resp.StatusCode, string(b)
}

// newBrowser starts headless Chromium (Debian's chromium package).
func newBrowser(t *testing.T) context.Context {
	t.Helper()
	chromium := testenv.Tool(t, "chromium")
	opts := append(chromedp.DefaultExecAllocatorOptions[:],
		chromedp.ExecPath(chromium),
		chromedp.WindowSize(1280, 1000),
		chromedp.Flag("disable-dev-shm-usage", true),
		// Chromium refuses root without it, and CI containers often lack
		// the user namespaces its sandbox needs; the browser only visits
		// the test's own pages.
		chromedp.NoSandbox,
	)
	actx, cancelAlloc := chromedp.NewExecAllocator(context.Background(), opts...)
	t.Cleanup(cancelAlloc)
	ctx, cancel := chromedp.NewContext(actx, chromedp.WithLogf(t.Logf))
	t.Cleanup(cancel)
	// Starts the browser.
	if err := chromedp.Do(ctx); err != nil {
		t.Fatalf("starting %s: %v", chromium, err)
	}
	return ctx
}

// browse runs actions in the browser, giving them a generous time: the
// machine may be busy with QEMU guests of other tests.
func browse(t *testing.T, ctx context.Context, what string, actions ...chromedp.Action[chromedp.Void]) {
	t.Helper()
	tctx, cancel := context.WithTimeout(ctx, 3*time.Minute)
	defer cancel()
	if err := chromedp.Do(tctx, actions...); err != nil {
		// What the page showed then: its error box and dialog.
		sctx, cancel := context.WithTimeout(ctx, 30*time.Second)
		defer cancel()
		shown, _ := chromedp.Run(sctx, chromedp.Evaluate[string](`document.querySelector('#error') ? '[error] ' + document.querySelector('#error').textContent + ' [dialog open=' + document.querySelector('#ask').open + '] ' + document.querySelector('#ask-text').textContent : document.body.innerText.slice(0, 500)`))
		t.Fatalf("browser, %s: %v; the page shows: %s", what, err, shown)
	}
}

// artifactDir is where the run writes its screenshots: $VHDKIT_ARTIFACTS,
// else a new temporary folder that outlives the test.
func artifactDir(t *testing.T) string {
	dir := os.Getenv("VHDKIT_ARTIFACTS")
	if dir == "" {
		var err error
		if dir, err = os.MkdirTemp("", "vhdkit-console-"); err != nil {
			t.Fatal(err)
		}
	} else if err := os.MkdirAll(dir, 0o755); err != nil {
		t.Fatal(err)
	}
	return dir
}

// get runs one action that returns a value, as browse does.
func get[T any](t *testing.T, ctx context.Context, what string, a chromedp.Action[T]) T {
	t.Helper()
	tctx, cancel := context.WithTimeout(ctx, 3*time.Minute)
	defer cancel()
	v, err := chromedp.Run(tctx, a)
	if err != nil {
		t.Fatalf("browser, %s: %v", what, err)
	}
	return v
}

// until waits for a JavaScript condition on the page.
func until(cond string) chromedp.Action[chromedp.Void] {
	return chromedp.Poll[chromedp.Void](cond, chromedp.WithPollingInterval(100*time.Millisecond), chromedp.WithPollingTimeout(3*time.Minute))
}

func screenshot(t *testing.T, ctx context.Context, dir, name string) {
	t.Helper()
	png := get(t, ctx, "screenshot "+name, chromedp.CaptureScreenshot())
	path := filepath.Join(dir, name+".png")
	if err := os.WriteFile(path, png, 0o644); err != nil {
		t.Fatal(err)
	}
	t.Logf("screenshot %s", path)
}

// nbdWriter writes 64 KiB patterns at random places of a disk and
// flushes each, as a guest would, remembering the last seed written to
// each chunk.
type nbdWriter struct {
	c      *nbd.Client
	chunks int64
	stop   chan struct{}
	done   chan struct{}
	mu     sync.Mutex
	seeds  map[int64]byte
	writes int
	err    error
}

const writerChunk = 64 << 10

func startWriter(c *nbd.Client, size int64) *nbdWriter {
	w := &nbdWriter{c: c, chunks: size / writerChunk, stop: make(chan struct{}), done: make(chan struct{}), seeds: map[int64]byte{}}
	go w.run()
	return w
}

func (w *nbdWriter) run() {
	defer close(w.done)
	b := make([]byte, writerChunk)
	for i := 0; ; i++ {
		select {
		case <-w.stop:
			return
		default:
		}
		chunk := rand.Int64N(w.chunks)
		seed := byte(0x80 + i%100)
		off := chunk * writerChunk
		fillPattern(b, off, seed)
		_, err := w.c.WriteAt(b, off)
		if err == nil {
			err = w.c.Flush()
		}
		if err != nil {
			w.err = fmt.Errorf("write %d at %d: %w", i, off, err)
			return
		}
		w.mu.Lock()
		w.seeds[chunk] = seed
		w.writes++
		w.mu.Unlock()
		time.Sleep(2 * time.Millisecond) // a guest, not a benchmark: leave the merge some disk
	}
}

// finish stops the writer and reads back every chunk it wrote.
func (w *nbdWriter) finish(t *testing.T) map[int64]byte {
	t.Helper()
	close(w.stop)
	<-w.done
	if w.err != nil {
		t.Fatalf("NBD writer: %v", w.err)
	}
	got := make([]byte, writerChunk)
	for chunk, seed := range w.seeds {
		if _, err := w.c.ReadAt(got, chunk*writerChunk); err != nil {
			t.Fatal(err)
		}
		wantPattern(t, got, chunk*writerChunk, seed, "a write made during the merges")
	}
	t.Logf("NBD writer: %d writes over %d chunks, all read back", w.writes, len(w.seeds))
	return w.seeds
}

// pageTree is the checkpoint tree as the page draws it: each node with
// the node it hangs under ("" for a root), "now" for the running state.
const pageTreeJS = `[...document.querySelectorAll('#tree li')].map(li => {
	const p = li.parentElement.closest('li[data-cp-id]');
	return {id: li.dataset.cpId || 'now', name: li.dataset.cpName || '', parent: p ? p.dataset.cpId : ''};
})`

type treeNode struct {
	ID     string `json:"id"`
	Name   string `json:"name"`
	Parent string `json:"parent"`
}

// wantTree checks the page's tree against "checkpoint list --json".
func wantTree(t *testing.T, ctx context.Context, d *consoleDaemon, vm string) {
	t.Helper()
	var list api.Checkpoints
	if err := json.Unmarshal([]byte(d.cli(t, "checkpoint", "list", vm, "--json")), &list); err != nil {
		t.Fatal(err)
	}
	want := []treeNode{{ID: "now", Parent: list.Current}}
	for _, c := range list.Checkpoints {
		want = append(want, treeNode{ID: c.ID, Name: c.Name, Parent: c.Parent})
	}
	cmp := func(a, b treeNode) int { return strings.Compare(a.ID, b.ID) }
	slices.SortFunc(want, cmp)
	// The page redraws on the host's events: wait for it to agree.
	deadline := time.Now().Add(2 * time.Minute)
	for {
		got := get(t, ctx, "read the tree", chromedp.Evaluate[[]treeNode](pageTreeJS))
		slices.SortFunc(got, cmp)
		if slices.Equal(got, want) {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("the page's tree\n%+v\nwant (checkpoint list --json)\n%+v", got, want)
		}
		time.Sleep(100 * time.Millisecond)
	}
}

// answer fills the page's question dialog and presses OK.
func answer(text string) chromedp.Action[chromedp.Void] {
	return chromedp.Steps(
		chromedp.WaitVisible(chromedp.CSS("#ask-ok")),
		chromedp.SetValue(chromedp.CSS("#ask-input"), text),
		// The click closes the dialog at once; no wait for it to go,
		// since the action may open the next question at once.
		chromedp.Click(chromedp.CSS("#ask-ok")),
	)
}

// confirm presses OK in the page's question dialog.
func confirm() chromedp.Action[chromedp.Void] {
	return chromedp.Steps(
		chromedp.WaitVisible(chromedp.CSS("#ask-ok")),
		// The click closes the dialog at once; no wait for it to go,
		// since the action may open the next question at once.
		chromedp.Click(chromedp.CSS("#ask-ok")),
	)
}

// cpButton is a checkpoint's action button in the tree.
func cpButton(name, class string) string {
	return fmt.Sprintf(`li[data-cp-name=%q] > .node .%s`, name, class)
}

// TestWebConsole drives the console in headless Chromium against a real
// "vhdkit serve --http": the tree it draws matches checkpoint list
// --json through create and rename from the page; deleting checkpoints
// from the page starts live merges whose progress bar moves (a rate limit
// set from the page, then lifted from the page) and end with the machine
// on its .vhdx, while an NBD writer runs and every write verifies; the
// disk's map on the page is the one "vhdkit map" gives; requests without
// the token, without the CSRF token, or from another origin (also a
// page of another origin in the same browser) are refused.
func TestWebConsole(t *testing.T) {
	ctx := newBrowser(t)
	shots := artifactDir(t)
	dir := shortTempDir(t)
	d := startConsole(t, filepath.Join(dir, "d"))
	const size = 128 << 20
	d.cli(t, "vm", "create", "web", "--disk", "128M")
	c := dialNBD(t, d.nbd, "web")
	for off := int64(0); off < 32<<20; off += 1 << 20 {
		writeFlushed(t, c, off, 1<<20, 1)
	}
	d.cli(t, "checkpoint", "create", "web", "--name", "before")
	for off := int64(32 << 20); off < 96<<20; off += 1 << 20 {
		writeFlushed(t, c, off, 1<<20, 2)
	}

	// Refused: no token; a cross-origin POST with the token; the cookie
	// without the CSRF token.
	// Each refused request names the checkpoint it would make: none may
	// appear.
	refused := []string{"no-token", "cross-origin", "no-csrf", "evil-page"}
	create := func(name string) string { return `{"name":"` + name + `"}` }
	if st, body := d.request(t, "POST", "/v1/vms/web/checkpoints", create("no-token"), nil); st != http.StatusUnauthorized || !strings.Contains(body, "token") {
		t.Errorf("POST without the token: %d %s", st, body)
	}
	if st, body := d.request(t, "GET", "/v1/vms", "", nil); st != http.StatusUnauthorized {
		t.Errorf("GET without the token: %d %s", st, body)
	}
	bearer := "Bearer " + d.token
	if st, body := d.request(t, "POST", "/v1/vms/web/checkpoints", create("cross-origin"), map[string]string{
		"Authorization": bearer, "Origin": "http://evil.example", "Sec-Fetch-Site": "cross-site"}); st != http.StatusForbidden {
		t.Errorf("cross-origin POST: %d %s", st, body)
	}
	if st, body := d.request(t, "POST", "/v1/vms/web/checkpoints", create("no-csrf"), map[string]string{
		"Cookie": "vhdkit_token=" + d.token}); st != http.StatusForbidden || !strings.Contains(body, "CSRF") {
		t.Errorf("POST with the cookie, no CSRF token: %d %s", st, body)
	}
	if st, body := d.request(t, "GET", "/v1/vms/web", "", map[string]string{"Authorization": bearer}); st != http.StatusOK || !strings.Contains(body, `"web"`) {
		t.Errorf("GET with the token: %d %s", st, body)
	}
	// Through the console an export goes to DIR/exports/NAME, nowhere else.
	if st, body := d.request(t, "POST", "/v1/vms/web/checkpoints/before/export", `{"dir":"`+dir+`/out"}`, map[string]string{
		"Authorization": bearer}); st != http.StatusBadRequest || !strings.Contains(body, filepath.Join(d.data, "exports")) {
		t.Errorf("export to a path through the console: %d %s", st, body)
	}

	// Log in: a wrong token first.
	browse(t, ctx, "log in",
		chromedp.Navigate(d.url),
		chromedp.WaitVisible(chromedp.CSS("#token")),
		chromedp.SendKeys(chromedp.CSS("#token"), "not-the-token-at-all"),
		chromedp.Submit(chromedp.CSS("#token")),
		chromedp.WaitVisible(chromedp.CSS("#wrong")),
	)
	if loc := get(t, ctx, "after a wrong token", chromedp.Location()); !strings.Contains(loc, "/login") {
		t.Fatalf("a wrong token led to %s", loc)
	}
	browse(t, ctx, "log in",
		chromedp.SendKeys(chromedp.CSS("#token"), d.token),
		chromedp.Submit(chromedp.CSS("#token")),
		chromedp.WaitVisible(chromedp.CSS(`#machines tr[data-vm="web"]`)),
		chromedp.WaitVisible(chromedp.CSS(`li[data-cp-name="before"]`)),
		chromedp.WaitVisible(chromedp.CSS(`#conn.live`)),
	)
	wantTree(t, ctx, d, "web")

	// A page of another origin in the same browser (another port of
	// 127.0.0.1: the same site, so SameSite lets the cookie go) posts to
	// the console: refused.
	evil := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		fmt.Fprintf(w, `<!doctype html><title>evil</title><script>
fetch(%q, {method: "POST", mode: "no-cors", credentials: "include", body: '{"name":"evil-page"}'})
  .finally(() => { document.title = "sent"; });
</script>`, d.url+"v1/vms/web/checkpoints")
	}))
	defer evil.Close()
	browse(t, ctx, "the other origin's page",
		chromedp.Navigate(evil.URL),
		until(`document.title === "sent"`),
	)
	out := d.cli(t, "checkpoint", "list", "web")
	for _, name := range refused {
		if strings.Contains(out, name) {
			t.Errorf("the refused request %q made a checkpoint:\n%s", name, out)
		}
	}

	// Create and rename from the page.
	browse(t, ctx, "create a checkpoint",
		chromedp.Navigate(d.url),
		chromedp.WaitVisible(chromedp.CSS(`li[data-cp-name="before"]`)),
		chromedp.Click(chromedp.CSS("#cp-create")),
		answer("scratch"),
		chromedp.WaitVisible(chromedp.CSS(`li[data-cp-name="scratch"]`)),
	)
	wantTree(t, ctx, d, "web")
	browse(t, ctx, "rename it",
		chromedp.Click(chromedp.CSS(cpButton("scratch", "rename"))),
		answer("renamed"),
		chromedp.WaitVisible(chromedp.CSS(`li[data-cp-name="renamed"]`)),
	)
	wantTree(t, ctx, d, "web")
	screenshot(t, ctx, shots, "machines-and-tree")

	// The writer goes on from here to the end.
	w := startWriter(dialNBD(t, d.nbd, "web"), size)

	// Delete "renamed": a live merge of the running file into its file.
	browse(t, ctx, "delete renamed",
		chromedp.Click(chromedp.CSS(cpButton("renamed", "delete"))),
		answer("0"), // no rate limit
		chromedp.WaitVisible(chromedp.CSS(`.job[data-state="done"]`)),
		chromedp.WaitNotPresent(chromedp.CSS(`li[data-cp-name="renamed"]`)),
	)
	wantTree(t, ctx, d, "web")

	// Disk details: the map on the page is vhdkit map's.
	browse(t, ctx, "disk details",
		chromedp.Click(chromedp.CSS(`#disks tr[data-disk="0"] button.details`)),
		chromedp.WaitVisible(chromedp.CSS(`#strip[data-extents]`)),
		chromedp.WaitVisible(chromedp.CSS(`#files tr[data-depth="1"]`)),
	)
	screenshot(t, ctx, shots, "disk-details")
	var details api.DiskDetails
	st, body := d.request(t, "GET", "/v1/vms/web/disks/0?map=1", "", map[string]string{"Authorization": bearer})
	if st != http.StatusOK || json.Unmarshal([]byte(body), &details) != nil {
		t.Fatalf("disk details: %d %s", st, body)
	}
	if len(details.Files) != 2 || !strings.HasSuffix(details.Files[1].Path, "disk0.vhdx") || details.Files[0].Type != "differencing" || details.Files[1].BlockSize == 0 {
		t.Fatalf("disk details files: %+v", details.Files)
	}
	var depths [2]bool
	for _, e := range details.Map {
		if e.Type == "data" && e.Depth < 2 {
			depths[e.Depth] = true
		}
	}
	if !depths[0] || !depths[1] {
		t.Fatalf("the map should hold data at depths 0 and 1: %+v", details.Map)
	}

	// Delete "before" at 8 MiB/s from the page: the bar moves; then the
	// limit is lifted from the page and the merge ends.
	browse(t, ctx, "delete before",
		chromedp.Click(chromedp.CSS(cpButton("before", "delete"))),
		answer("8"),
		chromedp.WaitVisible(chromedp.CSS(`.job[data-state="running"]`)),
	)
	var seen []int
	deadline := time.Now().Add(5 * time.Minute)
	for len(seen) < 3 {
		pct := get(t, ctx, "read the bar", chromedp.Evaluate[int](`Number(document.querySelector('.job[data-state="running"] .bar, .job[data-state="completing"] .bar, .job .bar').getAttribute('aria-valuenow'))`))
		if len(seen) > 0 && pct < seen[len(seen)-1] {
			t.Fatalf("the progress bar went back: %v then %d", seen, pct)
		}
		if pct > 0 && pct < 100 && (len(seen) == 0 || pct > seen[len(seen)-1]) {
			seen = append(seen, pct)
		}
		if pct == 100 || time.Now().After(deadline) {
			t.Fatalf("the bar did not show the merge moving below 100%%: %v, now %d", seen, pct)
		}
		time.Sleep(150 * time.Millisecond)
	}
	t.Logf("progress seen on the page: %v%%", seen)
	screenshot(t, ctx, shots, "live-merge")
	browse(t, ctx, "lift the limit",
		chromedp.SetValue(chromedp.CSS(`.job[data-state="running"] input.bandwidth`), "0"),
		chromedp.Click(chromedp.CSS(`.job[data-state="running"] button.set-bandwidth`)),
	)
	browse(t, ctx, "wait for the merge",
		until(`document.querySelectorAll('.job[data-state="done"]').length === 2 && !document.querySelector('li[data-cp-id]')`),
		chromedp.WaitVisible(chromedp.CSS(`li[data-now]`)),
	)
	browse(t, ctx, "the page after the merge",
		until(`document.querySelector('#disks .running-on').textContent === 'disk0.vhdx'`),
		chromedp.WaitNotVisible(chromedp.CSS(`.job[data-state="done"] .controls`)),
	)
	if pct := get(t, ctx, "the bars", chromedp.Evaluate[[]string](`[...document.querySelectorAll('.job .bar')].map(b => b.getAttribute('aria-valuenow'))`)); !slices.Equal(pct, []string{"100", "100"}) {
		t.Errorf("the finished jobs' bars show %v%%", pct)
	}
	v := d.vm(t, "web")
	if want := filepath.Join(d.data, "vms", "web", "disk0.vhdx"); v.Disks[0].Path != want || len(v.Disks[0].Chain) != 1 {
		t.Fatalf("after the merges the machine runs on %+v, want %s alone", v.Disks[0], want)
	}
	wantTree(t, ctx, d, "web")
	events := get(t, ctx, "the event log", chromedp.Text(chromedp.CSS("#events")))
	for _, want := range []string{"checkpoint created", "checkpoint renamed", "checkpoint delete started", "disk switched to merged file", "job finished"} {
		if !strings.Contains(events, want) {
			t.Errorf("the event log lacks %q:\n%s", want, events)
		}
	}
	screenshot(t, ctx, shots, "after-merge")

	// Every write verifies through NBD: the writer's, and those before it
	// that it did not overwrite.
	written := w.finish(t)
	w.c.Close()
	got := make([]byte, writerChunk)
	for off := int64(0); off < 96<<20; off += writerChunk {
		if _, ok := written[off/writerChunk]; ok {
			continue
		}
		if _, err := c.ReadAt(got, off); err != nil {
			t.Fatal(err)
		}
		seed := byte(1)
		if off >= 32<<20 {
			seed = 2
		}
		wantPattern(t, got, off, seed, "a write made before the merges")
	}

	// The page's map of the merged disk is what vhdkit map prints for it.
	browse(t, ctx, "disk details again",
		chromedp.Click(chromedp.CSS(`#disks tr[data-disk="0"] button.details`)),
		chromedp.WaitNotPresent(chromedp.CSS(`#files tr[data-depth="1"]`)),
	)
	st, body = d.request(t, "GET", "/v1/vms/web/disks/0?map=1", "", map[string]string{"Authorization": bearer})
	details = api.DiskDetails{}
	if st != http.StatusOK || json.Unmarshal([]byte(body), &details) != nil {
		t.Fatalf("disk details: %d %s", st, body)
	}
	var cliMap []api.Extent
	if err := json.Unmarshal([]byte(d.cli(t, "map", "--json", "-U", want0(d))), &cliMap); err != nil {
		t.Fatal(err)
	}
	if !slices.Equal(details.Map, cliMap) {
		t.Fatalf("the console's map\n%+v\nvhdkit map's\n%+v", details.Map, cliMap)
	}
	if extents := get(t, ctx, "the strip", chromedp.AttributeValue(chromedp.CSS("#strip"), "data-extents")).Value; extents != fmt.Sprint(len(cliMap)) {
		t.Errorf("the strip drew %s extents, vhdkit map has %d", extents, len(cliMap))
	}

	// Export and apply from the page. The export goes to the daemon's
	// exports folder and reads as the disk did; the apply, with an NBD
	// client connected, asks first, then disconnects it.
	before := make([]byte, 1<<20)
	if _, err := c.ReadAt(before, 0); err != nil {
		t.Fatal(err)
	}
	exported := filepath.Join(d.data, "exports", "web-end", "web-disk0.vhdx")
	browse(t, ctx, "checkpoint end, exported",
		chromedp.Click(chromedp.CSS("#cp-create")),
		answer("end"),
		chromedp.WaitVisible(chromedp.CSS(`li[data-cp-name="end"]`)),
		chromedp.Click(chromedp.CSS(cpButton("end", "export"))),
		answer("web-end"),
		until(`document.querySelector('#notice').textContent.includes(`+fmt.Sprintf("%q", exported)+`)`),
	)
	if out := d.cli(t, "check", exported); !strings.Contains(out, "no problems found") {
		t.Fatalf("vhdkit check %s:\n%s", exported, out)
	}
	writeFlushed(t, c, 0, 1<<20, 9)
	browse(t, ctx, "apply end", chromedp.Click(chromedp.CSS(cpButton("end", "apply"))), confirm())
	browse(t, ctx, "the question about the client", until(`document.querySelector('#ask').open && document.querySelector('#ask-text').textContent.includes('NBD client')`))
	browse(t, ctx, "disconnect it", confirm())
	browse(t, ctx, "the tree after the apply", until(`document.querySelector('li[data-cp-name="end"] > ul > li[data-now]') !== null`))
	wantTree(t, ctx, d, "web")
	if _, err := c.ReadAt(make([]byte, 4096), 0); err == nil {
		t.Error("the NBD client reads on after the apply that disconnected it")
	}
	c2 := dialNBD(t, d.nbd, "web")
	got = make([]byte, 1<<20)
	if _, err := c2.ReadAt(got, 0); err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(got, before) {
		t.Error("after applying checkpoint end, the first MiB is not what it was at end")
	}
	c2.Close()
	screenshot(t, ctx, shots, "applied")

	// Delete subtree: s1 and s2 under it go, the running state merging
	// back into end's child.
	browse(t, ctx, "two checkpoints",
		chromedp.Click(chromedp.CSS("#cp-create")),
		answer("s1"),
		chromedp.WaitVisible(chromedp.CSS(`li[data-cp-name="s1"]`)),
		chromedp.Click(chromedp.CSS("#cp-create")),
		answer("s2"),
		chromedp.WaitVisible(chromedp.CSS(`li[data-cp-name="s1"] li[data-cp-name="s2"]`)),
	)
	wantTree(t, ctx, d, "web")
	browse(t, ctx, "delete subtree s1",
		chromedp.Click(chromedp.CSS(cpButton("s1", "delete-subtree"))),
		answer("0"),
		chromedp.WaitNotPresent(chromedp.CSS(`li[data-cp-name="s1"]`)),
		until(`document.querySelectorAll('.job[data-state="done"]').length === 3`),
	)
	wantTree(t, ctx, d, "web")

	// A machine made and deleted from the page, with its files.
	browse(t, ctx, "a new machine",
		chromedp.Click(chromedp.CSS("#vm-create")),
		answer("extra"),
		answer("16M"),
		chromedp.WaitVisible(chromedp.CSS(`#machines tr[data-vm="extra"]`)),
		until(`document.querySelector('#vm-name').textContent === 'extra' && document.querySelector('#disks tr[data-disk="0"]') !== null`),
	)
	if v := d.vm(t, "extra"); len(v.Disks) != 1 || v.Disks[0].Size != 16<<20 {
		t.Fatalf("the machine made from the page: %+v", v.Disks)
	}
	browse(t, ctx, "delete it",
		chromedp.Click(chromedp.CSS("#vm-delete")),
		confirm(),
		chromedp.WaitNotPresent(chromedp.CSS(`#machines tr[data-vm="extra"]`)),
		until(`document.querySelector('#notice').textContent.includes('Machine extra deleted')`),
	)
	if _, err := os.Stat(filepath.Join(d.data, "vms", "extra")); !os.IsNotExist(err) {
		t.Errorf("the deleted machine's folder: %v", err)
	}
	d.stop(t)
}

func want0(d *consoleDaemon) string { return filepath.Join(d.data, "vms", "web", "disk0.vhdx") }

// TestWebConsoleTokenFile: a non-loopback console needs a token file;
// the token file is made when missing (mode 0600) and read when present,
// and a bearer token from it is accepted.
func TestWebConsoleTokenFile(t *testing.T) {
	dir := shortTempDir(t)
	bin := vhdkitBinary(t)
	out, err := exec.Command(bin, "serve", "--data", filepath.Join(dir, "d"), "--http", "0.0.0.0:0").CombinedOutput()
	if err == nil || !strings.Contains(string(out), "not a loopback address") || !strings.Contains(string(out), "--http-token-file") {
		t.Fatalf("serve --http 0.0.0.0:0 without a token file: %v\n%s", err, out)
	}
	tokenFile := filepath.Join(dir, "token")
	if err := os.WriteFile(tokenFile, []byte("short\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	out, err = exec.Command(bin, "serve", "--data", filepath.Join(dir, "d"), "--http", "127.0.0.1:0", "--http-token-file", tokenFile).CombinedOutput()
	if err == nil || !strings.Contains(string(out), "at least 16") {
		t.Fatalf("serve with a short token: %v\n%s", err, out)
	}
	os.Remove(tokenFile)

	cmd := exec.Command(bin, "serve", "--data", filepath.Join(dir, "d"), "--http", "127.0.0.1:0", "--http-token-file", tokenFile)
	stdout, _ := cmd.StdoutPipe()
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	defer func() { cmd.Process.Kill(); cmd.Wait() }()
	r := bufio.NewReader(stdout)
	r.ReadString('\n')
	line, _ := r.ReadString('\n')
	f := strings.Fields(line)
	if len(f) != 6 || f[1] != "console" || !strings.Contains(line, "token in "+tokenFile) {
		t.Fatalf("serve printed %q", line)
	}
	fi, err := os.Stat(tokenFile)
	if err != nil || fi.Mode().Perm() != 0o600 {
		t.Fatalf("token file: %v %v", fi, err)
	}
	b, _ := os.ReadFile(tokenFile)
	u, _ := url.JoinPath(f[2], "v1/vms")
	req, _ := http.NewRequest("GET", u, nil)
	req.Header.Set("Authorization", "Bearer "+strings.TrimSpace(string(b)))
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		t.Fatalf("GET /v1/vms with the file's token: %s", resp.Status)
	}
}

// TestWebConsoleGuest follows the seed's story in the browser with a
// machine QEMU runs: its settings and disks changed from the page while
// it is off (memory, a disk added and removed), started from the page,
// paused and resumed, a checkpoint taken and deleted (a live merge under
// the running guest, which writes and reads back its disk all along
// without an I/O error), the disk back on its .vhdx, turned off from the
// page; the guest's first write is in the file.
func TestWebConsoleGuest(t *testing.T) {
	env := guest.Require(t)
	ctx := newBrowser(t)
	shots := artifactDir(t)
	dir := shortTempDir(t)
	pattern := make([]byte, 4<<20)
	fillPattern(pattern, 8<<20, 0x5a)
	slot := make([]byte, 1<<20)
	fillPattern(slot, 0, 0x33)
	boot, err := env.WriteBoot(dir, guest.Options{
		Disks: []guest.Disk{{}},
		Files: map[string]guest.File{"/pattern": {Data: pattern}, "/slot": {Data: slot}},
		Script: `dd if=/pattern of=/dev/vda bs=1M seek=8 oflag=direct conv=fsync,notrunc status=none || echo GUEST-IO-ERROR
echo VHDKIT-RUN-WROTE
i=0
while true; do
  s=$(( 16 + i % 16 ))
  dd if=/slot of=/dev/vda bs=1M seek=$s oflag=direct conv=fsync,notrunc status=none || echo GUEST-IO-ERROR
  dd if=/dev/vda of=/tmp/back bs=1M skip=$s count=1 iflag=direct status=none || echo GUEST-IO-ERROR
  cmp /slot /tmp/back || echo GUEST-IO-ERROR
  echo "ITER $i"
  i=$(( i + 1 ))
  usleep 100000
done
`,
	})
	if err != nil {
		t.Fatal(err)
	}
	d := startConsole(t, filepath.Join(dir, "d"))
	d.cli(t, "vm", "create", "g", "--disk", "64M", "--memory", "256M", "--cpus", "1", "--accel", "tcg",
		"--kernel", boot.Kernel, "--initrd", boot.Initrd, "--append", boot.Append)

	browse(t, ctx, "log in",
		chromedp.Navigate(d.url),
		chromedp.SendKeys(chromedp.CSS("#token"), d.token),
		chromedp.Submit(chromedp.CSS("#token")),
		chromedp.WaitVisible(chromedp.CSS(`#machines tr[data-vm="g"]`)),
		chromedp.WaitVisible(chromedp.CSS(`#conn.live`)),
	)
	// Off: settings and disks change.
	browse(t, ctx, "memory, a disk added",
		chromedp.Click(chromedp.CSS("#set-memory")),
		answer("192"),
		until(`document.querySelector('#vm-settings').textContent.includes('192.0 MiB memory')`),
		chromedp.Click(chromedp.CSS("#disk-add")),
		answer("16M"),
		chromedp.WaitVisible(chromedp.CSS(`#disks tr[data-disk="1"]`)),
	)
	if v := d.vm(t, "g"); v.Settings.MemoryMiB != 192 || len(v.Disks) != 2 || v.Disks[1].Size != 16<<20 {
		t.Fatalf("after the page's changes: settings %+v, disks %+v", v.Settings, v.Disks)
	}
	browse(t, ctx, "the disk removed",
		chromedp.Click(chromedp.CSS(`#disks tr[data-disk="1"] button.remove`)),
		confirm(),
		chromedp.WaitNotPresent(chromedp.CSS(`#disks tr[data-disk="1"]`)),
	)
	if v := d.vm(t, "g"); len(v.Disks) != 1 {
		t.Fatalf("after removing disk 1: %+v", v.Disks)
	}

	// Started from the page.
	browse(t, ctx, "start", chromedp.Click(chromedp.CSS(`#power-buttons button[data-power="start"]`)),
		until(`document.querySelector('#machines tr[data-vm="g"]').textContent.includes('running')`))
	v := d.vm(t, "g")
	if v.Power != api.PowerRunning || v.Runtime == nil || v.Runtime.Pid == 0 {
		t.Fatalf("after start from the page: %q %+v", v.Power, v.Runtime)
	}
	pid := v.Runtime.Pid
	t.Cleanup(func() { syscall.Kill(pid, syscall.SIGKILL) })
	consoleLog := v.Runtime.Console
	iters := func() int {
		b, _ := os.ReadFile(consoleLog)
		c := string(b)
		if strings.Contains(c, "GUEST-IO-ERROR") {
			t.Fatalf("the guest saw an I/O error; console:\n%s", c)
		}
		return strings.Count(c, "ITER ")
	}
	waitIters := func(n int, what string) {
		t.Helper()
		for deadline := time.Now().Add(10 * time.Minute); iters() < n; time.Sleep(100 * time.Millisecond) {
			if time.Now().After(deadline) {
				b, _ := os.ReadFile(consoleLog)
				t.Fatalf("%s: the guest did not reach %d iterations; console:\n%s\ndaemon:\n%s", what, n, b, d.stderr)
			}
		}
	}
	waitIters(3, "after start")
	browse(t, ctx, "pause, resume",
		chromedp.Click(chromedp.CSS(`#power-buttons button[data-power="pause"]`)),
		until(`document.querySelector('#machines tr[data-vm="g"]').textContent.includes('paused')`),
		chromedp.Click(chromedp.CSS(`#power-buttons button[data-power="resume"]`)),
		until(`document.querySelector('#machines tr[data-vm="g"]').textContent.includes('running')`),
	)

	// A checkpoint while it runs: the disk moves to an .avhdx.
	browse(t, ctx, "checkpoint",
		chromedp.Click(chromedp.CSS("#cp-create")),
		chromedp.WaitVisible(chromedp.CSS("#ask-type")),
		chromedp.SetValue(chromedp.CSS("#ask-type"), "crash"),
		answer("first"),
		chromedp.WaitVisible(chromedp.CSS(`li[data-cp-name="first"]`)),
		until(`document.querySelector('#disks .running-on').textContent.endsWith('.avhdx')`),
	)
	n := iters()
	waitIters(n+5, "on the checkpoint's .avhdx")
	screenshot(t, ctx, shots, "guest-running-checkpoint")

	// Deleted from the page: a live merge under the running guest.
	browse(t, ctx, "delete the checkpoint",
		chromedp.Click(chromedp.CSS(cpButton("first", "delete"))),
		answer("0"),
		chromedp.WaitVisible(chromedp.CSS(`.job[data-state="done"]`)),
		until(`document.querySelector('#disks .running-on').textContent === 'disk0.vhdx'`),
		chromedp.WaitNotPresent(chromedp.CSS(`li[data-cp-id]`)),
	)
	n = iters()
	waitIters(n+5, "back on the .vhdx")
	if v := d.vm(t, "g"); v.Power != api.PowerRunning || len(v.Disks[0].Chain) != 1 || filepath.Base(v.Disks[0].Path) != "disk0.vhdx" {
		t.Fatalf("after the merge: power %q, disk %+v", v.Power, v.Disks[0])
	}
	wantTree(t, ctx, d, "g")
	screenshot(t, ctx, shots, "guest-merged")

	browse(t, ctx, "turn off",
		chromedp.Click(chromedp.CSS(`#power-buttons button[data-power="stop"][data-turn-off]`)),
		until(`document.querySelector('#machines tr[data-vm="g"]').textContent.includes('off')`),
	)
	if v := d.vm(t, "g"); v.Power != api.PowerOff {
		t.Fatalf("after turn off: %q", v.Power)
	}
	c := dialNBD(t, d.nbd, "g")
	got := make([]byte, len(pattern))
	if _, err := c.ReadAt(got, 8<<20); err != nil {
		t.Fatal(err)
	}
	wantPattern(t, got, 8<<20, 0x5a, "the guest's first write")
	c.Close()
	d.stop(t)
}

// testPKI is a CA, a server certificate for 127.0.0.1 and a client
// certificate it signed, and a client certificate it did not sign.
type testPKI struct {
	caFile, certFile, keyFile string
	client, rogue             tls.Certificate
	roots                     *x509.CertPool
}

func newTestPKI(t *testing.T, dir string) *testPKI {
	t.Helper()
	key := func() *ecdsa.PrivateKey {
		k, err := ecdsa.GenerateKey(elliptic.P256(), crand.Reader)
		if err != nil {
			t.Fatal(err)
		}
		return k
	}
	sign := func(tmpl, parent *x509.Certificate, pub *ecdsa.PublicKey, signer *ecdsa.PrivateKey) *x509.Certificate {
		tmpl.NotBefore, tmpl.NotAfter = time.Now().Add(-time.Hour), time.Now().Add(24*time.Hour)
		der, err := x509.CreateCertificate(crand.Reader, tmpl, parent, pub, signer)
		if err != nil {
			t.Fatal(err)
		}
		c, err := x509.ParseCertificate(der)
		if err != nil {
			t.Fatal(err)
		}
		return c
	}
	pemOf := func(typ string, der []byte) []byte { return pem.EncodeToMemory(&pem.Block{Type: typ, Bytes: der}) }
	write := func(name string, b []byte) string {
		path := filepath.Join(dir, name)
		if err := os.WriteFile(path, b, 0o600); err != nil {
			t.Fatal(err)
		}
		return path
	}
	caKey := key()
	caTmpl := &x509.Certificate{SerialNumber: big.NewInt(1), Subject: pkix.Name{CommonName: "test CA"}, IsCA: true,
		BasicConstraintsValid: true, KeyUsage: x509.KeyUsageCertSign | x509.KeyUsageDigitalSignature}
	ca := sign(caTmpl, caTmpl, &caKey.PublicKey, caKey)
	p := &testPKI{roots: x509.NewCertPool()}
	p.roots.AddCert(ca)
	p.caFile = write("ca.pem", pemOf("CERTIFICATE", ca.Raw))

	srvKey := key()
	srv := sign(&x509.Certificate{SerialNumber: big.NewInt(2), Subject: pkix.Name{CommonName: "127.0.0.1"},
		IPAddresses: []net.IP{net.IPv4(127, 0, 0, 1)}, KeyUsage: x509.KeyUsageDigitalSignature,
		ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth}}, ca, &srvKey.PublicKey, caKey)
	p.certFile = write("server.pem", pemOf("CERTIFICATE", srv.Raw))
	kder, err := x509.MarshalPKCS8PrivateKey(srvKey)
	if err != nil {
		t.Fatal(err)
	}
	p.keyFile = write("server-key.pem", pemOf("PRIVATE KEY", kder))

	clientCert := func(parent *x509.Certificate, signer *ecdsa.PrivateKey, serial int64) tls.Certificate {
		k := key()
		tmpl := &x509.Certificate{SerialNumber: big.NewInt(serial), Subject: pkix.Name{CommonName: "operator"},
			KeyUsage: x509.KeyUsageDigitalSignature, ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth}}
		if parent == nil {
			parent, signer = tmpl, k
		}
		c := sign(tmpl, parent, &k.PublicKey, signer)
		return tls.Certificate{Certificate: [][]byte{c.Raw}, PrivateKey: k}
	}
	p.client = clientCert(ca, caKey, 3)
	p.rogue = clientCert(nil, nil, 4)
	return p
}

// TestWebConsoleTLS: with --http-tls-cert/--http-tls-key the console is
// HTTPS (the login cookie is Secure); with --http-client-ca a client
// without a certificate, or with one the CA did not sign, is refused in
// the handshake, and one with a good certificate still needs the token.
func TestWebConsoleTLS(t *testing.T) {
	dir := shortTempDir(t)
	pki := newTestPKI(t, dir)
	bin := vhdkitBinary(t)
	if out, err := exec.Command(bin, "serve", "--data", filepath.Join(dir, "d"), "--http", "127.0.0.1:0", "--http-client-ca", pki.caFile).CombinedOutput(); err == nil || !strings.Contains(string(out), "--http-client-ca needs --http-tls-cert") {
		t.Fatalf("client CA without a certificate: %v\n%s", err, out)
	}
	cmd := exec.Command(bin, "serve", "--data", filepath.Join(dir, "d"), "--http", "127.0.0.1:0",
		"--http-tls-cert", pki.certFile, "--http-tls-key", pki.keyFile, "--http-client-ca", pki.caFile)
	stdout, _ := cmd.StdoutPipe()
	var stderr lockedBuffer
	cmd.Stderr = &stderr
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	defer func() { cmd.Process.Kill(); cmd.Wait() }()
	r := bufio.NewReader(stdout)
	r.ReadString('\n')
	line, _ := r.ReadString('\n')
	f := strings.Fields(line)
	if len(f) != 5 || f[1] != "console" || !strings.HasPrefix(f[2], "https://127.0.0.1:") {
		t.Fatalf("serve printed %q; stderr:\n%s", line, &stderr)
	}
	consoleURL, token := f[2], f[4]
	client := func(certs ...tls.Certificate) *http.Client {
		return &http.Client{
			Transport: &http.Transport{TLSClientConfig: &tls.Config{RootCAs: pki.roots, Certificates: certs}},
			// The login's redirect is not followed: its cookie is read.
			CheckRedirect: func(*http.Request, []*http.Request) error { return http.ErrUseLastResponse },
		}
	}
	get := func(hc *http.Client, withToken bool) (int, error) {
		req, _ := http.NewRequest("GET", consoleURL+"v1/vms", nil)
		if withToken {
			req.Header.Set("Authorization", "Bearer "+token)
		}
		resp, err := hc.Do(req)
		if err != nil {
			return 0, err
		}
		resp.Body.Close()
		return resp.StatusCode, nil
	}
	if st, err := get(client(pki.client), true); err != nil || st != http.StatusOK {
		t.Fatalf("a good client certificate and the token: %d %v", st, err)
	}
	if st, err := get(client(pki.client), false); err != nil || st != http.StatusUnauthorized {
		t.Errorf("a good client certificate without the token: %d %v", st, err)
	}
	if st, err := get(client(), true); err == nil {
		t.Errorf("no client certificate: served %d", st)
	}
	if st, err := get(client(pki.rogue), true); err == nil {
		t.Errorf("a client certificate the CA did not sign: served %d", st)
	}
	if resp, err := http.Get(strings.Replace(consoleURL, "https:", "http:", 1) + "v1/vms"); err == nil {
		resp.Body.Close()
		if resp.StatusCode == http.StatusOK {
			t.Errorf("plain HTTP on the HTTPS port: %s", resp.Status)
		}
	}
	req, _ := http.NewRequest("POST", consoleURL+"login", strings.NewReader(url.Values{"token": {token}}.Encode()))
	req.Header.Set("Content-Type", "application/x-www-form-urlencoded")
	resp, err := client(pki.client).Do(req)
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if ck := resp.Cookies(); resp.StatusCode != http.StatusSeeOther || len(ck) != 1 || !ck[0].Secure || !ck[0].HttpOnly {
		t.Fatalf("login over HTTPS: %s %+v", resp.Status, ck)
	}
}
