package vhd

import (
	"bytes"
	"encoding/binary"
	"encoding/json"
	"fmt"
	"math/rand/v2"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	"github.com/vhdkit/vhdkit/disk"
	"github.com/vhdkit/vhdkit/internal/testenv"
)

// chsExact returns the smallest size ≥ approx (in sectors) that the
// spec's geometry describes exactly, so that every reader agrees on it.
func chsExact(approx int64) int64 {
	for s := alignUp(approx, SectorSize); ; s += SectorSize {
		if GeometryFor(s).Size() == s {
			return s
		}
	}
}

// sparseContent makes a disk's worth of bytes: runs of patterns and of
// zeros, so that dynamic images get unallocated blocks and partial
// bitmaps.
func sparseContent(r *rand.Rand, size int64) []byte {
	b := make([]byte, size)
	for off := int64(0); off < size; {
		n := min(size-off, int64(r.IntN(300<<10)+1))
		if r.IntN(3) != 0 {
			fill(r, b[off:off+n])
		}
		off += n
	}
	return b
}

func qemuVirtualSize(t *testing.T, path string) int64 {
	t.Helper()
	var info struct {
		VirtualSize int64 `json:"virtual-size"`
	}
	if err := json.Unmarshal(run(t, "qemu-img", "info", "-f", "vpc", "--output=json", path), &info); err != nil {
		t.Fatal(err)
	}
	return info.VirtualSize
}

// sevenZipExtract returns the flattened disk 7-Zip extracts from a VHD:
// -tvhd makes it hand over the disk itself rather than open the
// partitions inside, -so writes it to stdout.
func sevenZipExtract(t *testing.T, path string) []byte {
	t.Helper()
	cmd := exec.Command("7zz", "e", "-tvhd", "-so", filepath.Base(path))
	cmd.Dir = filepath.Dir(path)
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	out, err := cmd.Output()
	if err != nil {
		t.Fatalf("7zz e %s: %v\n%s", path, err, stderr.Bytes())
	}
	return out
}

// Images made and written by QEMU read back byte for byte, and QEMU reads
// what we then write into them.
func TestQemuMadeImages(t *testing.T) {
	testenv.Tool(t, "qemu-img")
	testenv.Tool(t, "qemu-io")
	for _, kind := range []struct {
		name string
		opts []string
	}{
		{"dynamic", nil},
		{"fixed", []string{"-o", "subformat=fixed"}},
		{"force_size", []string{"-o", "force_size=on"}},
	} {
		t.Run(kind.name, func(t *testing.T) {
			r := rand.New(rand.NewPCG(1, uint64(len(kind.name))))
			dir := t.TempDir()
			src := sparseContent(r, 9<<20+7*512)
			srcPath := filepath.Join(dir, "src.raw")
			if err := os.WriteFile(srcPath, src, 0o644); err != nil {
				t.Fatal(err)
			}
			q := filepath.Join(dir, "q.vhd")
			run(t, "qemu-img", append(append([]string{"convert", "-f", "raw", "-O", "vpc"}, kind.opts...), srcPath, q)...)
			run(t, "qemu-io", "-f", "vpc",
				"-c", "write -P 0x5a 1000448 4096",
				"-c", "write -P 0xa5 5242880 512",
				"-c", "write -P 0x33 8390656 70000",
				"-c", "write -P 0x71 12345 678",
				q)
			wantPath := filepath.Join(dir, "want.raw")
			run(t, "qemu-img", "convert", "-f", "vpc", "-O", "raw", q, wantPath)
			want, err := os.ReadFile(wantPath)
			if err != nil {
				t.Fatal(err)
			}

			img, err := Open(q, OpenOptions{ReadOnly: true})
			if err != nil {
				t.Fatal(err)
			}
			if img.Size() != int64(len(want)) || img.Size() != qemuVirtualSize(t, q) {
				t.Fatalf("size %d, qemu says %d", img.Size(), len(want))
			}
			if got := readAll(t, img); !bytes.Equal(got, want) {
				t.Fatalf("content differs from qemu's: %s", diffAt(got, want))
			}
			if got := hashImage(t, img); got != md5hex(want) {
				t.Fatalf("extent-wise content differs")
			}
			mustClose(t, img)

			// Now we write into QEMU's image; QEMU must read it.
			img, err = Open(q, OpenOptions{})
			if err != nil {
				t.Fatal(err)
			}
			for i := 0; i < 40; i++ {
				off := r.Int64N(img.Size() - 1)
				n := min(img.Size()-off, r.Int64N(100<<10)+1)
				p := make([]byte, n)
				fill(r, p)
				mustWrite(t, img, p, off)
				copy(want[off:], p)
			}
			mustClose(t, img)
			if err := os.WriteFile(wantPath, want, 0o644); err != nil {
				t.Fatal(err)
			}
			run(t, "qemu-img", "compare", "-f", "raw", "-F", "vpc", wantPath, q)
		})
	}
}

// Our fixed and dynamic images read correctly in qemu-img and 7-Zip.
func TestOursReadByQemuAnd7zip(t *testing.T) {
	testenv.Tool(t, "qemu-img")
	testenv.Tool(t, "7zz")
	size := chsExact(11 << 20)
	for _, c := range []struct {
		name string
		opts CreateOptions
	}{
		{"fixed", CreateOptions{Type: Fixed}},
		{"dynamic", CreateOptions{Type: Dynamic}},
		{"dynamic-512K", CreateOptions{Type: Dynamic, BlockSize: 512 << 10}},
	} {
		t.Run(c.name, func(t *testing.T) {
			r := rand.New(rand.NewPCG(2, uint64(len(c.name))))
			dir := t.TempDir()
			src := sparseContent(r, size)
			path := filepath.Join(dir, "ours.vhd")
			c.opts.Size = uint64(size)
			img, err := Create(path, c.opts)
			if err != nil {
				t.Fatal(err)
			}
			// Written in unaligned pieces, in random order, skipping zeros
			// like a converter.
			type piece struct{ off, n int64 }
			var pieces []piece
			for off := int64(0); off < size; {
				n := min(size-off, r.Int64N(200<<10)+1)
				pieces = append(pieces, piece{off, n})
				off += n
			}
			r.Shuffle(len(pieces), func(i, j int) { pieces[i], pieces[j] = pieces[j], pieces[i] })
			for _, p := range pieces {
				if !disk.IsZero(src[p.off : p.off+p.n]) {
					mustWrite(t, img, src[p.off:p.off+p.n], p.off)
				}
			}
			mustClose(t, img)
			srcPath := filepath.Join(dir, "src.raw")
			if err := os.WriteFile(srcPath, src, 0o644); err != nil {
				t.Fatal(err)
			}
			run(t, "qemu-img", "compare", "-f", "raw", "-F", "vpc", srcPath, path)
			if got := qemuVirtualSize(t, path); got != size {
				t.Errorf("qemu-img sees %d bytes, want %d", got, size)
			}
			if got := sevenZipExtract(t, path); !bytes.Equal(got, src) {
				t.Errorf("7-Zip extracts different content: %s", diffAt(got, src))
			}
			if c.opts.Type == Fixed {
				// Exactly the data plus the footer.
				if fi, err := os.Stat(path); err != nil || fi.Size() != size+footerSize {
					t.Errorf("fixed file is %d bytes", fi.Size())
				}
			}
		})
	}
}

// A three-level chain with partial sector bitmaps extracts identically in
// 7-Zip, which follows the W2ru locators and checks the unique ids.
func TestDifferencingChain7zip(t *testing.T) {
	testenv.Tool(t, "7zz")
	r := rand.New(rand.NewPCG(3, 3))
	dir := t.TempDir()
	size := chsExact(7 << 20)
	model := make([]byte, size)
	paths := []string{filepath.Join(dir, "base.vhd"), filepath.Join(dir, "child1.avhd"), filepath.Join(dir, "child2.vhd")}
	var models [][]byte
	for level, path := range paths {
		opts := CreateOptions{Size: uint64(size)}
		if level > 0 {
			opts = CreateOptions{Parent: paths[level-1]}
		}
		img, err := Create(path, opts)
		if err != nil {
			t.Fatal(err)
		}
		for i := 0; i < 25; i++ {
			off := r.Int64N(size)
			var n int64
			switch r.IntN(3) {
			case 0:
				n = r.Int64N(600) + 1 // inside or across a sector or two
			case 1:
				n = r.Int64N(64<<10) + 1
			default:
				n = r.Int64N(3<<20) + 1
			}
			n = min(n, size-off)
			p := make([]byte, n)
			fill(r, p)
			mustWrite(t, img, p, off)
			copy(model[off:], p)
		}
		if level == 2 {
			// Trim a stretch back to the parent and zero another.
			off := r.Int64N(size / 2)
			if err := img.Trim(off, 1<<20+333); err != nil {
				t.Fatal(err)
			}
			parent := models[1]
			copy(model[off:off+1<<20+333], parent[off:])
			off2 := size/2 + r.Int64N(size/4)
			if err := img.WriteZeroes(off2, 70000, true); err != nil {
				t.Fatal(err)
			}
			clear(model[off2 : off2+70000])
		}
		if got := readAll(t, img); !bytes.Equal(got, model) {
			t.Fatalf("level %d reads wrong: %s", level, diffAt(got, model))
		}
		mustClose(t, img)
		models = append(models, bytes.Clone(model))
	}
	for level, path := range paths {
		img, err := Open(path, OpenOptions{ReadOnly: true})
		if err != nil {
			t.Fatal(err)
		}
		if got := readAll(t, img); !bytes.Equal(got, models[level]) {
			t.Fatalf("level %d reopened reads wrong: %s", level, diffAt(got, models[level]))
		}
		if got := hashImage(t, img); got != md5hex(models[level]) {
			t.Fatalf("level %d: extent-wise content differs", level)
		}
		if n := len(img.Info().Chain); n != level+1 {
			t.Errorf("level %d: chain of %d", level, n)
		}
		mustClose(t, img)
		if got := sevenZipExtract(t, path); !bytes.Equal(got, models[level]) {
			t.Errorf("7-Zip extracts level %d differently: %s", level, diffAt(got, models[level]))
		}
	}
}

// libvhdi's vhdiinfo agrees on the metadata of our images (its data
// reading is not used: version 20210425 misreads partial bitmaps).
func TestVhdiinfo(t *testing.T) {
	testenv.Tool(t, "vhdiinfo")
	dir := t.TempDir()
	size := chsExact(3 << 20)
	base, _ := makeImage(t, dir, "base.vhd", CreateOptions{Size: uint64(size)})
	fixed, _ := makeImage(t, dir, "fixed.vhd", CreateOptions{Type: Fixed, Size: uint64(size)})
	child := filepath.Join(dir, "child.vhd")
	img, err := Create(child, CreateOptions{Parent: base})
	if err != nil {
		t.Fatal(err)
	}
	mustClose(t, img)
	for _, c := range []struct{ path, typ string }{{base, "Dynamic"}, {fixed, "Fixed"}, {child, "Differential"}} {
		out := string(run(t, "vhdiinfo", c.path))
		img, err := Open(c.path, OpenOptions{ReadOnly: true})
		if err != nil {
			t.Fatal(err)
		}
		info := img.Info()
		img.Close()
		want := []string{
			"Disk type\t\t: " + c.typ,
			fmt.Sprintf("(%d bytes)", size),
			"Identifier\t\t: " + info.UniqueID.String(),
		}
		if c.path == child {
			want = append(want, "Parent identifier\t: "+info.ParentUniqueID.String(), "Parent filename\t\t: "+base)
		}
		for _, w := range want {
			if !strings.Contains(out, w) {
				t.Errorf("%s: vhdiinfo lacks %q:\n%s", c.path, w, out)
			}
		}
	}
}

// Writing into Hyper-V's images (its block alignment, its locator space)
// keeps them readable by 7-Zip and, for the dynamic one, qemu-img.
func TestWriteIntoHyperVImages(t *testing.T) {
	testenv.Tool(t, "7zz")
	testenv.Tool(t, "qemu-img")
	dir := t.TempDir()
	cp := func(rel, name string) string {
		b, err := os.ReadFile(sample(t, rel))
		if err != nil {
			t.Fatal(err)
		}
		p := filepath.Join(dir, name)
		if err := os.WriteFile(p, b, 0o644); err != nil {
			t.Fatal(err)
		}
		return p
	}
	dyn := cp("hyperv/dynamic.vhd.gz", "dynamic.vhd")
	cp("synthetic-parents/fat-parent.vhd.gz", "fat-parent.vhd")
	diff := cp("hyperv/fat-differential.vhd.gz", "fat-differential.vhd")
	r := rand.New(rand.NewPCG(12, 12))
	for _, path := range []string{dyn, diff} {
		img, err := Open(path, OpenOptions{})
		if err != nil {
			t.Fatal(err)
		}
		model := readAll(t, img)
		for range 30 {
			off, n := randomRange(r, img.Size(), DefaultBlockSize)
			p := make([]byte, n)
			fill(r, p)
			mustWrite(t, img, p, off)
			copy(model[off:], p)
		}
		mustClose(t, img)
		if got := sevenZipExtract(t, path); !bytes.Equal(got, model) {
			t.Errorf("%s: 7-Zip reads %s", path, diffAt(got, model))
		}
		if path == dyn {
			raw := filepath.Join(dir, "model.raw")
			os.WriteFile(raw, model, 0o644)
			run(t, "qemu-img", "compare", "-f", "raw", "-F", "vpc", raw, path)
		}
		probs, err := Check(path, false)
		if err != nil {
			t.Fatal(err)
		}
		for _, p := range probs {
			if !p.Warning {
				t.Errorf("%s: %v", path, p)
			}
		}
	}
}

// Sizes the spec's geometry does not describe exactly read in full in
// QEMU (7.2 sizes an unknown creator's VHD by its geometry): the last
// sector written by us reads back in qemu-io, qemu-img sees the size we
// made, and a disk copied from a raw file of such a size — a GPT disk
// whose backup header is its last sector — compares equal to it, size
// included.
func TestInexactSizesReadInFullByQemu(t *testing.T) {
	testenv.Tool(t, "qemu-img")
	testenv.Tool(t, "qemu-io")
	for _, c := range []struct {
		name string
		typ  Type
		size int64
	}{
		{"fixed-8MiB", Fixed, 8 << 20},
		{"dynamic-8MiB", Dynamic, 8 << 20},
		{"dynamic-1GiB+3584", Dynamic, 1<<30 + 3584},
		{"fixed-10MiB+512", Fixed, 10<<20 + 512},
		{"dynamic-exact", Dynamic, chsExact(5 << 20)},
		{"dynamic-150GiB", Dynamic, 150 << 30}, // beyond CHS
	} {
		t.Run(c.name, func(t *testing.T) {
			dir := t.TempDir()
			path := filepath.Join(dir, "d.vhd")
			img, err := Create(path, CreateOptions{Type: c.typ, Size: uint64(c.size)})
			if err != nil {
				t.Fatal(err)
			}
			if img.Size() != c.size {
				t.Fatalf("Size() = %d, want %d", img.Size(), c.size)
			}
			if g := img.ft.Geometry; GeometryFor(c.size).Size() == c.size && g != GeometryFor(c.size) {
				t.Errorf("exact size %d got geometry %v, want the spec's %v", c.size, g, GeometryFor(c.size))
			}
			last := bytes.Repeat([]byte{0x5A}, SectorSize)
			mustWrite(t, img, last, c.size-SectorSize)
			mustWrite(t, img, bytes.Repeat([]byte{0x33}, SectorSize), 0)
			mustClose(t, img)
			if got := qemuVirtualSize(t, path); got != c.size {
				t.Errorf("qemu-img sees %d bytes, want %d", got, c.size)
			}
			out := string(run(t, "qemu-io", "-f", "vpc", "-r", "-c", fmt.Sprintf("read -P 0x5a %d %d", c.size-SectorSize, SectorSize), path))
			if strings.Contains(out, "Pattern verification failed") || !strings.Contains(out, "read 512/512 bytes") {
				t.Errorf("qemu-io reading the last sector:\n%s", out)
			}
			if probs, err := Check(path, false); err != nil || len(probs) > 0 {
				t.Errorf("Check: %v %v", probs, err)
			}
			if c.size > 1<<30+4096 {
				return // the copy below would write a large file
			}
			// A raw disk of that size with data at both ends, copied as
			// convert does, compares equal in qemu-img, at the same size.
			rawPath := filepath.Join(dir, "src.img")
			rf, err := os.Create(rawPath)
			if err != nil {
				t.Fatal(err)
			}
			head := bytes.Repeat([]byte{0x11}, 64<<10)
			tail := bytes.Repeat([]byte{0x22}, 16<<10) // the GPT backup's place
			rf.WriteAt(head, 0)
			rf.WriteAt(tail, c.size-int64(len(tail)))
			mustClose(t, rf)
			conv := filepath.Join(dir, "conv.vhd")
			img, err = Create(conv, CreateOptions{Type: c.typ, Size: uint64(c.size)})
			if err != nil {
				t.Fatal(err)
			}
			mustWrite(t, img, head, 0)
			mustWrite(t, img, tail, c.size-int64(len(tail)))
			mustClose(t, img)
			run(t, "qemu-img", "compare", "-f", "raw", "-F", "vpc", rawPath, conv)
			if got := qemuVirtualSize(t, conv); got != c.size {
				t.Errorf("converted: qemu-img sees %d bytes, want %d", got, c.size)
			}
		})
	}
}

// Resize to a size the geometry does not describe exactly: QEMU sees the
// new size.
func TestResizeInexactReadInFullByQemu(t *testing.T) {
	testenv.Tool(t, "qemu-img")
	dir := t.TempDir()
	for _, typ := range []Type{Fixed, Dynamic} {
		path := filepath.Join(dir, typ.String()+".vhd")
		img, err := Create(path, CreateOptions{Type: typ, Size: 4 << 20})
		if err != nil {
			t.Fatal(err)
		}
		mustClose(t, img)
		for _, size := range []int64{9<<20 + 512, 6 << 20} {
			img, err := Open(path, OpenOptions{})
			if err != nil {
				t.Fatal(err)
			}
			if err := img.Resize(size); err != nil {
				t.Fatal(err)
			}
			mustClose(t, img)
			if got := qemuVirtualSize(t, path); got != size {
				t.Errorf("%v resized to %d: qemu-img sees %d", typ, size, got)
			}
		}
	}
}

// An image an older vhdkit made (its footer geometry rounded down from a
// size it does not describe) reads short in QEMU; Check warns and Check
// with repair gives it the geometry Create writes now.
func TestRepairShortGeometry(t *testing.T) {
	testenv.Tool(t, "qemu-img")
	dir := t.TempDir()
	for _, typ := range []Type{Fixed, Dynamic} {
		path, _ := makeImage(t, dir, typ.String()+".vhd", CreateOptions{Type: typ, Size: 8 << 20})
		b, err := os.ReadFile(path)
		if err != nil {
			t.Fatal(err)
		}
		ats := []int{len(b) - footerSize}
		if typ != Fixed {
			ats = append(ats, 0)
		}
		for _, at := range ats {
			f := b[at : at+footerSize]
			GeometryFor(8 << 20).encode(f[56:])
			binary.BigEndian.PutUint32(f[footerChecksumAt:], checksum(f, footerChecksumAt))
		}
		os.WriteFile(path, b, 0o600)
		if got := qemuVirtualSize(t, path); got == 8<<20 {
			t.Fatalf("%v: the old geometry reads whole in QEMU", typ)
		}
		probs, err := Check(path, false)
		if err != nil || len(probs) != 1 || probs[0].Rule != "footer.geometry-short" || !probs[0].Warning {
			t.Fatalf("%v: Check: %v %v", typ, probs, err)
		}
		if _, err := Check(path, true); err != nil {
			t.Fatal(err)
		}
		if probs, err := Check(path, false); err != nil || len(probs) > 0 {
			t.Errorf("%v: after repair: %v %v", typ, probs, err)
		}
		if got := qemuVirtualSize(t, path); got != 8<<20 {
			t.Errorf("%v: after repair QEMU sees %d bytes", typ, got)
		}
	}
}
