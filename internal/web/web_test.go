package web

import (
	"encoding/json"
	"io"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/vhdkit/vhdkit/internal/api"
)

const testToken = "0123456789abcdef0123456789abcdef"

// recordingAPI stands in for the host's API: it answers 200 and keeps
// what reached it.
type recordingAPI struct {
	method, path, body string
}

func (a *recordingAPI) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	b, _ := io.ReadAll(r.Body)
	a.method, a.path, a.body = r.Method, r.URL.Path, string(b)
	w.Write([]byte("{}"))
}

func newConsole(t *testing.T) (*Console, *recordingAPI, string) {
	t.Helper()
	rec := &recordingAPI{}
	dir := t.TempDir()
	c, err := New(rec, testToken, dir)
	if err != nil {
		t.Fatal(err)
	}
	return c, rec, dir
}

func do(c *Console, method, target, body string, header map[string]string) *httptest.ResponseRecorder {
	r := httptest.NewRequest(method, target, strings.NewReader(body))
	for k, v := range header {
		r.Header.Set(k, v)
	}
	w := httptest.NewRecorder()
	c.ServeHTTP(w, r)
	return w
}

// TestAccess: what each request must carry, and that a refused one never
// reaches the API.
func TestAccess(t *testing.T) {
	c, rec, _ := newConsole(t)
	cookie := "vhdkit_token=" + testToken
	for _, tc := range []struct {
		name, method, target string
		header               map[string]string
		want                 int
	}{
		{"login page", "GET", "/login", nil, 200},
		{"style sheet", "GET", "/console.css", nil, 200},
		{"page without token", "GET", "/", nil, http.StatusSeeOther},
		{"script without token", "GET", "/console.js", nil, http.StatusSeeOther},
		{"API without token", "GET", "/v1/vms", nil, 401},
		{"API with a wrong bearer", "GET", "/v1/vms", map[string]string{"Authorization": "Bearer " + strings.Repeat("0", 32)}, 401},
		{"API with a wrong cookie", "GET", "/v1/vms", map[string]string{"Cookie": "vhdkit_token=x"}, 401},
		{"page with cookie", "GET", "/", map[string]string{"Cookie": cookie}, 200},
		{"API with bearer", "GET", "/v1/vms", map[string]string{"Authorization": "Bearer " + testToken}, 200},
		{"change with bearer", "POST", "/v1/vms/a/start", map[string]string{"Authorization": "Bearer " + testToken}, 200},
		{"change with bearer, cross-site", "POST", "/v1/vms/a/start", map[string]string{"Authorization": "Bearer " + testToken, "Sec-Fetch-Site": "cross-site"}, 403},
		{"change with bearer, same-site other origin", "POST", "/v1/vms/a/start", map[string]string{"Authorization": "Bearer " + testToken, "Sec-Fetch-Site": "same-site"}, 403},
		{"change with bearer, other Origin", "DELETE", "/v1/vms/a", map[string]string{"Authorization": "Bearer " + testToken, "Origin": "http://127.0.0.1:1"}, 403},
		{"change with cookie, no CSRF", "POST", "/v1/vms/a/start", map[string]string{"Cookie": cookie, "Sec-Fetch-Site": "same-origin"}, 403},
		{"change with cookie, wrong CSRF", "PATCH", "/v1/jobs/j", map[string]string{"Cookie": cookie, "Sec-Fetch-Site": "same-origin", "X-CSRF-Token": "x"}, 403},
		{"change with cookie and CSRF", "POST", "/v1/vms/a/start", map[string]string{"Cookie": cookie, "Sec-Fetch-Site": "same-origin", "X-CSRF-Token": c.csrf}, 200},
		{"unknown file", "GET", "/etc/passwd", map[string]string{"Cookie": cookie}, 404},
		{"traversal", "GET", "/../static/web.go", map[string]string{"Cookie": cookie}, 404},
	} {
		rec.path = ""
		w := do(c, tc.method, tc.target, "", tc.header)
		if w.Code != tc.want {
			t.Errorf("%s: %s %s: %d %s, want %d", tc.name, tc.method, tc.target, w.Code, w.Body, tc.want)
		}
		if reached := rec.path != ""; reached != (tc.want == 200 && strings.HasPrefix(tc.target, "/v1/")) {
			t.Errorf("%s: reached the API: %v", tc.name, reached)
		}
		if csp := w.Header().Get("Content-Security-Policy"); !strings.Contains(csp, "default-src 'self'") {
			t.Errorf("%s: Content-Security-Policy %q", tc.name, csp)
		}
	}
	// The session hands the CSRF token only to a logged-in page.
	if w := do(c, "GET", "/session", "", nil); w.Code != 401 {
		t.Errorf("session without token: %d", w.Code)
	}
	w := do(c, "GET", "/session", "", map[string]string{"Cookie": cookie})
	var s map[string]string
	if json.Unmarshal(w.Body.Bytes(), &s) != nil || s["csrf"] != c.csrf || strings.Contains(w.Body.String(), testToken) {
		t.Errorf("session: %d %s", w.Code, w.Body)
	}
}

// TestLogin: the right token sets an HttpOnly, SameSite=Strict cookie;
// a wrong one or another origin's form sets none.
func TestLogin(t *testing.T) {
	c, _, _ := newConsole(t)
	form := map[string]string{"Content-Type": "application/x-www-form-urlencoded", "Sec-Fetch-Site": "same-origin"}
	w := do(c, "POST", "/login", "token="+testToken, form)
	ck := w.Result().Cookies()
	if w.Code != http.StatusSeeOther || w.Header().Get("Location") != "/" || len(ck) != 1 || ck[0].Value != testToken || !ck[0].HttpOnly || ck[0].SameSite != http.SameSiteStrictMode {
		t.Fatalf("login: %d %v %+v", w.Code, w.Header(), ck)
	}
	w = do(c, "POST", "/login", "token=wrong", form)
	if w.Code != http.StatusSeeOther || w.Header().Get("Location") != "/login#wrong" || len(w.Result().Cookies()) != 0 {
		t.Fatalf("wrong token: %d %v", w.Code, w.Header())
	}
	form["Sec-Fetch-Site"] = "cross-site"
	if w = do(c, "POST", "/login", "token="+testToken, form); w.Code != 403 || len(w.Result().Cookies()) != 0 {
		t.Fatalf("cross-site login: %d %v", w.Code, w.Header())
	}
}

// TestConfineExport: an export through the console names a folder, made
// in DIR/exports; a path is refused before the API sees it.
func TestConfineExport(t *testing.T) {
	c, rec, dir := newConsole(t)
	auth := map[string]string{"Authorization": "Bearer " + testToken}
	for _, bad := range []string{"/tmp/x", "../x", "a/b", "", ".hidden", strings.Repeat("a", 65)} {
		rec.path = ""
		b, _ := json.Marshal(api.ExportCheckpoint{Dir: bad})
		if w := do(c, "POST", "/v1/vms/a/checkpoints/cp-1/export", string(b), auth); w.Code != 400 || rec.path != "" {
			t.Errorf("export to %q: %d %s, reached the API: %v", bad, w.Code, w.Body, rec.path != "")
		}
	}
	if w := do(c, "POST", "/v1/vms/a/checkpoints/cp-1/export", `{"dir":"x","other":1}`, auth); w.Code != 400 {
		t.Errorf("export with an unknown field: %d", w.Code)
	}
	w := do(c, "POST", "/v1/vms/a/checkpoints/cp-1/export", `{"dir":"a-1.b_c"}`, auth)
	var got api.ExportCheckpoint
	if w.Code != 200 || json.Unmarshal([]byte(rec.body), &got) != nil || got.Dir != filepath.Join(dir, ExportsDir, "a-1.b_c") {
		t.Fatalf("export: %d, the API got %q", w.Code, rec.body)
	}
	if fi, err := os.Stat(filepath.Join(dir, ExportsDir)); err != nil || fi.Mode().Perm() != 0o700 {
		t.Fatalf("exports folder: %v %v", fi, err)
	}
}

func TestLoopback(t *testing.T) {
	for addr, want := range map[string]bool{
		"127.0.0.1:8080": true, "[::1]:80": true, "localhost:1": true, "127.1.2.3:0": true,
		"0.0.0.0:8080": false, ":8080": false, "[::]:80": false, "192.168.1.2:80": false, "example.com:80": false, "127.0.0.1": false,
	} {
		if got := Loopback(addr); got != want {
			t.Errorf("Loopback(%q) = %v, want %v", addr, got, want)
		}
	}
}

// TestReadToken: made 0600 when missing and read back; too short or
// readable by others refused.
func TestReadToken(t *testing.T) {
	dir := t.TempDir()
	file := filepath.Join(dir, "token")
	tok, err := ReadToken(file)
	if err != nil || len(tok) != 64 {
		t.Fatalf("new token: %q %v", tok, err)
	}
	if fi, _ := os.Stat(file); fi.Mode().Perm() != 0o600 {
		t.Fatalf("token file mode %v", fi.Mode())
	}
	if again, err := ReadToken(file); err != nil || again != tok {
		t.Fatalf("read again: %q %v", again, err)
	}
	os.Chmod(file, 0o644)
	if _, err := ReadToken(file); err == nil || !strings.Contains(err.Error(), "chmod 600") {
		t.Fatalf("a token others may read: %v", err)
	}
	os.WriteFile(file, []byte("short\n"), 0o600)
	os.Chmod(file, 0o600)
	if _, err := ReadToken(file); err == nil || !strings.Contains(err.Error(), "at least 16") {
		t.Fatalf("a short token: %v", err)
	}
}
