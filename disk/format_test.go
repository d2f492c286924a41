package disk_test

import (
	"errors"
	"os"
	"path/filepath"
	"testing"

	"github.com/vhdkit/vhdkit/disk"
	_ "github.com/vhdkit/vhdkit/raw"
	"github.com/vhdkit/vhdkit/vhd"
	"github.com/vhdkit/vhdkit/vhdx"
)

// TestDetect: the content decides the format; a name that claims another
// format than the content holds is refused, and raw needs a raw name.
func TestDetect(t *testing.T) {
	dir := t.TempDir()
	mk := func(name string, make func(string)) string {
		p := filepath.Join(dir, name)
		make(p)
		return p
	}
	vhdxAt := func(p string) {
		im, err := vhdx.Create(p, vhdx.CreateOptions{Size: 4 << 20})
		if err != nil {
			t.Fatal(err)
		}
		im.Close()
	}
	vhdAt := func(typ vhd.Type) func(string) {
		return func(p string) {
			im, err := vhd.Create(p, vhd.CreateOptions{Type: typ, Size: 4 << 20})
			if err != nil {
				t.Fatal(err)
			}
			im.Close()
		}
	}
	rawAt := func(p string) {
		if err := os.WriteFile(p, make([]byte, 1<<20), 0o600); err != nil {
			t.Fatal(err)
		}
	}
	qcow2At := func(p string) {
		if err := os.WriteFile(p, append([]byte("QFI\xfb"), make([]byte, 4096)...), 0o600); err != nil {
			t.Fatal(err)
		}
	}
	for _, tc := range []struct {
		path string
		want string // "" when refused
	}{
		{mk("a.vhdx", vhdxAt), "vhdx"},
		{mk("a.img", vhdxAt), "vhdx"},              // a raw name is no promise
		{mk("a-vhdx", vhdxAt), "vhdx"},             // no extension at all
		{mk("a.disk", vhdxAt), "vhdx"},             // an unknown one
		{mk("fixed.img", vhdAt(vhd.Fixed)), "vhd"}, // its footer at the end
		{mk("fixed", vhdAt(vhd.Fixed)), "vhd"},
		{mk("dyn.bin", vhdAt(vhd.Dynamic)), "vhd"},
		{mk("fixed.vhd", vhdAt(vhd.Fixed)), "vhd"},
		{mk("r.img", rawAt), "raw"},
		{mk("r.RAW", rawAt), "raw"},
		{mk("x.vhd", vhdxAt), ""}, // a VHDX named .vhd
		{mk("x.avhd", vhdxAt), ""},
		{mk("y.vhdx", vhdAt(vhd.Fixed)), ""}, // a VHD named .vhdx
		{mk("r.vhdx", rawAt), ""},            // a raw file named .vhdx
		{mk("r.vhd", rawAt), ""},
		{mk("r", rawAt), ""},      // no signature, no raw name
		{mk("r.disk", rawAt), ""}, // likewise
		{mk("q.img", qcow2At), ""},
		{mk("q.qcow2", qcow2At), ""},
	} {
		f, err := disk.Detect(tc.path)
		name := filepath.Base(tc.path)
		switch {
		case tc.want == "" && err == nil:
			t.Errorf("%s: detected %s, want a refusal", name, f.Name)
		case tc.want == "" && !errors.Is(err, disk.ErrFormatMismatch):
			t.Errorf("%s: %v, want an error wrapping ErrFormatMismatch", name, err)
		case tc.want != "" && err != nil:
			t.Errorf("%s: %v, want %s", name, err, tc.want)
		case tc.want != "" && f.Name != tc.want:
			t.Errorf("%s: detected %s, want %s", name, f.Name, tc.want)
		}
		if err != nil {
			t.Logf("%s: %v", name, err)
		}
	}
	if _, err := disk.Detect(filepath.Join(dir, "missing.vhdx")); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("missing file: %v", err)
	}
}
