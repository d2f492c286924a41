package nbd_test

import (
	"context"
	"log"
	"net"
	"os"
	"os/signal"
	"strconv"
	"syscall"
	"time"

	"github.com/vhdkit/vhdkit/disk"
	"github.com/vhdkit/vhdkit/nbd"
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
