package storage

import (
	"os"
	"path/filepath"
	"testing"
)

// TestIsHole: a range of an OS file is a hole only where the file system
// holds no data in it and it lies within the file; MemFiles and MemFS
// handles answer by their bytes, FaultFiles for the file they wrap.
func TestIsHole(t *testing.T) {
	path := filepath.Join(t.TempDir(), "f")
	f, err := OpenFile(path, os.O_RDWR|os.O_CREATE|os.O_EXCL, 0o600)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	data := []byte{1}
	for _, off := range []int64{0, 1 << 20, 3 << 20} {
		if _, err := f.WriteAt(data, off); err != nil {
			t.Fatal(err)
		}
	}
	if err := f.Truncate(4 << 20); err != nil {
		t.Fatal(err)
	}
	// Data is allocated in file system blocks: 4 KiB at most around each
	// byte written (ext4, XFS, btrfs as made today).
	const fsBlock = 64 << 10
	m := NewMemFS(map[string][]byte{"m": make([]byte, 4<<20)})
	mh, err := m.OpenFile("m", os.O_RDWR, 0)
	if err != nil {
		t.Fatal(err)
	}
	for _, off := range []int64{0, 1 << 20, 3 << 20} {
		if _, err := mh.WriteAt(data, off); err != nil {
			t.Fatal(err)
		}
	}
	for _, tc := range []struct {
		off, n int64
		hole   bool
	}{
		{fsBlock, 1<<20 - fsBlock, true},         // between the first two
		{1<<20 + fsBlock, 2<<20 - fsBlock, true}, // between the second and third
		{3<<20 + fsBlock, 1<<20 - fsBlock, true}, // after the last, to the end
		{0, 1 << 20, false},                      // data at its start
		{fsBlock, 1 << 20, false},                // data at its end
		{3<<20 + fsBlock, 1 << 20, false},        // past the end
		{fsBlock, 0, false},                      // empty
		{-1, 10, false},
	} {
		for name, file := range map[string]File{"os": f, "memfs": mh, "fault": &FaultFile{File: f, FailAt: -1}} {
			if got := IsHole(file, tc.off, tc.n); got != tc.hole {
				t.Errorf("%s: IsHole(%#x, %#x) = %v, want %v", name, tc.off, tc.n, got, tc.hole)
			}
		}
	}
	if IsHole(struct{ File }{f}, fsBlock, 4096) {
		t.Error("a File IsHole cannot ask says it holds a hole")
	}
}
