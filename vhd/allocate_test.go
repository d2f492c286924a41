package vhd

import (
	"os"
	"path/filepath"
	"testing"

	"github.com/vhdkit/vhdkit/internal/testenv"
)

// A fixed VHD has every block of its file allocated when Create returns
// (no write to it can fail for space later); with Sparse, and for a
// dynamic image, it does not. All read zeros in qemu-img.
func TestCreateFixedAllocated(t *testing.T) {
	testenv.Tool(t, "qemu-img")
	const size = 64 << 20
	dir := t.TempDir()
	zeros := filepath.Join(dir, "zeros.img")
	if err := os.WriteFile(zeros, nil, 0o600); err != nil {
		t.Fatal(err)
	}
	if err := os.Truncate(zeros, size); err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct {
		name   string
		opts   CreateOptions
		sparse bool
	}{
		{"fixed.vhd", CreateOptions{Type: Fixed, Size: size}, false},
		{"sparse.vhd", CreateOptions{Type: Fixed, Size: size, Sparse: true}, true},
		{"dynamic.vhd", CreateOptions{Type: Dynamic, Size: size}, true},
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
		case tc.opts.Type == Fixed && fileSize != size+footerSize:
			t.Errorf("%s: a %d-byte file, want the data and a footer (%d)", tc.name, fileSize, size+footerSize)
		}
		t.Logf("%s: file %d bytes, %d allocated", tc.name, fileSize, allocated)
		run(t, "qemu-img", "compare", "-f", "vpc", "-F", "raw", path, zeros)
	}
}
