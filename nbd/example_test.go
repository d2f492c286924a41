package nbd_test

import (
	"context"
	"fmt"
	"log"
	"net"
	"os"
	"os/signal"
	"path/filepath"
	"strconv"
	"syscall"
	"time"

	"github.com/vhdkit/vhdkit/disk"
	"github.com/vhdkit/vhdkit/nbd"
	"github.com/vhdkit/vhdkit/vhdx"
)

// Example shows the shape of a qemu-nbd-like command: serve one image,
// on a listener inherited through systemd socket activation when there
// is one (as `nbdinfo [ vhdkit nbd … ]` passes), else on a unix socket;
// on SIGINT/SIGTERM finish in-flight requests, flush and close.
func Example() {
	img, err := disk.Open("disk.vhdx", disk.OpenOptions{})
	if err != nil {
		log.Fatal(err)
	}
	defer img.Close()

	srv := &nbd.Server{}
	if err := srv.AddExport(nbd.Export{Name: "", Image: img}); err != nil {
		log.Fatal(err)
	}

	var l net.Listener
	if pid, _ := strconv.Atoi(os.Getenv("LISTEN_PID")); pid == os.Getpid() && os.Getenv("LISTEN_FDS") == "1" {
		l, err = net.FileListener(os.NewFile(3, "LISTEN_FD_3"))
	} else {
		l, err = net.Listen("unix", "/run/vhdkit/disk.sock")
	}
	if err != nil {
		log.Fatal(err)
	}

	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	errc := make(chan error, 1)
	go func() { errc <- srv.Serve(l) }()
	select {
	case <-ctx.Done():
	case err := <-errc:
		log.Fatal(err)
	}
	// A client that stops reading replies could hold a graceful shutdown
	// forever; bound it. Shutdown returns after the drain and the flush,
	// so the deferred Close sees a quiet image.
	sctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	if err := srv.Shutdown(sctx); err != nil {
		log.Print(err)
	}
}

// ExampleServer_ServeConn serves a dynamic VHDX to a client of this
// package over an in-memory connection: what the client writes lands in
// the image, and the allocation map reaches the client through block
// status.
func ExampleServer_ServeConn() {
	dir, err := os.MkdirTemp("", "nbd-example-")
	if err != nil {
		log.Fatal(err)
	}
	defer os.RemoveAll(dir)
	img, err := vhdx.Create(filepath.Join(dir, "disk.vhdx"), vhdx.CreateOptions{Size: 64 << 20, BlockSize: 2 << 20})
	if err != nil {
		log.Fatal(err)
	}
	defer img.Close()

	srv := &nbd.Server{}
	if err := srv.AddExport(nbd.Export{Name: "disk", Image: img}); err != nil {
		log.Fatal(err)
	}
	clientSide, serverSide := net.Pipe()
	go srv.ServeConn(serverSide)

	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	c, err := nbd.NewClient(ctx, clientSide, &nbd.ClientOptions{Export: "disk"})
	if err != nil {
		log.Fatal(err)
	}
	if _, err := c.WriteAt([]byte("hello, disk"), 4<<20); err != nil {
		log.Fatal(err)
	}
	if err := c.Flush(); err != nil {
		log.Fatal(err)
	}
	exts, err := c.Extents(0, c.Size())
	if err != nil {
		log.Fatal(err)
	}
	c.Close()
	srv.Shutdown(ctx)

	fmt.Printf("export of %d MiB\n", c.Size()>>20)
	for _, e := range exts {
		fmt.Printf("  at %d MiB, %d MiB: %v\n", e.Offset>>20, e.Length>>20, e.Type)
	}
	got := make([]byte, 11)
	img.ReadAt(got, 4<<20)
	fmt.Printf("the image holds %q\n", got)
	// Output:
	// export of 64 MiB
	//   at 0 MiB, 4 MiB: hole
	//   at 4 MiB, 2 MiB: data
	//   at 6 MiB, 58 MiB: hole
	// the image holds "hello, disk"
}
