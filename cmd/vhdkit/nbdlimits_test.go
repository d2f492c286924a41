package main

import (
	"bufio"
	"context"
	"errors"
	"flag"
	"io"
	"net"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/vhdkit/vhdkit/nbd"
)

// TestNBDLimitsApply: the limit flags, as nbd and serve (prefixed nbd-)
// parse them, reach the server; unset, the server's defaults stay;
// values the server cannot honour are usage errors naming the flag.
func TestNBDLimitsApply(t *testing.T) {
	for _, prefix := range []string{"", "nbd-"} {
		parse := func(args ...string) (*nbd.Server, error) {
			fs := flag.NewFlagSet("test", flag.ContinueOnError)
			fs.SetOutput(io.Discard)
			var l nbdLimits
			l.addFlags(fs, prefix)
			for i := range args {
				args[i] = strings.ReplaceAll(args[i], "--", "--"+prefix)
			}
			if err := fs.Parse(args); err != nil {
				return nil, err
			}
			srv := &nbd.Server{}
			return srv, l.apply(srv)
		}
		srv, err := parse("--max-connections", "7", "--handshake-timeout", "1500ms", "--connection-memory", "96M")
		if err != nil {
			t.Fatal(err)
		}
		if srv.MaxConns != 7 || srv.HandshakeTimeout != 1500*time.Millisecond || srv.ConnMemory != 96<<20 {
			t.Fatalf("%q: server got MaxConns %d, HandshakeTimeout %v, ConnMemory %d", prefix, srv.MaxConns, srv.HandshakeTimeout, srv.ConnMemory)
		}
		if srv, err = parse(); err != nil || srv.MaxConns != 1024 || srv.HandshakeTimeout != 30*time.Second || srv.ConnMemory != 0 {
			t.Fatalf("%q defaults: %v, MaxConns %d, HandshakeTimeout %v, ConnMemory %d", prefix, err, srv.MaxConns, srv.HandshakeTimeout, srv.ConnMemory)
		}
		for _, bad := range [][]string{
			{"--max-connections", "0"},
			{"--handshake-timeout", "0s"},
			{"--handshake-timeout", "-1s"},
			{"--connection-memory", "31M"},
			{"--connection-memory", "0"},
		} {
			_, err := parse(bad...)
			var ue *usageError
			if !errors.As(err, &ue) || !strings.Contains(err.Error(), bad[0]) {
				t.Errorf("%s %s: %v, want a usage error naming the flag", bad[0], bad[1], err)
			}
		}
	}
}

// TestNBDHandshakeTimeoutFlag: vhdkit nbd --handshake-timeout 1s and
// vhdkit serve --nbd-handshake-timeout 1s close a client that says
// nothing after the greeting (the default would wait 30 s; the client
// gives up after 20), and still serve one that does.
func TestNBDHandshakeTimeoutFlag(t *testing.T) {
	dir := shortTempDir(t)
	img := filepath.Join(dir, "d.vhdx")
	bin := vhdkitBinary(t)
	runTool(t, time.Minute, bin, "create", "--size", "1M", img)
	if _, err := runToolErr(time.Minute, bin, "nbd", "--connection-memory", "1M", img); err == nil || !strings.Contains(err.Error(), "want at least 32M") {
		t.Fatalf("--connection-memory 1M: %v", err)
	}
	if _, err := runToolErr(time.Minute, bin, "serve", "--data", filepath.Join(dir, "refused"), "--nbd-handshake-timeout", "0s"); err == nil || !strings.Contains(err.Error(), "--nbd-handshake-timeout") {
		t.Fatalf("serve --nbd-handshake-timeout 0s: %v", err)
	}

	silentClientClosed := func(sock string) {
		t.Helper()
		c, err := net.Dial("unix", sock)
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close()
		c.SetDeadline(time.Now().Add(20 * time.Second))
		if _, err := io.ReadFull(c, make([]byte, 18)); err != nil {
			t.Fatalf("no greeting: %v", err)
		}
		_, err = io.Copy(io.Discard, c)
		var ne net.Error
		if errors.As(err, &ne) && ne.Timeout() {
			t.Fatal("a client silent after the greeting was not closed")
		}
	}

	sock := filepath.Join(dir, "s")
	startNBD(t, "--socket", sock, "--handshake-timeout", "1s", "--connection-memory", "32M", img)
	silentClientClosed(sock)
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	c, err := nbd.Dial(ctx, "unix", sock, nil)
	if err != nil {
		t.Fatalf("a client that speaks: %v", err)
	}
	if _, err := c.ReadAt(make([]byte, 4096), 0); err != nil {
		t.Fatal(err)
	}
	c.Close()

	data := filepath.Join(dir, "data")
	serve := exec.Command(bin, "serve", "--data", data, "--nbd-handshake-timeout", "1s")
	var stderr lockedBuffer
	serve.Stderr = &stderr
	stdout, err := serve.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := serve.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		serve.Process.Kill()
		serve.Wait()
	})
	line := make(chan string, 1)
	go func() {
		l, _ := bufio.NewReader(stdout).ReadString('\n')
		line <- l
	}()
	select {
	case l := <-line:
		if !strings.HasPrefix(l, "vhdkit serving ") {
			t.Fatalf("vhdkit serve: %q; stderr:\n%s", l, stderr.String())
		}
	case <-time.After(time.Minute):
		t.Fatalf("vhdkit serve did not start within a minute; stderr:\n%s", stderr.String())
	}
	silentClientClosed(filepath.Join(data, "nbd.sock"))
}
