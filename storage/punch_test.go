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

func TestPunchOSFile(t *testing.T) {
	path := filepath.Join(t.TempDir(), "f")
	f, err := OpenFile(path, os.O_RDWR|os.O_CREATE|os.O_EXCL, 0o600)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	const size = 8 << 20
	data := bytes.Repeat([]byte{0x5A}, size)
	if _, err := f.WriteAt(data, 0); err != nil {
		t.Fatal(err)
	}
	if err := f.Sync(); err != nil {
		t.Fatal(err)
	}
	before, _ := testenv.Allocated(t, path)
	err = Punch(f, 2<<20, 4<<20)
	if errors.Is(err, ErrPunchUnsupported) {
		t.Skipf("%s: %v", filepath.Dir(path), err)
	}
	if err != nil {
		t.Fatal(err)
	}
	if n, _ := f.Size(); n != size {
		t.Fatalf("size after Punch %d, want %d", n, size)
	}
	if after, _ := testenv.Allocated(t, path); after > before-4<<20 {
		t.Fatalf("%d bytes allocated after punching 4 MiB out of %d", after, before)
	}
	got := make([]byte, size)
	if _, err := f.ReadAt(got, 0); err != nil {
		t.Fatal(err)
	}
	clear(data[2<<20 : 6<<20])
	if !bytes.Equal(got, data) {
		t.Fatal("Punch changed bytes outside its range or left some inside")
	}
	// Past the end: the size stays.
	if err := Punch(f, size-4096, 1<<20); err != nil {
		t.Fatal(err)
	}
	if n, _ := f.Size(); n != size {
		t.Fatalf("punching past the end changed the size to %d", n)
	}
	if err := Punch(f, -1, 10); err == nil {
		t.Fatal("negative offset accepted")
	}
}

// A MemFile or FaultFile has no blocks to give back: Punch writes zeros,
// which a crash may keep or lose like any unsynced write, and a FaultFile
// counts (and can fail) them.
func TestPunchOtherFiles(t *testing.T) {
	data := bytes.Repeat([]byte{7}, 3<<20)
	m := NewMemFile(data)
	ff := &FaultFile{File: m, FailAt: -1}
	if err := Punch(ff, 1<<20, 4<<20); err != nil {
		t.Fatal(err)
	}
	if ff.Ops() == 0 {
		t.Fatal("Punch on a FaultFile counted no operation")
	}
	if n, _ := m.Size(); n != 3<<20 {
		t.Fatalf("size %d, want %d", n, 3<<20)
	}
	want := bytes.Clone(data)
	clear(want[1<<20:])
	if !bytes.Equal(m.Bytes(), want) {
		t.Fatal("Punch on a MemFile did not zero its range")
	}
	// Unsynced: a crash may bring the old bytes back.
	back := false
	for i := range 20 {
		c := m.CrashClone(rand.New(rand.NewPCG(uint64(i), 1)))
		if !bytes.Equal(c.Bytes(), want) {
			back = true
		}
	}
	if !back {
		t.Fatal("an unsynced punch survived every crash")
	}
	ff = &FaultFile{File: m, FailAt: 0}
	if err := Punch(ff, 0, 4096); !errors.Is(err, ErrInjected) {
		t.Fatalf("Punch through a failing FaultFile: %v", err)
	}
}
