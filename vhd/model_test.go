package vhd

import (
	"bytes"
	"math/rand/v2"
	"path/filepath"
	"testing"

	"github.com/vhdkit/vhdkit/disk"
)

// modelCase is an image kind for the model-based tests.
type modelCase struct {
	name      string
	typ       Type
	size      int64
	blockSize uint32
}

var modelCases = []modelCase{
	{"fixed", Fixed, 1<<20 + 3*512, 0},
	{"dynamic-8K", Dynamic, 1<<20 + 3*512, 8 << 10},
	{"dynamic-2M", Dynamic, 5<<20 + 512, 0},
	{"differencing-16K", Differencing, 1<<20 + 3*512, 16 << 10},
	{"differencing-512", Differencing, 256<<10 + 512, 512},
}

// makeParent creates a dynamic parent with scattered content and returns
// its path and content.
func makeParent(t testing.TB, r *rand.Rand, dir string, size int64, bs uint32) (string, []byte) {
	t.Helper()
	path := filepath.Join(dir, "parent.vhd")
	p, err := Create(path, CreateOptions{Size: uint64(size), BlockSize: bs})
	if err != nil {
		t.Fatal(err)
	}
	content := make([]byte, size)
	for i := 0; i < 20; i++ {
		off := r.Int64N(size)
		b := make([]byte, min(size-off, r.Int64N(40<<10)+1))
		fill(r, b)
		mustWrite(t, p, b, off)
		copy(content[off:], b)
	}
	mustClose(t, p)
	return path, content
}

// randomRange picks a range: often unaligned, sometimes sector or block
// aligned, sometimes spanning several blocks.
func randomRange(r *rand.Rand, size, bs int64) (int64, int64) {
	var off, n int64
	switch r.IntN(4) {
	case 0:
		off, n = r.Int64N(size), r.Int64N(1500)+1
	case 1:
		off = r.Int64N(size/SectorSize) * SectorSize
		n = (r.Int64N(16) + 1) * SectorSize
	case 2:
		off = r.Int64N(size/bs+1) * bs
		n = bs * (r.Int64N(3) + 1)
	default:
		off, n = r.Int64N(size), r.Int64N(3*bs)+1
	}
	off = min(off, size-1)
	return off, min(n, size-off)
}

func TestModelRandomIO(t *testing.T) {
	for _, c := range modelCases {
		t.Run(c.name, func(t *testing.T) {
			r := rand.New(rand.NewPCG(4, uint64(c.size)+uint64(c.blockSize)))
			dir := t.TempDir()
			path := filepath.Join(dir, "disk.vhd")
			opts := CreateOptions{Type: c.typ, Size: uint64(c.size), BlockSize: c.blockSize}
			var parent []byte
			if c.typ == Differencing {
				var ppath string
				ppath, parent = makeParent(t, r, dir, c.size, c.blockSize)
				opts = CreateOptions{Parent: ppath, BlockSize: c.blockSize}
			}
			img, err := Create(path, opts)
			if err != nil {
				t.Fatal(err)
			}
			model := make([]byte, c.size)
			if parent != nil {
				copy(model, parent)
			}
			bs := int64(c.blockSize)
			if bs == 0 {
				bs = DefaultBlockSize
			}
			for step := 0; step < 600; step++ {
				off, n := randomRange(r, c.size, bs)
				switch op := r.IntN(20); {
				case op < 8:
					p := make([]byte, n)
					fill(r, p)
					mustWrite(t, img, p, off)
					copy(model[off:], p)
				case op < 11:
					got := make([]byte, n)
					if _, err := img.ReadAt(got, off); err != nil {
						t.Fatal(err)
					}
					if !bytes.Equal(got, model[off:off+n]) {
						t.Fatalf("step %d: read %d+%d: %s", step, off, n, diffAt(got, model[off:off+n]))
					}
				case op < 13:
					if err := img.Trim(off, n); err != nil {
						t.Fatal(err)
					}
					if parent != nil {
						copy(model[off:off+n], parent[off:])
					} else {
						clear(model[off : off+n])
					}
				case op < 15:
					if err := img.WriteZeroes(off, n, r.IntN(2) == 0); err != nil {
						t.Fatal(err)
					}
					clear(model[off : off+n])
				case op < 16:
					if err := img.Flush(); err != nil {
						t.Fatal(err)
					}
				case op < 17:
					mustClose(t, img)
					if img, err = Open(path, OpenOptions{}); err != nil {
						t.Fatal(err)
					}
				default:
					checkExtents(t, img, off, n, model, parent)
				}
			}
			checkExtents(t, img, 0, c.size, model, parent)
			if got := readAll(t, img); !bytes.Equal(got, model) {
				t.Fatalf("final content: %s", diffAt(got, model))
			}
			mustClose(t, img)
			probs, err := Check(path, false)
			if err != nil {
				t.Fatal(err)
			}
			for _, p := range probs {
				if !p.Warning {
					t.Errorf("Check: %v", p)
				}
			}
		})
	}
}

// checkExtents checks that Extents tiles the range and agrees with the
// model: holes read as zeros, depth-1 ranges of a child as the parent.
func checkExtents(t *testing.T, img *Image, off, n int64, model, parent []byte) {
	t.Helper()
	exts, err := img.Extents(off, n)
	if err != nil {
		t.Fatal(err)
	}
	pos := off
	for i, e := range exts {
		if e.Offset != pos || e.Length <= 0 {
			t.Fatalf("extent %d %+v does not continue at %d", i, e, pos)
		}
		if i > 0 && exts[i-1].Type == e.Type && exts[i-1].Depth == e.Depth {
			t.Fatalf("extents %d and %d not merged: %v", i-1, i, exts)
		}
		seg := model[e.Offset : e.Offset+e.Length]
		switch {
		case e.Type == disk.Hole && !disk.IsZero(seg):
			t.Fatalf("hole %+v holds data", e)
		case e.Depth >= 1 && parent != nil && e.Type != disk.Hole && !bytes.Equal(seg, parent[e.Offset:e.Offset+e.Length]):
			t.Fatalf("extent %+v from the parent differs from it", e)
		}
		pos += e.Length
	}
	if pos != off+n {
		t.Fatalf("extents end at %d, want %d", pos, off+n)
	}
}

// Writing more blocks than a Flush batch holds flushes on the way.
func TestManyPendingBlocks(t *testing.T) {
	path := filepath.Join(t.TempDir(), "d.vhd")
	const size = 3 << 20
	img, err := Create(path, CreateOptions{Size: size, BlockSize: 512})
	if err != nil {
		t.Fatal(err)
	}
	model := make([]byte, size)
	fill(rand.New(rand.NewPCG(11, 11)), model)
	for off := 0; off < size; off += 64 << 10 {
		mustWrite(t, img, model[off:off+64<<10], int64(off))
	}
	if n := len(img.newBlocks); n >= maxPendingBitmaps || n == 0 {
		t.Errorf("%d blocks pending", n)
	}
	mustClose(t, img)
	img, err = Open(path, OpenOptions{ReadOnly: true})
	if err != nil {
		t.Fatal(err)
	}
	if got := readAll(t, img); !bytes.Equal(got, model) {
		t.Fatal(diffAt(got, model))
	}
	mustClose(t, img)
}
