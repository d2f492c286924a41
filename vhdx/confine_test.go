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

// TestCheckBitmapBeyondEOF: a sector bitmap entry whose block lies past
// the end of the file is named as one (SB_BLOCK_PRESENT, the sector
// bitmap): check called it a FULLY_PRESENT block, the payload state with
// the same value (the hostile corpus's vhdx-bat/child-bitmap-beyond-eof).
func TestCheckBitmapBeyondEOF(t *testing.T) {
	dir := t.TempDir()
	p, err := Create(filepath.Join(dir, "p.vhdx"), CreateOptions{Size: 8 << 20})
	if err != nil {
		t.Fatal(err)
	}
	child, err := p.CreateChild(filepath.Join(dir, "c.avhdx"), CreateOptions{BlockSize: 1 << 20})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := child.WriteAt(make([]byte, 512), 1<<20); err != nil {
		t.Fatal(err)
	}
	g, batOff := child.geo, int64(child.regs.BAT.Offset)
	if err := child.Close(); err != nil {
		t.Fatal(err)
	}
	f, err := os.OpenFile(filepath.Join(dir, "c.avhdx"), os.O_RDWR, 0)
	if err != nil {
		t.Fatal(err)
	}
	entry := batEntry(bitmapPresent, 1<<40)
	var b [8]byte
	for i := range b {
		b[i] = byte(entry >> (8 * i))
	}
	_, err = f.WriteAt(b[:], batOff+8*g.bitmapIndex(0))
	f.Close()
	if err != nil {
		t.Fatal(err)
	}
	probs, err := Check(filepath.Join(dir, "c.avhdx"), false)
	if err != nil {
		t.Fatal(err)
	}
	for _, p := range probs {
		if p.Rule == RuleBATBeyondEOF {
			if !strings.Contains(p.What, "SB_BLOCK_PRESENT sector bitmap block") {
				t.Errorf("%s: want the sector bitmap block named", p.What)
			}
			return
		}
	}
	t.Errorf("problems %v: want the sector bitmap block past the end of the file", probs)
}
