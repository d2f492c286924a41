// Command vhdkit creates, inspects, checks, converts, resizes and merges
// virtual disks (VHDX, VHD and raw) on Linux, serves them over NBD, and
// runs the host daemon whose machines take checkpoints and merge them
// live. Run "vhdkit help" for the commands.
package main

import (
	"context"
	"os"
	"os/signal"
	"syscall"
)

func main() {
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	code := run(ctx, os.Args[1:], os.Stdout, os.Stderr)
	stop()
	os.Exit(code)
}
