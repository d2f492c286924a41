package merge

import (
	"bytes"
	"context"
	"math/rand"
	"os"
	"path/filepath"
	"testing"

	"github.com/vhdkit/vhdkit/internal/testenv"
	"github.com/vhdkit/vhdkit/vhdx"
)

// TestMergeClonesOnXFS merges a child holding whole blocks and scattered
// sectors into its base on loop-mounted XFS with reflink: the whole
// blocks are cloned, not copied, so the base's extents are the very
// blocks of a reflinked copy of the child taken before (FIEMAP shows
// them shared); qemu-img checks the base and compares it with the
// expected bytes, and 7-Zip extracts the same.
func TestMergeClonesOnXFS(t *testing.T) {
	testMergeClones(t, testenv.MountLoop(t, 512<<20, "mkfs.xfs", "-m", "reflink=1"))
}

// TestMergeClonesOnBtrfs is TestMergeClonesOnXFS on btrfs.
func TestMergeClonesOnBtrfs(t *testing.T) {
	testMergeClones(t, testenv.MountLoop(t, 512<<20, "mkfs.btrfs"))
}

func testMergeClones(t *testing.T, mnt string) {
	const size = 64 << 20
	model := make([]byte, size)
	base := filepath.Join(mnt, "base.vhdx")
	im, err := vhdx.Create(base, vhdx.CreateOptions{Size: size})
	if err != nil {
		t.Fatal(err)
	}
	scribble(t, im, model, 1, 10, 4<<20)
	if err := im.Close(); err != nil {
		t.Fatal(err)
	}
	top := filepath.Join(mnt, "top.avhdx")
	child, err := vhdx.Create(top, vhdx.CreateOptions{Parent: base})
	if err != nil {
		t.Fatal(err)
	}
	whole := make([]byte, 16<<20) // eight whole 2 MiB blocks
	rand.New(rand.NewSource(2)).Read(whole)
	if _, err := child.WriteAt(whole, 8<<20); err != nil {
		t.Fatal(err)
	}
	copy(model[8<<20:], whole)
	scribble(t, child, model, 3, 40, 8<<10) // partial blocks
	if err := child.Close(); err != nil {
		t.Fatal(err)
	}
	run(t, "cp", "--reflink=always", top, filepath.Join(mnt, "top.copy"))

	res, err := Merge(context.Background(), top, Options{})
	if err != nil {
		t.Fatal(err)
	}
	if res.Moved.Cloned < 16<<20 {
		t.Fatalf("merge moved %+v: want the 16 MiB of whole blocks cloned", res.Moved)
	}
	if res.Copied != res.Moved.Total() {
		t.Fatalf("result: %d bytes copied, %+v moved", res.Copied, res.Moved)
	}
	if shared := testenv.SharedBytes(t, base); shared < 16<<20 {
		t.Fatalf("filefrag shows %d bytes of the base shared, want the %d cloned", shared, res.Moved.Cloned)
	}
	if got := content(t, base); !bytes.Equal(got, model) {
		t.Fatal("the base does not hold the merged content")
	}
	testenv.Tool(t, "qemu-img")
	want := filepath.Join(t.TempDir(), "want.raw")
	os.WriteFile(want, model, 0o644)
	run(t, "qemu-img", "check", "-f", "vhdx", base)
	run(t, "qemu-img", "compare", "-f", "vhdx", "-F", "raw", base, want)
	testenv.Tool(t, "7zz")
	out := filepath.Join(t.TempDir(), "x")
	run(t, "7zz", "x", "-y", "-o"+out, base)
	if got, _ := os.ReadFile(filepath.Join(out, "base.img")); !bytes.Equal(got, model) {
		t.Error("7zz x of the merged base differs")
	}
	t.Logf("moved %+v, zeroed %d", res.Moved, res.Zeroed)
}
