package main

import (
	"bufio"
	"bytes"
	"encoding/json"
	"fmt"
	"io"
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

// daemon is a running "vhdkit serve".
type daemon struct {
	bin    string
	cmd    *exec.Cmd
	data   string
	nbd    string // its NBD socket
	stderr *lockedBuffer
	done   chan struct{}
	err    error
}

// startDaemon runs vhdkit serve on the data directory and waits until it
// says it serves; the process is killed when the test ends if it still
// runs.
func startDaemon(t testing.TB, data string) *daemon {
	t.Helper()
	cmd := exec.Command(vhdkitBinary(t), "serve", "--data", data)
	d := &daemon{bin: cmd.Path, cmd: cmd, data: data, nbd: filepath.Join(data, "nbd.sock"), stderr: &lockedBuffer{}, done: make(chan struct{})}
	cmd.Stderr = d.stderr
	stdout, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	lines := make(chan string, 1)
	go func() {
		r := bufio.NewReader(stdout)
		line, _ := r.ReadString('\n')
		lines <- line
		io.Copy(io.Discard, r)
		d.err = cmd.Wait()
		close(d.done)
	}()
	t.Cleanup(func() { d.kill() })
	select {
	case line := <-lines:
		if !strings.HasPrefix(line, "vhdkit serving ") {
			<-d.done
			t.Fatalf("vhdkit serve: %v; stdout %q; stderr:\n%s", d.err, line, d.stderr)
		}
	case <-time.After(time.Minute):
		t.Fatalf("vhdkit serve did not start within a minute; stderr:\n%s", d.stderr)
	}
	return d
}

// stop ends the daemon with SIGTERM and expects a clean exit.
func (d *daemon) stop(t testing.TB) {
	t.Helper()
	d.cmd.Process.Signal(syscall.SIGTERM)
	select {
	case <-d.done:
	case <-time.After(time.Minute):
		t.Fatalf("vhdkit serve did not stop within a minute of SIGTERM; stderr:\n%s", d.stderr)
	}
	if d.err != nil {
		t.Fatalf("vhdkit serve: %v; stderr:\n%s", d.err, d.stderr)
	}
}

// kill ends the daemon with SIGKILL, as a crash would.
func (d *daemon) kill() {
	select {
	case <-d.done:
	default:
		d.cmd.Process.Kill()
		<-d.done
	}
}

// vhdkitCLI runs a client verb against the daemon and returns its stdout;
// it fails the test when the verb fails.
func (d *daemon) cli(t testing.TB, args ...string) string {
	t.Helper()
	out, errOut, err := d.try(args...)
	if err != nil {
		t.Fatalf("vhdkit %s: %v\nstderr: %s\ndaemon:\n%s", strings.Join(args, " "), err, errOut, d.stderr)
	}
	return out
}

func (d *daemon) try(args ...string) (stdout, stderr string, err error) {
	cmd := exec.Command(d.bin, args...)
	cmd.Env = append(os.Environ(), "VHDKIT_DATA="+d.data)
	var o, e bytes.Buffer
	cmd.Stdout, cmd.Stderr = &o, &e
	err = cmd.Run()
	return o.String(), e.String(), err
}

func (d *daemon) uri(export string) string {
	return fmt.Sprintf("nbd+unix:///%s?socket=%s", export, d.nbd)
}

func (d *daemon) vm(t testing.TB, name string) api.VM {
	t.Helper()
	var v api.VM
	if err := json.Unmarshal([]byte(d.cli(t, "vm", "show", name, "--json")), &v); err != nil {
		t.Fatal(err)
	}
	return v
}

// TestServeQemuIO drives the daemon end to end with the CLI and qemu-io:
// a machine, patterns written through NBD, a checkpoint (the disk moves
// to an .avhdx), more writes, the checkpoint deleted by a live merge with
// a progress bar, the disk back on its .vhdx; qemu-io reads every pattern,
// and after SIGTERM qemu-img checks and compares the base.
func TestServeQemuIO(t *testing.T) {
	qemuIO := testenv.Tool(t, "qemu-io")
	testenv.Tool(t, "qemu-img")
	dir := shortTempDir(t)
	d := startDaemon(t, filepath.Join(dir, "d"))
	out := d.cli(t, "vm", "create", "web", "--disk", "64M", "--disk", "16M")
	if !strings.Contains(out, `disk 1: export "web/1", 16.0 MiB`) && !strings.Contains(out, `export "web/1"`) {
		t.Fatalf("vm create:\n%s", out)
	}
	qio := func(export string, cmds ...string) {
		t.Helper()
		args := []string{"-f", "raw"}
		for _, c := range cmds {
			args = append(args, "-c", c)
		}
		out := runTool(t, time.Minute, qemuIO, append(args, d.uri(export))...)
		if strings.Contains(out, "failed") || strings.Contains(out, "Pattern verification") {
			t.Fatalf("qemu-io %v:\n%s", cmds, out)
		}
	}
	qio("web", "write -P 0x11 0 16M")
	qio("web/1", "write -P 0x33 1M 2M")
	out = d.cli(t, "checkpoint", "create", "web", "--name", "before")
	if !strings.Contains(out, "disk0.vhdx frozen, now runs on") || !strings.Contains(out, "disk0_") || !strings.Contains(out, ".avhdx") {
		t.Fatalf("checkpoint create:\n%s", out)
	}
	v := d.vm(t, "web")
	if !strings.HasSuffix(v.Disks[0].Path, ".avhdx") || len(v.Disks[0].Chain) != 2 {
		t.Fatalf("after the checkpoint: %+v", v.Disks[0])
	}
	qio("web", "write -P 0x22 8M 24M", "write -z 40M 1M")
	qio("web/1", "write -P 0x44 2M 2M")
	if out := d.cli(t, "checkpoint", "list", "web"); !strings.Contains(out, "before") || !strings.Contains(out, "Now") {
		t.Fatalf("checkpoint list:\n%s", out)
	}
	cmd := exec.Command(vhdkitBinary(t), "checkpoint", "delete", "web", "before", "--wait", "--progress", "--bandwidth", "40M")
	cmd.Env = append(os.Environ(), "VHDKIT_DATA="+d.data)
	var stdout, stderr bytes.Buffer
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	if err := cmd.Run(); err != nil {
		t.Fatalf("checkpoint delete: %v\n%s%s", err, stdout.String(), stderr.String())
	}
	if !strings.Contains(stdout.String(), `checkpoint "before" of web deleted`) || !strings.Contains(stderr.String(), "progress: 100%") {
		t.Fatalf("checkpoint delete:\n%s\nstderr:\n%s", stdout.String(), stderr.String())
	}
	v = d.vm(t, "web")
	for i, disk := range v.Disks {
		if want := filepath.Join(d.data, "vms", "web", fmt.Sprintf("disk%d.vhdx", i)); disk.Path != want || len(disk.Chain) != 1 {
			t.Fatalf("disk %d after the merge: %+v", i, disk)
		}
	}
	if m, _ := filepath.Glob(filepath.Join(d.data, "vms", "web", "*.avhdx")); len(m) != 0 {
		t.Fatalf("left over: %v", m)
	}
	qio("web", "read -P 0x11 0 8M", "read -P 0x22 8M 24M", "read -P 0x11 32M 0", "read -P 0 40M 1M")
	qio("web/1", "read -P 0x33 1M 1M", "read -P 0x44 2M 2M")
	d.stop(t)

	want := make([]byte, 64<<20)
	fill := func(off, n int, b byte) {
		for i := off; i < off+n; i++ {
			want[i] = b
		}
	}
	fill(0, 16<<20, 0x11)
	fill(8<<20, 24<<20, 0x22)
	fill(40<<20, 1<<20, 0)
	raw := filepath.Join(dir, "want.raw")
	os.WriteFile(raw, want, 0o644)
	base := filepath.Join(d.data, "vms", "web", "disk0.vhdx")
	runTool(t, time.Minute, "qemu-img", "check", "-f", "vhdx", base)
	runTool(t, time.Minute, "qemu-img", "compare", "-f", "vhdx", "-F", "raw", base, raw)
}

// TestServeCLIErrors: client verbs without a daemon, and misuse, fail
// with one clear line and a non-zero exit.
func TestServeCLIErrors(t *testing.T) {
	dir := shortTempDir(t)
	d := &daemon{bin: vhdkitBinary(t), data: filepath.Join(dir, "none")}
	_, errOut, err := d.try("vm", "list")
	if err == nil || !strings.Contains(errOut, "no vhdkit daemon is running") || !strings.Contains(errOut, "vhdkit serve --data") {
		t.Fatalf("vm list without a daemon: %v\n%s", err, errOut)
	}
	d = startDaemon(t, filepath.Join(dir, "d"))
	for _, c := range []struct {
		args []string
		want string
	}{
		{[]string{"vm", "show", "ghost"}, `no machine named "ghost"`},
		{[]string{"vm", "create", "x"}, "at least one --disk"},
		{[]string{"checkpoint", "create", "ghost"}, `no machine named "ghost"`},
		{[]string{"job", "show", "42"}, `no job "42"`},
		{[]string{"job", "set", "42"}, "--bandwidth is required"},
		{[]string{"vm"}, "Commands:"},
	} {
		_, errOut, err := d.try(c.args...)
		if err == nil {
			t.Errorf("vhdkit %s succeeded", strings.Join(c.args, " "))
			continue
		}
		if !strings.Contains(errOut, c.want) {
			out, _, _ := d.try(c.args...)
			if !strings.Contains(out, c.want) {
				t.Errorf("vhdkit %s: %s, want %q", strings.Join(c.args, " "), errOut, c.want)
			}
		}
	}
	d.cli(t, "vm", "create", "x", "--disk", "8M")
	_, errOut, err = d.try("vm", "create", "x", "--disk", "8M")
	if err == nil || !strings.Contains(errOut, `a machine named "x" exists`) {
		t.Fatalf("duplicate machine: %v %s", err, errOut)
	}
	// A second daemon on the same directory is refused.
	cmd := exec.Command(vhdkitBinary(t), "serve", "--data", d.data)
	b, err := cmd.CombinedOutput()
	if err == nil || !strings.Contains(string(b), "in use by another vhdkit daemon") {
		t.Fatalf("second daemon: %v\n%s", err, b)
	}
	d.cli(t, "vm", "delete", "x", "--delete-disks")
	if out := d.cli(t, "vm", "list", "--json"); strings.TrimSpace(out) != "[]" {
		t.Fatalf("vm list after delete: %s", out)
	}
	d.stop(t)
}
