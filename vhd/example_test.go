package vhd_test

import (
	"fmt"
	"log"
	"os"
	"path/filepath"

	"github.com/vhdkit/vhdkit/vhd"
)

// A dynamic VHD: made, written, reopened and read back, with its size
// and the CHS geometry its footer records.
func Example() {
	dir, err := os.MkdirTemp("", "vhd-example-")
	if err != nil {
		log.Fatal(err)
	}
	defer os.RemoveAll(dir)
	path := filepath.Join(dir, "disk.vhd")

	// Dynamic is the default Type; BlockSize 0 means DefaultBlockSize.
	im, err := vhd.Create(path, vhd.CreateOptions{Size: 64 << 20})
	if err != nil {
		log.Fatal(err)
	}
	if _, err := im.WriteAt([]byte("hello, VHD"), 3<<20); err != nil {
		log.Fatal(err)
	}
	if err := im.Close(); err != nil {
		log.Fatal(err)
	}

	im, err = vhd.Open(path, vhd.OpenOptions{ReadOnly: true})
	if err != nil {
		log.Fatal(err)
	}
	defer im.Close()
	got := make([]byte, 10)
	if _, err := im.ReadAt(got, 3<<20); err != nil {
		log.Fatal(err)
	}
	fmt.Printf("read back: %q\n", got)

	info := im.Info()
	fmt.Println("type:", info.Type)
	fmt.Println("size:", im.Size())
	fmt.Println("block size:", info.BlockSize)
	fmt.Println("blocks allocated:", info.AllocatedBlocks, "of", info.TotalBlocks)
	// The spec's CHS geometry for 64 MiB falls short of it, so the footer
	// holds the maximum geometry instead: readers that size disks by
	// geometry (QEMU before 10.0) then take the current size, as vhdkit
	// does.
	g := vhd.GeometryFor(64 << 20)
	fmt.Println("spec geometry:", g, "=", g.Size(), "bytes")
	fmt.Println("footer geometry:", info.Geometry)
	fmt.Println("size from geometry:", info.SizeFromGeometry)
	// Output:
	// read back: "hello, VHD"
	// type: dynamic
	// size: 67108864
	// block size: 2097152
	// blocks allocated: 1 of 32
	// spec geometry: 963/8/17 = 67055616 bytes
	// footer geometry: 65535/16/255
	// size from geometry: false
}
