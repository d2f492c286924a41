package imagecopy_test

import (
	"bytes"
	"context"
	"errors"
	"math/rand/v2"
	"path/filepath"
	"testing"

	"github.com/vhdkit/vhdkit/disk"
	"github.com/vhdkit/vhdkit/imagecopy"
	"github.com/vhdkit/vhdkit/internal/testenv"
	"github.com/vhdkit/vhdkit/raw"
	"github.com/vhdkit/vhdkit/storage"
	"github.com/vhdkit/vhdkit/vhd"
	"github.com/vhdkit/vhdkit/vhdx"
)

const diskSize = 48 << 20

// chain makes base.vhdx (8 MiB blocks) and child.avhdx over it in dir,
// written so that the child holds every shape a copy meets: whole 2 MiB
// blocks (cloneable), partially present blocks with 4 KiB and unaligned
// 512-byte runs, declared zeros, data that is zeros; and returns the
// child open read-only with the bytes it reads.
func chain(t *testing.T, dir string) (*vhdx.Image, []byte) {
	return chainSectors(t, dir, 512)
}

// chainSectors is chain with logical sectors of sector bytes.
func chainSectors(t *testing.T, dir string, sector uint32) (*vhdx.Image, []byte) {
	t.Helper()
	model := make([]byte, diskSize)
	rng := rand.New(rand.NewPCG(7, 7))
	fill := func(p []byte) {
		for i := range p {
			p[i] = byte(rng.Uint32() | 1)
		}
	}
	base, err := vhdx.Create(filepath.Join(dir, "base.vhdx"), vhdx.CreateOptions{Size: diskSize, BlockSize: 8 << 20, LogicalSectorSize: sector})
	if err != nil {
		t.Fatal(err)
	}
	write := func(im *vhdx.Image, off, n int64) {
		t.Helper()
		p := make([]byte, n)
		fill(p)
		if _, err := im.WriteAt(p, off); err != nil {
			t.Fatal(err)
		}
		copy(model[off:], p)
	}
	write(base, 0, 20<<20)
	write(base, 30<<20, 3<<20)
	if err := base.Flush(); err != nil {
		t.Fatal(err)
	}
	child, err := base.CreateChild(filepath.Join(dir, "child.avhdx"), vhdx.CreateOptions{})
	if err != nil {
		t.Fatal(err)
	}
	write(child, 2<<20, 6<<20)      // whole blocks
	write(child, 10<<20+4096, 8192) // partial, aligned
	write(child, 12<<20+512, 1536)  // partial, unaligned sectors
	write(child, 36<<20, 2<<20)     // whole block over the parent's hole
	if _, err := child.WriteAt(make([]byte, 2<<20), 40<<20); err != nil {
		t.Fatal(err) // data that reads as zeros
	}
	if err := child.WriteZeroes(16<<20, 2<<20, true); err != nil {
		t.Fatal(err)
	}
	clear(model[16<<20 : 18<<20])
	if err := child.Close(); err != nil {
		t.Fatal(err)
	}
	im, err := vhdx.Open(filepath.Join(dir, "child.avhdx"), vhdx.OpenOptions{ReadOnly: true})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { im.Close() })
	return im, model
}

func extents(t *testing.T, im disk.Image) []disk.Extent {
	t.Helper()
	exts, err := im.(disk.Extenter).Extents(0, im.Size())
	if err != nil {
		t.Fatal(err)
	}
	return exts
}

func readAll(t *testing.T, im disk.Image) []byte {
	t.Helper()
	b := make([]byte, im.Size())
	if _, err := im.ReadAt(b, 0); err != nil {
		t.Fatal(err)
	}
	return b
}

// checkStats checks that every byte of the extents was accounted once.
func checkStats(t *testing.T, st imagecopy.Stats, total int64) {
	t.Helper()
	if got := st.Moved.Total() + st.Zeroed + st.Skipped; got != total {
		t.Fatalf("stats %+v account for %d bytes, want %d", st, got, total)
	}
}

// TestCopyFlattens copies a chain into fresh and written targets of each
// kind, moving data file to file or reading it, and checks every byte.
func TestCopyFlattens(t *testing.T) {
	for _, tc := range []struct {
		name   string
		target string // vhdx, raw, or written (a VHDX holding other data)
		opts   imagecopy.Options
	}{
		{"vhdx-move", "vhdx", imagecopy.Options{Fresh: true}},
		{"vhdx-detect-zeros", "vhdx", imagecopy.Options{Fresh: true, DetectZeros: true}},
		{"vhdx-nomove", "vhdx", imagecopy.Options{Fresh: true, NoMove: true}},
		{"raw-move", "raw", imagecopy.Options{Fresh: true}},
		{"written-move", "written", imagecopy.Options{}},
		{"written-detect-zeros", "written", imagecopy.Options{DetectZeros: true}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			dir := t.TempDir()
			src, model := chain(t, dir)
			dst := target(t, dir, tc.target)
			exts := extents(t, src)
			st, err := imagecopy.Copy(context.Background(), dst, src, exts, tc.opts)
			if err != nil {
				t.Fatal(err)
			}
			checkStats(t, st, diskSize)
			// Moving data read for zero detection stops at the first
			// range the file system does not clone (the bytes are in
			// memory already).
			if !tc.opts.NoMove && !tc.opts.DetectZeros && st.KernelCopied+st.Cloned < 8<<20 ||
				tc.opts.DetectZeros && st.KernelCopied+st.Cloned == 0 {
				t.Fatalf("%+v: the child's whole blocks were not moved file to file", st)
			}
			if tc.opts.NoMove && st.KernelCopied+st.Cloned != 0 {
				t.Fatalf("%+v: NoMove moved file ranges", st)
			}
			if err := dst.Flush(); err != nil {
				t.Fatal(err)
			}
			if !bytes.Equal(readAll(t, dst), model) {
				t.Fatal("the target differs from the source")
			}
			t.Logf("%+v", st)
		})
	}
}

// target makes the kind of target a test copies into.
func target(t *testing.T, dir, kind string) disk.Image {
	t.Helper()
	var dst disk.Image
	var err error
	switch kind {
	case "raw":
		dst, err = raw.Create(filepath.Join(dir, "dst.img"), diskSize)
	default:
		var im *vhdx.Image
		im, err = vhdx.Create(filepath.Join(dir, "dst.vhdx"), vhdx.CreateOptions{Size: diskSize})
		if err == nil && kind == "written" {
			// Data everywhere, which the copy must replace, zeros too.
			_, err = im.WriteAt(bytes.Repeat([]byte{0xEE}, diskSize), 0)
		}
		dst = im
	}
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { dst.Close() })
	return dst
}

// TestCopyResumes stops a copy midway (cancelled after its first durable
// report) and resumes it from there.
func TestCopyResumes(t *testing.T) {
	dir := t.TempDir()
	src, model := chain(t, dir)
	dst := target(t, dir, "written")
	exts := extents(t, src)
	ctx, cancel := context.WithCancel(context.Background())
	durable := int64(-1)
	var progress []imagecopy.Progress
	_, err := imagecopy.Copy(ctx, dst, src, exts, imagecopy.Options{
		DurableEvery: 1, // every piece
		Durable:      func(off int64) { durable = off; cancel() },
		Progress:     func(p imagecopy.Progress) { progress = append(progress, p) },
	})
	if !errors.Is(err, context.Canceled) {
		t.Fatalf("cancelled copy: %v", err)
	}
	if durable <= 0 || durable >= diskSize {
		t.Fatalf("durable offset %d", durable)
	}
	if len(progress) == 0 || progress[0].Total != diskSize {
		t.Fatalf("progress %+v", progress)
	}
	var resumed []imagecopy.Progress
	if _, err := imagecopy.Copy(context.Background(), dst, src, exts, imagecopy.Options{From: durable,
		Progress: func(p imagecopy.Progress) { resumed = append(resumed, p) }}); err != nil {
		t.Fatal(err)
	}
	if resumed[0].Done != durable || resumed[len(resumed)-1].Done != diskSize {
		t.Fatalf("resumed progress from %d to %d, want %d to %d", resumed[0].Done, resumed[len(resumed)-1].Done, durable, diskSize)
	}
	if !bytes.Equal(readAll(t, dst), model) {
		t.Fatal("the resumed copy differs from the source")
	}
}

// TestCopyBase writes only what differs from a differencing target's
// parent.
func TestCopyBase(t *testing.T) {
	dir := t.TempDir()
	src, model := chain(t, dir)
	base, err := vhdx.Open(filepath.Join(dir, "base.vhdx"), vhdx.OpenOptions{ReadOnly: true})
	if err != nil {
		t.Fatal(err)
	}
	defer base.Close()
	dst, err := vhdx.Create(filepath.Join(dir, "new.avhdx"), vhdx.CreateOptions{Parent: filepath.Join(dir, "base.vhdx")})
	if err != nil {
		t.Fatal(err)
	}
	defer dst.Close()
	st, err := imagecopy.Copy(context.Background(), dst, src, extents(t, src), imagecopy.Options{Fresh: true, Base: base, Sector: 512})
	if err != nil {
		t.Fatal(err)
	}
	checkStats(t, st, diskSize)
	if !bytes.Equal(readAll(t, dst), model) {
		t.Fatal("the differencing target differs from the source")
	}
	// Written: the child's data (6 MiB, 8 KiB, 1.5 KiB, 2 MiB) and the
	// zeros over the parent's data (2 MiB); not the 2 MiB of zeros over
	// the parent's hole.
	want := int64(6<<20 + 8192 + 1536 + 2<<20 + 2<<20)
	if got := st.Moved.Total() + st.Zeroed; got != want {
		t.Fatalf("%+v: wrote %d bytes, want %d", st, got, want)
	}
}

// TestCopyClonesOnXFS: on XFS with reflink the child's whole blocks are
// cloned into the target, which then shares its extents with the child.
func TestCopyClonesOnXFS(t *testing.T) {
	mnt := testenv.MountLoop(t, 512<<20, "mkfs.xfs", "-m", "reflink=1")
	src, model := chain(t, mnt)
	dst := target(t, mnt, "vhdx")
	st, err := imagecopy.Copy(context.Background(), dst, src, extents(t, src), imagecopy.Options{Fresh: true})
	if err != nil {
		t.Fatal(err)
	}
	checkStats(t, st, diskSize)
	// The whole 2 MiB blocks of the child (8 MiB), the 4 KiB-aligned
	// run and the parent's payload (cloned from base.vhdx) at least.
	if st.Cloned < 8<<20+8192 {
		t.Fatalf("%+v: want the child's whole blocks cloned", st)
	}
	if err := dst.Flush(); err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(readAll(t, dst), model) {
		t.Fatal("the target differs from the source")
	}
	if shared := testenv.SharedBytes(t, filepath.Join(mnt, "dst.vhdx")); shared < 8<<20 {
		t.Fatalf("filefrag shows %d shared bytes in the target, want the cloned %d", shared, st.Cloned)
	}
	t.Logf("%+v", st)
}

// TestCopyFixedTargetNotCloned: a fixed VHDX keeps blocks of its own (no
// write to it may fail for space), so on XFS the copy into it writes the
// bytes instead of sharing the source's blocks.
func TestCopyFixedTargetNotCloned(t *testing.T) {
	mnt := testenv.MountLoop(t, 512<<20, "mkfs.xfs", "-m", "reflink=1")
	src, model := chain(t, mnt)
	dst, err := vhdx.Create(filepath.Join(mnt, "fixed.vhdx"), vhdx.CreateOptions{Type: vhdx.Fixed, Size: diskSize})
	if err != nil {
		t.Fatal(err)
	}
	defer dst.Close()
	st, err := imagecopy.Copy(context.Background(), dst, src, extents(t, src), imagecopy.Options{})
	if err != nil {
		t.Fatal(err)
	}
	if st.Cloned != 0 || st.KernelCopied != 0 {
		t.Fatalf("%+v: a fixed target shares the source's blocks", st)
	}
	if !bytes.Equal(readAll(t, dst), model) {
		t.Fatal("the target differs from the source")
	}
	if shared := testenv.SharedBytes(t, filepath.Join(mnt, "fixed.vhdx")); shared != 0 {
		t.Fatalf("filefrag shows %d shared bytes in a fixed target", shared)
	}
}

// TestCopyFromVHDChain moves a differencing VHD chain's data (Locate
// through the child's sector bitmaps and into its parent) into a VHDX and
// a raw file, and checks every byte against the chain as read.
func TestCopyFromVHDChain(t *testing.T) {
	dir := t.TempDir()
	base, err := vhd.Create(filepath.Join(dir, "base.vhd"), vhd.CreateOptions{Size: diskSize})
	if err != nil {
		t.Fatal(err)
	}
	rng := rand.New(rand.NewPCG(8, 8))
	write := func(im disk.Image, off, n int64) {
		t.Helper()
		p := make([]byte, n)
		for i := range p {
			p[i] = byte(rng.Uint32() | 1)
		}
		if _, err := im.WriteAt(p, off); err != nil {
			t.Fatal(err)
		}
	}
	write(base, 0, 6<<20)
	write(base, 20<<20+512, 100000)
	if err := base.Close(); err != nil {
		t.Fatal(err)
	}
	child, err := vhd.Create(filepath.Join(dir, "child.vhd"), vhd.CreateOptions{Parent: filepath.Join(dir, "base.vhd")})
	if err != nil {
		t.Fatal(err)
	}
	write(child, 2<<20, 4<<20)
	write(child, 3<<20+1024, 3000)
	write(child, 30<<20, 8192)
	if err := child.Close(); err != nil {
		t.Fatal(err)
	}
	src, err := vhd.Open(filepath.Join(dir, "child.vhd"), vhd.OpenOptions{ReadOnly: true})
	if err != nil {
		t.Fatal(err)
	}
	defer src.Close()
	want := readAll(t, src)
	for _, kind := range []string{"vhdx", "raw"} {
		dst := target(t, dir, kind)
		st, err := imagecopy.Copy(context.Background(), dst, src, extents(t, src), imagecopy.Options{Fresh: true})
		if err != nil {
			t.Fatal(err)
		}
		checkStats(t, st, diskSize)
		if st.KernelCopied+st.Cloned == 0 {
			t.Fatalf("%s: %+v: nothing moved file to file", kind, st)
		}
		if !bytes.Equal(readAll(t, dst), want) {
			t.Fatalf("%s: the target differs from the VHD chain", kind)
		}
	}
}

// TestCopy4KSectors copies a chain of 4096-byte sectors into a
// differencing target of the same sectors (whole sectors of partially
// present blocks are moved; the 512-byte runs inside a sector are read)
// and into a fresh VHDX.
func TestCopy4KSectors(t *testing.T) {
	dir := t.TempDir()
	src, model := chainSectors(t, dir, 4096)
	dst, err := vhdx.Create(filepath.Join(dir, "dst.vhdx"), vhdx.CreateOptions{Size: diskSize, LogicalSectorSize: 4096})
	if err != nil {
		t.Fatal(err)
	}
	defer dst.Close()
	st, err := imagecopy.Copy(context.Background(), dst, src, extents(t, src), imagecopy.Options{Fresh: true})
	if err != nil {
		t.Fatal(err)
	}
	checkStats(t, st, diskSize)
	if !bytes.Equal(readAll(t, dst), model) {
		t.Fatal("the 4K-sector target differs from the source")
	}
	// Into a differencing image of base.vhdx: written over the parent.
	diff, err := vhdx.Create(filepath.Join(dir, "diff.avhdx"), vhdx.CreateOptions{Parent: filepath.Join(dir, "base.vhdx")})
	if err != nil {
		t.Fatal(err)
	}
	st, err = imagecopy.Copy(context.Background(), diff, src, extents(t, src), imagecopy.Options{})
	if err != nil {
		t.Fatal(err)
	}
	checkStats(t, st, diskSize)
	if !bytes.Equal(readAll(t, diff), model) {
		t.Fatal("the 4K-sector differencing target differs from the source")
	}
	if err := diff.Close(); err != nil {
		t.Fatal(err)
	}
	if probs, err := vhdx.Check(filepath.Join(dir, "diff.avhdx"), false); err != nil || len(probs) > 0 {
		t.Fatalf("check: %v %v", probs, err)
	}
}

// TestCopyJoinsGaps copies a child's own data into its parent, as a merge
// does: a block of one-page runs with one-page gaps over a parent reading
// zeros there goes as one clone with JoinGaps (the runs and the gaps
// between them: the child's file holds holes there), one clone per run
// without; the parent ends up the same either way.
func TestCopyJoinsGaps(t *testing.T) {
	const runs = 64
	var clones [2]int
	for i, join := range []bool{false, true} {
		fsys := storage.NewMemFS(nil)
		base, err := vhdx.Create("base.vhdx", vhdx.CreateOptions{Size: 32 << 20, BlockSize: 8 << 20, FS: fsys})
		if err != nil {
			t.Fatal(err)
		}
		child, err := base.CreateChild("child.avhdx", vhdx.CreateOptions{FS: fsys})
		if err != nil {
			t.Fatal(err)
		}
		model := make([]byte, 32<<20)
		for r := range int64(runs) {
			off := 8<<20 + r*8192
			p := model[off : off+4096]
			for j := range p {
				p[j] = byte(r + 1)
			}
			if _, err := child.WriteAt(p, off); err != nil {
				t.Fatal(err)
			}
		}
		if err := child.Flush(); err != nil {
			t.Fatal(err)
		}
		var own []disk.Extent
		for _, e := range extents(t, child) {
			if e.Depth == 0 && e.Type != disk.Hole {
				own = append(own, e)
			}
		}
		dst, err := vhdx.Open("base.vhdx", vhdx.OpenOptions{FS: fsys})
		if err != nil {
			t.Fatal(err)
		}
		st, err := imagecopy.Copy(context.Background(), dst, child, own, imagecopy.Options{JoinGaps: join})
		if err != nil {
			t.Fatal(err)
		}
		clones[i] = fsys.Clones()
		if st.Cloned != runs*4096 {
			t.Errorf("JoinGaps %v: %d bytes counted cloned, want the runs' %d (gaps count as skipped)", join, st.Cloned, runs*4096)
		}
		if join && st.Skipped != (runs-1)*4096 {
			t.Errorf("JoinGaps: %d bytes counted skipped, want the %d gaps' %d", st.Skipped, runs-1, (runs-1)*4096)
		}
		if err := dst.Close(); err != nil {
			t.Fatal(err)
		}
		child.Close()
		dst, err = vhdx.Open("base.vhdx", vhdx.OpenOptions{FS: fsys, ReadOnly: true})
		if err != nil {
			t.Fatal(err)
		}
		if !bytes.Equal(readAll(t, dst), model) {
			t.Fatalf("JoinGaps %v: the target differs from the child", join)
		}
		dst.Close()
		t.Logf("JoinGaps %v: %d clones, %+v", join, clones[i], st)
	}
	// Without: one clone per run (the first extent clones before joining
	// starts). With: the first run, then the rest as one.
	if clones[0] != runs || clones[1] != 2 {
		t.Fatalf("clones without and with JoinGaps: %v, want [%d 2]", clones, runs)
	}
}
