package storage

import (
	"bytes"
	"errors"
	"math/rand/v2"
	"os"
	"path/filepath"
	"testing"

	"github.com/vhdkit/vhdkit/internal/testenv"
)

// randomBytes returns n deterministic random bytes.
func randomBytes(seed uint64, n int) []byte {
	b := make([]byte, n)
	r := rand.New(rand.NewPCG(seed, seed))
	for i := range b {
		b[i] = byte(r.Uint32())
	}
	return b
}

// copyRangeCases copy within and past the end of a 3 MiB + 100 byte
// source: aligned, with a shared misalignment (the middle can be cloned),
// with different misalignments, and reaching past src's end (zeros).
var copyRangeCases = []struct{ srcOff, dstOff, n int64 }{
	{0, 0, 1 << 20},
	{1 << 20, 4 << 20, 2 << 20},
	{100, 8<<20 + 100, 1<<20 + 5000},
	{512, 12<<20 + 1024, 300000},
	{3 << 20, 16 << 20, 8192}, // past src's end after 100 bytes
}

// checkCopyRange runs copyRangeCases from src to dst and checks dst's
// bytes, returning what was moved how.
func checkCopyRange(t *testing.T, dst, src File, data []byte) Moved {
	t.Helper()
	var all Moved
	want := make([]byte, 20<<20)
	for _, c := range copyRangeCases {
		m, err := CopyRange(dst, c.dstOff, src, c.srcOff, c.n)
		if err != nil {
			t.Fatalf("CopyRange(%d -> %d, %d): %v", c.srcOff, c.dstOff, c.n, err)
		}
		if m.Total() != c.n {
			t.Fatalf("CopyRange(%d -> %d, %d) moved %+v", c.srcOff, c.dstOff, c.n, m)
		}
		all = all.Add(m)
		if c.srcOff < int64(len(data)) {
			copy(want[c.dstOff:c.dstOff+c.n], data[c.srcOff:min(int64(len(data)), c.srcOff+c.n)])
		}
	}
	size, err := dst.Size()
	if err != nil {
		t.Fatal(err)
	}
	got := make([]byte, size)
	if _, err := dst.ReadAt(got, 0); err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(got, want[:size]) {
		t.Fatal("the copied ranges differ from the source's bytes")
	}
	return all
}

func TestCopyRangeOSFile(t *testing.T) {
	dir := t.TempDir()
	moved := copyBetweenOSFiles(t, dir)
	t.Logf("%s: %+v", dir, moved)
}

// copyBetweenOSFiles runs the cases between two files in dir.
func copyBetweenOSFiles(t *testing.T, dir string) Moved {
	t.Helper()
	data := randomBytes(1, 3<<20+100)
	srcPath := filepath.Join(dir, "src")
	if err := os.WriteFile(srcPath, data, 0o600); err != nil {
		t.Fatal(err)
	}
	src, err := OpenFile(srcPath, os.O_RDONLY, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer src.Close()
	dst, err := OpenFile(filepath.Join(dir, "dst"), os.O_RDWR|os.O_CREATE|os.O_EXCL, 0o600)
	if err != nil {
		t.Fatal(err)
	}
	defer dst.Close()
	if err := dst.Truncate(20 << 20); err != nil {
		t.Fatal(err)
	}
	return checkCopyRange(t, dst, src, data)
}

// TestCopyRangeClonesOnXFS: on XFS with reflink the aligned parts are
// cloned, and the file system reports the target's extents shared.
func TestCopyRangeClonesOnXFS(t *testing.T) {
	mnt := testenv.MountLoop(t, 512<<20, "mkfs.xfs", "-m", "reflink=1")
	moved := copyBetweenOSFiles(t, mnt)
	// Aligned: 1 MiB, 2 MiB; shared misalignment: the aligned middle of
	// 1 MiB + 5000 from 100 (1 MiB + 4096 - 4096); the rest is not.
	wantCloned := int64(1<<20 + 2<<20 + (1<<20 + 4096 - 4096))
	if moved.Cloned != wantCloned {
		t.Fatalf("cloned %d bytes, want %d (%+v)", moved.Cloned, wantCloned, moved)
	}
	if moved.Copied != 8192-100 {
		t.Fatalf("copied %d bytes through memory, want the %d past src's end (%+v)", moved.Copied, 8192-100, moved)
	}
	if shared := testenv.SharedBytes(t, filepath.Join(mnt, "dst")); shared < wantCloned {
		t.Fatalf("filefrag shows %d shared bytes in the target, want at least %d", shared, wantCloned)
	}
}

func TestCopyRangeMemFile(t *testing.T) {
	data := randomBytes(2, 3<<20+100)
	src := NewMemFile(data)
	dst := NewMemFile(make([]byte, 20<<20))
	moved := checkCopyRange(t, dst, src, data)
	var want int64
	for _, c := range copyRangeCases {
		want += c.n
	}
	if moved.Cloned != want {
		t.Fatalf("a MemFile stands in for a clone: moved %+v, want %d cloned", moved, want)
	}
	// Unsynced, as a write is: a crash may lose it.
	lost := false
	for seed := uint64(0); seed < 8 && !lost; seed++ {
		c := dst.CrashClone(rand.New(rand.NewPCG(seed, 0)))
		b := make([]byte, 1<<20)
		c.ReadAt(b, 0)
		lost = !bytes.Equal(b, data[:1<<20])
	}
	if !lost {
		t.Fatal("no crash clone lost a range copied without a Sync")
	}
}

func TestCopyRangeFaultFile(t *testing.T) {
	data := randomBytes(3, 1<<20)
	dst := &FaultFile{File: NewMemFile(nil), FailAt: 0}
	if _, err := CopyRange(dst, 0, NewMemFile(data), 0, 1<<20); !errors.Is(err, ErrInjected) {
		t.Fatalf("CopyRange through a failing FaultFile: %v, want ErrInjected", err)
	}
	if n, _ := dst.File.Size(); n != 0 {
		t.Fatal("a failed copy wrote")
	}
	m, err := CopyRange(dst, 0, NewMemFile(data), 0, 1<<20)
	if err != nil || m.Cloned != 1<<20 {
		t.Fatalf("CopyRange after the fault: %+v, %v", m, err)
	}
	// A File that cannot clone is copied through memory.
	plain := struct{ File }{NewMemFile(nil)}
	if m, err := CopyRange(plain, 4096, NewMemFile(data), 0, 1<<20); err != nil || m.Copied != 1<<20 {
		t.Fatalf("CopyRange into a File without RangeCopier: %+v, %v", m, err)
	}
}
