package raw_test

import (
	"errors"
	"fmt"
	"log"
	"os"
	"path/filepath"

	"github.com/vhdkit/vhdkit/disk"
	"github.com/vhdkit/vhdkit/raw"
)

// A sparse raw image: the written megabyte is the file's only data, and
// Extents finds it among the holes.
func Example() {
	dir, err := os.MkdirTemp("", "raw-example-")
	if err != nil {
		log.Fatal(err)
	}
	defer os.RemoveAll(dir)
	path := filepath.Join(dir, "disk.img")

	img, err := raw.Create(path, 4<<20)
	if err != nil {
		log.Fatal(err)
	}
	defer img.Close()
	// A whole, aligned megabyte: file systems track holes in blocks (4 KiB
	// on most, larger on some), so a smaller write would report the rest
	// of its block as data too.
	data := make([]byte, 1<<20)
	copy(data, "hello, raw")
	if _, err := img.WriteAt(data, 1<<20); err != nil {
		log.Fatal(err)
	}
	if err := img.Flush(); err != nil {
		log.Fatal(err)
	}

	got := make([]byte, 10)
	if _, err := img.ReadAt(got, 1<<20); err != nil {
		log.Fatal(err)
	}
	fmt.Printf("read back: %q\n", got)
	fmt.Println("size:", img.Size())

	// A raw image is one layer: data has depth 0, holes depth 1.
	extents, err := img.Extents(0, img.Size())
	if err != nil {
		log.Fatal(err)
	}
	for _, e := range extents {
		fmt.Printf("%7d +%7d %s, depth %d\n", e.Offset, e.Length, e.Type, e.Depth)
	}

	// Past the end of the disk is out of range, for reads as for writes.
	_, err = img.ReadAt(got, img.Size()-5)
	fmt.Println("read past the end is ErrOutOfRange:", errors.Is(err, disk.ErrOutOfRange))
	// Output:
	// read back: "hello, raw"
	// size: 4194304
	//       0 +1048576 hole, depth 1
	// 1048576 +1048576 data, depth 0
	// 2097152 +2097152 hole, depth 1
	// read past the end is ErrOutOfRange: true
}
