package vhdx

import (
	"bytes"
	"os"
	"path/filepath"
	"testing"

	"github.com/vhdkit/vhdkit/internal/testenv"
)

// wantCleanContent checks the closed image at path: the strict check finds
// nothing, and opened read-only it reads model.
func wantCleanContent(t *testing.T, path string, model []byte, what string) {
	t.Helper()
	probs, err := Check(path, false)
	if err != nil {
		t.Fatal(err)
	}
	for _, p := range probs {
		t.Errorf("%s: check: %v", what, p)
	}
	ro, err := Open(path, OpenOptions{ReadOnly: true})
	if err != nil {
		t.Fatal(err)
	}
	defer ro.Close()
	if got := readAll(t, ro); !bytes.Equal(got, model) {
		t.Fatalf("%s: content differs at %d", what, firstDiff(got, model))
	}
}

// wantQemuReads checks the closed image at path with qemu-img: check finds
// nothing, and it reads model.
func wantQemuReads(t *testing.T, path string, model []byte) {
	t.Helper()
	testenv.Tool(t, "qemu-img")
	raw := filepath.Join(t.TempDir(), "model.raw")
	if err := os.WriteFile(raw, model, 0o600); err != nil {
		t.Fatal(err)
	}
	run(t, "qemu-img", "check", "-f", "vhdx", path)
	run(t, "qemu-img", "compare", "-f", "vhdx", "-F", "raw", path, raw)
}
