package vhd

import (
	"bytes"
	"errors"
	"math/rand/v2"
	"path/filepath"
	"testing"

	"github.com/vhdkit/vhdkit/storage"
)

// TestCrashAndFaults runs one script of writes, trims and flushes again
// and again, failing its i-th file operation for i = 0, 1, 2, … until it
// completes, and after each failure simulates power cuts (the durable
// content plus a random subset of unsynced sectors). Every cut must open,
// and every sector must read as it was at the last successful Flush or as
// one of the states it had since.
func TestCrashAndFaults(t *testing.T) {
	for _, c := range []modelCase{
		{"fixed", Fixed, 64 << 10, 0},
		{"dynamic-4K", Dynamic, 96<<10 + 512, 4 << 10},
		{"differencing-4K", Differencing, 96<<10 + 512, 4 << 10},
	} {
		t.Run(c.name, func(t *testing.T) {
			dir := t.TempDir()
			path := filepath.Join(dir, "child.vhd")
			var parent []byte
			opts := CreateOptions{Type: c.typ, Size: uint64(c.size), BlockSize: c.blockSize}
			if c.typ == Differencing {
				var ppath string
				ppath, parent = makeParent(t, rand.New(rand.NewPCG(5, 5)), dir, c.size, c.blockSize)
				opts = CreateOptions{Parent: ppath, BlockSize: c.blockSize}
			}
			// The failures start after the creation, whose operations a
			// first run counts (creating is deterministic).
			counter := &storage.FaultFile{File: storage.NewMemFile(nil), FailAt: -1}
			if _, err := CreateFile(counter, path, opts); err != nil {
				t.Fatal(err)
			}
			created := counter.Ops()
			for i := 0; ; i++ {
				mem := storage.NewMemFile(nil)
				f := &storage.FaultFile{File: mem, FailAt: created + int64(i)}
				img, err := CreateFile(f, path, opts)
				if err != nil {
					t.Fatal(err)
				}
				st := newCrashState(c.size, parent)
				done := runCrashScript(img, st, c.size, int64(c.blockSize))
				if done {
					if f.Injected() {
						t.Fatal("script completed although an operation failed")
					}
					if i == 0 {
						t.Fatal("script did no I/O")
					}
					t.Logf("%d fault points", i)
					return
				}
				r := rand.New(rand.NewPCG(6, uint64(i)))
				for k := 0; k < 3; k++ {
					st.verify(t, mem.CrashClone(r).Bytes(), path, i, k)
				}
			}
		})
	}
}

// crashState is what a crash may leave: per sector, the content at the
// last successful Flush or any state written since.
type crashState struct {
	model   []byte
	parent  []byte
	flushed []byte
	since   map[int64][][]byte
}

func newCrashState(size int64, parent []byte) *crashState {
	m := make([]byte, size)
	copy(m, parent)
	return &crashState{model: m, parent: parent, flushed: bytes.Clone(m), since: map[int64][][]byte{}}
}

// apply changes the model and records the new states of the sectors.
func (s *crashState) apply(off int64, b []byte) {
	copy(s.model[off:], b)
	for sec := off / SectorSize; sec*SectorSize < off+int64(len(b)); sec++ {
		lo := sec * SectorSize
		s.since[sec] = append(s.since[sec], bytes.Clone(s.model[lo:min(lo+SectorSize, int64(len(s.model)))]))
	}
}

func (s *crashState) flushedOK() {
	s.flushed = bytes.Clone(s.model)
	clear(s.since)
}

// verify checks cut, what the disk held after a power cut.
func (s *crashState) verify(t *testing.T, cut []byte, path string, fault, k int) {
	t.Helper()
	img, err := OpenFile(storage.NewMemFile(cut), path, OpenOptions{ReadOnly: true})
	if err != nil {
		t.Fatalf("fault %d, cut %d: open: %v", fault, k, err)
	}
	got := readAll(t, img)
	for sec := int64(0); sec*SectorSize < int64(len(got)); sec++ {
		lo := sec * SectorSize
		hi := min(lo+SectorSize, int64(len(got)))
		g := got[lo:hi]
		if bytes.Equal(g, s.flushed[lo:hi]) {
			continue
		}
		ok := false
		for _, v := range s.since[sec] {
			if bytes.Equal(g, v) {
				ok = true
				break
			}
		}
		if !ok {
			t.Fatalf("fault %d, cut %d: sector %d reads neither its flushed content nor a later state", fault, k, sec)
		}
	}
	img.Close()
	// The cut must be valid to the strictest reader, not only readable by
	// ours: the strict Check finds no error (warnings are states a
	// writable open repairs).
	probs, err := CheckFile(storage.NewMemFile(cut), path)
	if err != nil {
		t.Fatalf("fault %d, cut %d: Check: %v", fault, k, err)
	}
	for _, p := range probs {
		if !p.Warning {
			t.Fatalf("fault %d, cut %d: Check: %v", fault, k, p)
		}
	}
	// A writable open of the cut recovers it for further use.
	recovered := storage.NewMemFile(cut)
	img, err = OpenFile(recovered, path, OpenOptions{})
	if err != nil {
		t.Fatalf("fault %d, cut %d: writable open: %v", fault, k, err)
	}
	p := bytes.Repeat([]byte{0xEE}, 3000)
	mustWrite(t, img, p, img.Size()-3000)
	if err := img.Close(); err != nil {
		t.Fatalf("fault %d, cut %d: close after recovery: %v", fault, k, err)
	}
	img, err = OpenFile(storage.NewMemFile(recovered.Bytes()), path, OpenOptions{ReadOnly: true})
	if err != nil {
		t.Fatalf("fault %d, cut %d: reopen after recovery: %v", fault, k, err)
	}
	tail := make([]byte, 3000)
	if _, err := img.ReadAt(tail, img.Size()-3000); err != nil || !bytes.Equal(tail, p) {
		t.Fatalf("fault %d, cut %d: write after recovery lost: %v", fault, k, err)
	}
	img.Close()
}

// runCrashScript runs a fixed sequence of operations; it stops at the
// first error and reports whether it got through.
func runCrashScript(img *Image, st *crashState, size, bs int64) bool {
	r := rand.New(rand.NewPCG(7, 7))
	if bs == 0 {
		bs = 4096
	}
	for step := 0; step < 60; step++ {
		off, n := randomRange(r, size, bs)
		var err error
		switch op := r.IntN(10); {
		case op < 6:
			p := make([]byte, n)
			fill(r, p)
			st.apply(off, p)
			_, err = img.WriteAt(p, off)
		case op < 7:
			b := make([]byte, n)
			if st.parent != nil {
				copy(b, st.parent[off:])
			}
			st.apply(off, b)
			err = img.Trim(off, n)
		case op < 8:
			st.apply(off, make([]byte, n))
			err = img.WriteZeroes(off, n, r.IntN(2) == 0)
		default:
			if err = img.Flush(); err == nil {
				st.flushedOK()
			}
		}
		if err != nil {
			if !errors.Is(err, storage.ErrInjected) {
				panic(err)
			}
			return false
		}
	}
	if err := img.Flush(); err != nil {
		return false
	}
	st.flushedOK()
	return true
}
