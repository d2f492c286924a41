package disk_test

import (
	"errors"
	"fmt"
	"log"
	"math"
	"os"
	"path/filepath"

	"github.com/vhdkit/vhdkit/disk"
	"github.com/vhdkit/vhdkit/raw"
	_ "github.com/vhdkit/vhdkit/vhdx" // registers the "vhdx" format with Open
)

// An allocation map built range by range, as a format's Extents walks
// its blocks: adjacent ranges of the same type and depth become one.
func ExampleAppendExtent() {
	var list []disk.Extent
	for _, e := range []disk.Extent{
		{Offset: 0, Length: 1 << 20, Type: disk.Data},
		{Offset: 1 << 20, Length: 1 << 20, Type: disk.Data},           // merged
		{Offset: 2 << 20, Length: 1 << 20, Type: disk.Data, Depth: 1}, // another layer
		{Offset: 3 << 20, Length: 0, Type: disk.Zero},                 // empty: dropped
		{Offset: 3 << 20, Length: 1 << 20, Type: disk.Zero},           // another type
		{Offset: 4 << 20, Length: 4 << 20, Type: disk.Hole, Depth: 2}, // nothing in a chain of two
		{Offset: 8 << 20, Length: 8 << 20, Type: disk.Hole, Depth: 2}, // merged
	} {
		list = disk.AppendExtent(list, e)
	}
	for _, e := range list {
		fmt.Printf("%8d +%8d %s, depth %d\n", e.Offset, e.Length, e.Type, e.Depth)
	}
	// Output:
	//        0 + 2097152 data, depth 0
	//  2097152 + 1048576 data, depth 1
	//  3145728 + 1048576 zero, depth 0
	//  4194304 +12582912 hole, depth 2
}

// CheckRange is the bounds check every format makes before I/O; its
// error is ErrOutOfRange, which formats wrap with what was asked.
// Offsets and lengths are hostile: their sum overflowing is out of
// range too, not a wrap-around.
func ExampleCheckRange() {
	const size = 1 << 20
	for _, r := range []struct{ off, n int64 }{
		{0, size},          // the whole disk
		{size, 0},          // empty, at the end
		{size - 512, 1024}, // runs past the end
		{-512, 512},        // negative offset
		{math.MaxInt64, 1}, // off+n overflows
	} {
		if err := disk.CheckRange(r.off, r.n, size); err != nil {
			// What a format returns: the sentinel, wrapped with context.
			err = fmt.Errorf("read %d bytes at %d: %w", r.n, r.off, err)
			fmt.Printf("%v (ErrOutOfRange: %v)\n", err, errors.Is(err, disk.ErrOutOfRange))
			continue
		}
		fmt.Printf("read %d bytes at %d: ok\n", r.n, r.off)
	}
	// Output:
	// read 1048576 bytes at 0: ok
	// read 0 bytes at 1048576: ok
	// read 1024 bytes at 1048064: offset out of range (ErrOutOfRange: true)
	// read 512 bytes at -512: offset out of range (ErrOutOfRange: true)
	// read 1 bytes at 9223372036854775807: offset out of range (ErrOutOfRange: true)
}

// Open picks the format from the file's content among the registered
// ones (a format package registers itself when imported); a file whose
// name claims another format than its content is refused.
func ExampleOpen() {
	dir, err := os.MkdirTemp("", "disk-example-")
	if err != nil {
		log.Fatal(err)
	}
	defer os.RemoveAll(dir)

	img, err := raw.Create(filepath.Join(dir, "disk.img"), 1<<20)
	if err != nil {
		log.Fatal(err)
	}
	if err := img.Close(); err != nil {
		log.Fatal(err)
	}
	for _, name := range []string{"disk.img", "disk.vhdx"} {
		if name == "disk.vhdx" {
			// A raw file under a VHDX name.
			if err := os.Rename(filepath.Join(dir, "disk.img"), filepath.Join(dir, name)); err != nil {
				log.Fatal(err)
			}
		}
		f, err := disk.Detect(filepath.Join(dir, name))
		if err != nil {
			fmt.Printf("%s: refused (ErrFormatMismatch: %v)\n", name, errors.Is(err, disk.ErrFormatMismatch))
			continue
		}
		d, err := disk.Open(filepath.Join(dir, name), disk.OpenOptions{ReadOnly: true})
		if err != nil {
			log.Fatal(err)
		}
		fmt.Printf("%s: %s, %d bytes\n", name, f.Name, d.Size())
		d.Close()
	}
	// Output:
	// disk.img: raw, 1048576 bytes
	// disk.vhdx: refused (ErrFormatMismatch: true)
}
