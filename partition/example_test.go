package partition_test

import (
	"bytes"
	"encoding/binary"
	"fmt"

	"github.com/vhdkit/vhdkit/partition"
)

// A 64 MiB disk whose MBR holds two partitions, as "sfdisk" writes them
// for ",10M" and ",20M": the disk can shrink to where the second ends.
func Example() {
	disk := make([]byte, 64<<20)
	for i, p := range []struct{ first, sectors uint32 }{{2048, 20480}, {22528, 40960}} {
		e := disk[446+16*i:]
		e[4] = 0x83 // Linux
		binary.LittleEndian.PutUint32(e[8:], p.first)
		binary.LittleEndian.PutUint32(e[12:], p.sectors)
	}
	disk[510], disk[511] = 0x55, 0xAA

	t, err := partition.Read(bytes.NewReader(disk), int64(len(disk)), 512)
	if err != nil {
		fmt.Println(err)
		return
	}
	for _, p := range t.Partitions {
		fmt.Printf("%s partition %d: type %s, bytes %d to %d\n", t.Kind, p.Number, p.Type, p.Start, p.End())
	}
	fmt.Println("minimum size:", t.MinimumSize(1<<20))

	// A disk without a table: nothing to shrink to.
	_, err = partition.Read(bytes.NewReader(make([]byte, 1<<20)), 1<<20, 512)
	fmt.Println(err)
	// Output:
	// MBR partition 1: type 0x83, bytes 1048576 to 11534336
	// MBR partition 2: type 0x83, bytes 11534336 to 32505856
	// minimum size: 32505856
	// partition: MBR at offset 0x0: no 0x55AA signature: no partition table
}
