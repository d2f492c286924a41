package vhdx

import (
	"path/filepath"
	"testing"

	"github.com/vhdkit/vhdkit/internal/testenv"
)

// A fixed VHDX has every block of its file allocated when Create returns
// (no write to it can fail for space later); with Sparse, and for a
// dynamic image, the payload is not allocated. qemu-img checks both.
func TestCreateFixedAllocated(t *testing.T) {
	testenv.Tool(t, "qemu-img")
	const size = 64 << 20
	dir := t.TempDir()
	for _, tc := range []struct {
		name   string
		opts   CreateOptions
		sparse bool
	}{
		{"fixed.vhdx", CreateOptions{Type: Fixed, Size: size}, false},
		{"sparse.vhdx", CreateOptions{Type: Fixed, Size: size, Sparse: true}, true},
		{"dynamic.vhdx", CreateOptions{Type: Dynamic, Size: size, Sparse: false}, true},
	} {
		path := filepath.Join(dir, tc.name)
		im, err := Create(path, tc.opts)
		if err != nil {
			t.Fatal(err)
		}
		if err := im.Close(); err != nil {
			t.Fatal(err)
		}
		allocated, fileSize := testenv.Allocated(t, path)
		switch {
		case !tc.sparse && allocated < fileSize:
			t.Errorf("%s: %d of its %d bytes allocated, want all", tc.name, allocated, fileSize)
		case tc.sparse && allocated >= size/2:
			t.Errorf("%s: %d of its %d bytes allocated, want a sparse file", tc.name, allocated, fileSize)
		case tc.opts.Type == Fixed && fileSize < size:
			t.Errorf("%s: a %d-byte file holds no 64 MiB payload", tc.name, fileSize)
		}
		t.Logf("%s: file %d bytes, %d allocated", tc.name, fileSize, allocated)
		run(t, "qemu-img", "check", "-f", "vhdx", path)
	}
}
