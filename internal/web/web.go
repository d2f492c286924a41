// Package web is vhdkit's web console: pages embedded in the binary
// (plain HTML, CSS and JavaScript in static/, no build step, nothing
// fetched from elsewhere) that drive the host through the same HTTP API
// the command line uses, mounted on a TCP listener behind a token.
//
// What a request must carry:
//
//	/login, /console.css      nothing (the login page)
//	everything else           the token: the cookie the login page sets,
//	                          or "Authorization: Bearer TOKEN"
//	POST, PUT, PATCH, DELETE  also same origin (Sec-Fetch-Site, Origin);
//	                          with the cookie, the CSRF token in the
//	                          X-CSRF-Token header (GET /session gives it)
//
// The files served are the embedded ones; the API replies with JSON about
// the host, never a file's content. A checkpoint export asked for through
// the console writes into DIR/exports/NAME, a folder of the daemon's own:
// its target is a folder name, not a path (see confineExport).
package web

import (
	"bytes"
	"crypto/hmac"
	"crypto/rand"
	"crypto/sha256"
	"crypto/subtle"
	"embed"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"time"

	"github.com/vhdkit/vhdkit/internal/api"
	"github.com/vhdkit/vhdkit/internal/lazyregexp"
)

//go:embed static
var static embed.FS

const (
	// tokenCookie holds the token once the login page accepted it.
	tokenCookie = "vhdkit_token"
	// csrfHeader carries the CSRF token on state-changing requests.
	csrfHeader = "X-CSRF-Token"
	// ExportsDir is the folder of the data directory console exports go
	// to.
	ExportsDir = "exports"
)

// Console is the web console's HTTP handler.
type Console struct {
	api     http.Handler
	token   string
	csrf    string // derived from token: stable across daemon restarts
	dataDir string
	files   fs.FS
	origin  *http.CrossOriginProtection
}

// New returns the console for the API handler apiHandler of the host on
// dataDir; token is what a client must present.
func New(apiHandler http.Handler, token, dataDir string) (*Console, error) {
	if len(token) < 16 {
		return nil, errors.New("console token: want at least 16 characters")
	}
	files, err := fs.Sub(static, "static")
	if err != nil {
		return nil, err
	}
	mac := hmac.New(sha256.New, []byte(token))
	mac.Write([]byte("vhdkit console CSRF"))
	return &Console{api: apiHandler, token: token, csrf: hex.EncodeToString(mac.Sum(nil)),
		dataDir: dataDir, files: files, origin: http.NewCrossOriginProtection()}, nil
}

// NewToken returns a random token: 32 bytes, hex.
func NewToken() string { return randomHex(32) }

// startTime is the embedded files' modification time.
var startTime = time.Now()

func randomHex(n int) string {
	b := make([]byte, n)
	rand.Read(b)
	return hex.EncodeToString(b)
}

// ReadToken reads the token from file, or, when file does not exist,
// writes a new one there (mode 0600) so the next start uses it too.
func ReadToken(file string) (string, error) {
	b, err := os.ReadFile(file)
	if errors.Is(err, os.ErrNotExist) {
		tok := randomHex(32)
		f, err := os.OpenFile(file, os.O_WRONLY|os.O_CREATE|os.O_EXCL, 0o600)
		if err != nil {
			return "", fmt.Errorf("console token file: %w", err)
		}
		_, err = fmt.Fprintln(f, tok)
		if cerr := f.Close(); err == nil {
			err = cerr
		}
		return tok, err
	}
	if err != nil {
		return "", fmt.Errorf("console token file: %w", err)
	}
	// A token others can read is no secret.
	if fi, err := os.Stat(file); err == nil && fi.Mode().Perm()&0o077 != 0 {
		return "", fmt.Errorf("console token file %s is mode %#o: others may read it; chmod 600 %s", file, fi.Mode().Perm(), file)
	}
	tok := strings.TrimSpace(string(b))
	if len(tok) < 16 {
		return "", fmt.Errorf("console token file %s: the token is %d characters, want at least 16", file, len(tok))
	}
	return tok, nil
}

// Loopback reports whether addr (HOST:PORT) binds to loopback only.
func Loopback(addr string) bool {
	host, _, err := net.SplitHostPort(addr)
	if err != nil {
		return false
	}
	if host == "localhost" {
		return true
	}
	ip := net.ParseIP(host)
	return ip != nil && ip.IsLoopback()
}

func (c *Console) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	h := w.Header()
	h.Set("Content-Security-Policy", "default-src 'self'; img-src 'self' data:; frame-ancestors 'none'; form-action 'self'; base-uri 'none'")
	h.Set("X-Content-Type-Options", "nosniff")
	h.Set("X-Frame-Options", "DENY")
	h.Set("Referrer-Policy", "no-referrer")
	switch r.URL.Path {
	case "/login":
		c.login(w, r)
		return
	case "/console.css":
		c.file(w, r, "console.css")
		return
	}
	if !c.authenticated(r) {
		if strings.HasPrefix(r.URL.Path, "/v1/") || r.URL.Path == "/session" {
			refuse(w, http.StatusUnauthorized, "the console token is missing or wrong: log in at /login, or send Authorization: Bearer TOKEN")
			return
		}
		http.Redirect(w, r, "/login", http.StatusSeeOther)
		return
	}
	if err := c.checkChange(r); err != nil {
		refuse(w, http.StatusForbidden, err.Error())
		return
	}
	switch {
	case r.URL.Path == "/session":
		h.Set("Content-Type", "application/json")
		h.Set("Cache-Control", "no-store")
		json.NewEncoder(w).Encode(map[string]string{"csrf": c.csrf})
	case strings.HasPrefix(r.URL.Path, "/v1/"):
		if err := c.confineExport(r); err != nil {
			refuse(w, http.StatusBadRequest, err.Error())
			return
		}
		c.api.ServeHTTP(w, r)
	case r.URL.Path == "/" || r.URL.Path == "/index.html":
		c.file(w, r, "index.html")
	case r.URL.Path == "/console.js":
		c.file(w, r, "console.js")
	default:
		http.NotFound(w, r)
	}
}

// authenticated reports whether r carries the token, as a cookie or a
// bearer token.
func (c *Console) authenticated(r *http.Request) bool {
	if tok, ok := strings.CutPrefix(r.Header.Get("Authorization"), "Bearer "); ok {
		return equal(tok, c.token)
	}
	ck, err := r.Cookie(tokenCookie)
	return err == nil && equal(ck.Value, c.token)
}

// checkChange refuses a state-changing request from another origin, and
// one authenticated by the cookie (which the browser sends on its own)
// without the CSRF token (which only the console's pages can read).
func (c *Console) checkChange(r *http.Request) error {
	switch r.Method {
	case http.MethodGet, http.MethodHead, http.MethodOptions:
		return nil
	}
	if err := c.origin.Check(r); err != nil {
		return fmt.Errorf("refused: %v (the console takes changes from its own pages only)", err)
	}
	if strings.HasPrefix(r.Header.Get("Authorization"), "Bearer ") {
		return nil
	}
	if !equal(r.Header.Get(csrfHeader), c.csrf) {
		return errors.New("refused: the CSRF token is missing or wrong (reload the console)")
	}
	return nil
}

// login shows the login page, and takes the token from its form: the
// cookie it sets is HttpOnly (no script reads it) and SameSite=Strict
// (no other site's page sends it).
func (c *Console) login(w http.ResponseWriter, r *http.Request) {
	switch r.Method {
	case http.MethodGet, http.MethodHead:
		c.file(w, r, "login.html")
		return
	case http.MethodPost:
	default:
		refuse(w, http.StatusMethodNotAllowed, "login takes GET or POST")
		return
	}
	if err := c.origin.Check(r); err != nil {
		refuse(w, http.StatusForbidden, fmt.Sprintf("refused: %v", err))
		return
	}
	r.Body = http.MaxBytesReader(w, r.Body, 4096)
	if !equal(strings.TrimSpace(r.PostFormValue("token")), c.token) {
		http.Redirect(w, r, "/login#wrong", http.StatusSeeOther)
		return
	}
	http.SetCookie(w, &http.Cookie{Name: tokenCookie, Value: c.token, Path: "/", HttpOnly: true,
		SameSite: http.SameSiteStrictMode, Secure: r.TLS != nil})
	http.Redirect(w, r, "/", http.StatusSeeOther)
}

func (c *Console) file(w http.ResponseWriter, r *http.Request, name string) {
	b, err := fs.ReadFile(c.files, name)
	if err != nil {
		http.NotFound(w, r)
		return
	}
	w.Header().Set("Cache-Control", "no-cache")
	http.ServeContent(w, r, name, startTime, bytes.NewReader(b))
}

// exportName is what a console export's target may be: one folder name.
var exportName = lazyregexp.New(`^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$`)

// exportRoute matches the checkpoint export route of package api.
var exportRoute = lazyregexp.New(`^/v1/vms/[^/]+/checkpoints/[^/]+/export$`)

// confineExport rewrites the target of a checkpoint export to
// DIR/exports/NAME: through the console, a client names a folder, and the
// daemon writes only into a folder of its own (mode 0700), whatever the
// client asks for.
func (c *Console) confineExport(r *http.Request) error {
	if r.Method != http.MethodPost || !exportRoute.MatchString(r.URL.Path) {
		return nil
	}
	var req api.ExportCheckpoint
	dec := json.NewDecoder(io.LimitReader(r.Body, 1<<20))
	dec.DisallowUnknownFields()
	if err := dec.Decode(&req); err != nil {
		return fmt.Errorf("request body: %v", err)
	}
	if !exportName.MatchString(req.Dir) {
		return fmt.Errorf("export target %q: through the console, name a folder (letters, digits, '.', '_', '-'); it is made in %s", req.Dir, filepath.Join(c.dataDir, ExportsDir))
	}
	exports := filepath.Join(c.dataDir, ExportsDir)
	if err := os.Mkdir(exports, 0o700); err != nil && !errors.Is(err, os.ErrExist) {
		return err
	}
	req.Dir = filepath.Join(exports, req.Dir)
	b, err := json.Marshal(req)
	if err != nil {
		return err
	}
	r.Body = io.NopCloser(bytes.NewReader(b))
	r.ContentLength = int64(len(b))
	return nil
}

func refuse(w http.ResponseWriter, status int, msg string) {
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(status)
	json.NewEncoder(w).Encode(api.Error{Error: msg})
}

func equal(a, b string) bool { return subtle.ConstantTimeCompare([]byte(a), []byte(b)) == 1 }
