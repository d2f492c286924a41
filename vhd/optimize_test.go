package vhd

import (
	"bytes"
	"errors"
	"fmt"
	"math/rand/v2"
	"os"
	"path/filepath"
	"testing"

	"github.com/vhdkit/vhdkit/disk"
)

// wasteful builds a dynamic image of 24 blocks of 64 KiB, every block
// written, then: blocks 2, 5, 6, 11 trimmed (their space leaks), blocks 3
// and 9 overwritten with zeros (stored zeros), block 14 partly zeroed. It
// returns the path and the content.
func wasteful(t *testing.T, dir string) (string, []byte) {
	t.Helper()
	const bs = 64 << 10
	path, content := makeImage(t, dir, "w.vhd", CreateOptions{Size: 24 * bs, BlockSize: bs})
	img, err := Open(path, OpenOptions{})
	if err != nil {
		t.Fatal(err)
	}
	r := rand.New(rand.NewPCG(3, 3))
	for bi := int64(0); bi < 24; bi++ {
		p := make([]byte, bs)
		fill(r, p)
		mustWrite(t, img, p, bi*bs)
		copy(content[bi*bs:], p)
	}
	for _, bi := range []int64{2, 5, 6, 11} {
		if err := img.Trim(bi*bs, bs); err != nil {
			t.Fatal(err)
		}
		clear(content[bi*bs : (bi+1)*bs])
	}
	for _, bi := range []int64{3, 9} {
		mustWrite(t, img, make([]byte, bs), bi*bs)
		clear(content[bi*bs : (bi+1)*bs])
	}
	mustWrite(t, img, make([]byte, 4096), 14*bs+8192)
	clear(content[14*bs+8192 : 14*bs+12288])
	mustClose(t, img)
	return path, content
}

func checkOptimized(t *testing.T, path string, content []byte) {
	t.Helper()
	if got := readChain(t, path); !bytes.Equal(got, content) {
		t.Fatalf("content changed: %s", diffAt(got, content))
	}
	if probs, err := Check(path, false); err != nil || len(probs) > 0 {
		t.Fatalf("Check: %v %v", probs, err)
	}
}

func TestOptimizeDynamic(t *testing.T) {
	const bs = 64 << 10
	blockSpan := int64(bs + 512)
	for _, full := range []bool{false, true} {
		t.Run(fmt.Sprintf("full=%v", full), func(t *testing.T) {
			dir := t.TempDir()
			path, content := wasteful(t, dir)
			var last [2]int64
			progress := func(done, total int64) {
				if done < last[0] || total < last[1] || done > total {
					t.Errorf("progress %d/%d after %d/%d", done, total, last[0], last[1])
				}
				last = [2]int64{done, total}
			}
			res, err := Optimize(path, OptimizeOptions{Full: full, Progress: progress})
			if err != nil {
				t.Fatal(err)
			}
			if want := int64(24 + res.Moved); last != [2]int64{want, want} {
				t.Errorf("progress ended at %v, want %d steps", last, want)
			}
			checkOptimized(t, path, content)
			// Quick: the 4 trimmed blocks' space; full: also the 2 blocks of
			// zeros (block 14 keeps data).
			kept := int64(20)
			if full {
				kept = 18
				if res.Released != 2 {
					t.Errorf("released %d blocks, want 2", res.Released)
				}
			} else if res.Released != 0 {
				t.Errorf("quick released %d blocks, want 0", res.Released)
			}
			img, err := Open(path, OpenOptions{ReadOnly: true})
			if err != nil {
				t.Fatal(err)
			}
			if n := img.bat.allocated(); n != kept {
				t.Errorf("%d blocks allocated, want %d", n, kept)
			}
			// Nothing after the last block but the footer.
			if want := img.bat.dataEnd(blockSpan) + footerSize; res.SizeAfter != want {
				t.Errorf("file is %d bytes, want %d (%+v)", res.SizeAfter, want, res)
			}
			mustClose(t, img)
			if res.SizeAfter >= res.SizeBefore || res.Moved == 0 {
				t.Errorf("nothing compacted: %+v", res)
			}
			// Again: nothing left to do.
			res2, err := Optimize(path, OptimizeOptions{Full: full})
			if err != nil || res2.Moved != 0 || res2.Released != 0 || res2.SizeAfter != res.SizeAfter {
				t.Errorf("second run: %+v %v", res2, err)
			}
			// QEMU and 7-Zip read the same disk.
			if _, err := os.Stat("/usr/bin/qemu-img"); err == nil {
				raw := filepath.Join(dir, "want.raw")
				os.WriteFile(raw, content, 0o600)
				run(t, "qemu-img", "compare", "-f", "raw", "-F", "vpc", raw, path)
			}
		})
	}
}

// A differencing child: full mode releases blocks that store exactly the
// parent's bytes, and keeps those that differ.
func TestOptimizeDifferencing(t *testing.T) {
	child, _, content := releasableChild(t, t.TempDir())
	res, err := Optimize(child, OptimizeOptions{Full: true})
	if err != nil {
		t.Fatal(err)
	}
	if res.Released != 4 {
		t.Errorf("released %d, want 4: %+v", res.Released, res)
	}
	checkOptimized(t, child, content)
}

// releasableChild builds a differencing child of 16 blocks of 64 KiB
// whose blocks 1, 4, 7 and 12 store the parent's own bytes and blocks 2
// and 13 new ones; it returns the child's and the parent's paths and the
// content.
func releasableChild(t *testing.T, dir string) (child, parent string, content []byte) {
	t.Helper()
	const bs = 64 << 10
	parent, below := makeParent(t, rand.New(rand.NewPCG(9, 9)), dir, 16*bs, bs)
	child = filepath.Join(dir, "child.vhd")
	img, err := Create(child, CreateOptions{Parent: parent, BlockSize: bs})
	if err != nil {
		t.Fatal(err)
	}
	content = bytes.Clone(below)
	for _, bi := range []int64{1, 4, 7, 12} { // the parent's own bytes
		mustWrite(t, img, below[bi*bs:(bi+1)*bs], bi*bs)
	}
	for _, bi := range []int64{2, 13} { // new bytes
		p := bytes.Repeat([]byte{byte(bi)}, 5000)
		mustWrite(t, img, p, bi*bs+100)
		copy(content[bi*bs+100:], p)
	}
	mustClose(t, img)
	return child, parent, content
}

func TestOptimizeRefused(t *testing.T) {
	dir := t.TempDir()
	path, _ := makeImage(t, dir, "d.vhd", CreateOptions{Size: 1 << 20})
	img, err := Open(path, OpenOptions{})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := Optimize(path, OptimizeOptions{}); err == nil {
		t.Error("optimized a file open for writing")
	}
	mustClose(t, img)
	fixed, _ := makeImage(t, dir, "f.vhd", CreateOptions{Type: Fixed, Size: 1 << 20})
	if _, err := Optimize(fixed, OptimizeOptions{}); !errors.Is(err, disk.ErrUnsupported) {
		t.Errorf("fixed: %v", err)
	}
}

// headerAtEnd is wasteful's image grown by a Resize, which moves the
// header and the BAT to the end of the file, with a block written after
// them; it returns the path and the content.
func headerAtEnd(t *testing.T, dir string) (string, []byte) {
	t.Helper()
	path, content := wasteful(t, dir)
	img, err := Open(path, OpenOptions{})
	if err != nil {
		t.Fatal(err)
	}
	const bs = 64 << 10
	if err := img.Resize(26 * bs); err != nil {
		t.Fatal(err)
	}
	p := bytes.Repeat([]byte{0xAB}, bs)
	mustWrite(t, img, p, 25*bs) // a block after the header
	if img.hdrOff < 20*bs {
		t.Fatalf("header at %#x after a resize", img.hdrOff)
	}
	mustClose(t, img)
	content = append(content, make([]byte, 2*bs)...)
	copy(content[25*bs:], p)
	return path, content
}

// After a resize the header and BAT lie near the end of the file: they
// move down into the space released, the blocks below them, and the file
// ends after the last structure; the same for a differencing child whose
// header SetParent moved.
func TestOptimizeHeaderAtEnd(t *testing.T) {
	dir := t.TempDir()
	path, content := headerAtEnd(t, dir)
	res, err := Optimize(path, OptimizeOptions{Full: true})
	if err != nil {
		t.Fatal(err)
	}
	checkOptimized(t, path, content)
	img, err := Open(path, OpenOptions{ReadOnly: true})
	if err != nil {
		t.Fatal(err)
	}
	if want := img.usedEnd() + footerSize; res.SizeAfter != want || img.hdrOff > 4*(64<<10) {
		t.Errorf("file is %d bytes (want %d), header at %#x: %+v", res.SizeAfter, want, img.hdrOff, res)
	}
	mustClose(t, img)

	base, child := makeChain(t, t.TempDir())
	img, err = Open(child, OpenOptions{})
	if err != nil {
		t.Fatal(err)
	}
	if err := img.SetParent(base); err != nil {
		t.Fatal(err)
	}
	mustClose(t, img)
	want := readChain(t, child)
	if _, err := Optimize(child, OptimizeOptions{Full: true}); err != nil {
		t.Fatal(err)
	}
	checkOptimized(t, child, want)
	img, err = Open(child, OpenOptions{ReadOnly: true})
	if err != nil {
		t.Fatal(err)
	}
	if l := img.Info().ParentLocators; len(l) != 2 || l[0].Path != base || img.hdrOff != footerSize {
		t.Errorf("header at %#x, locators %+v", img.hdrOff, l)
	}
	mustClose(t, img)
}
