package guest

import (
	"context"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/vhdkit/vhdkit/internal/vmm"
)

// TestAgentAnswers boots the kit's guest with the agent under vmm (which
// gives every machine the agent's channel) and asks it what a production
// checkpoint will: ping and fsfreeze status. The initramfs carries
// qemu-ga, every library its ELF needs and the loader.
func TestAgentAnswers(t *testing.T) {
	e := Require(t)
	agent := RequireAgent(t)
	interp, libs, err := neededLibraries(agent)
	if err != nil {
		t.Fatal(err)
	}
	if !strings.HasPrefix(interp, "/lib") || !strings.Contains(strings.Join(libs, " "), "libglib-2.0.so.0") {
		t.Fatalf("qemu-ga needs: loader %q, libraries %v", interp, libs)
	}
	dir, err := os.MkdirTemp("", "vhdkit-ga") // a short path for the sockets
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	boot, err := e.WriteBoot(dir, Options{Agent: true, Script: "echo VHDKIT-AGENT-UP\nwhile true; do sleep 1; done\n"})
	if err != nil {
		t.Fatal(err)
	}
	p, _, err := vmm.Start(context.Background(), vmm.Config{Name: "agent", RunDir: filepath.Join(dir, "run"), Accel: vmm.AccelTCG,
		MemoryMiB: 128, CPUs: 1, Kernel: boot.Kernel, Initrd: boot.Initrd, Append: boot.Append})
	if err != nil {
		t.Fatal(err)
	}
	defer p.Quit(context.Background())
	console := func() string { b, _ := os.ReadFile(p.Cons); return string(b) }
	for deadline := time.Now().Add(5 * time.Minute); !strings.Contains(console(), "VHDKIT-AGENT-UP"); time.Sleep(100 * time.Millisecond) {
		if time.Now().After(deadline) {
			t.Fatalf("the guest never came up; console:\n%s", console())
		}
	}
	a := p.GuestAgent()
	a.SyncTimeout = time.Minute // a busy machine's TCG guest is slow
	if err := a.Ping(context.Background()); err != nil {
		t.Fatalf("ping: %v; console:\n%s", err, console())
	}
	if s, err := a.FreezeStatus(context.Background()); err != nil || s != "thawed" {
		t.Fatalf("fsfreeze status: %q, %v", s, err)
	}
}
