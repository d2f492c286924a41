package merge

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"slices"
	"testing"

	"github.com/vhdkit/vhdkit/internal/testenv"
	"github.com/vhdkit/vhdkit/vhd"
	"github.com/vhdkit/vhdkit/vhdx"
)

// vhdChainSize is exact in CHS, so qemu-img, which sizes our VHDs by
// their geometry, reads them whole.
var vhdChainSize = vhd.GeometryFor(24 << 20).Size()

// buildVHDChain is buildChain in VHD: base.vhd and levels .avhd children,
// each written with small (partial bitmaps), large and zeroing writes.
func buildVHDChain(t testing.TB, dir string, levels int) ([]string, [][]byte) {
	t.Helper()
	size := vhdChainSize
	model := make([]byte, size)
	paths := []string{filepath.Join(dir, "base.vhd")}
	im, err := vhd.Create(paths[0], vhd.CreateOptions{Size: uint64(size)})
	if err != nil {
		t.Fatal(err)
	}
	scribble(t, im, model, 1, 20, 2<<20)
	if err := im.Close(); err != nil {
		t.Fatal(err)
	}
	contents := [][]byte{bytes.Clone(model)}
	for i := 1; i <= levels; i++ {
		p := filepath.Join(dir, fmt.Sprintf("level%d.avhd", i))
		im, err := vhd.Create(p, vhd.CreateOptions{Parent: paths[i-1]})
		if err != nil {
			t.Fatal(err)
		}
		scribble(t, im, model, int64(10*i), 30, 16<<10)
		scribble(t, im, model, int64(10*i+1), 2, 3<<20)
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

// TestMergeVHD merges a VHD chain: the top into its parent (the grand-
// parent untouched; 7-Zip reads the shortened chain as we do), then the
// rest into the base, which qemu-img compares with the raw content.
func TestMergeVHD(t *testing.T) {
	dir := t.TempDir()
	paths, contents := buildVHDChain(t, dir, 3)
	base, _ := os.ReadFile(paths[0])
	level1, _ := os.ReadFile(paths[1])
	res, err := Merge(context.Background(), paths[3], Options{})
	if err != nil {
		t.Fatal(err)
	}
	if res.Target != paths[2] || !slices.Equal(res.Removed, []string{paths[3]}) || res.Copied == 0 {
		t.Errorf("result %+v", res)
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
	if probs, err := vhd.Check(paths[2], false); err != nil || len(probs) > 0 {
		t.Errorf("check: %v %v", probs, err)
	}
	testenv.Tool(t, "7zz")
	out := filepath.Join(dir, "x")
	run(t, "7zz", "x", "-y", "-o"+out, paths[2])
	if got, _ := os.ReadFile(filepath.Join(out, "level2.img")); !bytes.Equal(got, contents[3]) {
		t.Error("7zz x of the merged chain differs")
	}

	if _, err := Merge(context.Background(), paths[2], Options{Into: paths[0]}); err != nil {
		t.Fatal(err)
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
	run(t, "qemu-img", "compare", "-f", "vpc", "-F", "raw", paths[0], raw)
}

// TestMergeMiddleLayer merges a layer that is not the leaf into its
// parent: the leaf above it, which reads the same data through the
// merged target, is re-pointed there without being asked for, in VHDX
// and VHD chains. A sibling of the target is still refused.
func TestMergeMiddleLayer(t *testing.T) {
	for _, c := range []struct {
		name  string
		build func(testing.TB, string, int) ([]string, [][]byte)
	}{{"vhdx", buildChain}, {"vhd", buildVHDChain}} {
		t.Run(c.name, func(t *testing.T) {
			dir := t.TempDir()
			paths, contents := c.build(t, dir, 3)
			res, err := Merge(context.Background(), paths[2], Options{})
			if err != nil {
				t.Fatal(err)
			}
			if res.Target != paths[1] || !slices.Equal(res.Relinked, []string{paths[3]}) {
				t.Errorf("result %+v", res)
			}
			if _, err := os.Stat(paths[2]); !errors.Is(err, os.ErrNotExist) {
				t.Error("the merged layer still exists")
			}
			if got := content(t, paths[3]); !bytes.Equal(got, contents[3]) {
				t.Fatal("the leaf reads differently after its parent was merged away")
			}
			if got := content(t, paths[1]); !bytes.Equal(got, contents[2]) {
				t.Fatal("level1 does not hold level2's content")
			}
			if l := chainOf(t, paths[3]); !slices.Equal(l, []string{paths[3], paths[1], paths[0]}) {
				t.Fatalf("leaf chain %v", l)
			}
		})
	}
}

func chainOf(t testing.TB, path string) []string {
	t.Helper()
	l, err := chainPaths(path, Options{})
	if err != nil {
		t.Fatal(err)
	}
	return l
}

// TestMergeGrowsTarget: a child grown past its parent's size (Resize-VHD
// on the differencing disk) merges into a parent that grows to match, in
// VHDX and VHD chains.
func TestMergeGrowsTarget(t *testing.T) {
	type resizer interface {
		io.WriterAt
		Resize(int64) error
		Close() error
	}
	for _, c := range []struct {
		name   string
		build  func(testing.TB, string, int) ([]string, [][]byte)
		bigger int64
		open   func(string) (resizer, error)
		qemu   string
	}{
		{"vhdx", buildChain, 40 << 20, func(p string) (resizer, error) { return vhdx.Open(p, vhdx.OpenOptions{}) }, "vhdx"},
		{"vhd", buildVHDChain, vhd.GeometryFor(40 << 20).Size(), func(p string) (resizer, error) { return vhd.Open(p, vhd.OpenOptions{}) }, "vpc"},
	} {
		t.Run(c.name, func(t *testing.T) {
			dir := t.TempDir()
			paths, contents := c.build(t, dir, 1)
			im, err := c.open(paths[1])
			if err != nil {
				t.Fatal(err)
			}
			if err := im.Resize(c.bigger); err != nil {
				t.Fatal(err)
			}
			want := append(bytes.Clone(contents[1]), make([]byte, c.bigger-int64(len(contents[1])))...)
			scribble(t, im, want, 99, 10, 1<<20)
			if err := im.Close(); err != nil {
				t.Fatal(err)
			}
			res, err := Merge(context.Background(), paths[1], Options{})
			if err != nil {
				t.Fatal(err)
			}
			if res.Grown != c.bigger {
				t.Errorf("grown %d, want %d", res.Grown, c.bigger)
			}
			if got := content(t, paths[0]); !bytes.Equal(got, want) {
				t.Fatal("the grown base does not hold the merged content")
			}
			testenv.Tool(t, "qemu-img")
			raw := filepath.Join(dir, "want.raw")
			os.WriteFile(raw, want, 0o644)
			run(t, "qemu-img", "compare", "-f", c.qemu, "-F", "raw", paths[0], raw)
		})
	}
}

// TestSetParent re-points VHDX and VHD children at moved parents, and
// refuses a parent the child was not made from.
func TestSetParent(t *testing.T) {
	for _, c := range []struct {
		name  string
		build func(testing.TB, string, int) ([]string, [][]byte)
	}{{"vhdx", buildChain}, {"vhd", buildVHDChain}} {
		t.Run(c.name, func(t *testing.T) {
			dir := t.TempDir()
			paths, contents := c.build(t, dir, 2)
			moved := filepath.Join(dir, "sub", "renamed"+filepath.Ext(paths[1]))
			os.Mkdir(filepath.Dir(moved), 0o755)
			if err := os.Rename(paths[1], moved); err != nil {
				t.Fatal(err)
			}
			if _, err := open(paths[2], true, Options{}); err == nil {
				t.Fatal("the child opened with its parent gone")
			}
			// The base is not the child's parent.
			if err := SetParent(paths[2], paths[0], false, Options{}); err == nil {
				t.Fatal("re-parenting onto the grandparent was accepted")
			}
			if err := SetParent(paths[2], moved, false, Options{}); err != nil {
				t.Fatal(err)
			}
			if got := content(t, paths[2]); !bytes.Equal(got, contents[2]) {
				t.Fatal("the re-parented child reads differently")
			}
		})
	}
}
