package vhd

import (
	"path/filepath"
	"testing"
)

const benchSize = 256 << 20

// BenchmarkWriteSequential fills a new image in 1 MiB writes, as a
// converter does, with a Flush at the end.
func BenchmarkWriteSequential(b *testing.B) {
	for _, typ := range []Type{Fixed, Dynamic} {
		b.Run(typ.String(), func(b *testing.B) {
			buf := make([]byte, 1<<20)
			for i := range buf {
				buf[i] = byte(i)
			}
			b.SetBytes(benchSize)
			for i := 0; b.Loop(); i++ {
				img, err := Create(filepath.Join(b.TempDir(), "b.vhd"), CreateOptions{Type: typ, Size: benchSize})
				if err != nil {
					b.Fatal(err)
				}
				for off := int64(0); off < benchSize; off += int64(len(buf)) {
					if _, err := img.WriteAt(buf, off); err != nil {
						b.Fatal(err)
					}
				}
				if err := img.Close(); err != nil {
					b.Fatal(err)
				}
			}
		})
	}
}

// BenchmarkReadSequential reads a full dynamic image and a differencing
// child that holds every other block.
func BenchmarkReadSequential(b *testing.B) {
	dir := b.TempDir()
	base := filepath.Join(dir, "base.vhd")
	img, err := Create(base, CreateOptions{Size: benchSize})
	if err != nil {
		b.Fatal(err)
	}
	buf := make([]byte, 1<<20)
	for off := int64(0); off < benchSize; off += int64(len(buf)) {
		if _, err := img.WriteAt(buf[:len(buf)-1], off+1); err != nil {
			b.Fatal(err)
		}
	}
	img.Close()
	child := filepath.Join(dir, "child.vhd")
	img, err = Create(child, CreateOptions{Parent: base})
	if err != nil {
		b.Fatal(err)
	}
	for off := int64(0); off < benchSize; off += 4 << 20 {
		if _, err := img.WriteAt(buf, off); err != nil {
			b.Fatal(err)
		}
	}
	img.Close()
	for _, path := range []string{base, child} {
		b.Run(filepath.Base(path), func(b *testing.B) {
			img, err := Open(path, OpenOptions{ReadOnly: true})
			if err != nil {
				b.Fatal(err)
			}
			defer img.Close()
			b.SetBytes(benchSize)
			for b.Loop() {
				for off := int64(0); off < benchSize; off += int64(len(buf)) {
					if _, err := img.ReadAt(buf, off); err != nil {
						b.Fatal(err)
					}
				}
			}
		})
	}
}
