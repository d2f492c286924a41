package partition

import (
	"bytes"
	"encoding/binary"
	"errors"
	"fmt"
	"hash/crc32"
	"io"
	"math/rand/v2"
	"strings"
	"testing"

	"github.com/vhdkit/vhdkit/storage"
	"github.com/vhdkit/vhdkit/vhd"
	"github.com/vhdkit/vhdkit/vhdx"
)

// resizable is what both formats' images offer.
type resizable interface {
	io.ReaderAt
	io.WriterAt
	Flush() error
	Close() error
	Size() int64
	Resize(int64) error
}

func createImage(format string, f storage.File, size int64) (resizable, error) {
	if format == "vhdx" {
		return vhdx.CreateFile(f, "d.vhdx", vhdx.CreateOptions{Size: uint64(size), BlockSize: 1 << 20})
	}
	return vhd.CreateFile(f, "d.vhd", vhd.CreateOptions{Size: uint64(size), BlockSize: 1 << 20})
}

func openImage(format string, f storage.File) (resizable, error) {
	if format == "vhdx" {
		return vhdx.OpenFile(f, "d.vhdx", vhdx.OpenOptions{ReadOnly: true})
	}
	return vhd.OpenFile(f, "d.vhd", vhd.OpenOptions{ReadOnly: true})
}

// shrinkToMinimum is resize --to-minimum: read, move the table's end,
// resize, close.
func shrinkToMinimum(im resizable) error {
	t, err := Read(im, im.Size(), 512)
	if err != nil {
		return err
	}
	size := t.MinimumSize(1 << 20)
	if err := t.SetDiskSize(im, size); err != nil {
		return err
	}
	if err := im.Resize(size); err != nil {
		return err
	}
	return im.Close()
}

// TestCrashToMinimum stops a shrink to the minimum of a GPT disk (a
// dynamic VHDX and VHD of 16 MiB, partitions to 3 MiB: 4 MiB) at every
// operation of its file, and checks three crash clones of each point:
// the disk has its old or its new size, its GPT reads with both headers
// valid and in agreement, and the partitions hold what they held.
func TestCrashToMinimum(t *testing.T) {
	const size, minimum = 16 << 20, 4 << 20
	img := gptDiskSized(size)
	for _, format := range []string{"vhdx", "vhd"} {
		t.Run(format, func(t *testing.T) {
			points, shrunk := 0, 0
			for i := int64(0); ; i++ {
				base := storage.NewMemFile(nil)
				ff := &storage.FaultFile{File: base, FailAt: -1}
				im, err := createImage(format, ff, size)
				if err != nil {
					t.Fatal(err)
				}
				for _, r := range [][2]int{{0, 3 << 20}, {size - 33*512, size}} {
					if _, err := im.WriteAt(img[r[0]:r[1]], int64(r[0])); err != nil {
						t.Fatal(err)
					}
				}
				if err := im.Flush(); err != nil {
					t.Fatal(err)
				}
				ff.FailAt, ff.Dead = ff.Ops()+i, true
				err = shrinkToMinimum(im)
				if err != nil && !errors.Is(err, storage.ErrInjected) {
					t.Fatalf("point %d: %v", i, err)
				}
				if !ff.Injected() {
					if err != nil {
						t.Fatal(err)
					}
					break
				}
				points++
				for c := range 3 {
					clone := base.CrashClone(rand.New(rand.NewPCG(uint64(i), uint64(c))))
					got, err := checkAfterCrash(format, clone, img, size, minimum)
					if err != nil {
						t.Fatalf("point %d, clone %d: %v", i, c, err)
					}
					if got == minimum {
						shrunk++
					}
				}
			}
			if points < 10 || shrunk == 0 {
				t.Fatalf("%d crash points, %d clones shrunk: the sweep did not cover the shrink", points, shrunk)
			}
			t.Logf("%d crash points, %d of %d clones shrunk", points, shrunk, 3*points)
		})
	}
}

// checkAfterCrash opens a crash clone and returns its size after checking
// it: the old or the new size, a GPT whose primary and backup headers
// are valid and agree, a protective MBR, and the partitions' bytes.
func checkAfterCrash(format string, clone *storage.MemFile, img []byte, size, minimum int64) (int64, error) {
	// The file as the crash left it passes the format's strict check.
	if err := strictCheck(format, clone); err != nil {
		return 0, err
	}
	im, err := openImage(format, clone)
	if err != nil {
		return 0, fmt.Errorf("open: %w", err)
	}
	defer im.Close()
	got := im.Size()
	if got != size && got != minimum {
		return 0, fmt.Errorf("size %d, want %d or %d", got, size, minimum)
	}
	tab, err := Read(im, got, 512)
	if err != nil {
		return 0, err
	}
	if tab.End() != 3<<20 || len(tab.Partitions) != 2 {
		return 0, fmt.Errorf("partitions %+v", tab.Partitions)
	}
	part := make([]byte, 2<<20)
	if _, err := im.ReadAt(part, 1<<20); err != nil {
		return 0, err
	}
	if !bytes.Equal(part, img[1<<20:3<<20]) {
		return 0, errors.New("the partitions' bytes changed")
	}
	// The backup the primary names is a valid header for its place, with
	// the same entries.
	g := tab.gpt
	b := make([]byte, 512)
	if _, err := im.ReadAt(b, int64(g.alternate)*512); err != nil {
		return 0, err
	}
	le := binary.LittleEndian
	hs := le.Uint32(b[12:])
	switch {
	case string(b[:8]) != gptSignature || hs < gptHeaderMin || hs > 512:
		return 0, fmt.Errorf("no backup header at LBA %d", g.alternate)
	case le.Uint32(b[offHeaderCRC:]) != headerCRC(b[:hs]):
		return 0, errors.New("backup header CRC")
	case le.Uint64(b[offMyLBA:]) != g.alternate || le.Uint64(b[offAlternate:]) != 1 || le.Uint64(b[offLastUsable:]) != g.lastUsable:
		return 0, errors.New("backup header fields disagree with the primary")
	}
	entries := make([]byte, len(g.entries))
	if _, err := im.ReadAt(entries, int64(le.Uint64(b[offEntryLBA:]))*512); err != nil {
		return 0, err
	}
	if crc32.ChecksumIEEE(entries) != le.Uint32(b[88:]) || !bytes.Equal(entries, g.entries) {
		return 0, errors.New("backup entries differ")
	}
	if got == minimum && g.alternate != uint64(minimum/512-1) {
		return 0, fmt.Errorf("a shrunk disk's backup is at LBA %d", g.alternate)
	}
	return got, nil
}

// strictCheck runs the format's strict validator on f, refusing any
// finding but a warning (and, for VHDX, a log waiting to be replayed).
func strictCheck(format string, f storage.File) error {
	var bad []string
	switch format {
	case "vhdx":
		ps, err := vhdx.CheckStructure(f)
		if err != nil {
			return fmt.Errorf("strict check: %w", err)
		}
		for _, p := range ps {
			if p.Violation() {
				bad = append(bad, p.String())
			}
		}
	case "vhd":
		ps, err := vhd.CheckFile(f, "crash.vhd")
		if err != nil {
			return fmt.Errorf("strict check: %w", err)
		}
		for _, p := range ps {
			if !p.Warning {
				bad = append(bad, p.What)
			}
		}
	}
	if len(bad) > 0 {
		return fmt.Errorf("strict check: %s", strings.Join(bad, "; "))
	}
	return nil
}
