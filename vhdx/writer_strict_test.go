package vhdx

import (
	"bytes"
	"encoding/binary"
	"fmt"
	"math/rand/v2"
	"os"
	"path/filepath"
	"sync"
	"testing"

	"github.com/vhdkit/vhdkit/internal/testenv"
	"github.com/vhdkit/vhdkit/storage"
	"github.com/vhdkit/vhdkit/storage/faulttest"
)

// Tests that what the writer leaves in the file, in every state, is what
// the strictest reader (OpenVMM's vhdx crate, following MS-VHDX's MUSTs)
// accepts. writerProblems is an oracle written apart from the package's
// reader and check, from the spec: it reads the raw bytes.

// writerProblems lists, for the raw image b, the breaches of the rules the
// writer must keep: FileOffsetMB zero in NOT_PRESENT, ZERO, UNMAPPED and
// UNDEFINED payload entries and NOT_PRESENT bitmap entries; a header
// LogGuid only when a valid entry with it exists; no log entry longer than
// the log minus one sector.
func writerProblems(b []byte) []string {
	var probs []string
	// The current header: the valid one with the higher sequence number.
	var cur header
	found := false
	for _, off := range []int64{header1Offset, header2Offset} {
		h, err := parseHeader(b[off:], "header", off)
		if err == nil && (!found || h.Seq > cur.Seq) {
			cur, found = h, true
		}
	}
	if !found {
		return []string{"no valid header"}
	}
	logOff, logLen := int64(cur.LogOffset), int64(cur.LogLength)
	withGUID := 0
	for pos := int64(0); pos+logSectorSize <= logLen; pos += logSectorSize {
		e := b[logOff+pos:]
		if binary.LittleEndian.Uint32(e) != sigLogEntry {
			continue
		}
		length := int64(binary.LittleEndian.Uint32(e[8:]))
		if length < logSectorSize || length%logSectorSize != 0 || pos+length > logLen {
			continue
		}
		if checksum(e[:length], 4) != binary.LittleEndian.Uint32(e[4:]) {
			continue
		}
		if length > logLen-logSectorSize {
			probs = append(probs, fmt.Sprintf("log entry at %#x is %d bytes, the whole %d-byte log", pos, length, logLen))
		}
		if GUID(e[32:48]) == cur.LogGUID {
			withGUID++
		}
	}
	if !cur.LogGUID.IsZero() && withGUID == 0 {
		probs = append(probs, fmt.Sprintf("header names LogGuid {%s} and no log entry has it", cur.LogGUID))
	}
	// The BAT, laid out by the metadata.
	rt, err := parseRegionTable(b[region1Offset:], "region table", region1Offset)
	if err != nil {
		return append(probs, err.Error())
	}
	regs, err := validateRegions(rt, "region table", region1Offset, int64(len(b)))
	if err != nil {
		return append(probs, err.Error())
	}
	metaOff := int64(regs.Metadata.Offset)
	entries, err := parseMetaTable(b[metaOff:], metaOff, regs.Metadata.Length)
	if err != nil {
		return append(probs, err.Error())
	}
	p, err := parseParams(entries, func(e metaEntry) ([]byte, error) {
		return b[metaOff+int64(e.Offset):][:e.Length], nil
	}, metaOff)
	if err != nil {
		return append(probs, err.Error())
	}
	g := newGeometry(p.BlockSize, p.LogicalSectorSize, p.VirtualSize, p.HasParent)
	batOff := int64(regs.BAT.Offset)
	for i := int64(0); i < g.totalEntries; i++ {
		e := binary.LittleEndian.Uint64(b[batOff+8*i:])
		st, off := batState(e), batOffset(e)
		bitmap := (i+1)%(g.chunkRatio+1) == 0
		if off != 0 && (bitmap && st == bitmapNotPresent || !bitmap && st != payloadFullyPresent && st != payloadPartiallyPresent) {
			probs = append(probs, fmt.Sprintf("BAT entry %d: state %d with FileOffsetMB %d", i, st, off/mib))
		}
	}
	return probs
}

// logWatch records the length of every log entry written through it.
type logWatch struct {
	storage.File
	logOff, logLen int64
	mu             sync.Mutex
	lengths        []int64
}

func (w *logWatch) WriteAt(p []byte, off int64) (int, error) {
	if off >= w.logOff && off < w.logOff+w.logLen && len(p) >= 64 && binary.LittleEndian.Uint32(p) == sigLogEntry {
		w.mu.Lock()
		w.lengths = append(w.lengths, int64(binary.LittleEndian.Uint32(p[8:])))
		w.mu.Unlock()
	}
	return w.File.WriteAt(p, off)
}

// TestZeroedBlockHasNoOffset: a block made ZERO (WriteZeroes) or UNMAPPED
// (Trim) keeps no file offset; the space it held serves the next block
// allocated, and a later write into the ZERO block allocates afresh, so
// neither block's data is lost.
func TestZeroedBlockHasNoOffset(t *testing.T) {
	for _, kind := range []string{"zero", "trim"} {
		t.Run(kind, func(t *testing.T) {
			mf := storage.NewMemFile(nil)
			path := filepath.Join(t.TempDir(), "z.vhdx")
			im, err := CreateFile(keepOpen{mf}, path, CreateOptions{Size: 8 << 20, BlockSize: 1 << 20})
			if err != nil {
				t.Fatal(err)
			}
			model := make([]byte, 8<<20)
			write := func(off int64, n int, v byte) {
				t.Helper()
				b := bytes.Repeat([]byte{v}, n)
				if _, err := im.WriteAt(b, off); err != nil {
					t.Fatal(err)
				}
				copy(model[off:], b)
			}
			write(0, 1<<20, 1)
			write(1<<20, 1<<20, 2)
			if err := im.Flush(); err != nil {
				t.Fatal(err)
			}
			if kind == "zero" {
				err = im.WriteZeroes(0, 1<<20, true)
			} else {
				err = im.Trim(0, 1<<20)
			}
			if err != nil {
				t.Fatal(err)
			}
			clear(model[:1<<20])
			if err := im.Flush(); err != nil {
				t.Fatal(err)
			}
			if probs := writerProblems(mf.Bytes()); len(probs) > 0 {
				t.Fatalf("after %s of a whole block: %v", kind, probs)
			}
			end := im.fileEnd
			// A new block takes the freed space, not the end of the file.
			write(5<<20, 4096, 3)
			if got := batOffset(im.bat[im.geo.payloadIndex(5)]); got >= end {
				t.Fatalf("new block at %#x, past the file's end %#x: the freed block was not reused", got, end)
			}
			// Writing into the zeroed block allocates new space.
			write(100, 10, 4)
			if a, b := batOffset(im.bat[0]), batOffset(im.bat[im.geo.payloadIndex(5)]); a == b {
				t.Fatalf("blocks 0 and 5 share file offset %#x", a)
			}
			if err := im.Close(); err != nil {
				t.Fatal(err)
			}
			if probs := writerProblems(mf.Bytes()); len(probs) > 0 {
				t.Fatal(probs)
			}
			ro, err := OpenFile(keepOpen{mf}, path, OpenOptions{ReadOnly: true})
			if err != nil {
				t.Fatal(err)
			}
			defer ro.Close()
			if got := readAll(t, ro); !bytes.Equal(got, model) {
				t.Fatalf("content differs at %d", firstDiff(got, model))
			}
		})
	}
}

// TestLogEntryLeavesRoom: no log entry is as long as the log, however many
// pages one flush changes: the first write to a fresh differencing child
// (a whole sector bitmap block), and a flush touching 400 BAT pages.
func TestLogEntryLeavesRoom(t *testing.T) {
	check := func(t *testing.T, w *logWatch) {
		t.Helper()
		if len(w.lengths) == 0 {
			t.Fatal("no log entry written")
		}
		for _, n := range w.lengths {
			if n > w.logLen-logSectorSize {
				t.Fatalf("a log entry of %d bytes in a %d-byte log (entries %v)", n, w.logLen, w.lengths)
			}
		}
	}
	t.Run("differencing", func(t *testing.T) {
		dir := t.TempDir()
		parent := filepath.Join(dir, "p.vhdx")
		p, err := Create(parent, CreateOptions{Size: 64 << 20})
		if err != nil {
			t.Fatal(err)
		}
		p.Close()
		w := &logWatch{File: storage.NewMemFile(nil), logOff: newLogOffset, logLen: defaultLogSize}
		im, err := CreateFile(w, filepath.Join(dir, "c.avhdx"), CreateOptions{Parent: parent})
		if err != nil {
			t.Fatal(err)
		}
		if _, err := im.WriteAt([]byte("x"), 12345); err != nil {
			t.Fatal(err)
		}
		if err := im.Flush(); err != nil {
			t.Fatal(err)
		}
		check(t, w)
		if probs := writerProblems(w.File.(*storage.MemFile).Bytes()); len(probs) > 0 {
			t.Fatal(probs)
		}
		im.Close()
	})
	t.Run("many-pages", func(t *testing.T) {
		w := &logWatch{File: storage.NewMemFile(nil), logOff: newLogOffset, logLen: defaultLogSize}
		const pages = 400
		im, err := CreateFile(w, filepath.Join(t.TempDir(), "d.vhdx"), CreateOptions{Size: pages * 512 << 20, BlockSize: 1 << 20})
		if err != nil {
			t.Fatal(err)
		}
		model := map[int64]byte{}
		for i := int64(0); i < pages; i++ {
			off := i * 512 << 20 // the first block of each BAT page
			if _, err := im.WriteAt([]byte{byte(i) | 1}, off); err != nil {
				t.Fatal(err)
			}
			model[off] = byte(i) | 1
		}
		if err := im.Flush(); err != nil {
			t.Fatal(err)
		}
		check(t, w)
		mf := w.File.(*storage.MemFile)
		if probs := writerProblems(mf.Bytes()); len(probs) > 0 {
			t.Fatal(probs)
		}
		// A crash now: the log replays to every write.
		ro, err := OpenFile(mf.CrashClone(rand.New(rand.NewPCG(1, 2))), "d.vhdx", OpenOptions{ReadOnly: true})
		if err != nil {
			t.Fatal(err)
		}
		for off, v := range model {
			b := make([]byte, 1)
			if _, err := ro.ReadAt(b, off); err != nil || b[0] != v {
				t.Fatalf("after a crash, byte at %d is %d (%v), want %d", off, b[0], err, v)
			}
		}
		ro.Close()
		im.Close()
	})
}

// TestLogGUIDOnlyWithEntry: the header names a LogGuid only once an entry
// carries it: not after a first write that a crash interrupts before any
// flush, nor when flushes only overwrote data in place.
func TestLogGUIDOnlyWithEntry(t *testing.T) {
	path := filepath.Join(t.TempDir(), "g.vhdx")
	t.Run("crash-before-flush", func(t *testing.T) {
		mf := storage.NewMemFile(nil)
		im, err := CreateFile(keepOpen{mf}, path, CreateOptions{Size: 8 << 20, BlockSize: 1 << 20})
		if err != nil {
			t.Fatal(err)
		}
		if _, err := im.WriteAt([]byte("data"), 3<<20); err != nil {
			t.Fatal(err)
		}
		for i := range 5 {
			if probs := writerProblems(mf.CrashClone(rand.New(rand.NewPCG(uint64(i), 3))).Bytes()); len(probs) > 0 {
				t.Fatal(probs)
			}
		}
		im.Close()
	})
	t.Run("in-place", func(t *testing.T) {
		mf := storage.NewMemFile(nil)
		im, err := CreateFile(keepOpen{mf}, path, CreateOptions{Size: 8 << 20, BlockSize: 1 << 20, Type: Fixed})
		if err != nil {
			t.Fatal(err)
		}
		for i := range 3 {
			if _, err := im.WriteAt([]byte("in place"), int64(i)<<20); err != nil {
				t.Fatal(err)
			}
			if err := im.Flush(); err != nil {
				t.Fatal(err)
			}
			if probs := writerProblems(mf.Bytes()); len(probs) > 0 {
				t.Fatal(probs)
			}
		}
		im.Close()
	})
}

// TestQemuReplaysOurLog: at every crash point of a workload of several
// flushes (entries in both halves of the log, the same LogGuid on an older
// entry in the other half), qemu-img check -r all and our replay make the
// same image of a power cut's state, and the replayed file reads each
// sector as flushed or newer. Crash mode only, one power cut per point
// and not the state as left: two qemu-img runs per state, and the states
// the other modes leave hold the same kinds of log.
func TestQemuReplaysOurLog(t *testing.T) {
	testenv.Tool(t, "qemu-img")
	dir := t.TempDir()
	path := filepath.Join(dir, "q.vhdx")
	const size = 8 << 20
	steps := crashWorkload(11, size)
	files := memFiles(t, nil, func(fsys *storage.MemFS) error {
		return createClosed(fsys, path, CreateOptions{Size: size, BlockSize: 1 << 20})
	})
	replays := 0
	var x *expectation
	faulttest.Run(t, faulttest.Sweep{
		Files:     files,
		Modes:     []faulttest.Mode{faulttest.Crash},
		PowerCuts: 1,
		Seed:      9,
		Start: func(fsys *storage.MemFS) (func() error, error) {
			im, err := Open(path, OpenOptions{FS: fsys})
			if err != nil {
				return nil, err
			}
			x = newExpectation(newModel(size, nil))
			return func() error { return runWorkload(im, steps, x, false) }, nil
		},
		Check: func(fsys *storage.MemFS, p faulttest.Point) error {
			if p.PowerCut == 0 {
				return nil
			}
			b, _ := fsys.Bytes(path)
			var h header
			for _, off := range []int64{header1Offset, header2Offset} {
				if c, err := parseHeader(b[off:], "header", off); err == nil && c.Seq >= h.Seq {
					h = c
				}
			}
			if h.LogGUID.IsZero() {
				return nil
			}
			replays++
			theirs, ours := filepath.Join(dir, "theirs.vhdx"), filepath.Join(dir, "ours.vhdx")
			if err := os.WriteFile(theirs, b, 0o600); err != nil {
				return err
			}
			if err := os.WriteFile(ours, b, 0o600); err != nil {
				return err
			}
			run(t, "qemu-img", "check", "-r", "all", "-f", "vhdx", theirs)
			if probs, err := Check(ours, true); err != nil || len(probs) > 0 {
				return fmt.Errorf("check --repair: %v %v", probs, err)
			}
			run(t, "qemu-img", "compare", "-f", "vhdx", "-F", "vhdx", theirs, ours)
			ro, err := Open(theirs, OpenOptions{ReadOnly: true})
			if err != nil {
				return err
			}
			defer ro.Close()
			if err := x.check(ro); err != nil {
				return fmt.Errorf("replayed by qemu-img: %w", err)
			}
			return nil
		},
	})
	t.Logf("%d crash points left a log to replay", replays)
	if replays == 0 {
		t.Fatal("no crash point left a log to replay")
	}
}
