package vhdx_test

import (
	"fmt"
	"log"
	"os"
	"path/filepath"

	"github.com/vhdkit/vhdkit/vhdx"
)

// A dynamic VHDX: made empty, written, flushed, reopened and read back,
// with what Get-VHD would report about it.
func Example() {
	dir, err := os.MkdirTemp("", "vhdx-example-")
	if err != nil {
		log.Fatal(err)
	}
	defer os.RemoveAll(dir)
	path := filepath.Join(dir, "disk.vhdx")

	// Dynamic is the zero Type: the file holds only the blocks written.
	im, err := vhdx.Create(path, vhdx.CreateOptions{Size: 64 << 20, BlockSize: 2 << 20})
	if err != nil {
		log.Fatal(err)
	}
	if _, err := im.WriteAt([]byte("hello, VHDX"), 5<<20); err != nil {
		log.Fatal(err)
	}
	// The write is durable once Flush returns: the new block's BAT entry
	// went through the log.
	if err := im.Flush(); err != nil {
		log.Fatal(err)
	}
	if err := im.Close(); err != nil {
		log.Fatal(err)
	}

	im, err = vhdx.Open(path, vhdx.OpenOptions{ReadOnly: true})
	if err != nil {
		log.Fatal(err)
	}
	defer im.Close()
	got := make([]byte, 11)
	if _, err := im.ReadAt(got, 5<<20); err != nil {
		log.Fatal(err)
	}
	fmt.Printf("read back: %q\n", got)

	info := im.Info()
	fmt.Println("type:", info.Type)
	fmt.Println("virtual size:", info.VirtualSize)
	fmt.Println("block size:", info.BlockSize)
	fmt.Println("sectors:", info.LogicalSectorSize, "logical,", info.PhysicalSectorSize, "physical")

	// The allocation map: only the written block holds data.
	extents, err := im.Extents(0, im.Size())
	if err != nil {
		log.Fatal(err)
	}
	for _, e := range extents {
		fmt.Printf("%8d +%8d %s\n", e.Offset, e.Length, e.Type)
	}
	// Output:
	// read back: "hello, VHDX"
	// type: dynamic
	// virtual size: 67108864
	// block size: 2097152
	// sectors: 512 logical, 4096 physical
	//        0 + 4194304 hole
	//  4194304 + 2097152 data
	//  6291456 +60817408 hole
}

// A differencing child (a checkpoint's .avhdx): writes go to the child,
// the rest reads through to its parent, which the child's linkage pins.
func Example_differencing() {
	dir, err := os.MkdirTemp("", "vhdx-example-")
	if err != nil {
		log.Fatal(err)
	}
	defer os.RemoveAll(dir)

	base, err := vhdx.Create(filepath.Join(dir, "base.vhdx"), vhdx.CreateOptions{Size: 16 << 20, BlockSize: 1 << 20})
	if err != nil {
		log.Fatal(err)
	}
	for _, off := range []int64{0, 1 << 20} {
		if _, err := base.WriteAt([]byte("base"), off); err != nil {
			log.Fatal(err)
		}
	}
	// CreateChild flushes and freezes the base (from now on it is only
	// read) and opens the child over it; the child owns the base.
	child, err := base.CreateChild(filepath.Join(dir, "base_1.avhdx"), vhdx.CreateOptions{})
	if err != nil {
		log.Fatal(err)
	}
	defer child.Close()
	if _, err := child.WriteAt([]byte("kid!"), 1<<20); err != nil {
		log.Fatal(err)
	}

	for _, off := range []int64{0, 1 << 20} {
		p := make([]byte, 4)
		if _, err := child.ReadAt(p, off); err != nil {
			log.Fatal(err)
		}
		fmt.Printf("at %d: %q\n", off, p)
	}
	// Depth says which layer holds a range: 0 the child, 1 the base; a
	// hole's depth is the chain's length (no layer holds it).
	extents, err := child.Extents(0, child.Size())
	if err != nil {
		log.Fatal(err)
	}
	for _, e := range extents {
		fmt.Printf("%8d +%8d %s, depth %d\n", e.Offset, e.Length, e.Type, e.Depth)
	}

	info := child.Info()
	fmt.Println("type:", info.Type)
	fmt.Println("virtual size:", info.VirtualSize, "(the parent's)")
	fmt.Println("block size:", info.BlockSize)
	fmt.Println("parent:", filepath.Base(info.ParentPath))
	fmt.Println("linkage is the parent's DataWriteGuid:", info.ParentLinkage == base.Info().DataWriteGUID)
	for i, p := range info.Chain {
		fmt.Printf("chain[%d]: %s\n", i, filepath.Base(p))
	}
	// Output:
	// at 0: "base"
	// at 1048576: "kid!"
	//        0 + 1048576 data, depth 1
	//  1048576 +     512 data, depth 0
	//  1049088 + 1048064 data, depth 1
	//  2097152 +14680064 hole, depth 2
	// type: differencing
	// virtual size: 16777216 (the parent's)
	// block size: 2097152
	// parent: base.vhdx
	// linkage is the parent's DataWriteGuid: true
	// chain[0]: base_1.avhdx
	// chain[1]: base.vhdx
}
