package vhdx

import (
	"bytes"
	"encoding/binary"
	"fmt"
	"math/rand/v2"
	"os"
	"path/filepath"
	"testing"

	"github.com/vhdkit/vhdkit/storage"
	"github.com/vhdkit/vhdkit/storage/faulttest"
)

// optimizeFixture fills im with data, then discards half of it: every
// other block trimmed, and every sixth block overwritten with zeros as
// data (FULLY_PRESENT blocks that read as zeros). It returns the model.
func optimizeFixture(t testing.TB, im *Image) []byte {
	t.Helper()
	size := im.Size()
	model := make([]byte, size)
	r := rand.New(rand.NewPCG(5, 5))
	for i := range model {
		model[i] = byte(r.Uint32()) | 1
	}
	if _, err := im.WriteAt(model, 0); err != nil {
		t.Fatal(err)
	}
	if err := im.Flush(); err != nil {
		t.Fatal(err)
	}
	bs := im.geo.blockSize
	for b := int64(0); b*bs < size; b++ {
		off := b * bs
		n := min(bs, size-off)
		switch {
		case b%2 == 1:
			if err := im.Trim(off, n); err != nil {
				t.Fatal(err)
			}
		case b%6 == 0:
			// Zeros written as data: only a full optimize finds them.
			if _, err := im.WriteAt(make([]byte, n), off); err != nil {
				t.Fatal(err)
			}
		default:
			continue
		}
		clear(model[off : off+n])
	}
	if err := im.Flush(); err != nil {
		t.Fatal(err)
	}
	return model
}

// TestOptimize: a full optimize of a half-discarded dynamic image releases
// the blocks of zeros, moves the last blocks into the holes and cuts the
// file, reads the same, passes the strict check and qemu-img check and
// compare, and reports progress; quick mode changes no data either.
func TestOptimize(t *testing.T) {
	dir := t.TempDir()
	path := filepath.Join(dir, "o.vhdx")
	im, err := Create(path, CreateOptions{Size: 48 << 20, BlockSize: 1 << 20})
	if err != nil {
		t.Fatal(err)
	}
	model := optimizeFixture(t, im)
	if err := im.Close(); err != nil {
		t.Fatal(err)
	}
	verify := func(what string) {
		t.Helper()
		wantCleanContent(t, path, model, what)
	}
	res, err := Optimize(path, OptimizeOptions{})
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("quick: %+v", res)
	verify("quick")
	var last, calls int64
	res, err = Optimize(path, OptimizeOptions{Full: true, Progress: func(done, total int64) {
		if done <= last || done > total {
			t.Errorf("progress %d of %d after %d", done, total, last)
		}
		last = done
		calls++
	}})
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("full: %+v, %d progress calls", res, calls)
	verify("full")
	// 48 blocks: 24 trimmed, 8 of zeros released, 16 left after 4 MiB of
	// structures.
	if res.Released != 8 || res.SizeAfter != (4+16)<<20 || res.Moved == 0 || calls == 0 {
		t.Fatalf("full optimize: %+v, %d progress calls", res, calls)
	}
	if fi, _ := os.Stat(path); fi.Size() != res.SizeAfter {
		t.Fatalf("file is %d bytes, optimize says %d", fi.Size(), res.SizeAfter)
	}
	// The optimized image takes writes, in its own space first.
	im, err = Open(path, OpenOptions{})
	if err != nil {
		t.Fatal(err)
	}
	fresh := bytes.Repeat([]byte{0x77}, 3<<20)
	if _, err := im.WriteAt(fresh, 7<<20); err != nil {
		t.Fatal(err)
	}
	copy(model[7<<20:], fresh)
	if err := im.Close(); err != nil {
		t.Fatal(err)
	}
	verify("written after")
	wantQemuReads(t, path, model)
}

// TestOptimizeDifferencing: blocks of zeros in a child become ZERO, not
// NOT_PRESENT, so they go on reading zeros over a parent full of data.
func TestOptimizeDifferencing(t *testing.T) {
	dir := t.TempDir()
	parentPath := filepath.Join(dir, "p.vhdx")
	p, err := Create(parentPath, CreateOptions{Size: 16 << 20, BlockSize: 1 << 20})
	if err != nil {
		t.Fatal(err)
	}
	model := bytes.Repeat([]byte{0x33}, 16<<20)
	if _, err := p.WriteAt(model, 0); err != nil {
		t.Fatal(err)
	}
	p.Close()
	path := filepath.Join(dir, "c.avhdx")
	im, err := Create(path, CreateOptions{Parent: parentPath, BlockSize: 1 << 20})
	if err != nil {
		t.Fatal(err)
	}
	for b := int64(0); b < 16; b++ {
		v := byte(0)
		if b%3 == 0 {
			v = byte(b + 1)
		}
		blk := bytes.Repeat([]byte{v}, 1<<20)
		if _, err := im.WriteAt(blk, b<<20); err != nil {
			t.Fatal(err)
		}
		copy(model[b<<20:], blk)
	}
	if err := im.Close(); err != nil {
		t.Fatal(err)
	}
	res, err := Optimize(path, OptimizeOptions{Full: true})
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("%+v", res)
	if res.Released != 10 || res.SizeAfter >= res.SizeBefore {
		t.Fatalf("%+v", res)
	}
	wantCleanContent(t, path, model, "optimized")
}

// TestCrashOptimize sweeps a full Optimize (zero blocks released, the
// last blocks moved down, the file cut) and Close of a dynamic and a
// differencing image, in every mode: after each point the image reads
// what it read before, which Optimize never changes (checkImage), and an
// Optimize run again completes, leaving the same content and a file that
// passes the strict check.
func TestCrashOptimize(t *testing.T) {
	dir := t.TempDir()
	const size = 8<<20 + 4096
	basePath := filepath.Join(dir, "base.vhdx")
	base, err := Create(basePath, CreateOptions{Size: size, BlockSize: 1 << 20})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := base.WriteAt(bytes.Repeat([]byte{0x3C}, size), 0); err != nil {
		t.Fatal(err)
	}
	if err := base.Close(); err != nil {
		t.Fatal(err)
	}
	for _, kind := range []string{"dynamic", "differencing"} {
		t.Run(kind, func(t *testing.T) {
			path := filepath.Join(dir, kind+".vhdx")
			opts := CreateOptions{Size: size, BlockSize: 1 << 20}
			if kind == "differencing" {
				opts = CreateOptions{Parent: basePath, BlockSize: 1 << 20}
			}
			var model []byte
			files := memFiles(t, []string{basePath}, func(fsys *storage.MemFS) error {
				opts.FS = fsys
				im, err := Create(path, opts)
				if err != nil {
					return err
				}
				model = optimizeFixture(t, im)
				return im.Close()
			})
			want := newModel(size, model)
			optimize := func(fsys *storage.MemFS) error {
				im, err := Open(path, OpenOptions{FS: fsys})
				if err != nil {
					return err
				}
				if _, err := im.Optimize(OptimizeOptions{Full: true}); err != nil {
					im.Close()
					return err
				}
				return im.Close()
			}
			// Without faults, the file shrinks: the sweep covers the moves.
			fsys := storage.NewMemFS(files)
			if err := optimize(fsys); err != nil {
				t.Fatal(err)
			}
			if after, _ := fsys.Bytes(path); len(after) >= len(files[path]) {
				t.Fatalf("optimize left the file at %d bytes (was %d)", len(after), len(files[path]))
			}
			faulttest.Run(t, faulttest.Sweep{
				Files:     files,
				PowerCuts: powerCuts(),
				Start: func(fsys *storage.MemFS) (func() error, error) {
					im, err := Open(path, OpenOptions{FS: fsys})
					if err != nil {
						return nil, err
					}
					return func() error {
						if _, err := im.Optimize(OptimizeOptions{Full: true}); err != nil {
							return err
						}
						return im.Close()
					}, nil
				},
				Check: func(fsys *storage.MemFS, p faulttest.Point) error {
					if _, err := checkImage(fsys, path, newExpectation(want)); err != nil {
						return err
					}
					if err := optimize(fsys); err != nil {
						return fmt.Errorf("optimizing again: %w", err)
					}
					if err := strictFS(fsys, path); err != nil {
						return fmt.Errorf("optimized again: %w", err)
					}
					im, err := Open(path, OpenOptions{FS: fsys, ReadOnly: true})
					if err != nil {
						return err
					}
					defer im.Close()
					// checkImage wrote its mark at 12345.
					written := want.clone()
					written.write([]byte("after the point"), 12345)
					if err := checkModels(im, written); err != nil {
						return fmt.Errorf("optimized again: %w", err)
					}
					return nil
				},
			})
		})
	}
}

// TestOptimizeOnline: a full optimize of an image in use, while another
// goroutine writes, trims and flushes: every write lands (the content is
// the writer's model at the end), and the file passes the strict check.
func TestOptimizeOnline(t *testing.T) {
	path := filepath.Join(t.TempDir(), "on.vhdx")
	im, err := Create(path, CreateOptions{Size: 24 << 20, BlockSize: 1 << 20})
	if err != nil {
		t.Fatal(err)
	}
	model := optimizeFixture(t, im)
	done := make(chan error)
	go func() {
		r := rand.New(rand.NewPCG(8, 8))
		for i := 0; i < 300; i++ {
			off := r.Int64N(im.Size()-64<<10) / 512 * 512
			n := r.Int64N(64<<10)/512*512 + 512
			var err error
			switch i % 7 {
			case 3:
				err = im.Trim(off, n)
				clear(model[off : off+n])
			case 5:
				err = im.Flush()
			default:
				b := bytes.Repeat([]byte{byte(i) | 1}, int(n))
				_, err = im.WriteAt(b, off)
				copy(model[off:], b)
			}
			if err != nil {
				done <- err
				return
			}
		}
		done <- nil
	}()
	for range 3 {
		if _, err := im.Optimize(OptimizeOptions{Full: true}); err != nil {
			t.Fatal(err)
		}
		if probs := spaceProblems(im); len(probs) > 0 {
			t.Fatal(probs)
		}
	}
	if err := <-done; err != nil {
		t.Fatal(err)
	}
	if got := readAll(t, im); !bytes.Equal(got, model) {
		t.Fatalf("content differs at %d", firstDiff(got, model))
	}
	if err := im.Close(); err != nil {
		t.Fatal(err)
	}
	wantCleanContent(t, path, model, "reopened")
}

// TestRandomSpaceOps runs random writes, trims, zeroings, flushes, resizes,
// reopenings and optimizes on dynamic and differencing images, checking
// after each that the free-space map agrees with the BAT and the content
// with a model, and at the end the strict check.
func TestRandomSpaceOps(t *testing.T) {
	for _, kind := range []string{"dynamic", "differencing"} {
		t.Run(kind, func(t *testing.T) {
			dir := t.TempDir()
			const mb = 1 << 20
			size := int64(12 * mb)
			opts := CreateOptions{Size: uint64(size), BlockSize: mb}
			model := make([]byte, size)
			if kind == "differencing" {
				parent := filepath.Join(dir, "p.vhdx")
				p, err := Create(parent, opts)
				if err != nil {
					t.Fatal(err)
				}
				for i := range model {
					model[i] = byte(i>>12) | 0x80
				}
				if _, err := p.WriteAt(model, 0); err != nil {
					t.Fatal(err)
				}
				p.Close()
				opts = CreateOptions{Parent: parent, BlockSize: mb}
			}
			path := filepath.Join(dir, "r.vhdx")
			im, err := Create(path, opts)
			if err != nil {
				t.Fatal(err)
			}
			r := rand.New(rand.NewPCG(3, uint64(len(kind))))
			for i := 0; i < 400; i++ {
				off := r.Int64N(size) / 512 * 512
				n := min(size-off, (r.Int64N(3*mb)+512)/512*512)
				if r.IntN(2) == 0 { // whole blocks, often
					off, n = off/mb*mb, min(size-off/mb*mb, (n/mb+1)*mb)
				}
				var err error
				switch op := r.IntN(20); {
				case op < 8:
					b := make([]byte, n)
					for k := range b {
						b[k] = byte(i) ^ byte(k>>9) | 1
					}
					_, err = im.WriteAt(b, off)
					copy(model[off:], b)
				case op < 11:
					err = im.Trim(off, n)
					clear(model[off : off+n])
				case op < 13:
					err = im.WriteZeroes(off, n, r.IntN(2) == 0)
					clear(model[off : off+n])
				case op < 16:
					err = im.Flush()
				case op < 17:
					_, err = im.Optimize(OptimizeOptions{Full: r.IntN(2) == 0})
				case op < 18 && kind == "dynamic":
					next := (r.Int64N(16*mb) + mb) / 512 * 512
					err = im.Resize(next)
					if next > size {
						model = append(model, make([]byte, next-size)...)
					}
					model, size = model[:next], next
				default:
					if err = im.Close(); err == nil {
						im, err = Open(path, OpenOptions{})
					}
				}
				if err != nil {
					t.Fatalf("op %d: %v", i, err)
				}
				if probs := spaceProblems(im); len(probs) > 0 {
					t.Fatalf("op %d: %v", i, probs)
				}
				if i%20 == 0 {
					if got := readAll(t, im); !bytes.Equal(got, model) {
						t.Fatalf("op %d: content differs at %d", i, firstDiff(got, model))
					}
				}
			}
			if got := readAll(t, im); !bytes.Equal(got, model) {
				t.Fatalf("content differs at %d", firstDiff(got, model))
			}
			if err := im.Close(); err != nil {
				t.Fatal(err)
			}
			b, err := os.ReadFile(path)
			if err != nil {
				t.Fatal(err)
			}
			if probs := writerProblems(b); len(probs) > 0 {
				t.Fatal(probs)
			}
			probs, err := Check(path, false)
			if err != nil {
				t.Fatal(err)
			}
			for _, p := range probs {
				t.Errorf("check: %v", p)
			}
		})
	}
}

// TestOptimizeOldFile: a file as the older vhdkit left it, with trimmed
// blocks still naming their space (ZERO and UNMAPPED with FileOffsetMB
// set), gives that space back to a quick optimize, and the entries lose
// their offsets.
func TestOptimizeOldFile(t *testing.T) {
	path := filepath.Join(t.TempDir(), "old.vhdx")
	const mb = 1 << 20
	im, err := Create(path, CreateOptions{Size: 16 * mb, BlockSize: 4 * mb})
	if err != nil {
		t.Fatal(err)
	}
	model := bytes.Repeat([]byte{0x61}, 16*mb)
	if _, err := im.WriteAt(model, 0); err != nil {
		t.Fatal(err)
	}
	if err := im.Close(); err != nil {
		t.Fatal(err)
	}
	f, err := os.OpenFile(path, os.O_RDWR, 0)
	if err != nil {
		t.Fatal(err)
	}
	e := make([]byte, 8)
	for _, b := range []struct {
		idx   int64
		state uint8
	}{{1, payloadZero}, {3, payloadUnmapped}} {
		if _, err := f.ReadAt(e, newBATOffset+8*b.idx); err != nil {
			t.Fatal(err)
		}
		binary.LittleEndian.PutUint64(e, batEntry(b.state, batOffset(binary.LittleEndian.Uint64(e))))
		if _, err := f.WriteAt(e, newBATOffset+8*b.idx); err != nil {
			t.Fatal(err)
		}
		clear(model[b.idx*4*mb : (b.idx+1)*4*mb])
	}
	f.Close()
	before := fileAllocated(t, path)
	res, err := Optimize(path, OptimizeOptions{})
	if err != nil {
		t.Fatal(err)
	}
	after := fileAllocated(t, path)
	t.Logf("%+v; allocated %d MiB before, %d MiB after", res, before>>20, after>>20)
	if before-after < 7*mb {
		t.Fatalf("allocated %d bytes before, %d after: the stale blocks' 8 MiB were not given back", before, after)
	}
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	if probs := writerProblems(b); len(probs) > 0 {
		t.Fatal(probs)
	}
	ro, err := Open(path, OpenOptions{ReadOnly: true})
	if err != nil {
		t.Fatal(err)
	}
	defer ro.Close()
	if got := readAll(t, ro); !bytes.Equal(got, model) {
		t.Fatalf("content differs at %d", firstDiff(got, model))
	}
}
