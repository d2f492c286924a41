package storage

import (
	"bytes"
	"errors"
	"fmt"
	"io"
	"math/rand/v2"
	"os"
	"path/filepath"
	"sync"
	"testing"
)

func TestMemFileReadWrite(t *testing.T) {
	f := NewMemFile([]byte("hello"))
	if n, err := f.WriteAt([]byte("XY"), 7); n != 2 || err != nil {
		t.Fatalf("WriteAt past end = %d, %v", n, err)
	}
	if got, want := f.Bytes(), []byte("hello\x00\x00XY"); !bytes.Equal(got, want) {
		t.Fatalf("Bytes = %q, want %q", got, want)
	}
	p := make([]byte, 4)
	if n, err := f.ReadAt(p, 6); n != 3 || err != io.EOF || string(p[:3]) != "\x00XY" {
		t.Fatalf("ReadAt across end = %d, %v, %q", n, err, p[:n])
	}
	if n, err := f.ReadAt(p, 9); n != 0 || err != io.EOF {
		t.Fatalf("ReadAt at end = %d, %v", n, err)
	}
	if n, err := f.ReadAt(nil, 100); n != 0 || err != nil {
		t.Fatalf("empty ReadAt past end = %d, %v", n, err)
	}
	if _, err := f.ReadAt(p, -1); err == nil {
		t.Fatal("ReadAt at -1 succeeded")
	}
	if _, err := f.WriteAt(p, -1); err == nil {
		t.Fatal("WriteAt at -1 succeeded")
	}
	if _, err := f.WriteAt(p, 1<<62); err == nil {
		t.Fatal("WriteAt at 1<<62 succeeded")
	}
	if err := f.Truncate(-1); err == nil {
		t.Fatal("Truncate(-1) succeeded")
	}
	if err := f.Truncate(1 << 40); err == nil {
		t.Fatal("Truncate(1<<40) succeeded")
	}
	// A shrink then a grow must expose zeros, not the old bytes still in
	// the slice's capacity.
	if err := f.Truncate(2); err != nil {
		t.Fatal(err)
	}
	if err := f.Truncate(5); err != nil {
		t.Fatal(err)
	}
	if got := f.Bytes(); string(got) != "he\x00\x00\x00" {
		t.Fatalf("after shrink and grow: %q", got)
	}
	if size, err := f.Size(); size != 5 || err != nil {
		t.Fatalf("Size = %d, %v", size, err)
	}
}

func TestMemFileClosed(t *testing.T) {
	f := NewMemFile(make([]byte, 1024))
	f.WriteAt([]byte{1}, 0)
	if err := f.Close(); err != nil {
		t.Fatal(err)
	}
	p := make([]byte, 1)
	for name, err := range map[string]error{
		"ReadAt":   second(f.ReadAt(p, 0)),
		"WriteAt":  second(f.WriteAt(p, 0)),
		"Sync":     f.Sync(),
		"Truncate": f.Truncate(0),
		"Size":     second(f.Size()),
		"Close":    f.Close(),
	} {
		if !errors.Is(err, ErrClosed) {
			t.Errorf("%s on closed file: %v, want ErrClosed", name, err)
		}
	}
	// A closed file still shows its content and can be crashed.
	if b := f.Bytes(); len(b) != 1024 || b[0] != 1 {
		t.Errorf("Bytes of closed file wrong")
	}
	if c := f.CrashClone(rand.New(rand.NewPCG(1, 2))); c == nil {
		t.Error("CrashClone of closed file is nil")
	}
}

func second[T any](_ T, err error) error { return err }

func TestMemFileSyncedSurvives(t *testing.T) {
	f := NewMemFile(nil)
	data := bytes.Repeat([]byte("abcdefg"), 1000)
	f.WriteAt(data, 3)
	f.Truncate(5000)
	f.Sync()
	want := f.Bytes()
	rng := rand.New(rand.NewPCG(1, 2))
	for range 20 {
		c := f.CrashClone(rng)
		if !bytes.Equal(c.Bytes(), want) {
			t.Fatal("clone of a synced file differs")
		}
	}
	// The clone is durable through and through, and independent.
	c := f.CrashClone(rng)
	c.WriteAt([]byte("zz"), 0)
	if bytes.Equal(f.Bytes()[:2], []byte("zz")) {
		t.Fatal("writing the clone changed the original")
	}
	c.Sync()
	if !bytes.Equal(c.CrashClone(rng).Bytes(), c.Bytes()) {
		t.Fatal("clone of synced clone differs")
	}
}

// TestMemFileCrashVersions checks that a sector written several times
// without a sync comes back as each of its versions, and as nothing else,
// whole sectors at a time.
func TestMemFileCrashVersions(t *testing.T) {
	f := NewMemFile(bytes.Repeat([]byte{'s'}, 2*SectorSize))
	f.WriteAt([]byte{'a'}, 10) // a partial write still versions its sector
	f.WriteAt(bytes.Repeat([]byte{'b'}, 2*SectorSize), 0)
	f.WriteAt([]byte{'c'}, 20)
	sector := func(fill byte, marks ...any) string {
		b := bytes.Repeat([]byte{fill}, SectorSize)
		for i := 0; i < len(marks); i += 2 {
			b[marks[i].(int)] = marks[i+1].(byte)
		}
		return string(b)
	}
	allowed0 := map[string]bool{
		sector('s'): true, sector('s', 10, byte('a')): true,
		sector('b'): true, sector('b', 20, byte('c')): true,
	}
	allowed1 := map[string]bool{sector('s'): true, sector('b'): true}
	seen0, seen1 := map[string]bool{}, map[string]bool{}
	rng := rand.New(rand.NewPCG(3, 4))
	for range 400 {
		b := f.CrashClone(rng).Bytes()
		s0, s1 := string(b[:SectorSize]), string(b[SectorSize:])
		if !allowed0[s0] || !allowed1[s1] {
			t.Fatalf("clone holds a state never written:\n%q\n%q", s0, s1)
		}
		seen0[s0], seen1[s1] = true, true
	}
	if len(seen0) != len(allowed0) || len(seen1) != len(allowed1) {
		t.Fatalf("saw %d and %d versions, want %d and %d", len(seen0), len(seen1), len(allowed0), len(allowed1))
	}
}

func TestMemFileCrashSizes(t *testing.T) {
	f := NewMemFile(bytes.Repeat([]byte{'s'}, 1000))
	f.Truncate(700) // cuts sector 1 mid-way
	f.WriteAt(bytes.Repeat([]byte{'n'}, SectorSize), 3*SectorSize)
	sizes := map[int]int{}
	rng := rand.New(rand.NewPCG(5, 6))
	for range 300 {
		b := f.CrashClone(rng).Bytes()
		sizes[len(b)]++
		if len(b) >= 700 && !bytes.Equal(b[:700], f.Bytes()[:700]) {
			t.Fatalf("untouched prefix changed")
		}
		if len(b) == 1000 {
			// Either the old tail or the zeros the cut left, whole.
			tail := string(b[700:1000])
			if tail != string(bytes.Repeat([]byte{'s'}, 300)) && tail != string(make([]byte, 300)) {
				t.Fatalf("size 1000 with tail %q", tail)
			}
		}
	}
	for _, size := range []int{1000, 700, 4 * SectorSize} {
		if sizes[size] == 0 {
			t.Errorf("no clone of size %d in %v", size, sizes)
		}
	}
	if len(sizes) != 3 {
		t.Errorf("clone sizes %v, want 1000, 700, 2048", sizes)
	}
}

func TestMemFileCrashDeterministic(t *testing.T) {
	f := NewMemFile(make([]byte, 64*SectorSize))
	rng := rand.New(rand.NewPCG(7, 8))
	for range 100 {
		buf := make([]byte, rng.IntN(3000))
		for i := range buf {
			buf[i] = byte(rng.Uint32())
		}
		f.WriteAt(buf, rng.Int64N(80*SectorSize))
	}
	a := f.CrashClone(rand.New(rand.NewPCG(9, 9))).Bytes()
	b := f.CrashClone(rand.New(rand.NewPCG(9, 9))).Bytes()
	if !bytes.Equal(a, b) {
		t.Fatal("same rng, different clones")
	}
}

// TestMemFileCrashModel runs random operations against a brute-force
// oracle: a full snapshot after every operation since the last sync. A
// crash clone must have one of those sizes, and each of its sectors must
// equal that sector in one of the snapshots (zero-padded, cut to size).
// Clones share pages with the original, so it also checks that writing
// either side leaves the other alone.
func TestMemFileCrashModel(t *testing.T) {
	seed := uint64(rand.Int64())
	t.Logf("seed %d", seed)
	rng := rand.New(rand.NewPCG(seed, 0))
	const maxSize = 4*pageSize + 100
	f := NewMemFile(nil)
	var model []byte
	snaps := [][]byte{nil}
	pool := make([]byte, 4*pageSize) // random non-zero bytes to write
	for i := range pool {
		pool[i] = byte(1 + rng.IntN(255))
	}
	var clone *MemFile
	var cloneWant []byte
	for op := range 2000 {
		switch r := rng.IntN(20); {
		case r < 13:
			off := rng.IntN(maxSize)
			start := rng.IntN(2 * pageSize)
			buf := pool[start : start+1+rng.IntN(2*pageSize)]
			if _, err := f.WriteAt(buf, int64(off)); err != nil {
				t.Fatal(err)
			}
			if end := off + len(buf); end > len(model) {
				model = append(model, make([]byte, end-len(model))...)
			}
			copy(model[off:], buf)
		case r < 16:
			size := rng.IntN(maxSize)
			if err := f.Truncate(int64(size)); err != nil {
				t.Fatal(err)
			}
			if size < len(model) {
				model = model[:size:size]
			} else {
				model = append(model, make([]byte, size-len(model))...)
			}
		case r < 17:
			if err := f.Sync(); err != nil {
				t.Fatal(err)
			}
			snaps = snaps[:0]
		default:
			if clone != nil && !bytes.Equal(clone.Bytes(), cloneWant) {
				t.Fatalf("op %d: the previous clone changed", op)
			}
			clone = f.CrashClone(rng)
			c := clone.Bytes()
			checkCrashState(t, op, c, snaps)
			// Growing the clone must expose zeros, whatever the original
			// held past the clone's size.
			clone.Truncate(int64(len(c)) + 2*SectorSize)
			if tail := clone.Bytes()[len(c):]; !bytes.Equal(tail, make([]byte, len(tail))) {
				t.Fatalf("op %d: growing the clone exposed old bytes", op)
			}
			// Write into the clone's shared pages: the original must not
			// see it (checked against the model below).
			clone.WriteAt([]byte{0xEE}, rng.Int64N(maxSize))
			cloneWant = clone.Bytes()
		}
		if !bytes.Equal(f.Bytes(), model) {
			t.Fatalf("op %d: content differs from model", op)
		}
		snaps = append(snaps, bytes.Clone(model))
	}
}

// checkCrashState checks that clone is made of sectors of snapshots.
func checkCrashState(t *testing.T, op int, clone []byte, snaps [][]byte) {
	t.Helper()
	okSize := false
	for _, s := range snaps {
		okSize = okSize || len(s) == len(clone)
	}
	if !okSize {
		t.Fatalf("op %d: clone size %d not among the sizes since sync", op, len(clone))
	}
	for lo := 0; lo < len(clone); lo += SectorSize {
		got := clone[lo:min(lo+SectorSize, len(clone))]
		found := false
		for _, snap := range snaps {
			var v []byte
			if lo < len(snap) {
				v = snap[lo:min(lo+len(got), len(snap))]
			}
			if bytes.Equal(got[:len(v)], v) && bytes.Count(got[len(v):], []byte{0}) == len(got)-len(v) {
				found = true
				break
			}
		}
		if !found {
			t.Fatalf("op %d: clone sector %d is no version of it", op, lo/SectorSize)
		}
	}
}

func TestMemFileConcurrent(t *testing.T) {
	f := NewMemFile(make([]byte, 1<<20))
	var wg sync.WaitGroup
	for g := range 4 {
		wg.Go(func() {
			rng := rand.New(rand.NewPCG(uint64(g), 1))
			buf := bytes.Repeat([]byte{byte(g + 1)}, 4096)
			for i := range 200 {
				region := int64(g) << 18 // each goroutine owns 256 KiB
				off := region + rng.Int64N(1<<18-4096)
				if _, err := f.WriteAt(buf, off); err != nil {
					t.Error(err)
					return
				}
				got := make([]byte, 4096)
				if _, err := f.ReadAt(got, off); err != nil || !bytes.Equal(got, buf) {
					t.Errorf("goroutine %d: read back wrong: %v", g, err)
					return
				}
				switch i % 50 {
				case 0:
					f.Sync()
				case 25:
					f.CrashClone(rng)
				}
			}
		})
	}
	wg.Wait()
}

func BenchmarkMemFileCrashClone(b *testing.B) {
	for _, mib := range []int{10, 40} {
		b.Run(fmt.Sprintf("%dMiB", mib), func(b *testing.B) {
			f := NewMemFile(make([]byte, mib<<20))
			buf := make([]byte, 4<<10)
			rng := rand.New(rand.NewPCG(1, 1))
			for range 16 { // 64 KiB of unsynced writes
				f.WriteAt(buf, rng.Int64N(int64(mib<<20-len(buf))))
			}
			for b.Loop() {
				f.CrashClone(rng)
			}
		})
	}
}

func BenchmarkMemFileWriteSync(b *testing.B) {
	f := NewMemFile(make([]byte, 40<<20))
	buf := make([]byte, 64<<10)
	b.SetBytes(int64(len(buf)))
	var off int64
	for b.Loop() {
		f.WriteAt(buf, off)
		off = (off + int64(len(buf))) % (40 << 20)
		if off%(1<<20) == 0 {
			f.Sync()
		}
	}
}

func TestWriteFileTo(t *testing.T) {
	dir := t.TempDir()
	p := filepath.Join(dir, "state.json")
	for _, content := range []string{"first", "second, longer", "3"} {
		if err := WriteFileTo(OS, p, []byte(content), 0o600); err != nil {
			t.Fatal(err)
		}
		if b, err := os.ReadFile(p); err != nil || string(b) != content {
			t.Fatalf("read %q, %v; want %q", b, err, content)
		}
	}
	if fi, err := os.Stat(p); err != nil || fi.Mode().Perm() != 0o600 {
		t.Fatalf("mode %v, %v", fi.Mode(), err)
	}
	if m, _ := filepath.Glob(filepath.Join(dir, "*.tmp")); len(m) != 0 {
		t.Fatalf("left behind: %v", m)
	}
	if err := WriteFileTo(OS, filepath.Join(dir, "no", "such"), nil, 0o600); err == nil {
		t.Fatal("writing into a missing folder succeeded")
	}
}
