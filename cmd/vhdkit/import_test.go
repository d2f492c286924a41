package main

import (
	"bytes"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/vhdkit/vhdkit/internal/testenv"
)

// TestVMImport: one daemon leaves a machine's files as Hyper-V would
// after checkpoints and an apply (disk0.vhdx <- disk0_1 <- disk0_2, and
// disk0.vhdx <- the running file); they are copied out with their times
// into a "Virtual Hard Disks" folder, as an export does, and a second
// daemon imports the folder in place and with --copy. qemu-io reads every
// pattern through NBD, before and after an apply and a merge in the
// imported tree; the originals of the copy import stay byte for byte.
func TestVMImport(t *testing.T) {
	qemuIO := testenv.Tool(t, "qemu-io")
	dir := shortTempDir(t)
	src := startDaemon(t, filepath.Join(dir, "a"))
	qio := func(d *daemon, export string, cmds ...string) {
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
	src.cli(t, "vm", "create", "src", "--disk", "16M")
	qio(src, "src", "write -P 0x11 0 1M")
	src.cli(t, "checkpoint", "create", "src", "--name", "one")
	qio(src, "src", "write -P 0x22 1M 1M")
	src.cli(t, "checkpoint", "create", "src", "--name", "two")
	qio(src, "src", "write -P 0x33 2M 1M")
	src.cli(t, "checkpoint", "create", "src", "--name", "three")
	qio(src, "src", "write -P 0x55 4M 1M")
	src.cli(t, "checkpoint", "apply", "src", "one")
	qio(src, "src", "write -P 0x44 3M 1M")
	src.stop(t)

	export := func(name string) string {
		folder := filepath.Join(dir, name)
		vhds := filepath.Join(folder, "Virtual Hard Disks")
		os.MkdirAll(vhds, 0o755)
		files, _ := filepath.Glob(filepath.Join(src.data, "vms", "src", "*vhdx"))
		if len(files) != 4 {
			t.Fatalf("the source machine left %v, want 4 files", files)
		}
		runTool(t, time.Minute, "cp", append(append([]string{"-p"}, files...), vhds)...)
		return folder
	}
	inPlace, copied := export("Web Server"), export("copied")

	d := startDaemon(t, filepath.Join(dir, "b"))
	out := d.cli(t, "vm", "import", inPlace)
	if !strings.Contains(out, "Web-Server") {
		t.Fatalf("vm import:\n%s", out)
	}
	tree := d.cli(t, "checkpoint", "list", "Web-Server")
	for _, want := range []string{"disk0 ", "disk0_1 ", "disk0_2 ", "Now"} {
		if !strings.Contains(tree, want) {
			t.Fatalf("checkpoint list lacks %q:\n%s", want, tree)
		}
	}
	t.Logf("imported tree:\n%s", tree)
	if v := d.vm(t, "Web-Server"); len(v.Disks[0].Chain) != 2 || filepath.Base(v.Disks[0].Chain[1]) != "disk0.vhdx" || filepath.Dir(v.Disks[0].Path) != filepath.Join(inPlace, "Virtual Hard Disks") {
		t.Fatalf("imported disk: %+v", v.Disks[0])
	}
	qio(d, "Web-Server", "read -P 0x11 0 1M", "read -P 0 1M 2M", "read -P 0x44 3M 1M", "read -P 0 4M 1M")
	// The imported tree applies and merges like the daemon's own.
	d.cli(t, "checkpoint", "apply", "Web-Server", "disk0_2")
	qio(d, "Web-Server", "read -P 0x11 0 1M", "read -P 0x22 1M 1M", "read -P 0x33 2M 1M", "read -P 0 3M 2M")
	d.cli(t, "checkpoint", "delete", "Web-Server", "disk0_1", "--wait")
	d.cli(t, "checkpoint", "delete", "Web-Server", "disk0_2", "--wait")
	qio(d, "Web-Server", "read -P 0x11 0 1M", "read -P 0x22 1M 1M", "read -P 0x33 2M 1M", "read -P 0 3M 2M")

	before := map[string][]byte{}
	originals, _ := filepath.Glob(filepath.Join(copied, "Virtual Hard Disks", "*"))
	for _, f := range originals {
		before[f], _ = os.ReadFile(f)
	}
	d.cli(t, "vm", "import", copied, "--name", "cp", "--copy")
	qio(d, "cp", "read -P 0x11 0 1M", "read -P 0 1M 2M", "read -P 0x44 3M 1M")
	d.cli(t, "checkpoint", "create", "cp", "--name", "mine")
	qio(d, "cp", "write -P 0x66 5M 1M")
	d.cli(t, "checkpoint", "delete", "cp", "mine", "--wait")
	d.cli(t, "checkpoint", "delete", "cp", "disk0", "--wait", "--subtree")
	qio(d, "cp", "read -P 0x11 0 1M", "read -P 0x44 3M 1M", "read -P 0x66 5M 1M")
	for f, b := range before {
		if now, _ := os.ReadFile(f); !bytes.Equal(now, b) {
			t.Errorf("%s changed by vm import --copy", f)
		}
	}
	d.stop(t)

	// Refused: a folder with no VHDX files, in one line, leaving nothing.
	empty := filepath.Join(dir, "empty")
	os.MkdirAll(empty, 0o755)
	d = startDaemon(t, filepath.Join(dir, "b"))
	_, stderr, err := d.try("vm", "import", empty)
	if ee, ok := err.(*exec.ExitError); !ok || ee.ExitCode() == 0 || !strings.Contains(stderr, "no .vhdx or .avhdx files") {
		t.Fatalf("import of an empty folder: %v, %q", err, stderr)
	}
	if _, err := os.Stat(filepath.Join(d.data, "vms", "empty")); !os.IsNotExist(err) {
		t.Fatalf("the refused import left its folder")
	}
	d.stop(t)
}
