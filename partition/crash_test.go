package partition

import (
	"bytes"
	"encoding/binary"
	"errors"
	"fmt"
	"hash/crc32"
	"io"
	"strings"
	"testing"

	"github.com/vhdkit/vhdkit/storage"
	"github.com/vhdkit/vhdkit/storage/faulttest"
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

// imagePath is where the sweeps' image of format lies (in a MemFS).
func imagePath(format string) string { return "/sweep/d." + format }

func createImage(format string, f storage.File, size int64) (resizable, error) {
	if format == "vhdx" {
		return vhdx.CreateFile(f, imagePath(format), vhdx.CreateOptions{Size: uint64(size), BlockSize: 1 << 20})
	}
	return vhd.CreateFile(f, imagePath(format), vhd.CreateOptions{Size: uint64(size), BlockSize: 1 << 20})
}

// openImage opens the image of format in fsys.
func openImage(format string, fsys storage.FS, readOnly bool) (resizable, error) {
	if format == "vhdx" {
		return vhdx.Open(imagePath(format), vhdx.OpenOptions{FS: fsys, ReadOnly: readOnly})
	}
	return vhd.Open(imagePath(format), vhd.OpenOptions{FS: fsys, ReadOnly: readOnly})
}

// shrinkToMinimum is resize --to-minimum: read, move the table's end,
// resize, close (also when a step failed, as the verb does).
func shrinkToMinimum(im resizable) error {
	err := func() error {
		t, err := Read(im, im.Size(), 512)
		if err != nil {
			return err
		}
		size := t.MinimumSize(1 << 20)
		if err := t.SetDiskSize(im, size); err != nil {
			return err
		}
		return im.Resize(size)
	}()
	return errors.Join(err, im.Close())
}

// TestCrashToMinimum sweeps a shrink to the minimum of a GPT disk (a
// dynamic VHDX and VHD of 16 MiB, partitions to 3 MiB: 4 MiB) through
// every crash, I/O error and full-disk point of its file
// (storage/faulttest), with the backup GPT at the disk's end and, as on a
// disk grown before without moving it, right after the partitions (the
// shrink then also clears it). After each point: the file passes the
// format's strict check; the disk has its old or its new size, its GPT
// reads with both headers valid and in agreement, and the partitions hold
// what they held; and running the shrink again (after a writable open,
// which replays a VHDX log) completes with the disk at the minimum, in
// the same shape.
func TestCrashToMinimum(t *testing.T) {
	const size, minimum = 16 << 20, 4 << 20
	for _, c := range []struct {
		name  string
		table []byte // the disk the table was made for, written at 0 (with its last 33 sectors at the end when as large)
	}{
		{"backup-at-end", gptDiskSized(size)},
		{"grown-before", gptDiskSized(3<<20 + 34*512)},
	} {
		for _, format := range []string{"vhdx", "vhd"} {
			t.Run(c.name+"/"+format, func(t *testing.T) { shrinkSweep(t, format, c.table, size, minimum) })
		}
	}
}

// shrinkSweep is TestCrashToMinimum for one table in one format.
func shrinkSweep(t *testing.T, format string, img []byte, size, minimum int64) {
	path := imagePath(format)
	mem := storage.NewMemFile(nil)
	im, err := createImage(format, mem, size)
	if err != nil {
		t.Fatal(err)
	}
	ranges := [][2]int64{{0, int64(len(img))}}
	if int64(len(img)) == size {
		ranges = [][2]int64{{0, 3 << 20}, {size - 33*512, size}}
	}
	for _, r := range ranges {
		if _, err := im.WriteAt(img[r[0]:r[1]], r[0]); err != nil {
			t.Fatal(err)
		}
	}
	if err := im.Close(); err != nil {
		t.Fatal(err)
	}
	// Without faults the shrink clears a backup left inside the disk.
	// (A crash after the primary names the new backup and before that
	// clearing leaves the old one, inert: no tool looks there, and a
	// re-run no longer knows where it was.)
	fsys := storage.NewMemFS(map[string][]byte{path: mem.Bytes()})
	if int64(len(img)) < minimum && oldBackupCleared(format, fsys, int64(len(img)), minimum) == nil {
		t.Fatal("no backup GPT header inside the disk before the shrink")
	}
	if im, err := openImage(format, fsys, false); err != nil {
		t.Fatal(err)
	} else if err := shrinkToMinimum(im); err != nil {
		t.Fatal(err)
	}
	if err := oldBackupCleared(format, fsys, int64(len(img)), minimum); err != nil {
		t.Fatal(err)
	}
	shrunk := 0
	faulttest.Run(t, faulttest.Sweep{
		Files: map[string][]byte{path: mem.Bytes()},
		Seed:  11,
		Start: func(fsys *storage.MemFS) (func() error, error) {
			im, err := openImage(format, fsys, false)
			if err != nil {
				return nil, err
			}
			return func() error { return shrinkToMinimum(im) }, nil
		},
		Check: func(fsys *storage.MemFS, p faulttest.Point) error {
			// On a disk that died the shrink cannot succeed. After one
			// failed operation it may (a VHDX read of the region table
			// falls back to the second copy); the checks judge.
			if p.Mode == faulttest.Crash && p.PowerCut == 0 && p.Err == nil {
				return errors.New("the shrink succeeded on a disk that died")
			}
			got, err := checkAfterCrash(format, fsys, img, size, minimum)
			if err != nil {
				return fmt.Errorf("as found: %w", err)
			}
			if got == minimum {
				shrunk++
			}
			im, err := openImage(format, fsys, false)
			if err != nil {
				return fmt.Errorf("writable open: %w", err)
			}
			if err := shrinkToMinimum(im); err != nil {
				return fmt.Errorf("re-running the shrink: %w", err)
			}
			if got, err := checkAfterCrash(format, fsys, img, size, minimum); err != nil || got != minimum {
				return fmt.Errorf("after re-running the shrink: size %d, %v", got, err)
			}
			return nil
		},
	})
	if shrunk == 0 {
		t.Fatal("no point left the disk shrunk: the sweep did not cover the shrink")
	}
	t.Logf("%d states shrunk", shrunk)
}

// oldBackupCleared checks, when the table was made for a disk of
// tableSize bytes, smaller than the shrunk one, that the backup header it
// had at its end is gone: no tool may find two.
func oldBackupCleared(format string, fsys *storage.MemFS, tableSize, minimum int64) error {
	if tableSize >= minimum {
		return nil
	}
	im, err := openImage(format, fsys, true)
	if err != nil {
		return err
	}
	defer im.Close()
	b := make([]byte, 512)
	if _, err := im.ReadAt(b, tableSize-512); err != nil {
		return err
	}
	if string(b[:8]) == gptSignature {
		return fmt.Errorf("the old backup GPT header at LBA %d is still there", tableSize/512-1)
	}
	return nil
}

// checkAfterCrash checks the image in fsys and returns its size: it
// passes the format's strict check and has the old or the new size, a
// GPT whose primary and backup headers are valid and agree, a protective
// MBR, and the partitions' bytes.
func checkAfterCrash(format string, fsys *storage.MemFS, img []byte, size, minimum int64) (int64, error) {
	b, ok := fsys.Bytes(imagePath(format))
	if !ok {
		return 0, errors.New("the image is gone")
	}
	if err := strictCheck(format, storage.NewMemFile(b)); err != nil {
		return 0, err
	}
	im, err := openImage(format, fsys, true)
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
	b = make([]byte, 512)
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
		ps, err := vhd.CheckFile(f, imagePath(format))
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
