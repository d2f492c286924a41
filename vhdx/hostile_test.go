package vhdx

import (
	"bytes"
	"encoding/binary"
	"errors"
	"fmt"
	"hash/crc32"
	"math/rand/v2"
	"os"
	"path/filepath"
	"runtime"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/vhdkit/vhdkit/storage"
)

// Regression tests for hostile images (issue 11): each crafts the file a
// campaign of malformed images found accepted or wedging, checksums
// recomputed, and checks it is refused, or handled, cheaply and clearly.

// ioCount wraps a file and counts what goes through it. Writes fail once
// more than limit bytes were written (0: no limit), so a runaway replay
// stops; the first writes are kept.
type ioCount struct {
	storage.File
	mu            sync.Mutex
	read, written int64
	limit         int64
	first         [][]byte // copies of the first writes
	firstOff      []int64
}

func (c *ioCount) ReadAt(p []byte, off int64) (int, error) {
	n, err := c.File.ReadAt(p, off)
	c.mu.Lock()
	c.read += int64(n)
	c.mu.Unlock()
	return n, err
}

func (c *ioCount) WriteAt(p []byte, off int64) (int, error) {
	c.mu.Lock()
	if c.limit > 0 && c.written+int64(len(p)) > c.limit {
		c.mu.Unlock()
		return 0, errors.New("ioCount: write limit reached")
	}
	c.written += int64(len(p))
	if len(c.first) < 4 {
		c.first = append(c.first, bytes.Clone(p[:min(len(p), headerSize)]))
		c.firstOff = append(c.firstOff, off)
	}
	c.mu.Unlock()
	return c.File.WriteAt(p, off)
}

// cleanImage returns an 8 MiB dynamic image (1 MiB blocks) whose block 1,
// at file offset 4 MiB, starts with "data"; the file is 5 MiB.
func cleanImage(t *testing.T) []byte {
	t.Helper()
	mf := storage.NewMemFile(nil)
	im, err := CreateFile(mf, filepath.Join(t.TempDir(), "x.vhdx"), CreateOptions{Size: 8 << 20, BlockSize: 1 << 20})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := im.WriteAt([]byte("data"), 1<<20); err != nil {
		t.Fatal(err)
	}
	if err := im.Close(); err != nil {
		t.Fatal(err)
	}
	b := mf.Bytes()
	if got := binary.LittleEndian.Uint64(b[newBATOffset+8:]); batOffset(got) != 4*mib || int64(len(b)) != 5*mib {
		t.Fatalf("layout changed: block 1 at %#x, file %d bytes", batOffset(got), len(b))
	}
	return b
}

// editHeaders edits both headers of b.
func editHeaders(t *testing.T, b []byte, edit func(*header)) {
	t.Helper()
	for _, off := range []int64{header1Offset, header2Offset} {
		h, err := parseHeader(b[off:], "header", off)
		if err != nil {
			t.Fatal(err)
		}
		edit(&h)
		copy(b[off:], h.marshal())
	}
}

// zeroRange is a zero descriptor's target.
type zeroRange struct{ off, length int64 }

// craftEntry builds a log entry: zero descriptors, then data descriptors
// for pages, checksummed.
func craftEntry(guid GUID, seq uint64, tail, flushed, last int64, zeros []zeroRange, pages []page) []byte {
	count := int64(len(zeros) + len(pages))
	descArea := alignUp(logEntryHeaderSize+count*logDescSize, logSectorSize)
	b := make([]byte, descArea+int64(len(pages))*logSectorSize)
	binary.LittleEndian.PutUint32(b[0:], sigLogEntry)
	binary.LittleEndian.PutUint32(b[8:], uint32(len(b)))
	binary.LittleEndian.PutUint32(b[12:], uint32(tail))
	binary.LittleEndian.PutUint64(b[16:], seq)
	binary.LittleEndian.PutUint32(b[24:], uint32(count))
	copy(b[32:48], guid[:])
	binary.LittleEndian.PutUint64(b[48:], uint64(flushed))
	binary.LittleEndian.PutUint64(b[56:], uint64(last))
	d := b[logEntryHeaderSize:]
	for _, z := range zeros {
		binary.LittleEndian.PutUint32(d[0:], sigZeroDesc)
		binary.LittleEndian.PutUint64(d[8:], uint64(z.length))
		binary.LittleEndian.PutUint64(d[16:], uint64(z.off))
		binary.LittleEndian.PutUint64(d[24:], seq)
		d = d[logDescSize:]
	}
	for i, p := range pages {
		binary.LittleEndian.PutUint32(d[0:], sigDataDesc)
		copy(d[4:8], p.data[4092:])
		copy(d[8:16], p.data[0:8])
		binary.LittleEndian.PutUint64(d[16:], uint64(p.off))
		binary.LittleEndian.PutUint64(d[24:], seq)
		d = d[logDescSize:]
		s := b[descArea+int64(i)*logSectorSize:]
		binary.LittleEndian.PutUint32(s[0:], sigDataSect)
		binary.LittleEndian.PutUint32(s[4:], uint32(seq>>32))
		copy(s[8:4092], p.data[8:4092])
		binary.LittleEndian.PutUint32(s[4092:], uint32(seq))
	}
	binary.LittleEndian.PutUint32(b[4:], checksum(b, 4))
	return b
}

// withLogEntry returns b, grown to size, with entry as the log's only
// entry and the headers naming its LogGuid.
func withLogEntry(t *testing.T, b []byte, size int64, guid GUID, entry []byte) []byte {
	t.Helper()
	b = append(bytes.Clone(b), make([]byte, size-int64(len(b)))...)
	copy(b[newLogOffset:], entry)
	editHeaders(t, b, func(h *header) { h.LogGUID = guid })
	return b
}

// TestLogCandidatesRead: a log full of candidate entries, each claiming
// nearly the whole log with a wrong checksum, was read once per candidate
// (4 GiB for a 4 MiB log: quadratic); it is read once now.
func TestLogCandidatesRead(t *testing.T) {
	const logLen = 4 * mib
	b := cleanImage(t)
	logOff := int64(len(b))
	b = append(b, make([]byte, logLen)...)
	guid := newGUID()
	for pos := int64(0); pos < logLen; pos += logSectorSize {
		e := b[logOff+pos:]
		binary.LittleEndian.PutUint32(e[0:], sigLogEntry)
		binary.LittleEndian.PutUint32(e[4:], 0xdead) // wrong
		binary.LittleEndian.PutUint32(e[8:], logLen-logSectorSize)
		binary.LittleEndian.PutUint64(e[16:], uint64(pos))
		copy(e[32:48], guid[:])
	}
	editHeaders(t, b, func(h *header) { h.LogGUID, h.LogOffset, h.LogLength = guid, uint64(logOff), logLen })
	f := &ioCount{File: storage.NewMemFile(b)}
	im, err := OpenFile(f, "x.vhdx", OpenOptions{ReadOnly: true})
	if err != nil {
		t.Fatal(err)
	}
	defer im.Close()
	if f.read > 3*logLen+8*mib {
		t.Errorf("open read %d bytes of a %d-byte file with a %d-byte log", f.read, len(b), logLen)
	}
	got := make([]byte, 4)
	im.ReadAt(got, 1<<20)
	if string(got) != "data" {
		t.Errorf("read %q", got)
	}
}

// TestLogTargetBounded: an entry whose LastFileOffset is absurd (1 TiB
// for a 13 MiB image) with a zero descriptor up to it made a read-write
// open write zeros until the disk was full; it is refused before any
// write now.
func TestLogTargetBounded(t *testing.T) {
	b := cleanImage(t)
	size := int64(len(b))
	guid := newGUID()
	entry := craftEntry(guid, 1, 0, size, 1<<40, []zeroRange{{4 * mib, 1<<40 - 4*mib}}, nil)
	b = withLogEntry(t, b, size, guid, entry)
	for _, ro := range []bool{true, false} {
		f := &ioCount{File: storage.NewMemFile(b), limit: 64 * mib}
		im, err := OpenFile(f, "x.vhdx", OpenOptions{ReadOnly: ro})
		if err == nil {
			im.Close()
			t.Fatalf("read-only %v: opened", ro)
		}
		if !errors.Is(err, ErrFormat) || !strings.Contains(err.Error(), "last file offset") || f.written > 0 {
			t.Errorf("read-only %v: %v, %d bytes written", ro, err, f.written)
		}
	}
}

// TestLogZerosSparse: replaying a zero descriptor over a range that reads
// as zeros writes nothing there (a hole stays a hole); it still zeroes
// what holds data. The new FileWriteGuid reaches the file before
// playback (MS-VHDX 2.2.2), and the log is closed after it.
func TestLogZerosSparse(t *testing.T) {
	b := cleanImage(t)
	old, err := parseHeader(b[header1Offset:], "header 1", header1Offset)
	if err != nil {
		t.Fatal(err)
	}
	const size = 64 * mib
	guid := newGUID()
	page1 := page{off: 6 * mib, data: bytes.Repeat([]byte{0x5a}, pageSize)}
	entry := craftEntry(guid, 7, 0, size, size, []zeroRange{{4 * mib, size - 4*mib}}, []page{page1})
	b = withLogEntry(t, b, size, guid, entry)

	// Read-only: the overlay shows the replayed file.
	ro, err := OpenFile(storage.NewMemFile(b), "x.vhdx", OpenOptions{ReadOnly: true})
	if err != nil {
		t.Fatal(err)
	}
	got := make([]byte, 4)
	ro.ReadAt(got, 1<<20)
	ro.Close()
	if !bytes.Equal(got, make([]byte, 4)) {
		t.Errorf("read-only: block 1 reads %q, want zeros", got)
	}

	f := &ioCount{File: storage.NewMemFile(b), limit: 16 * mib}
	im, err := OpenFile(f, "x.vhdx", OpenOptions{})
	if err != nil {
		t.Fatal(err)
	}
	im.ReadAt(got, 1<<20)
	if err := im.Close(); err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(got, make([]byte, 4)) {
		t.Errorf("block 1 reads %q after replay, want zeros", got)
	}
	if f.written > 2*mib {
		t.Errorf("replay wrote %d bytes; the zeroed range held 4 bytes of data and one logged page", f.written)
	}
	if len(f.first) == 0 || (f.firstOff[0] != header1Offset && f.firstOff[0] != header2Offset) {
		t.Fatalf("first write at %v, want a header", f.firstOff)
	}
	h, err := parseHeader(f.first[0], "header", f.firstOff[0])
	if err != nil {
		t.Fatal(err)
	}
	if h.FileWriteGUID == old.FileWriteGUID || h.LogGUID != guid {
		t.Errorf("first header written: FileWriteGuid %s (was %s), LogGuid %s (want %s kept until replayed)", h.FileWriteGUID, old.FileWriteGUID, h.LogGUID, guid)
	}
}

// TestLogSegments: reducing writes to disjoint segments gives what
// applying them in order gives.
func TestLogSegments(t *testing.T) {
	rng := rand.New(rand.NewPCG(1, 2))
	for round := 0; round < 200; round++ {
		const span = 64
		want := make([]byte, span*logSectorSize)
		for i := range want {
			want[i] = 0xee // the file before replay
		}
		var writes []logWrite
		for n := rng.IntN(12); n >= 0; n-- {
			off := int64(rng.IntN(span)) * logSectorSize
			if rng.IntN(2) == 0 {
				length := int64(1+rng.IntN(span-int(off/logSectorSize))) * logSectorSize
				writes = append(writes, logWrite{off: off, length: length})
				clear(want[off : off+length])
			} else {
				data := bytes.Repeat([]byte{byte(1 + rng.IntN(250))}, logSectorSize)
				writes = append(writes, logWrite{off: off, length: logSectorSize, data: data})
				copy(want[off:], data)
			}
		}
		mf := storage.NewMemFile(bytes.Repeat([]byte{0xee}, len(want)))
		pl := &pendingLog{writes: writes}
		if err := pl.apply(mf); err != nil {
			t.Fatal(err)
		}
		if got := mf.Bytes(); !bytes.Equal(got, want) {
			t.Fatalf("round %d: apply differs at %d", round, firstDiff(got, want))
		}
		o := newOverlay(storage.NewMemFile(bytes.Repeat([]byte{0xee}, len(want))), pl)
		for i := 0; i < 20; i++ {
			off := rng.IntN(len(want))
			n := 1 + rng.IntN(len(want)-off)
			got := make([]byte, n)
			if _, err := o.ReadAt(got, int64(off)); err != nil {
				t.Fatal(err)
			}
			if !bytes.Equal(got, want[off:off+n]) {
				t.Fatalf("round %d: overlay [%d, +%d) differs", round, off, n)
			}
		}
	}
}

// TestCRCCombine: the CRC-32C of a message from the CRCs of its parts.
func TestCRCCombine(t *testing.T) {
	rng := rand.New(rand.NewPCG(3, 4))
	for i := 0; i < 100; i++ {
		a := make([]byte, rng.IntN(9000))
		b := make([]byte, rng.IntN(9000))
		for j := range a {
			a[j] = byte(rng.Uint32())
		}
		for j := range b {
			b[j] = byte(rng.Uint32())
		}
		want := crc(append(bytes.Clone(a), b...))
		if got := crcCombine(crc(a), crc(b), int64(len(b))); got != want {
			t.Fatalf("%d+%d bytes: %#x, want %#x", len(a), len(b), got, want)
		}
	}
}

func crc(b []byte) uint32 { return crc32.Checksum(b, castagnoli) }

// editLocator rewrites the parent locator of the image at path (made by
// Create, so its metadata region is at newMetaOffset): the new item goes
// to the end of the region.
func editLocator(t *testing.T, path string, edit func(*parentLocator)) {
	t.Helper()
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	m := b[newMetaOffset : newMetaOffset+mib]
	entries, err := parseMetaTable(m, newMetaOffset, mib)
	if err != nil {
		t.Fatal(err)
	}
	for i, e := range entries {
		if e.ID != itemParentLocator {
			continue
		}
		loc, err := parseParentLocator(m[e.Offset:e.Offset+e.Length], 0)
		if err != nil {
			t.Fatal(err)
		}
		edit(&loc)
		nb := loc.marshal()
		at := uint32(mib - 64*kib)
		copy(m[at:], nb)
		binary.LittleEndian.PutUint32(m[32+32*i+16:], at)
		binary.LittleEndian.PutUint32(m[32+32*i+20:], uint32(len(nb)))
		if err := os.WriteFile(path, b, 0o600); err != nil {
			t.Fatal(err)
		}
		return
	}
	t.Fatal("no parent locator")
}

func dropKey(l *parentLocator, key string) {
	var keep []locatorEntry
	for _, e := range l.Entries {
		if e.Key != key {
			keep = append(keep, e)
		}
	}
	l.Entries = keep
}

// TestParentLocatorOrder: the locator's paths are tried as MS-VHDX
// 2.6.2.6 orders them (relative_path, volume_path, absolute_win32_path),
// and a candidate that is not a VHDX, or not the child's parent (another
// DataWriteGuid), is passed over for the next.
func TestParentLocatorOrder(t *testing.T) {
	dir := t.TempDir()
	for _, d := range []string{"a", "b", "c", "w", "r"} {
		os.Mkdir(filepath.Join(dir, d), 0o755)
	}
	p := filepath.Join(dir, "c", "p.vhdx")
	mustCreate(t, p, CreateOptions{Size: 8 << 20})
	child := filepath.Join(dir, "c", "child.avhdx")
	mustCreate(t, child, CreateOptions{Parent: p})
	for _, to := range []string{"a/p.vhdx", "b/p.vhdx", "c/q.vhdx"} {
		copyFile(t, p, filepath.Join(dir, to))
	}
	os.Remove(p)
	mustCreate(t, filepath.Join(dir, "w", "p.vhdx"), CreateOptions{Size: 8 << 20}) // another disk
	os.WriteFile(filepath.Join(dir, "r", "p.vhdx"), make([]byte, 3<<20), 0o600)    // not a VHDX

	editLocator(t, child, func(l *parentLocator) {
		l.Set(keyRelativePath, `..\a\p.vhdx`)
		l.Set(keyVolumePath, `\\?\Volume{26A21BDA-A627-11D7-9931-806E6F6E6963}\x\q.vhdx`)
		l.Set(keyAbsolutePath, strings.ReplaceAll(filepath.Join(dir, "b", "p.vhdx"), "/", `\`))
	})
	parentOf := func() (string, error) {
		im, err := Open(child, OpenOptions{ReadOnly: true})
		if err != nil {
			return "", err
		}
		defer im.Close()
		return im.parentPath, nil
	}
	expect := func(what, want string) {
		t.Helper()
		got, err := parentOf()
		if err != nil || got != filepath.Join(dir, want) {
			t.Errorf("%s: parent %q, %v; want %s", what, got, err, want)
		}
	}
	expect("all three paths", "a/p.vhdx")
	editLocator(t, child, func(l *parentLocator) { dropKey(l, keyRelativePath) })
	expect("volume_path before absolute_win32_path", "c/q.vhdx")
	editLocator(t, child, func(l *parentLocator) { l.Set(keyRelativePath, `..\w\p.vhdx`) })
	expect("relative_path naming another disk", "c/q.vhdx")
	editLocator(t, child, func(l *parentLocator) { l.Set(keyRelativePath, `..\r\p.vhdx`) })
	expect("relative_path naming a raw file", "c/q.vhdx")

	// Nothing but another disk and a raw file: refused, naming them.
	os.Remove(filepath.Join(dir, "c", "q.vhdx"))
	os.Remove(filepath.Join(dir, "b", "p.vhdx"))
	editLocator(t, child, func(l *parentLocator) {
		l.Set(keyVolumePath, `\\?\Volume{26A21BDA-A627-11D7-9931-806E6F6E6963}\r\p.vhdx`)
		l.Set(keyRelativePath, `..\w\p.vhdx`)
		l.Set(keyAbsolutePath, strings.ReplaceAll(filepath.Join(dir, "r", "p.vhdx"), "/", `\`))
	})
	if _, err := parentOf(); !errors.Is(err, ErrParentMismatch) || !strings.Contains(err.Error(), "not a VHDX") {
		t.Errorf("no candidate is the parent: %v", err)
	}
}

// TestParentFIFO: a parent locator naming a FIFO blocked the open forever
// (and with it every verb and the daemon); it is passed over now.
func TestParentFIFO(t *testing.T) {
	dir := t.TempDir()
	base := filepath.Join(dir, "base.vhdx")
	mustCreate(t, base, CreateOptions{Size: 8 << 20})
	child := filepath.Join(dir, "child.avhdx")
	mustCreate(t, child, CreateOptions{Parent: base})
	os.Remove(base)
	if err := syscall.Mkfifo(base, 0o600); err != nil {
		t.Skip("mkfifo:", err)
	}
	for _, ro := range []bool{true, false} {
		done := make(chan error, 1)
		go func() {
			im, err := Open(child, OpenOptions{ReadOnly: ro})
			if err == nil {
				im.Close()
			}
			done <- err
		}()
		var err error
		select {
		case err = <-done:
		case <-time.After(30 * time.Second):
			// Unblock the open: a writer on the FIFO, at once closed.
			if w, werr := os.OpenFile(base, os.O_RDWR, 0); werr == nil {
				w.Close()
			}
			<-done
			t.Fatalf("read-only %v: the open blocked on the FIFO", ro)
		}
		if !errors.Is(err, ErrParentNotFound) || !strings.Contains(err.Error(), "not a regular file") {
			t.Errorf("read-only %v: %v", ro, err)
		}
	}
	// Opened by name, a FIFO is refused too, before it is opened.
	if _, err := Open(base, OpenOptions{ReadOnly: true}); err == nil || !strings.Contains(err.Error(), "regular file") {
		t.Errorf("opening the FIFO itself: %v", err)
	}
}

// writeSparse writes b to path leaving its zero 64 KiB pieces as holes.
func writeSparse(t *testing.T, path string, b []byte) {
	t.Helper()
	f, err := os.OpenFile(path, os.O_RDWR|os.O_CREATE|os.O_TRUNC, 0o600)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	if err := f.Truncate(int64(len(b))); err != nil {
		t.Fatal(err)
	}
	zero := make([]byte, 64*kib)
	for off := 0; off < len(b); off += len(zero) {
		p := b[off:min(off+len(zero), len(b))]
		if !bytes.Equal(p, zero[:len(p)]) {
			if _, err := f.WriteAt(p, int64(off)); err != nil {
				t.Fatal(err)
			}
		}
	}
}

// TestChainDepth: a chain of thousands of images opened them all (6000
// levels, 6000 open files); beyond maxChainDepth it is refused now, and a
// chain of that depth still opens.
func TestChainDepth(t *testing.T) {
	dir := t.TempDir()
	name := func(i int) string { return fmt.Sprintf("l%04d.vhdx", i) }
	mustCreate(t, filepath.Join(dir, name(0)), CreateOptions{Size: 4 << 20, BlockSize: 1 << 20})
	mustCreate(t, filepath.Join(dir, name(1)), CreateOptions{Parent: filepath.Join(dir, name(0)), BlockSize: 1 << 20})
	template, err := os.ReadFile(filepath.Join(dir, name(1)))
	if err != nil {
		t.Fatal(err)
	}
	base, err := Open(filepath.Join(dir, name(0)), OpenOptions{ReadOnly: true})
	if err != nil {
		t.Fatal(err)
	}
	prev := base.Info().DataWriteGUID
	base.Close()
	// Level i is the template naming level i-1, with its own
	// DataWriteGuid as the next level's linkage.
	for i := 1; i <= maxChainDepth; i++ {
		b := bytes.ReplaceAll(template, utf16le(name(0)), utf16le(name(i-1)))
		j := bytes.Index(b, utf16le("parent_linkage{"))
		copy(b[j+len(utf16le("parent_linkage")):], utf16le("{"+prev.String()+"}"))
		prev = newGUID()
		editHeaders(t, b, func(h *header) { h.DataWriteGUID = prev })
		writeSparse(t, filepath.Join(dir, name(i)), b)
	}
	deepest := maxChainDepth - 1 // levels 0..deepest: maxChainDepth images
	im, err := Open(filepath.Join(dir, name(deepest)), OpenOptions{ReadOnly: true})
	if err != nil {
		t.Fatalf("a chain of %d images: %v", maxChainDepth, err)
	}
	im.Close()
	_, err = Open(filepath.Join(dir, name(deepest+1)), OpenOptions{ReadOnly: true})
	if !errors.Is(err, ErrUnsupported) || !strings.Contains(err.Error(), "deeper than") {
		t.Errorf("a chain of %d images: %v", maxChainDepth+1, err)
	}
}

// TestMissingSectorBitmap: a PARTIALLY_PRESENT block whose chunk has no
// sector bitmap read its parent's data as its own, silently; refused now.
func TestMissingSectorBitmap(t *testing.T) {
	dir := t.TempDir()
	base := filepath.Join(dir, "base.vhdx")
	p, err := Create(base, CreateOptions{Size: 8 << 20, BlockSize: 1 << 20})
	if err != nil {
		t.Fatal(err)
	}
	p.WriteAt(bytes.Repeat([]byte{0xbb}, 1<<20), 0)
	p.Close()
	child := filepath.Join(dir, "child.avhdx")
	c, err := Create(child, CreateOptions{Parent: base, BlockSize: 1 << 20})
	if err != nil {
		t.Fatal(err)
	}
	c.WriteAt([]byte("child"), 512)
	g := c.geo
	c.Close()
	b, err := os.ReadFile(child)
	if err != nil {
		t.Fatal(err)
	}
	if st := batState(binary.LittleEndian.Uint64(b[newBATOffset:])); st != payloadPartiallyPresent {
		t.Fatalf("block 0 is in state %d", st)
	}
	binary.LittleEndian.PutUint64(b[newBATOffset+8*g.bitmapIndex(0):], batEntry(bitmapNotPresent, 0))
	os.WriteFile(child, b, 0o600)
	im, err := Open(child, OpenOptions{ReadOnly: true})
	if err == nil {
		got := make([]byte, 5)
		im.ReadAt(got, 512)
		im.Close()
		t.Fatalf("opened; reads %q at 512", got)
	}
	if !errors.Is(err, ErrFormat) || !strings.Contains(err.Error(), "without a sector bitmap") {
		t.Errorf("%v", err)
	}
}

// TestLargeBATOpen: a legal BAT of four million allocated blocks (a
// 4 TiB disk of 1 MiB blocks, every block present, in a sparse file)
// opens with its overlap check, allocating little beyond the BAT itself:
// it used to be held twice, as bytes and as entries.
func TestLargeBATOpen(t *testing.T) {
	if testing.Short() {
		t.Skip("writes a 32 MiB BAT")
	}
	path := filepath.Join(t.TempDir(), "big.vhdx")
	const size = 4 << 40
	im, err := Create(path, CreateOptions{Size: size, BlockSize: 1 << 20})
	if err != nil {
		t.Fatal(err)
	}
	g, batOff, payload := im.geo, int64(im.regs.BAT.Offset), im.fileEnd
	im.Close()
	bat := make([]byte, g.totalEntries*8)
	for b := int64(0); b < g.dataBlocks; b++ {
		binary.LittleEndian.PutUint64(bat[8*g.payloadIndex(b):], batEntry(payloadFullyPresent, payload+b*mib))
	}
	f, err := os.OpenFile(path, os.O_RDWR, 0)
	if err != nil {
		t.Fatal(err)
	}
	_, err = f.WriteAt(bat, batOff)
	if err == nil {
		err = f.Truncate(payload + g.dataBlocks*mib)
	}
	f.Close()
	if err != nil {
		t.Skip("no room for a sparse 4 TiB file:", err)
	}
	bat = nil
	var before, after runtime.MemStats
	runtime.GC()
	runtime.ReadMemStats(&before)
	start := time.Now()
	im, err = Open(path, OpenOptions{ReadOnly: true})
	took := time.Since(start)
	runtime.ReadMemStats(&after)
	if err != nil {
		t.Fatal(err)
	}
	defer im.Close()
	alloc := int64(after.TotalAlloc - before.TotalAlloc)
	t.Logf("%d entries: open took %v, allocated %d MiB", g.totalEntries, took, alloc>>20)
	if batBytes := g.totalEntries * 8; alloc > batBytes+batBytes/4+4*mib {
		t.Errorf("open allocated %d bytes for a %d-byte BAT", alloc, batBytes)
	}
}

// BenchmarkCraftedLog opens an image whose 64 MiB log holds an entry at
// every 4 KiB but the last, all valid, with consecutive sequence numbers,
// each naming as its tail the place after it: no sequence is valid, and a
// search that walks from each head's tail to the end is quadratic (16383
// heads). Measured, not asserted: go test -bench CraftedLog -run X.
func BenchmarkCraftedLog(b *testing.B) {
	const logLen = 64 * mib
	t := &testing.T{}
	img := cleanImage(t)
	logOff := int64(len(img))
	img = append(img, make([]byte, logLen)...)
	guid := newGUID()
	for pos := int64(0); pos < logLen-logSectorSize; pos += logSectorSize {
		e := craftEntry(guid, uint64(1+pos/logSectorSize), pos+logSectorSize, 0, 0, nil, nil)
		copy(img[logOff+pos:], e)
	}
	editHeaders(t, img, func(h *header) { h.LogGUID, h.LogOffset, h.LogLength = guid, uint64(logOff), logLen })
	for i := 0; i < b.N; i++ {
		im, err := OpenFile(storage.NewMemFile(img), "x.vhdx", OpenOptions{ReadOnly: true})
		if err != nil {
			b.Fatal(err)
		}
		im.Close()
	}
}

// TestBATOverlapSorted: in a large sparse file holding few blocks, the
// overlap check sorts the blocks instead of keeping a bit per MiB; it
// finds the same overlaps.
func TestBATOverlapSorted(t *testing.T) {
	for _, c := range []struct {
		name  string
		entry uint64 // BAT entry 2
		want  string
	}{
		{"shared block", batEntry(payloadFullyPresent, 4*mib), "BAT entry 2 at offset 0x300010: [0x400000, +0x100000) overlaps BAT entry 1"},
		{"block in the log", batEntry(payloadFullyPresent, newLogOffset), "BAT entry 2 at offset 0x300010: [0x100000, +0x100000) overlaps the log"},
		{"block in the BAT", batEntry(payloadFullyPresent, newBATOffset), "overlaps the BAT region"},
	} {
		t.Run(c.name, func(t *testing.T) {
			b := cleanImage(t)
			binary.LittleEndian.PutUint64(b[newBATOffset+16:], c.entry)
			path := filepath.Join(t.TempDir(), "x.vhdx")
			writeSparse(t, path, b)
			if err := os.Truncate(path, 4<<30); err != nil {
				t.Fatal(err)
			}
			im, err := Open(path, OpenOptions{ReadOnly: true})
			if err == nil {
				im.Close()
				t.Fatal("opened")
			}
			if !errors.Is(err, ErrFormat) || !strings.Contains(err.Error(), c.want) {
				t.Errorf("%v, want %q", err, c.want)
			}
		})
	}
}
