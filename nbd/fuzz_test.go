package nbd

import (
	"bytes"
	"context"
	"errors"
	"io"
	"net"
	"sync"
	"testing"
	"time"
)

// recordingConn keeps every byte the client side sends.
type recordingConn struct {
	net.Conn
	mu   sync.Mutex
	sent bytes.Buffer
}

func (r *recordingConn) Write(p []byte) (int, error) {
	r.mu.Lock()
	r.sent.Write(p)
	r.mu.Unlock()
	return r.Conn.Write(p)
}

// clientTraffic is what this package's Client sends to a server for a
// session doing work: the handshake (structured replies, meta contexts),
// then session's requests, then the disconnect. It seeds the fuzzer with
// real traffic.
func clientTraffic(t testing.TB, session func(*Client) error) []byte {
	t.Helper()
	s := &Server{}
	if err := s.AddExport(Export{Name: "e", Image: newMemImage(1<<20, 512, nil)}); err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	cs, ss := net.Pipe()
	go s.ServeConn(ss)
	rec := &recordingConn{Conn: cs}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	c, err := NewClient(ctx, rec, &ClientOptions{Export: "e"})
	if err != nil {
		t.Fatal(err)
	}
	if err := session(c); err != nil {
		t.Fatal(err)
	}
	c.Close()
	rec.mu.Lock()
	defer rec.mu.Unlock()
	return bytes.Clone(rec.sent.Bytes())
}

// FuzzServer feeds a server connection arbitrary client bytes: handshake
// options and transmission requests, seeded from real sessions of this
// package's client. Whatever arrives, the connection ends within a bound
// once the client hangs up (no request or option leaves it waiting on
// its own), nothing panics, and no request beyond the export's end
// reaches its image: the server refuses those itself.
func FuzzServer(f *testing.F) {
	block := bytes.Repeat([]byte{0x5a}, 4096)
	for _, session := range []func(*Client) error{
		func(c *Client) error { return nil },
		func(c *Client) error {
			if _, err := c.WriteAt(block, 8192); err != nil {
				return err
			}
			if _, err := c.ReadAt(make([]byte, 4096), 8192); err != nil {
				return err
			}
			return c.Flush()
		},
		func(c *Client) error {
			if err := c.Trim(0, 65536); err != nil {
				return err
			}
			if err := c.WriteZeroes(65536, 65536, true); err != nil {
				return err
			}
			_, err := c.Extents(0, 1<<20)
			return err
		},
	} {
		f.Add(clientTraffic(f, session))
	}
	f.Fuzz(func(t *testing.T, in []byte) {
		img := newMemImage(1<<20, 512, nil)
		s := &Server{HandshakeTimeout: 2 * time.Second, Workers: 4, ConnMemory: 4 << 20}
		if err := s.AddExport(Export{Name: "e", Image: img}); err != nil {
			t.Fatal(err)
		}
		defer s.Close()
		cs, ss := net.Pipe()
		done := make(chan error, 1)
		go func() { done <- s.ServeConn(ss) }()
		go io.Copy(io.Discard, cs) // the server's replies
		cs.SetWriteDeadline(time.Now().Add(5 * time.Second))
		cs.Write(in) // the server may hang up before reading it all
		cs.Close()
		select {
		case err := <-done:
			if errors.Is(err, ErrServerClosed) {
				t.Fatalf("ServeConn: %v", err)
			}
		case <-time.After(10 * time.Second):
			t.Fatal("the connection did not end within 10 s of the client hanging up")
		}
		if n := img.outside.Load(); n > 0 {
			t.Fatalf("%d requests beyond the export's end reached its image", n)
		}
	})
}
