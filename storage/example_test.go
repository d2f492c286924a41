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

// What a power cut can leave of a file: CrashClone keeps what Sync made
// durable and, for each sector written since, the old or the new content;
// a size changed since the last Sync may be either too.
func ExampleMemFile_CrashClone() {
	f := storage.NewMemFile(nil)
	sector := func(s string) []byte { return append([]byte(s), make([]byte, storage.SectorSize-len(s))...) }
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

	// describe says what a crashed copy holds.
	describe := func(c *storage.MemFile) string {
		b := c.Bytes()
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
	// A fixed seed makes the crashes repeatable; enough of them show
	// every outcome.
	rng := rand.New(rand.NewPCG(1, 2))
	var outcomes []string
	for range 100 {
		if d := describe(f.CrashClone(rng)); !slices.Contains(outcomes, d) {
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
	fmt.Println("after Sync, it leaves:", describe(f.CrashClone(rng)))
	// Output:
	// before Sync, a crash leaves one of:
	//   1024 bytes: "synced" "unsynced"
	//   1024 bytes: "synced" zeros
	//   512 bytes: "synced"
	// after Sync, it leaves: 1024 bytes: "synced" "unsynced"
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
