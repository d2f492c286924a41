package storage_test

import (
	"bytes"
	"errors"
	"fmt"
	"log"
	"math/rand/v2"
	"os"
	"path/filepath"
	"slices"

	"github.com/vhdkit/vhdkit/storage"
)

// sector returns s padded with zeros to a sector.
func sector(s string) []byte {
	return append([]byte(s), make([]byte, storage.SectorSize-len(s))...)
}

// describe says what a file holds, sector by sector.
func describe(b []byte) string {
	s := fmt.Sprintf("%d bytes:", len(b))
	for off := 0; off < len(b); off += storage.SectorSize {
		if text := bytes.TrimRight(b[off:off+storage.SectorSize], "\x00"); len(text) > 0 {
			s += fmt.Sprintf(" %q", text)
		} else {
			s += " zeros"
		}
	}
	return s
}

// What a power cut can leave of a file: CrashClone keeps what Sync made
// durable and, for each sector written since, the old or the new content;
// a size changed since the last Sync may be either too.
func ExampleMemFile_CrashClone() {
	f := storage.NewMemFile(nil)
	if _, err := f.WriteAt(sector("synced"), 0); err != nil {
		log.Fatal(err)
	}
	if err := f.Sync(); err != nil {
		log.Fatal(err)
	}
	// Not synced: it grows the file by a sector.
	if _, err := f.WriteAt(sector("unsynced"), storage.SectorSize); err != nil {
		log.Fatal(err)
	}

	// A fixed seed makes the crashes repeatable; enough of them show
	// every outcome.
	rng := rand.New(rand.NewPCG(1, 2))
	var outcomes []string
	for range 100 {
		if d := describe(f.CrashClone(rng).Bytes()); !slices.Contains(outcomes, d) {
			outcomes = append(outcomes, d)
		}
	}
	slices.Sort(outcomes)
	fmt.Println("before Sync, a crash leaves one of:")
	for _, d := range outcomes {
		fmt.Println("  " + d)
	}

	if err := f.Sync(); err != nil {
		log.Fatal(err)
	}
	fmt.Println("after Sync, it leaves:", describe(f.CrashClone(rng).Bytes()))
	// Output:
	// before Sync, a crash leaves one of:
	//   1024 bytes: "synced" "unsynced"
	//   1024 bytes: "synced" zeros
	//   512 bytes: "synced"
	// after Sync, it leaves: 1024 bytes: "synced" "unsynced"
}

// Every failure point of an update, one run each, and after each the
// power cuts that can follow it: what a format's fault test does, with
// the format's reopen and checks in place of isCommitted.
func ExampleFaultFile() {
	// update writes a record, makes it durable, then marks it committed:
	// whichever operation fails, a reader finds no commit or a whole
	// record.
	update := func(f storage.File) error {
		if _, err := f.WriteAt(sector("record"), storage.SectorSize); err != nil {
			return err
		}
		if err := f.Sync(); err != nil {
			return err
		}
		if _, err := f.WriteAt(sector("committed"), 0); err != nil {
			return err
		}
		return f.Sync()
	}
	// consistent is the invariant a reader relies on.
	consistent := func(b []byte) bool {
		committed := bytes.Equal(b[:storage.SectorSize], sector("committed"))
		return !committed || bytes.Equal(b[storage.SectorSize:], sector("record"))
	}
	rng := rand.New(rand.NewPCG(1, 2))
	for i := int64(0); ; i++ {
		mem := storage.NewMemFile(make([]byte, 2*storage.SectorSize))
		ff := &storage.FaultFile{File: mem, FailAt: i, Dead: true}
		err := update(ff)
		crashesConsistent := true
		for range 20 {
			crashesConsistent = crashesConsistent && consistent(mem.CrashClone(rng).Bytes())
		}
		if !ff.Injected() {
			fmt.Printf("no failure at %d: %d operations, error %v, crashes consistent: %v\n", i, ff.Ops(), err, crashesConsistent)
			break
		}
		fmt.Printf("%v: file %s, crashes consistent: %v\n", err, describe(mem.Bytes()), crashesConsistent)
	}
	// Output:
	// write op 0: storage: injected fault: file 1024 bytes: zeros zeros, crashes consistent: true
	// sync op 1: storage: injected fault: file 1024 bytes: zeros "record", crashes consistent: true
	// write op 2: storage: injected fault: file 1024 bytes: zeros "record", crashes consistent: true
	// sync op 3: storage: injected fault: file 1024 bytes: "committed" "record", crashes consistent: true
	// no failure at 4: 4 operations, error <nil>, crashes consistent: true
}

// Image files are locked the way QEMU locks its images: one writer,
// which keeps other processes out, even readers (qemu-img and qemu-nbd
// included). Inside one process only a second writer is refused: the
// process coordinates its own readers with its writer.
func ExampleOpenFile() {
	dir, err := os.MkdirTemp("", "storage-example-")
	if err != nil {
		log.Fatal(err)
	}
	defer os.RemoveAll(dir)
	path := filepath.Join(dir, "disk.img")

	w, err := storage.OpenFile(path, os.O_RDWR|os.O_CREATE, 0o600)
	if err != nil {
		log.Fatal(err)
	}
	defer w.Close()

	_, err = storage.OpenFile(path, os.O_RDWR, 0)
	fmt.Println("second writer refused, ErrInUse:", errors.Is(err, storage.ErrInUse))
	var lockErr *storage.LockError
	if errors.As(err, &lockErr) {
		fmt.Println("refused open was for writing:", lockErr.Write)
		for _, h := range lockErr.Holders {
			fmt.Println("held by this process:", h.PID == os.Getpid(), "writing:", h.Writing)
		}
	}

	r, err := storage.OpenFile(path, os.O_RDONLY, 0)
	fmt.Println("reader in the same process:", err)
	if err == nil {
		r.Close()
	}
	// Output:
	// second writer refused, ErrInUse: true
	// refused open was for writing: true
	// held by this process: true writing: true
	// reader in the same process: <nil>
}
