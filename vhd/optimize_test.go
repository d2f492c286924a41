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
			res, err := Optimize(path, OptimizeOptions{Full: full})
			if err != nil {
				t.Fatal(err)
			}
			checkOptimized(t, path, content)
			// Quick: the 4 trimmed blocks' space; full: also the 2 blocks of
			// zeros (block 14 keeps data).
			kept := int64(20)
			if full {
				kept = 18
				if res.BlocksReleased != 2 {
					t.Errorf("released %d blocks, want 2", res.BlocksReleased)
				}
			} else if res.BlocksReleased != 0 {
				t.Errorf("quick released %d blocks, want 0", res.BlocksReleased)
			}
			img, err := Open(path, OpenOptions{ReadOnly: true})
			if err != nil {
				t.Fatal(err)
			}
			if n := img.bat.allocated(); n != kept {
				t.Errorf("%d blocks allocated, want %d", n, kept)
			}
			// Nothing after the last block but the footer.
			if want := img.bat.dataEnd(blockSpan) + footerSize; res.FileSizeAfter != want {
				t.Errorf("file is %d bytes, want %d (%+v)", res.FileSizeAfter, want, res)
			}
			mustClose(t, img)
			if res.FileSizeAfter >= res.FileSizeBefore || res.BlocksMoved == 0 {
				t.Errorf("nothing compacted: %+v", res)
			}
			// Again: nothing left to do.
			res2, err := Optimize(path, OptimizeOptions{Full: full})
			if err != nil || res2.BlocksMoved != 0 || res2.BlocksReleased != 0 || res2.FileSizeAfter != res.FileSizeAfter {
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
	dir := t.TempDir()
	const bs = 64 << 10
	ppath, parent := makeParent(t, rand.New(rand.NewPCG(9, 9)), dir, 16*bs, bs)
	child := filepath.Join(dir, "child.vhd")
	img, err := Create(child, CreateOptions{Parent: ppath, BlockSize: bs})
	if err != nil {
		t.Fatal(err)
	}
	content := bytes.Clone(parent)
	for _, bi := range []int64{1, 4, 7, 12} { // the parent's own bytes
		mustWrite(t, img, parent[bi*bs:(bi+1)*bs], bi*bs)
	}
	for _, bi := range []int64{2, 13} { // new bytes
		p := bytes.Repeat([]byte{byte(bi)}, 5000)
		mustWrite(t, img, p, bi*bs+100)
		copy(content[bi*bs+100:], p)
	}
	mustClose(t, img)
	res, err := Optimize(child, OptimizeOptions{Full: true})
	if err != nil {
		t.Fatal(err)
	}
	if res.BlocksReleased != 4 {
		t.Errorf("released %d, want 4: %+v", res.BlocksReleased, res)
	}
	checkOptimized(t, child, content)
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

// After a resize the header and BAT lie at the end of the file: blocks
// move below them, and the gaps left are punched.
func TestOptimizeHeaderAtEnd(t *testing.T) {
	dir := t.TempDir()
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
	mustClose(t, img)
	content = append(content, make([]byte, 2*bs)...)
	copy(content[25*bs:], p)
	res, err := Optimize(path, OptimizeOptions{Full: true})
	if err != nil {
		t.Fatal(err)
	}
	if got := readChain(t, path); !bytes.Equal(got, content) {
		t.Fatalf("content changed: %s", diffAt(got, content))
	}
	// The gap below the header cannot be cut off: it is punched, and
	// Check still sees it as referenced by nothing.
	probs, err := Check(path, false)
	if err != nil || len(probs) != 1 || probs[0].Rule != "file.leak" {
		t.Fatalf("Check: %v %v", probs, err)
	}
	if res.BlocksMoved == 0 || res.BytesPunched == 0 && !res.PunchUnsupported {
		t.Errorf("%+v", res)
	}
}

// Optimize at every crash point: every state reads the content and passes
// the strict Check.
func TestCrashOptimize(t *testing.T) {
	dir := t.TempDir()
	src, content := wasteful(t, dir)
	image, err := os.ReadFile(src)
	if err != nil {
		t.Fatal(err)
	}
	path := filepath.Join(dir, "crash.vhd")
	n := sweep(t, path, image, OpenOptions{}, func(img *Image) error {
		_, err := img.Optimize(OptimizeOptions{Full: true})
		return err
	}, func(t *testing.T, what string) {
		// Optimize never leaves the end of the file without its footer
		// nor the copy at 0 stale (states Check only warns about, since
		// appending writes leave them).
		probs, err := Check(path, false)
		if err != nil {
			t.Fatalf("%s: Check: %v", what, err)
		}
		for _, p := range probs {
			if p.Rule != "file.leak" && p.Rule != "parent" {
				t.Fatalf("%s: Check: %v", what, p)
			}
		}
		afterCrash(t, what, path, func(img *Image) (string, error) {
			// (After recovery afterCrash has written its own tail.)
			if got := readAll(t, img); !bytes.Equal(got, content) {
				return "ok", fmt.Errorf("content %s", diffAt(got, content))
			}
			return "ok", nil
		})
	})
	t.Logf("%d fault points", n)
	if n < 20 {
		t.Errorf("only %d fault points", n)
	}
}
