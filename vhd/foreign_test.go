package vhd

import (
	"bytes"
	"path/filepath"
	"testing"

	"github.com/vhdkit/vhdkit/disk"
	"github.com/vhdkit/vhdkit/raw"
	"github.com/vhdkit/vhdkit/vhdx"
)

// A differencing VHD over a parent of another format: the parent opens
// through package disk, has no unique id to check, and shows through
// where the child holds nothing.
func TestForeignParents(t *testing.T) {
	const size = 4 << 20
	for _, c := range []struct {
		name   string
		create func(path string) (disk.Image, error)
	}{
		{"base.img", func(p string) (disk.Image, error) { return raw.Create(p, size) }},
		{"base.vhdx", func(p string) (disk.Image, error) { return vhdx.Create(p, vhdx.CreateOptions{Size: size}) }},
	} {
		t.Run(c.name, func(t *testing.T) {
			dir := t.TempDir()
			ppath := filepath.Join(dir, c.name)
			p, err := c.create(ppath)
			if err != nil {
				t.Fatal(err)
			}
			model := make([]byte, size)
			for i := range model[:1<<20] {
				model[i] = byte(i%251 + 1)
			}
			mustWrite(t, p, model[:1<<20], 0)
			mustClose(t, p)

			child := filepath.Join(dir, "child.vhd")
			img, err := Create(child, CreateOptions{Parent: ppath})
			if err != nil {
				t.Fatal(err)
			}
			mustWrite(t, img, []byte("child data"), 1000)
			copy(model[1000:], "child data")
			mustClose(t, img)

			img, err = Open(child, OpenOptions{ReadOnly: true})
			if err != nil {
				t.Fatal(err)
			}
			defer mustClose(t, img)
			if got := readAll(t, img); !bytes.Equal(got, model) {
				t.Fatal(diffAt(got, model))
			}
			if info := img.Info(); !info.ParentUniqueID.IsZero() || info.ParentPath != ppath {
				t.Errorf("parent id %s, path %s", info.ParentUniqueID, info.ParentPath)
			}
			exts, err := img.Extents(0, size)
			if err != nil {
				t.Fatal(err)
			}
			if exts[0].Depth != 1 || exts[1].Depth != 0 || exts[1].Offset != 512 {
				t.Errorf("extents %+v", exts)
			}
		})
	}
}
