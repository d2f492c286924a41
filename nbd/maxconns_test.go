package nbd

import (
	"io"
	"net"
	"runtime"
	"testing"
	"time"
)

// TestMaxConns: with MaxConns connections open (idle in the handshake),
// one more is closed before the greeting; once one of them ends a new
// connection is served again.
func TestMaxConns(t *testing.T) {
	ts := startServer(t, func(s *Server) { s.MaxConns = 3 }, Export{Name: "e", Image: newMemImage(1<<20, 512, nil)})
	var open []*raw
	for range 3 {
		r := dialRaw(t, ts.sock)
		r.read(18) // the greeting: served
		open = append(open, r)
	}
	extra := dialRaw(t, ts.sock)
	if n, err := io.ReadFull(extra.c, make([]byte, 18)); err == nil {
		t.Fatalf("a fourth connection got a greeting (%d bytes) with MaxConns 3", n)
	}
	open[0].c.Close()
	deadline := time.Now().Add(10 * time.Second)
	for {
		c, err := net.Dial("unix", ts.sock)
		if err != nil {
			t.Fatal(err)
		}
		c.SetDeadline(time.Now().Add(5 * time.Second))
		_, err = io.ReadFull(c, make([]byte, 18))
		c.Close()
		if err == nil {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("no connection served after one of three ended: %v", err)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// TestManyConnectionsMemory: 300 clients that connect and then say
// nothing (each holding its handshake open) cost the server a bounded
// amount each: its heap grows by less than 256 KiB a connection (a
// 64 KiB read buffer and a goroutine's stack are what one holds).
func TestManyConnectionsMemory(t *testing.T) {
	const clients = 300
	ts := startServer(t, func(s *Server) { s.HandshakeTimeout = time.Minute }, Export{Name: "e", Image: newMemImage(1<<20, 512, nil)})
	heap := func() uint64 {
		runtime.GC()
		var m runtime.MemStats
		runtime.ReadMemStats(&m)
		return m.HeapInuse + m.StackInuse
	}
	before := heap()
	var conns []net.Conn
	defer func() {
		for _, c := range conns {
			c.Close()
		}
	}()
	for range clients {
		c, err := net.Dial("unix", ts.sock)
		if err != nil {
			t.Fatal(err)
		}
		conns = append(conns, c)
		c.SetDeadline(time.Now().Add(20 * time.Second))
		if _, err := io.ReadFull(c, make([]byte, 18)); err != nil {
			t.Fatalf("connection %d: no greeting: %v", len(conns), err)
		}
	}
	grown := int64(heap()) - int64(before)
	t.Logf("%d idle connections: heap and stacks grew %d KiB (%d KiB each)", clients, grown>>10, grown/clients>>10)
	if grown > clients*256<<10 {
		t.Fatalf("%d idle connections grew the heap by %d MiB", clients, grown>>20)
	}
}
