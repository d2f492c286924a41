package imagecopy_test

import (
	"bytes"
	"context"
	"fmt"
	"log"
	"os"
	"path/filepath"

	"github.com/vhdkit/vhdkit/imagecopy"
	"github.com/vhdkit/vhdkit/raw"
	"github.com/vhdkit/vhdkit/vhdx"
)

// Flattening a VHDX chain (a base and a checkpoint's child) into a raw
// file, as "vhdkit convert top.avhdx flat.img" does: the chain's extents
// say what to copy (data from either layer, zeros the child declares,
// holes), the engine moves the data and skips what reads as zeros in the
// new, sparse target.
func Example() {
	dir, err := os.MkdirTemp("", "imagecopy-example-")
	if err != nil {
		log.Fatal(err)
	}
	defer os.RemoveAll(dir)

	const size = 8 << 20
	base, err := vhdx.Create(filepath.Join(dir, "base.vhdx"), vhdx.CreateOptions{Size: size, BlockSize: 1 << 20})
	if err != nil {
		log.Fatal(err)
	}
	for _, off := range []int64{0, 2 << 20} {
		if _, err := base.WriteAt(bytes.Repeat([]byte("base"), 1024), off); err != nil {
			log.Fatal(err)
		}
	}
	src, err := base.CreateChild(filepath.Join(dir, "base_1.avhdx"), vhdx.CreateOptions{})
	if err != nil {
		log.Fatal(err)
	}
	defer src.Close()
	if _, err := src.WriteAt(bytes.Repeat([]byte("kid!"), 1024), 2<<20); err != nil {
		log.Fatal(err)
	}
	// The child also discards its first block (2 MiB), the base's data there included.
	if err := src.WriteZeroes(0, 2<<20, true); err != nil {
		log.Fatal(err)
	}

	extents, err := src.Extents(0, src.Size())
	if err != nil {
		log.Fatal(err)
	}
	for _, e := range extents {
		fmt.Printf("%7d +%7d %s, depth %d\n", e.Offset, e.Length, e.Type, e.Depth)
	}

	dst, err := raw.Create(filepath.Join(dir, "flat.img"), src.Size())
	if err != nil {
		log.Fatal(err)
	}
	defer dst.Close()
	// Fresh: the new raw file reads zeros wherever nothing is written.
	stats, err := imagecopy.Copy(context.Background(), dst, src, extents, imagecopy.Options{Fresh: true})
	if err != nil {
		log.Fatal(err)
	}
	if err := dst.Flush(); err != nil {
		log.Fatal(err)
	}
	// How the data moved (cloned, copied in the kernel, or through
	// memory) depends on the file system; how much did not.
	fmt.Println("data moved:", stats.Moved.Total())
	fmt.Println("zeroed:", stats.Zeroed, "skipped:", stats.Skipped)

	want, got := make([]byte, size), make([]byte, size)
	if _, err := src.ReadAt(want, 0); err != nil {
		log.Fatal(err)
	}
	if _, err := dst.ReadAt(got, 0); err != nil {
		log.Fatal(err)
	}
	fmt.Println("flat.img reads as the chain:", bytes.Equal(got, want))
	// Output:
	//       0 +2097152 zero, depth 0
	// 2097152 +   4096 data, depth 0
	// 2101248 +1044480 data, depth 1
	// 3145728 +5242880 hole, depth 2
	// data moved: 1048576
	// zeroed: 0 skipped: 7340032
	// flat.img reads as the chain: true
}
