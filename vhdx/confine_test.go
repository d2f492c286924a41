package vhdx

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
	parent, child := filepath.Join(out, "p.vhdx"), filepath.Join(in, "c.avhdx")
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
	if len(probs) != 1 || !probs[0].Violation() || !strings.Contains(probs[0].What, "outside the allowed") {
		t.Errorf("parent outside ParentDirs: problems %v, want one naming it outside the allowed directories", probs)
	}
	for _, opts := range []CheckOptions{{ParentDirs: []string{in, out}}, {}, {ForceShare: true, ParentDirs: []string{in, out}}} {
		if probs, err := CheckWith(child, opts); err != nil || len(probs) > 0 {
			t.Errorf("%+v: problems %v, %v; want none", opts, probs, err)
		}
	}
}
