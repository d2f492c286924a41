package main

import (
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/vhdkit/vhdkit/internal/guest"
	"github.com/vhdkit/vhdkit/internal/testenv"
)

// TestDemo runs README's first command both ways, keeping the files: the
// machine story (a guest under QEMU writes through the checkpoint and the
// live merge, is stopped by its power button, and every byte it wrote is
// in the .vhdx) and the NBD-client story. Each ends with its verification
// passed and a base that qemu-img checks clean; nothing else is left in
// the machine's folder.
func TestDemo(t *testing.T) {
	testenv.Tool(t, "qemu-img")
	for _, story := range []struct {
		name  string
		flags []string
		want  []string
	}{
		{"machine", nil, []string{
			"vhdkit vm start demo", "guest paused", "cp1.vmstate", "while the guest made",
			"machine demo is off", "each read back without an error", "a running machine checkpointed",
		}},
		{"nbd-client", []string{"--no-guest"}, []string{
			"an NBD client plays the running machine", "match the", "no write lost",
		}},
	} {
		t.Run(story.name, func(t *testing.T) {
			if story.flags == nil {
				guest.Require(t)
			}
			dir := filepath.Join(shortTempDir(t), "demo")
			cmd := exec.Command(vhdkitBinary(t), append(append([]string{"demo"}, story.flags...), dir)...)
			out, err := runWithTimeout(cmd, 10*time.Minute)
			if err != nil {
				t.Fatalf("vhdkit demo: %v\n%s", err, out)
			}
			for _, w := range story.want {
				if !strings.Contains(out, w) {
					t.Errorf("the demo's output lacks %q", w)
				}
			}
			if !strings.Contains(out, "identical") || !strings.Contains(out, "no problems found") {
				t.Errorf("the demo did not verify its file")
			}
			if t.Failed() {
				t.Fatalf("output:\n%s", out)
			}
			vmDir := filepath.Join(dir, "vhdkit-data", "vms", "demo")
			left, _ := filepath.Glob(filepath.Join(vmDir, "*"))
			if len(left) != 1 || filepath.Base(left[0]) != "disk0.vhdx" {
				t.Fatalf("the machine's folder holds %v, want only disk0.vhdx", left)
			}
			checkClean(t, left[0])
		})
	}
}

// runWithTimeout runs cmd and returns its combined output, killing it
// after d.
func runWithTimeout(cmd *exec.Cmd, d time.Duration) (string, error) {
	var out lockedBuffer
	cmd.Stdout, cmd.Stderr = &out, &out
	if err := cmd.Start(); err != nil {
		return "", err
	}
	timer := time.AfterFunc(d, func() { cmd.Process.Kill() })
	defer timer.Stop()
	err := cmd.Wait()
	return out.String(), err
}
