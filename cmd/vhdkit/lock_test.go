package main

import (
	"bytes"
	"context"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/vhdkit/vhdkit/internal/testenv"
	"github.com/vhdkit/vhdkit/nbd"
)

// The scenarios of a shared host: a daemon, "vhdkit nbd" servers, QEMU's
// tools and an admin's commands on the same files, as real processes.
// Image locking (package storage) makes each conflicting command fail
// cleanly, naming the file and its holder, and loses no acknowledged
// write.

// vhdkitCmd runs the built vhdkit and returns its output and error.
func vhdkitCmd(t testing.TB, env []string, args ...string) (stdout, stderr string, err error) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	cmd := exec.CommandContext(ctx, vhdkitBinary(t), args...)
	cmd.Env = append(os.Environ(), env...)
	var o, e bytes.Buffer
	cmd.Stdout, cmd.Stderr = &o, &e
	err = cmd.Run()
	return o.String(), e.String(), err
}

// wantRefused runs vhdkit args and expects exit status 1 with a message
// that the file is in use, naming it.
func wantRefused(t testing.TB, env []string, file, holder string, args ...string) {
	t.Helper()
	out, errOut, err := vhdkitCmd(t, env, args...)
	ee, ok := err.(*exec.ExitError)
	if !ok || ee.ExitCode() != 1 {
		t.Fatalf("vhdkit %s: %v, want exit 1 (refused)\nstdout: %s\nstderr: %s", strings.Join(args, " "), err, out, errOut)
	}
	if !strings.Contains(errOut, file) || !strings.Contains(errOut, holder) {
		t.Errorf("vhdkit %s: the refusal does not name %s and %s:\n%s", strings.Join(args, " "), file, holder, errOut)
	}
}

// dialNBD connects the package's client to a unix socket.
func dialNBD(t testing.TB, sock, export string) *nbd.Client {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	c, err := nbd.Dial(ctx, "unix", sock, &nbd.ClientOptions{Export: export})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	return c
}

// writeFlushed writes a pattern at off through c and flushes it.
func writeFlushed(t testing.TB, c *nbd.Client, off int64, n int, seed byte) {
	t.Helper()
	b := make([]byte, n)
	fillPattern(b, off, seed)
	if _, err := c.WriteAt(b, off); err != nil {
		t.Fatal(err)
	}
	if err := c.Flush(); err != nil {
		t.Fatal(err)
	}
}

func wantPattern(t testing.TB, got []byte, off int64, seed byte, what string) {
	t.Helper()
	want := make([]byte, len(got))
	fillPattern(want, off, seed)
	if !bytes.Equal(got, want) {
		t.Errorf("%s: the data written at %d is not there", what, off)
	}
}

// TestMergeWhileServed: "vhdkit merge TOP" while "vhdkit nbd" serves TOP
// used to remove TOP under the server, losing the writes acknowledged
// after it. Now the merge is refused, naming the server, and every write
// survives.
func TestMergeWhileServed(t *testing.T) {
	dir := shortTempDir(t)
	base, top := filepath.Join(dir, "base.vhdx"), filepath.Join(dir, "top.avhdx")
	createImage(t, base, "--size", "32M")
	createImage(t, top, "--parent", base)
	sock := filepath.Join(dir, "s.sock")
	s := startNBD(t, "--socket", sock, top)
	c := dialNBD(t, sock, "")
	writeFlushed(t, c, 1<<20, 256<<10, 1)

	wantRefused(t, nil, top, "vhdkit", "merge", top)
	wantRefused(t, nil, top, "vhdkit", "merge", "--into", base, top)
	wantRefused(t, nil, top, "vhdkit", "resize", "--size", "64M", top)
	if _, err := os.Stat(top); err != nil {
		t.Fatalf("after the refused merge: %v", err)
	}

	writeFlushed(t, c, 8<<20, 256<<10, 2)
	c.Close()
	s.stop(t, syscall.SIGTERM)
	wantPattern(t, readImage(t, top, 1<<20, 256<<10), 1<<20, 1, "top")
	wantPattern(t, readImage(t, top, 8<<20, 256<<10), 8<<20, 2, "top")
	checkClean(t, top)
}

// TestTwoServersOneFile: two "vhdkit nbd" on one file used to both accept
// writes, one BAT overwriting the other. The second now refuses to start,
// as do qemu-nbd, qemu-io and qemu-img; read-only inspection works with
// --force-share.
func TestTwoServersOneFile(t *testing.T) {
	qemuNBD := testenv.Tool(t, "qemu-nbd")
	qemuIO := testenv.Tool(t, "qemu-io")
	qemuImg := testenv.Tool(t, "qemu-img")
	dir := shortTempDir(t)
	img := filepath.Join(dir, "d.vhdx")
	createImage(t, img, "--size", "32M")
	sock := filepath.Join(dir, "s.sock")
	s := startNBD(t, "--socket", sock, img)
	c := dialNBD(t, sock, "")
	writeFlushed(t, c, 0, 1<<20, 3)

	for _, args := range [][]string{
		{"nbd", "--socket", filepath.Join(dir, "s2.sock"), img},
		{"nbd", "--read-only", "--socket", filepath.Join(dir, "s3.sock"), img},
	} {
		wantRefused(t, nil, img, "vhdkit", args...)
	}
	for _, args := range [][]string{
		{qemuNBD, "-f", "vhdx", "--socket", filepath.Join(dir, "q.sock"), img},
		{qemuIO, "-f", "vhdx", "-c", "read 0 4k", img},
		{qemuIO, "-r", "-f", "vhdx", "-c", "read 0 4k", img},
		{qemuImg, "info", img},
	} {
		out, err := runToolErr(time.Minute, args[0], args[1:]...)
		if err == nil || !strings.Contains(err.Error(), "lock") {
			t.Errorf("%s while vhdkit nbd writes: %v\n%s", strings.Join(args, " "), err, out)
		}
	}
	// QEMU's force-share opens get past the locks. (As VHDX, qemu-img
	// then refuses the file for its open log, as it should: a file being
	// written is only readable as raw bytes.)
	runTool(t, time.Minute, qemuImg, "info", "-U", "-f", "raw", img)

	writeFlushed(t, c, 4<<20, 1<<20, 4)
	c.Close()
	s.stop(t, syscall.SIGTERM)
	wantPattern(t, readImage(t, img, 0, 1<<20), 0, 3, "d.vhdx")
	wantPattern(t, readImage(t, img, 4<<20, 1<<20), 4<<20, 4, "d.vhdx")
	checkClean(t, img)
}

// TestRefuseQemuWriter: vhdkit refuses a file QEMU is writing, naming the
// process.
func TestRefuseQemuWriter(t *testing.T) {
	qemuIO := testenv.Tool(t, "qemu-io")
	dir := shortTempDir(t)
	base, top := filepath.Join(dir, "base.vhdx"), filepath.Join(dir, "top.avhdx")
	createImage(t, base, "--size", "32M")
	createImage(t, top, "--parent", base)
	// qemu-io opens base read-write and waits for commands on stdin.
	cmd := exec.Command(qemuIO, "-f", "vhdx", base)
	stdin, err := cmd.StdinPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	defer func() { stdin.Close(); cmd.Process.Kill(); cmd.Wait() }()
	deadline := time.Now().Add(30 * time.Second)
	for !heldBy(cmd.Process.Pid) {
		if time.Now().After(deadline) {
			t.Fatal("qemu-io did not open the file")
		}
		time.Sleep(10 * time.Millisecond)
	}
	wantRefused(t, nil, base, "qemu-io", "nbd", "--socket", filepath.Join(dir, "s.sock"), base)
	// The child's chain needs base read-only, which a writer refuses.
	wantRefused(t, nil, base, "qemu-io", "nbd", "--socket", filepath.Join(dir, "s.sock"), top)
	wantRefused(t, nil, base, "qemu-io", "merge", top)
	wantRefused(t, nil, base, "qemu-io", "resize", "--size", "64M", base)
}

// heldBy reports whether process pid holds OFD locks.
func heldBy(pid int) bool {
	dir := filepath.Join("/proc", strconv.Itoa(pid), "fdinfo")
	fds, _ := os.ReadDir(dir)
	for _, fd := range fds {
		b, _ := os.ReadFile(filepath.Join(dir, fd.Name()))
		if bytes.Contains(b, []byte("OFDLCK")) {
			return true
		}
	}
	return false
}

// TestDaemonFilesOwned: offline merge and resize of files a daemon serves
// used to succeed under it, and a second daemon attached the first one's
// running .avhdx read-write. Each is refused now, and the daemon's disk
// keeps every write.
func TestDaemonFilesOwned(t *testing.T) {
	dir := shortTempDir(t)
	d := startDaemon(t, filepath.Join(dir, "d"))
	d.cli(t, "vm", "create", "web", "--disk", "32M")
	c := dialNBD(t, d.nbd, "web")
	writeFlushed(t, c, 0, 1<<20, 5)
	d.cli(t, "checkpoint", "create", "web", "--name", "cp")
	writeFlushed(t, c, 2<<20, 1<<20, 6)
	v := d.vm(t, "web")
	leaf, base := v.Disks[0].Path, v.Disks[0].Chain[1]

	wantRefused(t, nil, leaf, "vhdkit", "merge", leaf)
	wantRefused(t, nil, base, "vhdkit", "resize", "--size", "64M", base)
	wantRefused(t, nil, leaf, "vhdkit", "resize", "--size", "64M", leaf)
	wantRefused(t, nil, leaf, "vhdkit", "set-parent", "--parent", base, leaf)

	// A second daemon on another data directory cannot take the files.
	d2 := startDaemon(t, filepath.Join(dir, "d2"))
	out, errOut, err := d2.try("vm", "create", "thief", "--attach", leaf)
	if err == nil || !strings.Contains(errOut, leaf) {
		t.Errorf("second daemon attached the first one's running disk: %v\n%s%s", err, out, errOut)
	}
	out, errOut, err = d2.try("vm", "create", "thief2", "--attach", base)
	if err == nil || !strings.Contains(errOut, base) {
		t.Errorf("second daemon attached the first one's checkpoint file: %v\n%s%s", err, out, errOut)
	}
	d2.stop(t)

	writeFlushed(t, c, 4<<20, 1<<20, 7)
	c.Close()
	d.stop(t)
	for _, w := range []struct {
		off  int64
		seed byte
	}{{0, 5}, {2 << 20, 6}, {4 << 20, 7}} {
		wantPattern(t, readImage(t, leaf, w.off, 1<<20), w.off, w.seed, "the daemon's disk")
	}
}
