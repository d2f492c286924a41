package vhdx

import (
	"math/rand"
	"path/filepath"
	"testing"
)

// Benchmarks of the I/O path on real files: sequential 1 MiB and random
// 4 KiB reads and writes, on a dynamic image and on a differencing child
// over one. Allocating writes (a fresh image per pass) and overwrites are
// measured apart. Compare runs with benchstat; compare with qemu-img and
// qemu-nbd in bench/.

const benchSize = 256 << 20

func benchImage(b *testing.B, diff, filled bool) *Image {
	b.Helper()
	dir := b.TempDir()
	path := filepath.Join(dir, "base.vhdx")
	im, err := Create(path, CreateOptions{Size: benchSize})
	if err != nil {
		b.Fatal(err)
	}
	buf := make([]byte, 1<<20)
	rand.New(rand.NewSource(1)).Read(buf)
	if filled && !diff {
		for off := int64(0); off < benchSize; off += int64(len(buf)) {
			im.WriteAt(buf, off)
		}
	}
	if !diff {
		return im
	}
	if err := im.Close(); err != nil {
		b.Fatal(err)
	}
	child, err := Create(filepath.Join(dir, "child.avhdx"), CreateOptions{Parent: path})
	if err != nil {
		b.Fatal(err)
	}
	if filled {
		for off := int64(0); off < benchSize; off += int64(len(buf)) {
			child.WriteAt(buf, off)
		}
	}
	return child
}

func benchSeq(b *testing.B, im *Image, write bool) {
	buf := make([]byte, 1<<20)
	b.SetBytes(int64(len(buf)))
	off := int64(0)
	for i := 0; i < b.N; i++ {
		var err error
		if write {
			_, err = im.WriteAt(buf, off)
		} else {
			_, err = im.ReadAt(buf, off)
		}
		if err != nil {
			b.Fatal(err)
		}
		off = (off + int64(len(buf))) % benchSize
	}
	if write {
		if err := im.Flush(); err != nil {
			b.Fatal(err)
		}
	}
}

func benchRandom(b *testing.B, im *Image, write bool) {
	buf := make([]byte, 4096)
	b.SetBytes(int64(len(buf)))
	r := rand.New(rand.NewSource(2))
	for i := 0; i < b.N; i++ {
		off := r.Int63n(benchSize/4096) * 4096
		var err error
		if write {
			_, err = im.WriteAt(buf, off)
		} else {
			_, err = im.ReadAt(buf, off)
		}
		if err != nil {
			b.Fatal(err)
		}
	}
	if write {
		if err := im.Flush(); err != nil {
			b.Fatal(err)
		}
	}
}

func BenchmarkDynamic(b *testing.B) {
	for _, c := range []struct {
		name          string
		filled, write bool
		random        bool
	}{
		{"SeqWriteAllocating", false, true, false},
		{"SeqWriteOverwrite", true, true, false},
		{"SeqRead", true, false, false},
		{"RandWrite4K", true, true, true},
		{"RandRead4K", true, false, true},
	} {
		for _, diff := range []bool{false, true} {
			name := c.name
			if diff {
				name = "Diff" + name
			}
			b.Run(name, func(b *testing.B) {
				im := benchImage(b, diff, c.filled)
				defer im.Close()
				b.ResetTimer()
				if c.random {
					benchRandom(b, im, c.write)
				} else {
					benchSeq(b, im, c.write)
				}
			})
		}
	}
}
