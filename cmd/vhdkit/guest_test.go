package main

import (
	"bytes"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/vhdkit/vhdkit/internal/guest"
	"github.com/vhdkit/vhdkit/internal/testenv"
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

// TestServeGuestLiveMerge is the mission with a real guest: a QEMU guest
// runs on a machine's disk served by "vhdkit serve" and keeps writing and
// reading back 1 MiB slots (O_DIRECT, fsync) while a checkpoint is taken
// under it and then deleted — merged live — under it. The guest checks
// every read and, at the end, every slot; the machine is back on its
// .vhdx; after SIGTERM qemu-img checks the base, and 7-Zip reads the chain
// a last checkpoint leaves as we do.
func TestServeGuestLiveMerge(t *testing.T) {
	env := guest.Require(t)
	testenv.Tool(t, "qemu-img")
	testenv.Tool(t, "7zz")
	dir := shortTempDir(t)
	d := startDaemon(t, filepath.Join(dir, "d"))
	d.cli(t, "vm", "create", "g", "--disk", "64M")

	const (
		iters    = 120
		slots    = 16
		patterns = 8
		first    = 8 // MiB: where the slots start
	)
	files := map[string]guest.File{}
	pats := make([][]byte, patterns)
	for p := range pats {
		pats[p] = make([]byte, 1<<20)
		fillPattern(pats[p], 0, byte(0x40+p))
		files[fmt.Sprintf("/p%d", p)] = guest.File{Data: pats[p]}
	}
	// Iteration i writes pattern i%8 into slot 5i%16 and reads it back;
	// at the end every slot must hold the last pattern written into it.
	script := fmt.Sprintf(`set -e
i=0
while [ $i -lt %[1]d ]; do
  slot=$(( (i*5) %% %[2]d )); pat=$(( i %% %[3]d ))
  dd if=/p$pat of=/dev/vda bs=1M seek=$(( %[4]d + slot )) oflag=direct conv=fsync,notrunc status=none
  dd if=/dev/vda of=/tmp/back bs=1M skip=$(( %[4]d + slot )) count=1 iflag=direct status=none
  cmp /p$pat /tmp/back
  echo "ITER $i"
  usleep 20000
  i=$(( i + 1 ))
done
echo 3 > /proc/sys/vm/drop_caches
s=0
while [ $s -lt %[2]d ]; do
  i=0; last=0
  while [ $i -lt %[1]d ]; do
    if [ $(( (i*5) %% %[2]d )) -eq $s ]; then last=$(( i %% %[3]d )); fi
    i=$(( i + 1 ))
  done
  dd if=/dev/vda of=/tmp/back bs=1M skip=$(( %[4]d + s )) count=1 iflag=direct status=none
  cmp /p$last /tmp/back
  s=$(( s + 1 ))
done
echo VHDKIT-GUEST-LIVE-MERGE-OK
`, iters, slots, patterns, first)

	g := env.Start(t, guest.Options{
		Disks:  []guest.Disk{{Socket: d.nbd, Export: "g"}},
		Script: script,
		Files:  files,
	})
	waitFor := func(marker string) {
		t.Helper()
		for deadline := time.Now().Add(10 * time.Minute); time.Now().Before(deadline); time.Sleep(20 * time.Millisecond) {
			// The serial console ends lines with \r\n.
			c := strings.ReplaceAll(g.Console(), "\r", "")
			if strings.Contains(c, marker) {
				return
			}
			if strings.Contains(c, "reboot: Power down") || strings.Contains(c, "Kernel panic") {
				break
			}
		}
		c, err := g.WaitTimeout(time.Second)
		t.Fatalf("the guest never printed %q (%v); console:\n%s", marker, err, c)
	}
	waitFor("ITER 10\n")
	out := d.cli(t, "checkpoint", "create", "g", "--name", "live")
	if !strings.Contains(out, ".avhdx") {
		t.Fatalf("checkpoint create:\n%s", out)
	}
	waitFor("ITER 40\n")
	// A slow merge, so that it runs under many of the guest's iterations.
	out = d.cli(t, "checkpoint", "delete", "g", "live", "--wait", "--bandwidth", "4M")
	if !strings.Contains(out, `checkpoint "live" of g deleted`) {
		t.Fatalf("checkpoint delete:\n%s", out)
	}
	c := strings.ReplaceAll(g.Console(), "\r", "")
	t.Logf("the merge finished after the guest's iteration %d of %d", strings.Count(c, "ITER ")-1, iters)
	console, err := g.WaitTimeout(10 * time.Minute)
	if err != nil {
		t.Fatalf("%v\nconsole:\n%s", err, console)
	}
	if !strings.Contains(console, "VHDKIT-GUEST-LIVE-MERGE-OK") {
		t.Fatalf("the guest did not verify its data; console:\n%s", console)
	}
	v := d.vm(t, "g")
	base := filepath.Join(d.data, "vms", "g", "disk0.vhdx")
	if v.Disks[0].Path != base || len(v.Disks[0].Chain) != 1 {
		t.Fatalf("after the merge the disk runs on %v", v.Disks[0].Chain)
	}
	want := make([]byte, 64<<20)
	for i := 0; i < iters; i++ {
		slot := (i * 5) % slots
		copy(want[(first+slot)<<20:], pats[i%patterns])
	}
	// One more checkpoint leaves a chain for 7-Zip to read.
	d.cli(t, "checkpoint", "create", "g", "--name", "after")
	leaf := d.vm(t, "g").Disks[0].Path
	d.stop(t)
	if got := readImage(t, base, 0, 64<<20); !bytes.Equal(got, want) {
		t.Fatal("the base does not hold what the guest wrote")
	}
	checkClean(t, base)
	out7 := filepath.Join(dir, "x")
	runTool(t, time.Minute, "7zz", "x", "-y", "-o"+out7, leaf)
	name := strings.TrimSuffix(filepath.Base(leaf), filepath.Ext(leaf)) + ".img"
	if got, err := os.ReadFile(filepath.Join(out7, name)); err != nil || !bytes.Equal(got, want) {
		t.Fatalf("7zz x of %s differs from what the guest wrote (%v)", leaf, err)
	}
}
