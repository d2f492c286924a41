package vhdx

import (
	"bytes"
	"path/filepath"
	"sync"
	"testing"
)

// TestFlushDuringAllocatingWrites flushes in a loop while another
// goroutine allocates block after block with a small write at the start
// of each, so the file ends just past that write, short of the block's
// end: a flush that extends the file to cover its allocated blocks must
// never cut it back below data a write has put past the end it saw.
func TestFlushDuringAllocatingWrites(t *testing.T) {
	const blocks = 400
	path := filepath.Join(t.TempDir(), "d.vhdx")
	im, err := Create(path, CreateOptions{Size: blocks << 20, BlockSize: 1 << 20})
	if err != nil {
		t.Fatal(err)
	}
	defer im.Close()
	pattern := func(i int) []byte { return bytes.Repeat([]byte{byte(i%251 + 1)}, 4096) }
	var wg sync.WaitGroup
	stop := make(chan struct{})
	wg.Add(1)
	go func() {
		defer wg.Done()
		for {
			select {
			case <-stop:
				return
			default:
			}
			if err := im.Flush(); err != nil {
				t.Error(err)
				return
			}
		}
	}()
	for i := 0; i < blocks; i++ {
		if _, err := im.WriteAt(pattern(i), int64(i)<<20); err != nil {
			t.Fatal(err)
		}
	}
	close(stop)
	wg.Wait()
	got := make([]byte, 4096)
	for i := 0; i < blocks; i++ {
		if _, err := im.ReadAt(got, int64(i)<<20); err != nil {
			t.Fatal(err)
		}
		if !bytes.Equal(got, pattern(i)) {
			t.Fatalf("block %d lost its data (a flush cut the file short)", i)
		}
	}
}
