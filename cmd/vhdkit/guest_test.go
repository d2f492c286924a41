package main

import (
	"bytes"
	"fmt"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/vhdkit/vhdkit/internal/guest"
)

// TestNBDGuest boots a QEMU guest whose virtio disk is a dynamic VHDX
// served by "vhdkit nbd". The guest writes two patterns with O_DIRECT and
// fsync (across a 32 MiB block boundary, and near the end of the disk),
// drops its caches, reads them back and compares. After it powers off and
// the server stops on SIGTERM, the image holds the patterns and checks
// clean with vhdkit check and qemu-img check.
func TestNBDGuest(t *testing.T) {
	env := guest.Require(t)
	dir := shortTempDir(t)
	img := filepath.Join(dir, "d.vhdx")
	createImage(t, img, "--size", "96M")
	sock := filepath.Join(dir, "s.sock")
	s := startNBD(t, "--socket", sock, "--export", "boot", img)

	type region struct {
		file      string
		off, size int64
	}
	regions := []region{{"/p1", 30 << 20, 4 << 20}, {"/p2", 95 << 20, 1 << 20}}
	files := map[string]guest.File{}
	var script strings.Builder
	script.WriteString("set -e\n")
	for i, r := range regions {
		data := make([]byte, r.size)
		fillPattern(data, r.off, byte(i+1))
		files[r.file] = guest.File{Data: data}
		fmt.Fprintf(&script, "dd if=%s of=/dev/vda bs=1M seek=%d oflag=direct conv=fsync,notrunc status=none\n", r.file, r.off>>20)
	}
	script.WriteString("sync\nblockdev --flushbufs /dev/vda\necho 3 > /proc/sys/vm/drop_caches\n")
	for _, r := range regions {
		fmt.Fprintf(&script, "dd if=/dev/vda of=/tmp/back bs=1M skip=%d count=%d iflag=direct status=none\n", r.off>>20, r.size>>20)
		fmt.Fprintf(&script, "cmp %s /tmp/back\n", r.file)
	}
	script.WriteString("echo VHDKIT-GUEST-PATTERN-OK\n")

	g := env.Start(t, guest.Options{
		Disks:  []guest.Disk{{Socket: sock, Export: "boot"}},
		Script: script.String(),
		Files:  files,
	})
	// Booting takes seconds; a loaded machine with TCG can take minutes.
	console, err := g.WaitTimeout(10 * time.Minute)
	if err != nil {
		t.Fatalf("%v\nconsole:\n%s", err, console)
	}
	if !strings.Contains(console, "VHDKIT-GUEST-PATTERN-OK") {
		t.Fatalf("the guest did not verify its pattern; console:\n%s", console)
	}
	t.Logf("console:\n%s", console)
	s.stop(t, syscall.SIGTERM)

	for i, r := range regions {
		want := make([]byte, r.size)
		fillPattern(want, r.off, byte(i+1))
		if !bytes.Equal(readImage(t, img, r.off, r.size), want) {
			t.Errorf("the pattern the guest wrote at %d is not in the image", r.off)
		}
	}
	checkClean(t, img)
}
