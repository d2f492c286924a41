package main

import (
	"bytes"
	"context"
	"encoding/json"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/vhdkit/vhdkit/internal/api"
	"github.com/vhdkit/vhdkit/internal/testenv"
)

// The host refuses, or makes safe, what would corrupt a running disk,
// one bad machine never takes it down, clients find it from anywhere,
// and its jobs tell the truth: each scenario with a real "vhdkit serve",
// real clients (the nbd package's client, qemu-img) and the CLI.

// fails runs vhdkit args and expects exit status 1 with every one of
// words in its stderr.
func (d *daemon) fails(t *testing.T, words []string, args ...string) string {
	t.Helper()
	out, errOut, err := d.try(args...)
	if ee, ok := err.(*exec.ExitError); !ok || ee.ExitCode() != 1 {
		t.Fatalf("vhdkit %s: %v, want exit 1\nstdout: %s\nstderr: %s", strings.Join(args, " "), err, out, errOut)
	}
	for _, w := range words {
		if !strings.Contains(errOut, w) {
			t.Fatalf("vhdkit %s: stderr does not say %q:\n%s", strings.Join(args, " "), w, errOut)
		}
	}
	return errOut
}

// TestServeApplyUnderClient: "checkpoint apply" swapped the disk under a
// connected client. Now it is refused while the client is connected (the
// client's acknowledged writes stay), and with --force the client is
// disconnected first and the machine runs from the checkpoint, as
// qemu-img reads.
func TestServeApplyUnderClient(t *testing.T) {
	qemuImg := testenv.Tool(t, "qemu-img")
	dir := shortTempDir(t)
	d := startDaemon(t, filepath.Join(dir, "d"))
	d.cli(t, "vm", "create", "web", "--disk", "32M")
	c := dialNBD(t, d.nbd, "web") // stays connected, as a guest does
	writeFlushed(t, c, 0, 1<<20, 1)
	d.cli(t, "checkpoint", "create", "web", "--name", "before")
	writeFlushed(t, c, 0, 1<<20, 2)

	d.fails(t, []string{"1 NBD client connected", `1 on export "web"`, "--force"}, "checkpoint", "apply", "web", "before")
	got := make([]byte, 1<<20)
	if _, err := c.ReadAt(got, 0); err != nil {
		t.Fatalf("the client after a refused apply: %v", err)
	}
	wantPattern(t, got, 0, 2, "the client after a refused apply")

	out := d.cli(t, "checkpoint", "apply", "web", "before", "--force")
	if !strings.Contains(out, "disconnected 1 NBD client") || !strings.Contains(out, `now runs from checkpoint before (cp-1)`) {
		t.Fatalf("apply --force:\n%s", out)
	}
	if _, err := c.ReadAt(got, 0); err == nil {
		t.Fatal("the client still reads after a forced apply")
	}
	// A new client reads the checkpoint's content: pattern 1 on the first
	// MiB, zeros after it (qemu-img compare reads a shorter image as if
	// padded with zeros).
	want := filepath.Join(dir, "want.raw")
	fillPattern(got, 0, 1)
	if err := os.WriteFile(want, got, 0o600); err != nil {
		t.Fatal(err)
	}
	if out, err := exec.Command(qemuImg, "compare", "-f", "raw", "-F", "raw", want, d.uri("web")).CombinedOutput(); err != nil {
		t.Fatalf("qemu-img compare with the checkpoint's content: %v\n%s", err, out)
	}
	d.stop(t)
}

// TestServeDeleteRules: "vm delete" removed the disks of a machine with a
// connected writer, without asking. Now it is refused while a client is
// connected and, without --delete-disks, whenever it would remove files
// (it names them); the writer's flushed data stays. --force
// --delete-disks disconnects and removes; attached files are kept.
func TestServeDeleteRules(t *testing.T) {
	dir := shortTempDir(t)
	d := startDaemon(t, filepath.Join(dir, "d"))
	d.cli(t, "vm", "create", "web", "--disk", "16M")
	disk := filepath.Join(d.data, "vms", "web", "disk0.vhdx")
	c := dialNBD(t, d.nbd, "web")
	writeFlushed(t, c, 0, 1<<20, 3)

	d.fails(t, []string{"would remove", disk, "--delete-disks"}, "vm", "delete", "web")
	d.fails(t, []string{"1 NBD client connected", `1 on export "web"`, "--force"}, "vm", "delete", "web", "--delete-disks")
	if _, err := os.Stat(disk); err != nil {
		t.Fatalf("the disk after refused deletes: %v", err)
	}
	got := make([]byte, 1<<20)
	if _, err := c.ReadAt(got, 0); err != nil {
		t.Fatal(err)
	}
	wantPattern(t, got, 0, 3, "the writer after refused deletes")
	writeFlushed(t, c, 1<<20, 1<<20, 4)

	out := d.cli(t, "vm", "delete", "web", "--delete-disks", "--force")
	if !strings.Contains(out, "disconnected 1 NBD client") || !strings.Contains(out, "removed "+disk) {
		t.Fatalf("vm delete --delete-disks --force:\n%s", out)
	}
	if _, err := os.Stat(disk); !os.IsNotExist(err) {
		t.Fatalf("the disk after the delete: %v", err)
	}
	if _, err := c.ReadAt(got, 0); err == nil {
		t.Fatal("the client still reads after its machine was deleted")
	}

	// An attached file: nothing to remove, so no flag; the file stays.
	att := filepath.Join(dir, "keep.vhdx")
	runTool(t, time.Minute, d.bin, "create", "--size", "8M", att)
	d.cli(t, "vm", "create", "db", "--attach", att)
	if out := d.cli(t, "vm", "delete", "db"); !strings.Contains(out, "kept    "+att) {
		t.Fatalf("vm delete of an attached disk:\n%s", out)
	}
	if _, err := os.Stat(att); err != nil {
		t.Fatalf("the attached file: %v", err)
	}
	d.stop(t)
}

// TestServeFailedMachine: one missing disk file made "vhdkit serve" exit
// at start, so no machine was reachable. Now serve starts, the other
// machine serves, the broken one is "failed" with the reason in vm list
// and vm show, and vm repair re-attaches the moved file: the machine
// serves again with every flushed write.
func TestServeFailedMachine(t *testing.T) {
	dir := shortTempDir(t)
	data := filepath.Join(dir, "d")
	d := startDaemon(t, data)
	d.cli(t, "vm", "create", "a", "--disk", "16M")
	d.cli(t, "vm", "create", "b", "--disk", "16M")
	ca, cb := dialNBD(t, d.nbd, "a"), dialNBD(t, d.nbd, "b")
	writeFlushed(t, ca, 0, 1<<20, 5)
	writeFlushed(t, cb, 0, 1<<20, 6)
	ca.Close()
	cb.Close()
	d.stop(t)
	disk := filepath.Join(data, "vms", "a", "disk0.vhdx")
	moved := filepath.Join(dir, "moved.vhdx")
	if err := os.Rename(disk, moved); err != nil {
		t.Fatal(err)
	}

	d = startDaemon(t, data)
	for i := 0; !strings.Contains(d.stderr.String(), "vhdkit: machine a is failed: disk 0:"); i++ {
		if i == 100 {
			t.Fatalf("serve does not report the failed machine:\n%s", d.stderr)
		}
		time.Sleep(20 * time.Millisecond)
	}
	cb = dialNBD(t, d.nbd, "b")
	got := make([]byte, 1<<20)
	if _, err := cb.ReadAt(got, 0); err != nil {
		t.Fatal(err)
	}
	wantPattern(t, got, 0, 6, "the other machine")
	list := d.cli(t, "vm", "list")
	if !strings.Contains(list, "failed") || !strings.Contains(list, disk) {
		t.Fatalf("vm list:\n%s", list)
	}
	v := d.vm(t, "a")
	if v.State != api.VMFailed || !strings.Contains(v.Error, disk) || v.Disks[0].Export != "" {
		t.Fatalf("vm show a: %+v", v)
	}
	if out := d.cli(t, "vm", "show", "a"); !strings.Contains(out, "failed") || !strings.Contains(out, "not exported") {
		t.Fatalf("vm show a:\n%s", out)
	}
	d.fails(t, []string{"still failed", disk}, "vm", "repair", "a")
	d.fails(t, []string{"is failed", "vm repair a"}, "checkpoint", "create", "a")
	out := d.cli(t, "vm", "repair", "a", "--disk", "0", "--path", moved)
	if !strings.Contains(out, "serving") || !strings.Contains(out, "runs on "+moved) {
		t.Fatalf("vm repair:\n%s", out)
	}
	ca = dialNBD(t, d.nbd, "a")
	if _, err := ca.ReadAt(got, 0); err != nil {
		t.Fatal(err)
	}
	wantPattern(t, got, 0, 5, "the repaired machine")
	ca.Close()
	cb.Close()
	d.stop(t)
}

// TestServeFindsDaemon: the client verbs found the daemon only through
// ./vhdkit-data, and the error always suggested starting a daemon. Now
// VHDKIT_DATA works from any directory, and the error names the
// directory tried and how it was chosen, suggesting "vhdkit serve" only
// when no daemon holds that directory.
func TestServeFindsDaemon(t *testing.T) {
	dir := shortTempDir(t)
	data := filepath.Join(dir, "d")
	d := startDaemon(t, data)
	d.cli(t, "vm", "create", "x", "--disk", "8M")
	elsewhere := t.TempDir()
	client := func(env []string, args ...string) (string, string, error) {
		cmd := exec.Command(d.bin, args...)
		cmd.Dir = elsewhere
		cmd.Env = append(os.Environ(), env...)
		var o, e strings.Builder
		cmd.Stdout, cmd.Stderr = &o, &e
		err := cmd.Run()
		return o.String(), e.String(), err
	}
	if out, errOut, err := client([]string{"VHDKIT_DATA=" + data}, "vm", "list"); err != nil || !strings.Contains(out, "x ") {
		t.Fatalf("vm list from another directory with VHDKIT_DATA: %v\n%s%s", err, out, errOut)
	}
	if out, errOut, err := client(nil, "vm", "list", "--data", data); err != nil || !strings.Contains(out, "x ") {
		t.Fatalf("vm list from another directory with --data: %v\n%s%s", err, out, errOut)
	}
	none := filepath.Join(dir, "none")
	_, errOut, err := client([]string{"VHDKIT_DATA=" + none}, "vm", "list")
	if err == nil || !strings.Contains(errOut, none+" (from $VHDKIT_DATA)") || !strings.Contains(errOut, "vhdkit serve --data "+none) {
		t.Fatalf("no daemon on an unheld directory: %v\n%s", err, errOut)
	}
	// A daemon that holds the directory but does not answer (its socket
	// gone): no suggestion to start a second one on its files.
	if err := os.Remove(filepath.Join(data, api.SocketName)); err != nil {
		t.Fatal(err)
	}
	_, errOut, err = client([]string{"VHDKIT_DATA=" + data}, "vm", "list")
	if err == nil || strings.Contains(errOut, "vhdkit serve") || !strings.Contains(errOut, "a daemon holds "+data) {
		t.Fatalf("a held directory without a socket: %v\n%s", err, errOut)
	}
	d.stop(t)
}

// jobJSON reads a job through the CLI.
func (d *daemon) job(t *testing.T, id string) api.Job {
	t.Helper()
	var j api.Job
	if err := json.Unmarshal([]byte(d.cli(t, "job", "show", id, "--json")), &j); err != nil {
		t.Fatal(err)
	}
	return j
}

// writeMiB writes n MiB of a pattern from off through a new client.
func (d *daemon) writeMiB(t *testing.T, export string, off, n int64, seed byte) {
	t.Helper()
	c := dialNBD(t, d.nbd, export)
	for i := int64(0); i < n; i++ {
		writeFlushed(t, c, off+i<<20, 1<<20, seed)
	}
	c.Close()
}

// TestServeJobTruth: "job cancel" of a merge that had begun said
// canceled, though the merge then completed; there was no "job wait";
// Ctrl-C on a wait did not say how to follow the job. Now cancel says
// the merge completes first and the job ends done; "job wait" exits 0
// for a done job, 1 for a canceled one, and SIGINT stops the wait, not
// the job, naming "vhdkit job wait ID".
func TestServeJobTruth(t *testing.T) {
	dir := shortTempDir(t)
	d := startDaemon(t, filepath.Join(dir, "d"))
	d.cli(t, "vm", "create", "web", "--disk", "64M")
	d.writeMiB(t, "web", 0, 4, 1)
	d.cli(t, "checkpoint", "create", "web", "--name", "one")
	d.writeMiB(t, "web", 0, 24, 2)
	var j api.Job
	json.Unmarshal([]byte(d.cli(t, "checkpoint", "delete", "web", "one", "--bandwidth", "4M", "--json")), &j)
	for d.job(t, j.ID).Done == 0 {
		time.Sleep(20 * time.Millisecond)
	}

	// Ctrl-C on job wait: the job goes on.
	cmd := exec.Command(d.bin, "job", "wait", j.ID)
	cmd.Env = append(os.Environ(), "VHDKIT_DATA="+d.data)
	var stderr strings.Builder
	cmd.Stderr = &stderr
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	time.Sleep(300 * time.Millisecond)
	cmd.Process.Signal(syscall.SIGINT)
	if err := cmd.Wait(); err == nil || !strings.Contains(stderr.String(), "goes on") || !strings.Contains(stderr.String(), "vhdkit job wait "+j.ID) {
		t.Fatalf("job wait after SIGINT: %v\n%s", err, stderr.String())
	}
	if s := d.job(t, j.ID); s.Finished() {
		t.Fatalf("the job ended with the wait: %+v", s)
	}

	out := d.cli(t, "job", "cancel", j.ID)
	if !strings.Contains(out, "completes first") || !strings.Contains(out, "vhdkit job wait "+j.ID) {
		t.Fatalf("job cancel of a merge under way:\n%s", out)
	}
	d.cli(t, "job", "set", j.ID, "--bandwidth", "0")
	out = d.cli(t, "job", "wait", j.ID, "--json")
	var end api.Job
	if err := json.Unmarshal([]byte(out), &end); err != nil || end.State != api.JobDone {
		t.Fatalf("job wait --json: %v\n%s", err, out)
	}

	// A subtree whose first merge is under way when canceled: that merge
	// completes, the older checkpoint is kept, the job ends canceled and
	// job wait exits 1.
	d.cli(t, "checkpoint", "create", "web", "--name", "a")
	d.writeMiB(t, "web", 0, 8, 3)
	d.cli(t, "checkpoint", "create", "web", "--name", "b")
	d.writeMiB(t, "web", 0, 24, 4)
	json.Unmarshal([]byte(d.cli(t, "checkpoint", "delete", "web", "a", "--subtree", "--bandwidth", "4M", "--json")), &j)
	for d.job(t, j.ID).Done == 0 {
		time.Sleep(20 * time.Millisecond)
	}
	d.cli(t, "job", "cancel", j.ID)
	d.cli(t, "job", "set", j.ID, "--bandwidth", "0")
	errOut := d.fails(t, []string{"canceled", `kept "a"`}, "job", "wait", j.ID)
	_ = errOut
	if out := d.cli(t, "checkpoint", "list", "web"); !strings.Contains(out, "a  (cp-2") || strings.Contains(out, "b  (") {
		t.Fatalf("checkpoint list after the canceled subtree:\n%s", out)
	}
	d.stop(t)
}

// TestServeProgressAcrossKill: progress reported before a crash could be
// ahead of what the daemon had saved, so after a restart it went back.
// Now what is reported is saved first: after SIGKILL in the middle of a
// live merge and a restart, the job never reports less, to its end.
func TestServeProgressAcrossKill(t *testing.T) {
	dir := shortTempDir(t)
	data := filepath.Join(dir, "d")
	d := startDaemon(t, data)
	d.cli(t, "vm", "create", "web", "--disk", "64M")
	d.cli(t, "checkpoint", "create", "web", "--name", "one")
	d.writeMiB(t, "web", 0, 40, 7)
	var j api.Job
	json.Unmarshal([]byte(d.cli(t, "checkpoint", "delete", "web", "one", "--bandwidth", "8M", "--json")), &j)
	cl := &api.Client{DataDir: data}
	ctx := context.Background()
	var seen int64
	for seen < 12<<20 {
		s, err := cl.Job(ctx, j.ID)
		if err != nil {
			t.Fatal(err)
		}
		if s.Done < seen {
			t.Fatalf("progress went back before the kill: %d then %d", seen, s.Done)
		}
		seen = s.Done
		time.Sleep(5 * time.Millisecond)
	}
	d.kill()
	d = startDaemon(t, data)
	for {
		s, err := cl.Job(ctx, j.ID)
		if err != nil {
			t.Fatal(err)
		}
		if s.Done < seen {
			t.Fatalf("progress went back across the kill: %d reported before, %d after", seen, s.Done)
		}
		seen = s.Done
		if s.Finished() {
			if s.State != api.JobDone {
				t.Fatalf("job %+v", s)
			}
			break
		}
		time.Sleep(20 * time.Millisecond)
	}
	c := dialNBD(t, d.nbd, "web")
	got := make([]byte, 1<<20)
	for off := int64(0); off < 40<<20; off += 1 << 20 {
		if _, err := c.ReadAt(got, off); err != nil {
			t.Fatal(err)
		}
		wantPattern(t, got, off, 7, "after the merge")
	}
	c.Close()
	d.stop(t)
}

// TestServeConfinesParents: the daemon followed an attached file's parent
// locator anywhere on the host, so a crafted or copied child made it serve
// (and merge into) a file outside anything it was given. Now a parent
// outside the file's folder and the data directory is not followed: the
// attach is refused, naming the parent.
func TestServeConfinesParents(t *testing.T) {
	dir := shortTempDir(t)
	d := startDaemon(t, filepath.Join(dir, "d"))
	for _, sub := range []string{"a", "b"} {
		if err := os.Mkdir(filepath.Join(dir, sub), 0o700); err != nil {
			t.Fatal(err)
		}
	}
	base, child := filepath.Join(dir, "a", "base.vhdx"), filepath.Join(dir, "b", "child.avhdx")
	runTool(t, time.Minute, d.bin, "create", "--size", "8M", base)
	runTool(t, time.Minute, d.bin, "create", "--parent", base, child)
	d.fails(t, []string{child, "outside the allowed", base}, "vm", "create", "x", "--attach", child)
	if out := d.cli(t, "vm", "list"); strings.Contains(out, "x ") {
		t.Fatalf("the refused machine is listed:\n%s", out)
	}
	// Beside its parent, the same chain attaches.
	sibling := filepath.Join(dir, "a", "child.avhdx")
	runTool(t, time.Minute, d.bin, "create", "--parent", base, sibling)
	d.cli(t, "vm", "create", "y", "--attach", sibling)
	d.stop(t)
}

// TestServeOptimizeRunning: vm optimize compacts a running machine's disk
// file while a client keeps writing: the file shrinks, every flushed write
// reads back, and the file passes vhdkit's strict check and qemu-img check
// after the daemon stops.
func TestServeOptimizeRunning(t *testing.T) {
	dir := shortTempDir(t)
	d := startDaemon(t, filepath.Join(dir, "d"))
	d.cli(t, "vm", "create", "web", "--disk", "256M")
	c := dialNBD(t, d.nbd, "web")
	const mib = 1 << 20
	writeFlushed(t, c, 0, 96*mib, 1)
	// The guest frees most of it: zeros written (kept allocated) and a
	// discard (released at once).
	if err := c.WriteZeroes(0, 48*mib, false); err != nil {
		t.Fatal(err)
	}
	if err := c.Trim(48*mib, 32*mib); err != nil {
		t.Fatal(err)
	}
	writeFlushed(t, c, 200*mib, 8*mib, 2)

	// A writer goes on during the optimize.
	stop := make(chan struct{})
	wrote := make(chan int)
	go func() {
		n := 0
		defer func() { wrote <- n }()
		buf := make([]byte, 64<<10)
		for ; ; n++ {
			select {
			case <-stop:
				return
			default:
			}
			off := int64(120*mib) + int64(n%128)*int64(len(buf))
			fillPattern(buf, off, 3)
			if _, err := c.WriteAt(buf, off); err != nil {
				t.Error(err)
				return
			}
			if err := c.Flush(); err != nil {
				t.Error(err)
				return
			}
		}
	}()
	var o api.Optimized
	if err := json.Unmarshal([]byte(d.cli(t, "vm", "optimize", "web", "--full", "--json")), &o); err != nil {
		t.Fatal(err)
	}
	close(stop)
	n := <-wrote
	if len(o.Disks) != 1 || o.Disks[0].SizeAfter >= o.Disks[0].SizeBefore || o.Disks[0].Released == 0 {
		t.Fatalf("vm optimize: %+v", o)
	}
	t.Logf("file %d -> %d bytes, %d blocks released, %d moved, %d client writes beside it", o.Disks[0].SizeBefore, o.Disks[0].SizeAfter, o.Disks[0].Released, o.Disks[0].Moved, n)

	got := make([]byte, 8*mib)
	for _, r := range []struct {
		off  int64
		seed byte
	}{{80 * mib, 1}, {200 * mib, 2}} {
		if _, err := c.ReadAt(got, r.off); err != nil {
			t.Fatal(err)
		}
		wantPattern(t, got, r.off, r.seed, "data kept through the optimize")
	}
	if _, err := c.ReadAt(got, 0); err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(got, make([]byte, len(got))) {
		t.Fatal("zeroed range no longer reads zeros")
	}
	if n > 0 {
		span := make([]byte, 128*64<<10)
		if _, err := c.ReadAt(span, 120*mib); err != nil {
			t.Fatal(err)
		}
		wantPattern(t, span[:min(n, 128)*64<<10], 120*mib, 3, "the writes beside the optimize")
	}
	c.Close()
	d.stop(t)
	leaf := filepath.Join(d.data, "vms", "web", "disk0.vhdx")
	runTool(t, time.Minute, d.bin, "check", leaf)
	runTool(t, time.Minute, testenv.Tool(t, "qemu-img"), "check", "-f", "vhdx", leaf)
}
