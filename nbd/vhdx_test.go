package nbd

import (
	"path/filepath"
	"testing"
	"time"

	"github.com/vhdkit/vhdkit/disk"
	"github.com/vhdkit/vhdkit/internal/testenv"
	"github.com/vhdkit/vhdkit/vhdx"
)

// TestTrimReleasesVHDXBlocks trims and zeroes a served dynamic VHDX with
// qemu-io: TRIM and WRITE_ZEROES with may-unmap leave no data in their
// blocks, WRITE_ZEROES with NO_HOLE keeps zeros there, and once flushed
// the host file holds less than before.
func TestTrimReleasesVHDXBlocks(t *testing.T) {
	testenv.Tool(t, "qemu-io")
	const mib = 1 << 20
	path := filepath.Join(t.TempDir(), "d.vhdx")
	img, err := vhdx.Create(path, vhdx.CreateOptions{Size: 16 * mib, BlockSize: mib})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { img.Close() }) // after the server's shutdown, which flushes it
	ts := startServer(t, nil, Export{Name: "d", Image: img})
	run(t, 60*time.Second, nil, "qemu-io", "-f", "raw",
		"-c", "write -P 0x5a 0 8M", "-c", "flush", ts.uri("d"))
	full, _ := testenv.Allocated(t, path)
	run(t, 60*time.Second, nil, "qemu-io", "-f", "raw",
		"-c", "discard 0 3M", // NBD_CMD_TRIM
		"-c", "write -z -u 3M 2M", // WRITE_ZEROES, may unmap
		"-c", "write -z 5M 1M", // WRITE_ZEROES with NO_HOLE
		"-c", "flush", ts.uri("d"))
	exts, err := img.Extents(0, 8*mib)
	if err != nil {
		t.Fatal(err)
	}
	typeAt := func(off int64) disk.ExtentType {
		for _, e := range exts {
			if off >= e.Offset && off < e.Offset+e.Length {
				return e.Type
			}
		}
		t.Fatalf("no extent at %d: %v", off, exts)
		return 0
	}
	for off := int64(0); off < 8*mib; off += mib {
		got := typeAt(off)
		switch {
		case off < 5*mib && got == disk.Data:
			t.Errorf("block at %d MiB holds data after a trim or may-unmap zeroing: %v", off/mib, exts)
		case off >= 6*mib && got != disk.Data:
			t.Errorf("block at %d MiB: %v, want data", off/mib, got)
		}
	}
	if now, _ := testenv.Allocated(t, path); now >= full {
		t.Errorf("host file holds %d bytes after trimming 5 of 8 MiB, %d before", now, full)
	} else {
		t.Logf("host file: %d KiB allocated before, %d KiB after", full>>10, now>>10)
	}
	// The image reads back what qemu-io wrote and zeroed.
	run(t, 60*time.Second, nil, "qemu-io", "-f", "raw",
		"-c", "read -P 0 0 6M", "-c", "read -P 0x5a 6M 2M", "-c", "read -P 0 8M 8M", ts.uri("d"))
}
