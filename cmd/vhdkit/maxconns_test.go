package main

import (
	"io"
	"net"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

// TestNBDMaxConnections: vhdkit nbd --max-connections 1 serves one client;
// a second is closed before the greeting and the refusal is logged; once
// the first leaves, a client is served again. 0 is refused.
func TestNBDMaxConnections(t *testing.T) {
	dir := shortTempDir(t)
	img := filepath.Join(dir, "d.vhdx")
	bin := vhdkitBinary(t)
	runTool(t, time.Minute, bin, "create", "--size", "1M", img)
	if _, err := runToolErr(time.Minute, bin, "nbd", "--max-connections", "0", img); err == nil || !strings.Contains(err.Error(), "want at least 1") {
		t.Fatalf("--max-connections 0: %v", err)
	}
	sock := filepath.Join(dir, "s")
	s := startNBD(t, "--socket", sock, "--max-connections", "1", img)
	greeted := func() bool {
		c, err := net.Dial("unix", sock)
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close()
		c.SetDeadline(time.Now().Add(10 * time.Second))
		_, err = io.ReadFull(c, make([]byte, 18))
		return err == nil
	}
	first, err := net.Dial("unix", sock)
	if err != nil {
		t.Fatal(err)
	}
	first.SetDeadline(time.Now().Add(10 * time.Second))
	if _, err := io.ReadFull(first, make([]byte, 18)); err != nil {
		t.Fatalf("the first client: %v", err)
	}
	if greeted() {
		t.Fatal("a second client was greeted with --max-connections 1")
	}
	// The server logs before it closes the socket, but its stderr reaches
	// the buffer through exec's copying goroutine, which may lag.
	for deadline := time.Now().Add(10 * time.Second); !strings.Contains(s.stderr.String(), "connection refused"); time.Sleep(20 * time.Millisecond) {
		if time.Now().After(deadline) {
			t.Fatalf("the refusal was not logged: %s", s.stderr)
		}
	}
	first.Close()
	for deadline := time.Now().Add(10 * time.Second); !greeted(); time.Sleep(20 * time.Millisecond) {
		if time.Now().After(deadline) {
			t.Fatal("no client served after the first left")
		}
	}
}
