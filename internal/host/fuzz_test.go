package host

import (
	"bytes"
	"encoding/json"
	"io/fs"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/vhdkit/vhdkit/internal/api"
)

// treeOf lists the files below dir with their contents, for checking
// that nothing outside a host's data directory changed.
func treeOf(t testing.TB, dir string) map[string]string {
	t.Helper()
	tree := map[string]string{}
	err := filepath.WalkDir(dir, func(p string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		if !d.IsDir() {
			b, err := os.ReadFile(p)
			if err != nil {
				return err
			}
			tree[p] = string(b)
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	return tree
}

// realState is the state.json of a host with a machine of two disks, a
// checkpoint and a finished merge job.
func realState(t testing.TB) []byte {
	t.Helper()
	dir := t.TempDir()
	h, err := Open(dir, Options{})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := h.CreateVM(api.CreateVM{Name: "web", Disks: []int64{1 << 20, 2 << 20}}); err != nil {
		t.Fatal(err)
	}
	if _, err := h.CreateCheckpoint("web", api.CreateCheckpoint{Name: "before", Type: api.CheckpointCrash}); err != nil {
		t.Fatal(err)
	}
	if _, err := h.CreateCheckpoint("web", api.CreateCheckpoint{Name: "after", Type: api.CheckpointCrash}); err != nil {
		t.Fatal(err)
	}
	if err := h.Close(); err != nil {
		t.Fatal(err)
	}
	b, err := os.ReadFile(filepath.Join(dir, stateName))
	if err != nil {
		t.Fatal(err)
	}
	return b
}

// FuzzState opens a host on an arbitrary state.json, seeded with a real
// one and with names that would lead out of the data directory: Open
// either refuses it or serves it, nothing panics, and no file outside
// the data directory is created, changed or removed (a decoy .avhdx
// beside it is what an unconfined orphan sweep would remove).
func FuzzState(f *testing.F) {
	real := realState(f)
	f.Add(real)
	f.Add(bytes.ReplaceAll(real, []byte(`"name": "web"`), []byte(`"name": "../../outside"`)))
	f.Add(bytes.ReplaceAll(real, []byte(`"name": "web"`), []byte(`"name": ""`)))
	f.Add(bytes.ReplaceAll(real, []byte(`"kind": {`), []byte(`"kind": {"type": "standard", "state": "../outside/decoy.avhdx",`)))
	f.Add([]byte(`{"machines":[{"name":"..","disks":[]},{"name":"a","disks":[{"leaf":"","size":-1}]}],"seq":-5}`))
	f.Add([]byte(`{"machines":null,"jobs":[{"id":"1","vm":"nope","targets":["9"],"step":{"kind":"live","top":"/","target":"/"}}]}`))
	f.Fuzz(func(t *testing.T, state []byte) {
		root := t.TempDir()
		data := filepath.Join(root, "d")
		outside := filepath.Join(root, "outside")
		if err := os.MkdirAll(outside, 0o700); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(filepath.Join(outside, "decoy.avhdx"), []byte("not the host's"), 0o600); err != nil {
			t.Fatal(err)
		}
		if err := os.MkdirAll(data, 0o700); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(filepath.Join(data, stateName), state, 0o600); err != nil {
			t.Fatal(err)
		}
		before := treeOf(t, outside)
		if h, err := Open(data, Options{}); err == nil {
			h.Close()
		}
		after := treeOf(t, outside)
		for p, b := range before {
			if a, ok := after[p]; !ok || a != b {
				t.Fatalf("opening the host changed %s, outside its data directory", p)
			}
		}
		for p := range after {
			if _, ok := before[p]; !ok {
				t.Fatalf("opening the host created %s, outside its data directory", p)
			}
		}
		entries, _ := os.ReadDir(root)
		if len(entries) != 2 {
			t.Fatalf("opening the host left %d entries beside its data directory", len(entries))
		}
	})
}

// FuzzAPI sends arbitrary requests to a host's API handler, seeded with
// the CLI's requests: every answer is a JSON error or result with a
// status below 500 (a client's mistake is a 4xx, never a crash or an
// internal error), and nothing outside the data directory changes. The
// bodies are kept free of '/' so that no path in them can name a file
// outside the working directory, a fresh one: the API attaches and
// imports files by path for its owner, which a fuzzer must not do to
// the machine it runs on.
func FuzzAPI(f *testing.F) {
	for _, seed := range []struct{ method, path, body string }{
		{"GET", "/v1/vms", ""},
		{"POST", "/v1/vms", `{"name":"web","disks":[1048576]}`},
		{"POST", "/v1/vms", `{"name":"web","disks":[-1]}`},
		{"POST", "/v1/vms", `{"name":"w","disks":[1048576],"settings":{"memory_mib":64,"cpus":1}}`},
		{"GET", "/v1/vms/web", ""},
		{"POST", "/v1/vms/web/checkpoints", `{"name":"before","type":"crash"}`},
		{"GET", "/v1/vms/web/checkpoints", ""},
		{"PATCH", "/v1/vms/web/checkpoints/cp-1", `{"name":"renamed"}`},
		{"DELETE", "/v1/vms/web/checkpoints/cp-1", ""},
		{"POST", "/v1/vms/web/apply/cp-1", `{}`},
		{"GET", "/v1/jobs", ""},
		{"PATCH", "/v1/jobs/1", `{"bandwidth":1}`},
		{"POST", "/v1/vms/..%2F..%2Fetc/checkpoints", `{}`},
		{"DELETE", "/v1/vms/web", `{"delete_disks":true}`},
	} {
		f.Add(seed.method, seed.path, []byte(seed.body))
	}
	f.Fuzz(func(t *testing.T, method, path string, body []byte) {
		if bytes.ContainsRune(body, '/') || bytes.ContainsRune(body, '\\') || !strings.HasPrefix(path, "/") {
			t.Skip()
		}
		root := t.TempDir()
		t.Chdir(root)
		data := filepath.Join(root, "d")
		h, err := Open(data, Options{})
		if err != nil {
			t.Fatal(err)
		}
		defer h.Close()
		req, err := http.NewRequest(method, "http://vhdkit"+path, bytes.NewReader(body))
		if err != nil {
			t.Skip()
		}
		handler := h.Handler()
		// Twice: the second request meets what the first made.
		for range 2 {
			rec := httptest.NewRecorder()
			handler.ServeHTTP(rec, req.Clone(req.Context()))
			req.Body = http.NoBody
			if len(body) > 0 {
				req.Body = httpBody(body)
			}
			if rec.Code >= 500 {
				t.Fatalf("%s %s %q: status %d: %s", method, path, body, rec.Code, rec.Body)
			}
			// Only the mux's own answers are not JSON: a redirect to the
			// cleaned path, no such route, a method it does not take.
			mux := rec.Code/100 == 3 || rec.Code == http.StatusNotFound || rec.Code == http.StatusMethodNotAllowed
			if rec.Body.Len() > 0 && !json.Valid(rec.Body.Bytes()) && !mux {
				t.Fatalf("%s %s: status %d, not JSON: %q", method, path, rec.Code, rec.Body)
			}
		}
		entries, _ := os.ReadDir(root)
		for _, e := range entries {
			if e.Name() != "d" {
				t.Fatalf("%s %s %q made %s beside the data directory", method, path, body, e.Name())
			}
		}
	})
}

func httpBody(b []byte) *bodyReader { return &bodyReader{bytes.NewReader(b)} }

type bodyReader struct{ *bytes.Reader }

func (bodyReader) Close() error { return nil }

// TestStateRefusesEscapes: a state.json naming a machine folder outside
// DIR/vms, or a checkpoint's memory state file (deleted with the
// checkpoint) other than the one the host names, is refused at Open with
// the reason.
func TestStateRefusesEscapes(t *testing.T) {
	real := realState(t)
	for _, c := range []struct{ name, from, to, want string }{
		{"machine name", `"name": "web"`, `"name": "../../x"`, `"../../x" is not a machine name`},
		{"state file", `"kind": {`, `"kind": {"type": "standard", "state": "/etc/passwd",`, `state file "/etc/passwd" is not`},
	} {
		t.Run(c.name, func(t *testing.T) {
			data := t.TempDir()
			planted := bytes.Replace(real, []byte(c.from), []byte(c.to), 1)
			if bytes.Equal(planted, real) {
				t.Fatalf("the real state has no %s", c.from)
			}
			if err := os.WriteFile(filepath.Join(data, stateName), planted, 0o600); err != nil {
				t.Fatal(err)
			}
			h, err := Open(data, Options{})
			if err == nil {
				h.Close()
				t.Fatal("Open took the state")
			}
			if !strings.Contains(err.Error(), c.want) {
				t.Fatalf("Open: %v, want %q", err, c.want)
			}
		})
	}
}

// TestAPIBodies: a body with data after its JSON object, or over the
// limit, is refused with a 4xx and changes nothing.
func TestAPIBodies(t *testing.T) {
	h, err := Open(t.TempDir(), Options{})
	if err != nil {
		t.Fatal(err)
	}
	defer h.Close()
	for _, c := range []struct {
		body string
		want int
	}{
		{`{"name":"a","disks":[1048576]} {"name":"b"}`, http.StatusBadRequest},
		{`{"name":"a","disks":[1048576]}]`, http.StatusBadRequest},
		{`{"name":"a","disks":[1048576]` + strings.Repeat(" ", 1<<20) + `}`, http.StatusRequestEntityTooLarge},
	} {
		rec := httptest.NewRecorder()
		h.Handler().ServeHTTP(rec, httptest.NewRequest("POST", "/v1/vms", strings.NewReader(c.body)))
		if rec.Code != c.want {
			t.Errorf("body %.40q...: status %d, want %d: %s", c.body, rec.Code, c.want, rec.Body)
		}
	}
	if vms := h.VMs(); len(vms) != 0 {
		t.Fatalf("a refused body made machines: %v", vms)
	}
}
