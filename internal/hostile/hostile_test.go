package hostile

import (
	"errors"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"

	"github.com/vhdkit/vhdkit/disk"
	"github.com/vhdkit/vhdkit/vhd"
	"github.com/vhdkit/vhdkit/vhdx"
)

// The corpus, made once for the tests of this package (it takes seconds).
var corpusOnce struct {
	sync.Once
	root  string
	cases []Case
	err   error
}

func TestMain(m *testing.M) {
	code := m.Run()
	if corpusOnce.root != "" {
		os.RemoveAll(filepath.Dir(corpusOnce.root))
	}
	os.Exit(code)
}

// generated returns the corpus; tests must not change it.
func generated(t *testing.T) (string, []Case) {
	t.Helper()
	corpusOnce.Do(func() {
		dir, err := os.MkdirTemp("", "hostile-test")
		if err != nil {
			corpusOnce.err = err
			return
		}
		corpusOnce.root = filepath.Join(dir, "corpus")
		corpusOnce.cases, corpusOnce.err = Generate(corpusOnce.root, Options{})
	})
	if corpusOnce.err != nil {
		t.Fatal(corpusOnce.err)
	}
	return corpusOnce.root, corpusOnce.cases
}

// TestGenerate: every case's image is there, IDs are unique, every class
// is present, the decoy folders hold a file, and Generate refuses to
// write into a folder that is not empty.
func TestGenerate(t *testing.T) {
	root, cases := generated(t)
	ids := map[string]bool{}
	classes := map[string]int{}
	for _, c := range cases {
		if ids[c.ID()] {
			t.Errorf("%s generated twice", c.ID())
		}
		ids[c.ID()] = true
		classes[c.Class]++
		if fi, err := os.Stat(filepath.Join(root, c.Image)); err != nil || !fi.Mode().IsRegular() {
			t.Errorf("%s: image %s: %v", c.ID(), c.Image, err)
		}
		if c.Outside != "" {
			if ents, err := os.ReadDir(filepath.Join(root, c.Outside)); err != nil || len(ents) == 0 {
				t.Errorf("%s: decoy folder %s: %v, %d files", c.ID(), c.Outside, err, len(ents))
			}
		}
	}
	for _, class := range []string{"vhdx-truncate", "vhdx-header", "vhdx-region", "vhdx-metadata", "vhdx-bat", "vhdx-log", "vhdx-locator",
		"vhd-truncate", "vhd-footer", "vhd-header", "vhd-bat", "vhd-locator", "chain-loop", "chain-deep", "chain-sector", "escape"} {
		if classes[class] == 0 {
			t.Errorf("no case of class %s", class)
		}
	}
	if _, err := Generate(root, Options{}); err == nil {
		t.Error("Generate wrote into a folder that is not empty")
	}
}

// TestSeedsValid: the images the damage starts from pass the strict check,
// so what a check finds in a case is the damage done to it.
func TestSeedsValid(t *testing.T) {
	dir := t.TempDir()
	dyn, err := vhdxSeed(vhdx.CreateOptions{Size: 8 << 20, BlockSize: 1 << 20}, dynamicWrites)
	if err != nil {
		t.Fatal(err)
	}
	pending, err := vhdxPendingSeed()
	if err != nil {
		t.Fatal(err)
	}
	pr, err := makeVHDXPair(512)
	if err != nil {
		t.Fatal(err)
	}
	vdyn, err := vhdSeed("", "seed.vhd", vhdCreate8M, vhdWrites)
	if err != nil {
		t.Fatal(err)
	}
	files := map[string][]byte{"dyn.vhdx": dyn, "pending.vhdx": pending, "p.vhdx": pr.parent, "c.avhdx": pr.child, "v.vhd": vdyn}
	for name, b := range files {
		if err := writeSparse(filepath.Join(dir, name), b); err != nil {
			t.Fatal(err)
		}
	}
	for _, name := range []string{"dyn.vhdx", "pending.vhdx", "c.avhdx"} {
		probs, err := vhdx.Check(filepath.Join(dir, name), false)
		if err != nil {
			t.Fatal(err)
		}
		for _, p := range probs {
			if p.Violation() {
				t.Errorf("seed %s: %v", name, p)
			}
		}
	}
	if probs, err := vhd.Check(filepath.Join(dir, "v.vhd"), false); err != nil || len(probs) > 0 {
		t.Errorf("seed v.vhd: %v, %v", probs, err)
	}
}

// TestChecksumsSealed: a field mutation keeps its structure's checksum
// valid, so only a semantic check can find it.
func TestChecksumsSealed(t *testing.T) {
	root, cases := generated(t)
	unsealed := map[string]bool{"vhdx-log/entry-length-max": true} // a length no CRC can cover
	n := 0
	for _, c := range cases {
		path := filepath.Join(root, c.Image)
		switch {
		case unsealed[c.ID()]:
		case c.Class == "vhdx-header" || c.Class == "vhdx-region" || c.Class == "vhdx-log" && !strings.HasPrefix(c.Name, "cut-"):
			n++
			probs, err := vhdx.Check(path, false)
			if err != nil {
				continue // refused before any checksum
			}
			for _, p := range probs {
				if strings.Contains(p.What, "checksum") {
					t.Errorf("%s: %v", c.ID(), p)
				}
			}
		case c.Class == "vhd-footer" || c.Class == "vhd-header":
			n++
			probs, _ := vhd.Check(path, false)
			for _, p := range probs {
				if p.Rule == "footer.checksum" || p.Rule == "header.checksum" {
					t.Errorf("%s: %v", c.ID(), p)
				}
			}
		}
	}
	if n < 50 {
		t.Errorf("only %d mutations checked", n)
	}
}

// TestChains: the loops, deep chains and escapes are what they say: the
// loops and the 1000-deep chains are refused for that, the 250-deep ones
// open, and each escaping
// child opens through its decoy when the decoy's folder is allowed, and
// not otherwise.
func TestChains(t *testing.T) {
	root, cases := generated(t)
	open := func(c Case, dirs ...string) (disk.Image, error) {
		path := filepath.Join(root, c.Image)
		f, err := disk.Detect(path)
		if err != nil {
			return nil, err
		}
		return f.Open(path, disk.OpenOptions{ReadOnly: true, ParentDirs: dirs})
	}
	for _, c := range cases {
		dir := filepath.Dir(filepath.Join(root, c.Image))
		switch c.Class {
		case "chain-loop", "chain-deep":
			im, err := open(c, dir)
			want := "loop"
			if c.Class == "chain-deep" {
				want = "deeper than"
			}
			if strings.HasSuffix(c.Name, "-250") { // within the limit of 256
				if err != nil {
					t.Errorf("%s: %v", c.ID(), err)
				} else {
					im.Close()
				}
				continue
			}
			if err == nil || !strings.Contains(err.Error(), want) {
				t.Errorf("%s: %v, want an error saying %q", c.ID(), err, want)
			}
		case "escape":
			if im, err := open(c, dir); err == nil || !errors.Is(err, disk.ErrParentNotFound) {
				if im != nil {
					im.Close()
				}
				t.Errorf("%s: opened without its decoy's folder allowed (%v)", c.ID(), err)
			}
			im, err := open(c, dir, filepath.Join(root, c.Outside))
			if err != nil {
				t.Errorf("%s: with the decoy's folder allowed: %v", c.ID(), err)
				continue
			}
			im.Close()
		}
	}
}
