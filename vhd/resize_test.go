package vhd

import (
	"bytes"
	"errors"
	"math/rand/v2"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"

	"github.com/vhdkit/vhdkit/disk"
	"github.com/vhdkit/vhdkit/internal/testenv"
)

// below is what a differencing child of parent reads where it holds
// nothing: the parent, then zeros past its end.
func below(parent []byte, off, n int64) []byte {
	b := make([]byte, n)
	if off < int64(len(parent)) {
		copy(b, parent[off:])
	}
	return b
}

// resizeModel is what Resize does to the content: the kept part stays,
// the new part reads as zeros, or as the parent in a differencing image.
func resizeModel(model, parent []byte, size int64) []byte {
	old := int64(len(model))
	if size <= old {
		return model[:size:size]
	}
	m := make([]byte, size)
	copy(m, model)
	if parent != nil {
		copy(m[old:], below(parent, old, size-old))
	}
	return m
}

// Random writes, trims and resizes (grow and shrink, across and within
// blocks) against a []byte model, with reopens and Check.
func TestResizeModel(t *testing.T) {
	for _, c := range modelCases {
		t.Run(c.name, func(t *testing.T) {
			r := rand.New(rand.NewPCG(31, uint64(c.size)+uint64(c.blockSize)))
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
			copy(model, parent)
			bs := int64(c.blockSize)
			if bs == 0 {
				bs = DefaultBlockSize
			}
			resizes := 0
			for step := 0; step < 400; step++ {
				size := int64(len(model))
				off, n := randomRange(r, size, bs)
				switch op := r.IntN(20); {
				case op < 8:
					p := make([]byte, n)
					fill(r, p)
					mustWrite(t, img, p, off)
					copy(model[off:], p)
				case op < 10:
					if err := img.Trim(off, n); err != nil {
						t.Fatal(err)
					}
					if parent != nil {
						copy(model[off:], below(parent, off, n))
					} else {
						clear(model[off : off+n])
					}
				case op < 14:
					// Sizes from a sector to twice the original, often
					// block aligned, often not.
					ns := (r.Int64N(2*c.size/SectorSize) + 1) * SectorSize
					if r.IntN(3) == 0 {
						ns = max(bs, ns/bs*bs)
					}
					if err := img.Resize(ns); err != nil {
						t.Fatalf("step %d: resize %d -> %d: %v", step, size, ns, err)
					}
					model = resizeModel(model, parent, ns)
					resizes++
					if img.Size() != ns {
						t.Fatalf("step %d: size %d after resizing to %d", step, img.Size(), ns)
					}
				case op < 16:
					got := make([]byte, n)
					if _, err := img.ReadAt(got, off); err != nil {
						t.Fatal(err)
					}
					if !bytes.Equal(got, model[off:off+n]) {
						t.Fatalf("step %d: read %d+%d: %s", step, off, n, diffAt(got, model[off:off+n]))
					}
				case op < 17:
					checkExtents(t, img, 0, size, model, parent)
				default:
					mustClose(t, img)
					if img, err = Open(path, OpenOptions{}); err != nil {
						t.Fatalf("step %d: %v", step, err)
					}
					if img.Size() != size {
						t.Fatalf("step %d: reopened with %d bytes, want %d", step, img.Size(), size)
					}
				}
			}
			if got := readAll(t, img); !bytes.Equal(got, model) {
				t.Fatalf("final content: %s", diffAt(got, model))
			}
			mustClose(t, img)
			t.Logf("%d resizes", resizes)
			img, err = Open(path, OpenOptions{ReadOnly: true})
			if err != nil {
				t.Fatal(err)
			}
			if got := readAll(t, img); !bytes.Equal(got, model) {
				t.Fatalf("reopened: %s", diffAt(got, model))
			}
			if c.typ == Fixed {
				if fs := img.Info().FileSize; fs != int64(len(model))+footerSize {
					t.Errorf("fixed file of %d bytes for a %d-byte disk", fs, len(model))
				}
			}
			mustClose(t, img)
			checkClean(t, path)
		})
	}
}

// A shrink leaves data past the new end in the last block; growing again
// must not show it.
func TestResizeRegrowReadsZeros(t *testing.T) {
	for _, typ := range []Type{Fixed, Dynamic, Differencing} {
		t.Run(typ.String(), func(t *testing.T) {
			dir := t.TempDir()
			const size = 1 << 20
			opts := CreateOptions{Type: typ, Size: size, BlockSize: 64 << 10}
			if typ == Differencing {
				// The parent ends before the range the test regrows.
				pp, _ := makeParent(t, rand.New(rand.NewPCG(1, 2)), dir, size/2, 64<<10)
				opts = CreateOptions{Parent: pp, BlockSize: 64 << 10}
			}
			img, err := Create(filepath.Join(dir, "d.vhd"), opts)
			if err != nil {
				t.Fatal(err)
			}
			if typ == Differencing {
				if err := img.Resize(size); err != nil {
					t.Fatal(err)
				}
			}
			mustWrite(t, img, bytes.Repeat([]byte{0xAA}, size), 0)
			// Shrink to mid-block, grow past the block and beyond.
			if err := img.Resize(size/2 + 3*SectorSize); err != nil {
				t.Fatal(err)
			}
			if err := img.Resize(2 * size); err != nil {
				t.Fatal(err)
			}
			want := make([]byte, 2*size)
			copy(want, bytes.Repeat([]byte{0xAA}, size/2+3*SectorSize))
			if got := readAll(t, img); !bytes.Equal(got, want) {
				t.Fatalf("after shrink and grow: %s", diffAt(got, want))
			}
			mustClose(t, img)
		})
	}
}

// A differencing child grown past its parent reads zeros there (the
// parent's ReadAt would refuse the range) and opens without a warning; one
// smaller than its parent is reported.
func TestGrownChild(t *testing.T) {
	dir := t.TempDir()
	base, content := makeImage(t, dir, "base.vhd", CreateOptions{Size: 1 << 20, BlockSize: 64 << 10})
	child := filepath.Join(dir, "child.vhd")
	img, err := Create(child, CreateOptions{Parent: base, BlockSize: 4096})
	if err != nil {
		t.Fatal(err)
	}
	p := img.Parent()
	if _, err := p.ReadAt(make([]byte, 512), 1<<20); !errors.Is(err, disk.ErrOutOfRange) {
		t.Fatalf("parent read past its end: %v", err)
	}
	if err := img.Resize(3<<20 + 512); err != nil {
		t.Fatal(err)
	}
	mustWrite(t, img, []byte("tail"), 3<<20)
	mustClose(t, img)
	img, err = Open(child, OpenOptions{ReadOnly: true})
	if err != nil {
		t.Fatal(err)
	}
	if w := img.Info().Warnings; len(w) > 0 {
		t.Errorf("warnings %q", w)
	}
	want := make([]byte, 3<<20+512)
	copy(want, content)
	copy(want[3<<20:], "tail")
	if got := readAll(t, img); !bytes.Equal(got, want) {
		t.Fatal(diffAt(got, want))
	}
	exts, err := img.Extents(0, img.Size())
	if err != nil {
		t.Fatal(err)
	}
	// Past the parent's end, up to the child's own data: a hole.
	for _, e := range exts {
		if e.Offset < 3<<20 && e.Offset+e.Length > 1<<20 && (e.Type != disk.Hole || e.Depth != 2) {
			t.Errorf("extent %+v past the parent's end", e)
		}
	}
	mustClose(t, img)
	checkClean(t, child)

	img, err = Open(child, OpenOptions{})
	if err != nil {
		t.Fatal(err)
	}
	if err := img.Resize(512 << 10); err != nil {
		t.Fatal(err)
	}
	mustClose(t, img)
	img, err = Open(child, OpenOptions{ReadOnly: true})
	if err != nil {
		t.Fatal(err)
	}
	if w := img.Info().Warnings; len(w) != 1 || !strings.Contains(w[0], "only") {
		t.Errorf("smaller child: warnings %q", w)
	}
	mustClose(t, img)
}

func TestResizeRefused(t *testing.T) {
	dir := t.TempDir()
	path, _ := makeImage(t, dir, "d.vhd", CreateOptions{Size: 1 << 20, BlockSize: 512})
	img, err := Open(path, OpenOptions{})
	if err != nil {
		t.Fatal(err)
	}
	for _, s := range []int64{0, -512, 1000, MaxSize + 512, 64<<20*512 + 512} {
		if err := img.Resize(s); !errors.Is(err, disk.ErrUnsupported) {
			t.Errorf("Resize(%d): %v", s, err)
		}
	}
	// Refusals leave it usable.
	if err := img.Resize(2 << 20); err != nil {
		t.Fatal(err)
	}
	mustClose(t, img)
	img, err = Open(path, OpenOptions{ReadOnly: true})
	if err != nil {
		t.Fatal(err)
	}
	if err := img.Resize(4 << 20); !errors.Is(err, disk.ErrReadOnly) {
		t.Errorf("read-only: %v", err)
	}
	mustClose(t, img)

	// QEMU's old images size disks by geometry: only sizes the geometry
	// describes exactly keep Size what was asked.
	q := filepath.Join(dir, "q.vhd")
	b, err := os.ReadFile(sample(t, "qemu-made/dfvfs-ext2.vhd.gz"))
	if err != nil {
		t.Fatal(err)
	}
	os.WriteFile(q, b, 0o644)
	img, err = Open(q, OpenOptions{})
	if err != nil {
		t.Fatal(err)
	}
	model := readAll(t, img)
	if err := img.Resize(8 << 20); !errors.Is(err, disk.ErrUnsupported) {
		t.Errorf("non-CHS size on a qemu image: %v", err)
	}
	exact := chsExact(8 << 20)
	if err := img.Resize(exact); err != nil || img.Size() != exact {
		t.Fatalf("CHS-exact size: %v, size %d", err, img.Size())
	}
	mustClose(t, img)
	img, err = Open(q, OpenOptions{ReadOnly: true})
	if err != nil {
		t.Fatal(err)
	}
	want := resizeModel(model, nil, exact)
	if got := readAll(t, img); !bytes.Equal(got, want) {
		t.Fatal(diffAt(got, want))
	}
	mustClose(t, img)
	checkClean(t, q)
}

// Resized fixed and dynamic images read the same in qemu-img and 7-Zip,
// libvhdi sees the new size, and QEMU writing into a resized dynamic image
// (header and BAT now at the end) puts its blocks after them: we read its
// writes, Check finds nothing wrong. qemu-img check does not support vpc.
func TestResizeInterop(t *testing.T) {
	testenv.Tool(t, "qemu-img")
	testenv.Tool(t, "qemu-io")
	testenv.Tool(t, "7zz")
	testenv.Tool(t, "vhdiinfo")
	for _, c := range []struct {
		name string
		opts CreateOptions
	}{
		{"fixed", CreateOptions{Type: Fixed}},
		{"dynamic", CreateOptions{Type: Dynamic}},
		{"dynamic-512K", CreateOptions{Type: Dynamic, BlockSize: 512 << 10}},
	} {
		t.Run(c.name, func(t *testing.T) {
			r := rand.New(rand.NewPCG(32, uint64(len(c.name))))
			dir := t.TempDir()
			path := filepath.Join(dir, "d.vhd")
			rawPath := filepath.Join(dir, "model.raw")
			c.opts.Size = uint64(chsExact(9 << 20))
			img, err := Create(path, c.opts)
			if err != nil {
				t.Fatal(err)
			}
			model := sparseContent(r, img.Size())
			mustWrite(t, img, model, 0)
			mustClose(t, img)
			compare := func(step string) {
				t.Helper()
				if err := os.WriteFile(rawPath, model, 0o644); err != nil {
					t.Fatal(err)
				}
				run(t, "qemu-img", "compare", "-f", "raw", "-F", "vpc", rawPath, path)
				if got := qemuVirtualSize(t, path); got != int64(len(model)) {
					t.Errorf("%s: qemu-img sees %d bytes, want %d", step, got, len(model))
				}
				if got := sevenZipExtract(t, path); !bytes.Equal(got, model) {
					t.Errorf("%s: 7-Zip extracts %s", step, diffAt(got, model))
				}
				if out := string(run(t, "vhdiinfo", path)); !strings.Contains(out, "("+itoa(len(model))+" bytes)") {
					t.Errorf("%s: vhdiinfo:\n%s", step, out)
				}
				checkClean(t, path)
			}
			for _, size := range []int64{chsExact(23 << 20), chsExact(5 << 20), chsExact(40 << 20)} {
				img, err := Open(path, OpenOptions{})
				if err != nil {
					t.Fatal(err)
				}
				if err := img.Resize(size); err != nil {
					t.Fatal(err)
				}
				model = resizeModel(model, nil, size)
				p := make([]byte, 300<<10)
				fill(r, p)
				off := size - int64(len(p)) - 4096
				mustWrite(t, img, p, off)
				copy(model[off:], p)
				mustClose(t, img)
				compare("resized to " + itoa(int(size)))

				// QEMU writes into it, in blocks it allocates.
				allocated := func() int64 {
					img, err := Open(path, OpenOptions{ReadOnly: true})
					if err != nil {
						t.Fatal(err)
					}
					defer img.Close()
					return img.Info().AllocatedBlocks
				}
				before := allocated()
				run(t, "qemu-io", "-f", "vpc", "-c", "write -P 0x6b 0 65536", "-c", "write -P 0x3c "+itoa(int(size/2))+" 1048576", path)
				copy(model, bytes.Repeat([]byte{0x6b}, 65536))
				copy(model[size/2:], bytes.Repeat([]byte{0x3c}, 1<<20))
				img, err = Open(path, OpenOptions{ReadOnly: true})
				if err != nil {
					t.Fatal(err)
				}
				if got := readAll(t, img); !bytes.Equal(got, model) {
					t.Fatalf("after qemu-io: %s", diffAt(got, model))
				}
				mustClose(t, img)
				// Past a grown disk's old end its blocks are new.
				if c.opts.Type == Dynamic && size > 9<<20 && allocated() <= before {
					t.Errorf("qemu-io allocated no block (%d before)", before)
				}
				compare("written by qemu-io")
			}
		})
	}
}

func itoa(n int) string { return strconv.Itoa(n) }

// A chain whose layers are all grown alike reads the same in 7-Zip and
// libvhdi. (A child larger than its parent they do not read: both fail at
// the parent's end, where we read zeros.)
func TestResizeChainInterop(t *testing.T) {
	testenv.Tool(t, "7zz")
	r := rand.New(rand.NewPCG(33, 33))
	dir := t.TempDir()
	const bs = 512 << 10
	base, content := makeImage(t, dir, "base.vhd", CreateOptions{Size: 4 << 20, BlockSize: bs})
	child := filepath.Join(dir, "child.vhd")
	model := wholeBlockChild(t, r, child, base, content, bs)
	const size = 7 << 20
	for _, p := range []string{base, child} {
		img, err := Open(p, OpenOptions{NoParent: true})
		if err != nil {
			t.Fatal(err)
		}
		if err := img.Resize(size); err != nil {
			t.Fatal(err)
		}
		// A whole block in the new range of each.
		b := make([]byte, bs)
		fill(r, b)
		off := int64(5<<20) + int64(len(p)%2)*bs
		mustWrite(t, img, b, off)
		if p == base {
			model = resizeModel(model, nil, size)
		}
		copy(model[off:], b)
		mustClose(t, img)
	}
	img, err := Open(child, OpenOptions{ReadOnly: true})
	if err != nil {
		t.Fatal(err)
	}
	if got := readAll(t, img); !bytes.Equal(got, model) {
		t.Fatal(diffAt(got, model))
	}
	mustClose(t, img)
	checkClean(t, child)
	if got := sevenZipExtract(t, child); !bytes.Equal(got, model) {
		t.Errorf("7-Zip extracts %s", diffAt(got, model))
	}
	if got := vhdimountChild(t, child, base); !bytes.Equal(got, model) {
		t.Errorf("vhdimount reads %s", diffAt(got, model))
	}
}

// Readers run while the size changes: each read is checked against the
// size under the same lock, so it either succeeds or reports the range
// out of the disk (run with -race).
func TestResizeConcurrentReads(t *testing.T) {
	path, _ := makeImage(t, t.TempDir(), "d.vhd", CreateOptions{Size: 2 << 20, BlockSize: 64 << 10})
	img, err := Open(path, OpenOptions{})
	if err != nil {
		t.Fatal(err)
	}
	defer mustClose(t, img)
	done := make(chan struct{})
	errs := make(chan error, 4)
	for g := range 4 {
		go func() {
			r := rand.New(rand.NewPCG(uint64(g), 5))
			buf := make([]byte, 8192)
			for {
				select {
				case <-done:
					errs <- nil
					return
				default:
				}
				off := r.Int64N(3 << 20)
				if _, err := img.ReadAt(buf, off); err != nil && !errors.Is(err, disk.ErrOutOfRange) {
					errs <- err
					return
				}
				if _, err := img.Extents(off, 8192); err != nil && !errors.Is(err, disk.ErrOutOfRange) {
					errs <- err
					return
				}
				_ = img.Size()
			}
		}()
	}
	for i := range 40 {
		if err := img.Resize(int64(2<<20 + (i%3)*(512<<10))); err != nil {
			t.Fatal(err)
		}
	}
	close(done)
	for range 4 {
		if err := <-errs; err != nil {
			t.Fatal(err)
		}
	}
}
