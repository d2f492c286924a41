package nbd

import (
	"context"
	"testing"
	"time"
)

// TestClientsDisconnect counts the clients of each export and ends those
// of one: a write already read completes and is acknowledged, the
// client's next request fails, and the other export's client goes on.
func TestClientsDisconnect(t *testing.T) {
	g := &gateImage{newMemImage(1<<20, 512, nil), make(chan struct{}, 1), make(chan struct{})}
	other := newMemImage(1<<20, 512, nil)
	ts := startServer(t, nil, Export{Name: "a", Image: g}, Export{Name: "b", Image: other})
	if n := ts.Clients("a"); n != 0 {
		t.Fatalf("clients of a before any connection: %d", n)
	}
	a1 := ts.dial(t, &ClientOptions{Export: "a"})
	a2 := ts.dial(t, &ClientOptions{Export: "a"})
	b := ts.dial(t, &ClientOptions{Export: "b"})
	if na, nb, nx := ts.Clients("a"), ts.Clients("b"), ts.Clients("x"); na != 2 || nb != 1 || nx != 0 {
		t.Fatalf("clients: a %d, b %d, x %d; want 2, 1, 0", na, nb, nx)
	}
	// A write in flight on a1 when the disconnect begins.
	want := make([]byte, 4096)
	pattern(want, 0, 7)
	errc := make(chan error, 1)
	go func() {
		_, err := a1.WriteAt(want, 0)
		errc <- err
	}()
	<-g.entered
	done := make(chan int, 1)
	go func() { done <- ts.Disconnect(context.Background(), "a") }()
	time.Sleep(50 * time.Millisecond) // Disconnect waits for the write
	close(g.release)
	if err := <-errc; err != nil {
		t.Fatalf("the write in flight failed: %v", err)
	}
	if n := <-done; n != 2 {
		t.Fatalf("Disconnect ended %d connections, want 2", n)
	}
	got := make([]byte, len(want))
	g.memImage.ReadAt(got, 0)
	if string(got) != string(want) {
		t.Fatal("the acknowledged write is not in the image")
	}
	if _, err := a2.ReadAt(got, 0); err == nil {
		t.Fatal("a disconnected client could still read")
	}
	if n := ts.Clients("a"); n != 0 {
		t.Fatalf("clients of a after Disconnect: %d", n)
	}
	if _, err := b.WriteAt(want, 0); err != nil {
		t.Fatalf("the other export's client: %v", err)
	}
	// The export stays: new clients may connect.
	ts.dial(t, &ClientOptions{Export: "a"})
	if n := ts.Clients("a"); n != 1 {
		t.Fatalf("clients of a after a new connection: %d", n)
	}
}

// TestDisconnectTimeout closes a connection whose request cannot finish
// once ctx ends.
func TestDisconnectTimeout(t *testing.T) {
	g := &gateImage{newMemImage(1<<20, 512, nil), make(chan struct{}, 1), make(chan struct{})}
	ts := startServer(t, nil, Export{Name: "a", Image: g})
	c := ts.dial(t, &ClientOptions{Export: "a"})
	errc := make(chan error, 1)
	go func() {
		_, err := c.WriteAt(make([]byte, 512), 0)
		errc <- err
	}()
	<-g.entered
	ctx, cancel := context.WithTimeout(context.Background(), 100*time.Millisecond)
	defer cancel()
	n := make(chan int, 1)
	go func() { n <- ts.Disconnect(ctx, "a") }()
	if err := <-errc; err == nil {
		t.Fatal("the stuck write was acknowledged across an abrupt disconnect")
	}
	close(g.release)
	if got := <-n; got != 1 {
		t.Fatalf("Disconnect ended %d connections, want 1", got)
	}
}
