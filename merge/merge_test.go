package merge

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"math/rand"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	"github.com/vhdkit/vhdkit/internal/testenv"
	"github.com/vhdkit/vhdkit/vhdx"
)

const chainSize = 24 << 20 // 7-Zip refuses sizes that are not whole MiB

// joinBlock is the block of buildChain's chain where a merge joins runs.
const joinBlock = 22 << 20

// buildChain makes base.vhdx and levels children above it, each written
// with small (partially present blocks), large, and zeroing writes. It
// returns the paths (base first) and each level's expected content.
func buildChain(t testing.TB, dir string, levels int) ([]string, [][]byte) {
	t.Helper()
	model := make([]byte, chainSize)
	paths := []string{filepath.Join(dir, "base.vhdx")}
	im, err := vhdx.Create(paths[0], vhdx.CreateOptions{Size: chainSize, BlockSize: 1 << 20})
	if err != nil {
		t.Fatal(err)
	}
	scribble(t, im, model, 1, 20, 2<<20)
	// A block the base declares zero, where level 1 writes pages with
	// gaps between them: a merge clones them with the gaps as one range
	// (the gaps read zeros below and are holes in level 1's file).
	if err := im.WriteZeroes(joinBlock, 1<<20, true); err != nil {
		t.Fatal(err)
	}
	clear(model[joinBlock : joinBlock+1<<20])
	if err := im.Close(); err != nil {
		t.Fatal(err)
	}
	contents := [][]byte{bytes.Clone(model)}
	for i := 1; i <= levels; i++ {
		p := filepath.Join(dir, fmt.Sprintf("level%d.avhdx", i))
		im, err := vhdx.Create(p, vhdx.CreateOptions{Parent: paths[i-1], BlockSize: 1 << 20})
		if err != nil {
			t.Fatal(err)
		}
		if i == 1 {
			for k := int64(0); k < 8; k++ {
				page := bytes.Repeat([]byte{byte(k + 1)}, 4096)
				if _, err := im.WriteAt(page, joinBlock+k*8192); err != nil {
					t.Fatal(err)
				}
				copy(model[joinBlock+k*8192:], page)
			}
		}
		scribble(t, im, model, int64(10*i), 30, 16<<10)
		scribble(t, im, model, int64(10*i+1), 2, 3<<20)
		// A whole block declared zero over the parent's data.
		if err := im.WriteZeroes(4<<20, 1<<20, true); err != nil {
			t.Fatal(err)
		}
		clear(model[4<<20 : 5<<20])
		if err := im.Close(); err != nil {
			t.Fatal(err)
		}
		paths = append(paths, p)
		contents = append(contents, bytes.Clone(model))
	}
	return paths, contents
}

func scribble(t testing.TB, im io.WriterAt, model []byte, seed int64, n int, maxLen int64) {
	t.Helper()
	r := rand.New(rand.NewSource(seed))
	for i := 0; i < n; i++ {
		off := r.Int63n(int64(len(model)))
		b := make([]byte, min(r.Int63n(maxLen)+1, int64(len(model))-off))
		r.Read(b)
		if _, err := im.WriteAt(b, off); err != nil {
			t.Fatal(err)
		}
		copy(model[off:], b)
	}
}

func content(t testing.TB, path string) []byte {
	t.Helper()
	im, err := open(path, true, Options{})
	if err != nil {
		t.Fatal(err)
	}
	defer im.Close()
	b := make([]byte, im.Size())
	if _, err := im.ReadAt(b, 0); err != nil {
		t.Fatal(err)
	}
	return b
}

func run(t testing.TB, name string, args ...string) string {
	t.Helper()
	out, err := exec.Command(name, args...).CombinedOutput()
	if err != nil {
		t.Fatalf("%s %s: %v\n%s", name, strings.Join(args, " "), err, out)
	}
	return string(out)
}

// TestMergeTopIntoParent: level3 merges into level2; level2 is the leaf
// and reads level3's content; the base and level1 are untouched; 7-Zip
// extracts the shortened chain identically.
func TestMergeTopIntoParent(t *testing.T) {
	dir := t.TempDir()
	paths, contents := buildChain(t, dir, 3)
	base, _ := os.ReadFile(paths[0])
	level1, _ := os.ReadFile(paths[1])
	res, err := Merge(context.Background(), paths[3], Options{})
	if err != nil {
		t.Fatal(err)
	}
	if res.Target != paths[2] || len(res.Removed) != 1 || res.Removed[0] != paths[3] {
		t.Errorf("result %+v", res)
	}
	if _, err := os.Stat(paths[3]); !errors.Is(err, os.ErrNotExist) {
		t.Error("the merged child still exists")
	}
	if got := content(t, paths[2]); !bytes.Equal(got, contents[3]) {
		t.Fatal("level2 does not read level3's content after the merge")
	}
	if b, _ := os.ReadFile(paths[0]); !bytes.Equal(b, base) {
		t.Error("the base changed")
	}
	if b, _ := os.ReadFile(paths[1]); !bytes.Equal(b, level1) {
		t.Error("level1 (the grandparent) changed")
	}
	if got := content(t, paths[1]); !bytes.Equal(got, contents[1]) {
		t.Error("level1 no longer reads its own content")
	}
	probs, err := vhdx.Check(paths[2], false)
	if err != nil || len(probs) > 0 {
		t.Errorf("check: %v %v", probs, err)
	}
	testenv.Tool(t, "7zz")
	out := filepath.Join(dir, "x")
	run(t, "7zz", "x", "-y", "-o"+out, paths[2])
	if got, _ := os.ReadFile(filepath.Join(out, "level2.img")); !bytes.Equal(got, contents[3]) {
		t.Error("7zz x of the merged chain differs")
	}
	// libvhdi exposes each layer, base first: vhdi3 is level2, the leaf.
	testenv.Tool(t, "vhdimount")
	if _, err := os.Stat("/dev/fuse"); err != nil {
		if os.Getenv("CI") != "" {
			t.Fatalf("vhdimount needs /dev/fuse: %v", err)
		}
		t.Skip("no /dev/fuse")
	}
	mnt := filepath.Join(dir, "mnt")
	os.Mkdir(mnt, 0o755)
	run(t, "vhdimount", "-X", "allow_root", paths[2], mnt)
	t.Cleanup(func() { exec.Command("umount", mnt).Run() })
	got, err := os.ReadFile(filepath.Join(mnt, "vhdi3"))
	if err != nil || len(got) != len(contents[3]) {
		t.Fatalf("vhdimount: %d bytes, %v", len(got), err)
	}
	// libvhdi 20210425 reads a ZERO-state block of a differencing VHDX
	// through to the parent; MS-VHDX and 7-Zip read zeros. buildChain
	// declares [4 MiB, 5 MiB) zero in every level: compare the rest.
	want := bytes.Clone(contents[3])
	copy(got[4<<20:5<<20], want[4<<20:5<<20])
	if !bytes.Equal(got, want) {
		t.Error("vhdimount of the merged chain differs")
	}
}

// TestMergeIntoBase: all three levels merge into the base, which then
// holds everything: qemu-img compares it with the raw content and checks
// it clean.
func TestMergeIntoBase(t *testing.T) {
	dir := t.TempDir()
	paths, contents := buildChain(t, dir, 3)
	res, err := Merge(context.Background(), paths[3], Options{Into: paths[0]})
	if err != nil {
		t.Fatal(err)
	}
	if res.Target != paths[0] || len(res.Removed) != 3 {
		t.Errorf("result %+v", res)
	}
	for _, p := range paths[1:] {
		if _, err := os.Stat(p); !errors.Is(err, os.ErrNotExist) {
			t.Errorf("%s still exists", p)
		}
	}
	if got := content(t, paths[0]); !bytes.Equal(got, contents[3]) {
		t.Fatal("the base does not hold the merged content")
	}
	testenv.Tool(t, "qemu-img")
	raw := filepath.Join(dir, "want.raw")
	os.WriteFile(raw, contents[3], 0o644)
	run(t, "qemu-img", "check", "-f", "vhdx", paths[0])
	run(t, "qemu-img", "compare", "-f", "vhdx", "-F", "raw", paths[0], raw)
}

// TestMergeMiddle: level2 merges into level1 while level3 stays above: the
// chain level3 -> level1 -> base reads as before, since level2 was
// level3's parent — the caller must name the re-link.
func TestMergeIntoGrandparentKeepsTop(t *testing.T) {
	dir := t.TempDir()
	paths, contents := buildChain(t, dir, 3)
	// Merging level2 into level1 changes level1, which level3 does not
	// depend on directly; level3 depends on level2, which goes away: only
	// a merge of the top chain is allowed. Merge level3 into level1.
	if _, err := Merge(context.Background(), paths[3], Options{Into: paths[1]}); err != nil {
		t.Fatal(err)
	}
	if got := content(t, paths[1]); !bytes.Equal(got, contents[3]) {
		t.Fatal("level1 does not hold the merged content")
	}
	if got := content(t, paths[0]); !bytes.Equal(got, contents[0]) {
		t.Fatal("the base changed")
	}
}

// TestMergeRefusesOtherChildren: a second child of the target would see
// its parent change: refused, unless re-linked.
func TestMergeRefusesOtherChildren(t *testing.T) {
	dir := t.TempDir()
	paths, contents := buildChain(t, dir, 1)
	sibling := filepath.Join(dir, "sibling.avhdx")
	im, err := vhdx.Create(sibling, vhdx.CreateOptions{Parent: paths[0]})
	if err != nil {
		t.Fatal(err)
	}
	im.Close()
	_, err = Merge(context.Background(), paths[1], Options{})
	if !errors.Is(err, ErrOtherChildren) || !strings.Contains(err.Error(), "sibling.avhdx") {
		t.Fatalf("merge with another child: %v", err)
	}
	if got := content(t, paths[1]); !bytes.Equal(got, contents[1]) {
		t.Fatal("a refused merge changed something")
	}
	res, err := Merge(context.Background(), paths[1], Options{Relink: true})
	if err != nil {
		t.Fatal(err)
	}
	if len(res.Relinked) != 1 {
		t.Errorf("relinked %v", res.Relinked)
	}
	// The sibling opens over the changed base (and so reads its content).
	if got := content(t, sibling); !bytes.Equal(got, contents[1]) {
		t.Error("the re-linked sibling does not read through the merged base")
	}
}
