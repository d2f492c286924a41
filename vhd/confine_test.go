package vhd

import (
	"os"
	"path/filepath"
	"strings"
	"testing"
)

// TestCheckParentDirs: CheckWith follows parents only into ParentDirs. The
// check opened whatever its locators named, so "vhdkit check" read a
// parent outside the folders the other verbs keep to, and found no problem
// with a chain they refuse.
func TestCheckParentDirs(t *testing.T) {
	dir := t.TempDir()
	in, out := filepath.Join(dir, "in"), filepath.Join(dir, "out")
	for _, d := range []string{in, out} {
		if err := os.Mkdir(d, 0o755); err != nil {
			t.Fatal(err)
		}
	}
	parent, child := filepath.Join(out, "p.vhd"), filepath.Join(in, "c.vhd")
	p, err := Create(parent, CreateOptions{Size: 8 << 20})
	if err != nil {
		t.Fatal(err)
	}
	p.Close()
	c, err := Create(child, CreateOptions{Parent: parent})
	if err != nil {
		t.Fatal(err)
	}
	c.Close()

	probs, err := CheckWith(child, CheckOptions{ParentDirs: []string{in}})
	if err != nil {
		t.Fatal(err)
	}
	refused := false
	for _, p := range probs {
		refused = refused || !p.Warning && strings.Contains(p.What, "outside the allowed")
	}
	if !refused {
		t.Errorf("parent outside ParentDirs: problems %v, want one naming it outside the allowed directories", probs)
	}
	for _, opts := range []CheckOptions{{ParentDirs: []string{in, out}}, {}, {ForceShare: true, ParentDirs: []string{in, out}}} {
		probs, err := CheckWith(child, opts)
		if err != nil {
			t.Fatal(err)
		}
		for _, p := range probs {
			if !p.Warning {
				t.Errorf("%+v: problem %v; want none", opts, p)
			}
		}
	}
}
