package vhdx

import (
	"fmt"
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

// BenchmarkChainDepth reads random 4 KiB through chains of 1 and 32
// layers whose data lives in the base, with a few sectors written in every
// layer (partially present blocks on the way down).
func BenchmarkChainDepth(b *testing.B) {
	for _, depth := range []int{1, 32} {
		b.Run(fmt.Sprint(depth), func(b *testing.B) {
			dir := b.TempDir()
			const size = 64 << 20
			path := filepath.Join(dir, "base.vhdx")
			im, err := Create(path, CreateOptions{Size: size, BlockSize: 2 << 20})
			if err != nil {
				b.Fatal(err)
			}
			buf := make([]byte, 1<<20)
			rand.New(rand.NewSource(1)).Read(buf)
			for off := int64(0); off < size; off += int64(len(buf)) {
				im.WriteAt(buf, off)
			}
			for i := 1; i < depth; i++ {
				if err := im.Close(); err != nil {
					b.Fatal(err)
				}
				child := filepath.Join(dir, fmt.Sprintf("l%d.avhdx", i))
				if im, err = Create(child, CreateOptions{Parent: path}); err != nil {
					b.Fatal(err)
				}
				im.WriteAt(buf[:512], int64(i)*(2<<20)+4096)
				path = child
			}
			defer im.Close()
			r := rand.New(rand.NewSource(2))
			p := make([]byte, 4096)
			b.SetBytes(4096)
			b.ResetTimer()
			for i := 0; i < b.N; i++ {
				if _, err := im.ReadAt(p, r.Int63n(size/4096)*4096); err != nil {
					b.Fatal(err)
				}
			}
		})
	}
}
