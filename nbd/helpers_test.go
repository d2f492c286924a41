package nbd

import (
	"bytes"
	"context"
	"errors"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

// inCI reports whether missing tools must fail tests instead of skipping.
func inCI() bool {
	v := os.Getenv("CI")
	return v != "" && v != "false" && v != "0"
}

// testServer is a Server listening on a unix socket in a temp dir.
type testServer struct {
	*Server
	sock string
	errc chan error
}

// startServer serves exports on a fresh unix socket and stops the server
// when the test ends.
func startServer(t testing.TB, configure func(*Server), exports ...Export) *testServer {
	t.Helper()
	s := &Server{}
	if configure != nil {
		configure(s)
	}
	for _, e := range exports {
		if err := s.AddExport(e); err != nil {
			t.Fatal(err)
		}
	}
	dir := t.TempDir()
	if len(dir) > 90 {
		// sun_path holds 108 bytes; fall back to a shorter directory.
		d, err := os.MkdirTemp("", "nbd")
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { os.RemoveAll(d) })
		dir = d
	}
	sock := filepath.Join(dir, "s")
	l, err := net.Listen("unix", sock)
	if err != nil {
		t.Fatal(err)
	}
	ts := &testServer{Server: s, sock: sock, errc: make(chan error, 1)}
	go func() { ts.errc <- s.Serve(l) }()
	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
		defer cancel()
		if err := s.Shutdown(ctx); err != nil {
			t.Errorf("shutdown: %v", err)
		}
		if err := <-ts.errc; !errors.Is(err, ErrServerClosed) {
			t.Errorf("serve: %v", err)
		}
	})
	return ts
}

// uri is the libnbd/qemu URI of an export on the test server.
func (ts *testServer) uri(export string) string {
	return "nbd+unix:///" + export + "?socket=" + ts.sock
}

func (ts *testServer) dial(t testing.TB, opts *ClientOptions) *Client {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	c, err := Dial(ctx, "unix", ts.sock, opts)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	return c
}

// run runs a program with a deadline and returns its stdout; it fails the
// test, showing stderr, when the program fails.
func run(t testing.TB, timeout time.Duration, env []string, name string, args ...string) string {
	t.Helper()
	out, err := runErr(timeout, env, name, args...)
	if err != nil {
		t.Fatalf("%s %s: %v", name, strings.Join(args, " "), err)
	}
	return out
}

func runErr(timeout time.Duration, env []string, name string, args ...string) (string, error) {
	ctx, cancel := context.WithTimeout(context.Background(), timeout)
	defer cancel()
	cmd := exec.CommandContext(ctx, name, args...)
	cmd.Env = append(os.Environ(), env...)
	var stdout, stderr bytes.Buffer
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	cmd.WaitDelay = 2 * time.Second
	if err := cmd.Run(); err != nil {
		return stdout.String(), errors.New(err.Error() + "\nstderr: " + stderr.String() + "\nstdout: " + stdout.String())
	}
	return stdout.String(), nil
}

// pattern fills b with bytes that differ per offset and seed.
func pattern(b []byte, off int64, seed byte) {
	for i := range b {
		x := uint64(off) + uint64(i)
		b[i] = byte(x>>9) ^ byte(x) ^ seed
	}
}
