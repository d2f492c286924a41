package vhdx

import (
	"compress/bzip2"
	"compress/gzip"
	"crypto/md5"
	"encoding/hex"
	"errors"
	"io"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/vhdkit/vhdkit/disk"
)

// samplesDir is the team's folder of real-world images, beside the repo.
const samplesDir = "../../shared/samples"

// sample decompresses a sample image into dir under name (or its own
// name) and returns the path. It skips the test when the samples are absent,
// except in CI.
func sample(t testing.TB, rel, dir, name string) string {
	t.Helper()
	src := filepath.Join(samplesDir, rel)
	f, err := os.Open(src)
	if err != nil {
		if os.Getenv("CI") == "" && errors.Is(err, os.ErrNotExist) {
			t.Skipf("samples not available: %v", err)
		}
		t.Fatal(err)
	}
	defer f.Close()
	var r io.Reader
	switch {
	case strings.HasSuffix(rel, ".gz"):
		zr, err := gzip.NewReader(f)
		if err != nil {
			t.Fatal(err)
		}
		r = zr
	case strings.HasSuffix(rel, ".bz2"):
		r = bzip2.NewReader(f)
	default:
		r = f
	}
	if name == "" {
		name = strings.TrimSuffix(strings.TrimSuffix(filepath.Base(rel), ".gz"), ".bz2")
	}
	dst := filepath.Join(dir, name)
	out, err := os.Create(dst)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := io.Copy(out, r); err != nil {
		t.Fatal(err)
	}
	if err := out.Close(); err != nil {
		t.Fatal(err)
	}
	return dst
}

// imageMD5 hashes the whole virtual disk, reading only what its extents
// say holds data.
func imageMD5(t testing.TB, im disk.Image) string {
	t.Helper()
	h := md5.New()
	zero := make([]byte, 4*mib)
	buf := make([]byte, 4*mib)
	size := im.Size()
	for off := int64(0); off < size; {
		n := min(size-off, int64(len(buf)))
		ext, err := im.(disk.Extenter).Extents(off, n)
		if err != nil {
			t.Fatal(err)
		}
		for _, e := range ext {
			if e.Type == disk.Data {
				if _, err := im.ReadAt(buf[:e.Length], e.Offset); err != nil {
					t.Fatal(err)
				}
				h.Write(buf[:e.Length])
			} else {
				h.Write(zero[:e.Length])
			}
		}
		off += n
	}
	return hex.EncodeToString(h.Sum(nil))
}

func TestSamples(t *testing.T) {
	cases := []struct {
		file string
		size int64
		md5  string
		typ  Type
	}{
		{"hyperv/fixed.vhdx.gz", 10485760, "5a8e554eb8d2dd310ae190523389065d", Fixed},
		{"hyperv/dynamic.vhdx.gz", 10485760, "e02915c2b80ceb31b6f4ca91d16ab9c0", Dynamic},
		{"hyperv/iotest-dynamic-1G.vhdx.bz2", 1 << 30, "8a5df7512d96578c537279cee90b5e8d", Dynamic},
		{"hyperv/discutils-vhdx-log-replay.vhdx.gz", 1 << 30, "671f96cf63f64ba869ce0fda80a48c6d", Dynamic},
		{"hyperv/discutils-btrfs.vhdx.gz", 1 << 30, "a11953a295955b7cb27d4c42b2707531", Dynamic},
		{"hyperv/discutils-swap.vhdx.gz", 10 << 30, "f02183652b601c7015ad6350e7c20990", Dynamic},
		{"hyperv/discutils-lvm2.vhdx.gz", 10 << 30, "4bd9efcad7a5679fe16f00b3a2793410", Dynamic},
		{"hyperv/discutils-xfs.vhdx.gz", 10 << 30, "900e2c384f89b460d695c1b15b4f9a87", Dynamic},
		{"hyperv/discutils-xfs5.vhdx.gz", 10 << 30, "13c2b33aba7e7e114847869b35a3fb88", Dynamic},
		{"qemu-made/iotest-dirtylog-10G-4M.vhdx.bz2", 10 << 30, "f57388780d1d321ed98f042d6cd3926e", Dynamic},
		{"disk2vhd/test-disk2vhd.vhdx.bz2", 256 << 20, "46adcce59438abbcd3bbb2645a003aa8", Dynamic},
	}
	for _, c := range cases {
		t.Run(filepath.Base(c.file), func(t *testing.T) {
			if c.size > 1<<30 && testing.Short() {
				t.Skip("large sample; skipped with -short")
			}
			t.Parallel()
			path := sample(t, c.file, t.TempDir(), "")
			before, err := os.ReadFile(path)
			if err != nil {
				t.Fatal(err)
			}
			im, err := Open(path, OpenOptions{ReadOnly: true})
			if err != nil {
				t.Fatal(err)
			}
			defer im.Close()
			if im.Size() != c.size || im.Info().Type != c.typ {
				t.Errorf("size %d type %v, want %d %v", im.Size(), im.Info().Type, c.size, c.typ)
			}
			if got := imageMD5(t, im); got != c.md5 {
				t.Errorf("md5 %s, want %s", got, c.md5)
			}
			after, err := os.ReadFile(path)
			if err != nil {
				t.Fatal(err)
			}
			if string(before) != string(after) {
				t.Error("a read-only open modified the file")
			}
		})
	}
}

// TestSampleLogReplayReadWrite replays the Hyper-V sample's pending log on
// the file itself: afterwards the file is clean and reads the same.
func TestSampleLogReplayReadWrite(t *testing.T) {
	for _, c := range []struct{ file, md5 string }{
		{"hyperv/discutils-vhdx-log-replay.vhdx.gz", "671f96cf63f64ba869ce0fda80a48c6d"},
		{"qemu-made/iotest-dirtylog-10G-4M.vhdx.bz2", "f57388780d1d321ed98f042d6cd3926e"},
	} {
		t.Run(filepath.Base(c.file), func(t *testing.T) {
			path := sample(t, c.file, t.TempDir(), "")
			im, err := Open(path, OpenOptions{})
			if err != nil {
				t.Fatal(err)
			}
			if !im.Info().LogReplayed {
				t.Error("no log replayed")
			}
			if err := im.Close(); err != nil {
				t.Fatal(err)
			}
			im, err = Open(path, OpenOptions{ReadOnly: true})
			if err != nil {
				t.Fatal(err)
			}
			defer im.Close()
			if im.Info().LogReplayed {
				t.Error("log still pending after a read-write open and close")
			}
			if got := imageMD5(t, im); got != c.md5 {
				t.Errorf("md5 %s, want %s", got, c.md5)
			}
		})
	}
}

func TestSampleDifferencing(t *testing.T) {
	dir := t.TempDir()
	child := sample(t, "hyperv/differencing.avhdx.gz", dir, "")
	_, err := Open(child, OpenOptions{ReadOnly: true})
	if !errors.Is(err, ErrParentNotFound) {
		t.Fatalf("without its parent: %v, want parent not found", err)
	}
	sample(t, "synthetic-parents/Generation 1_49C4BAF3-4B25-4406-8C4B-D39E65C32385.avhdx.gz", dir, "")
	im, err := Open(child, OpenOptions{ReadOnly: true})
	if err != nil {
		t.Fatal(err)
	}
	defer im.Close()
	if got, want := imageMD5(t, im), "4009949f5153a6966e582087d7708ad8"; got != want {
		t.Errorf("md5 %s, want %s", got, want)
	}
	inf := im.Info()
	if inf.Type != Differencing || len(inf.Chain) != 2 || inf.ParentLinkage.String() != "ff34003b-11ed-4cf8-a166-b2be05e20b80" {
		t.Errorf("info %+v", inf)
	}
}
