package hostile

import (
	"os"
	"path/filepath"
	"strings"
)

// escapes adds differencing images whose only way to their parent leads
// out of their folder: each case's folder is escape/NAME, and its parent,
// a valid one that the locators name exactly (linkage and all), is in
// escape-outside/NAME, where no verb may open a file unless
// --allow-parent-dir names that folder.
func escapes(c *corpus) error {
	pr, err := makeVHDXPair(512)
	if err != nil {
		return err
	}
	dir, err := os.MkdirTemp("", "hostile-seed")
	if err != nil {
		return err
	}
	defer os.RemoveAll(dir)
	vparent, err := vhdSeed(dir, "p.vhd", vhdCreate8M, vhdWrites)
	if err != nil {
		return err
	}
	vchild, err := vhdSeed(dir, "c.vhd", vhdChildOf(filepath.Join(dir, "p.vhd")), map[int64]int{2 << 20: 4096})
	if err != nil {
		return err
	}
	pid := parseVHD(vparent).uniqueID
	link := guidString(pr.pl.dataWriteGUID)

	type escape struct {
		name, note string
		image      string
		fs         func(outside string) files // the case's own files, given the decoy folder's absolute path
		outside    files                      // the decoy folder's files
		links      map[string]string          // symbolic links in the case's folder: name -> target
	}
	winAbs := func(p string) string { return strings.ReplaceAll(p, "/", `\`) }
	vloc := func(kv ...string) []byte {
		var l vhdxLocator
		for i := 0; i+1 < len(kv); i += 2 {
			l = append(l, [2]string{kv[i], kv[i+1]})
		}
		return l.marshal()
	}
	up := `..\..\escape-outside\`
	es := []escape{
		{name: "vhdx-relative", note: "relative_path ..\\ out of the folder", image: "c.avhdx",
			fs: func(o string) files {
				return files{"c.avhdx": pr.withLocator(vloc("parent_linkage", link, "relative_path", up+"vhdx-relative\\p.vhdx"))}
			}, outside: files{"p.vhdx": pr.parent}},
		{name: "vhdx-absolute", note: "absolute_win32_path out of the folder", image: "c.avhdx",
			fs: func(o string) files {
				return files{"c.avhdx": pr.withLocator(vloc("parent_linkage", link, "absolute_win32_path", winAbs(filepath.Join(o, "p.vhdx"))))}
			}, outside: files{"p.vhdx": pr.parent}},
		{name: "vhdx-volume", note: "volume_path out of the folder, POSIX form", image: "c.avhdx",
			fs: func(o string) files {
				return files{"c.avhdx": pr.withLocator(vloc("parent_linkage", link, "volume_path", filepath.Join(o, "q.vhdx")))}
			}, outside: files{"q.vhdx": pr.parent}},
		{name: "vhdx-relative-absolute", note: "relative_path holding an absolute path", image: "c.avhdx",
			fs: func(o string) files {
				return files{"c.avhdx": pr.withLocator(vloc("parent_linkage", link, "relative_path", filepath.Join(o, "p.vhdx")))}
			}, outside: files{"p.vhdx": pr.parent}},
		{name: "vhdx-symlink", note: "the parent in the folder is a symbolic link out of it", image: "c.avhdx",
			fs:      func(o string) files { return files{"c.avhdx": pr.child} },
			outside: files{"p.vhdx": pr.parent}, links: map[string]string{"p.vhdx": "../../escape-outside/vhdx-symlink/p.vhdx"}},
		{name: "vhdx-symlink-dir", note: "a folder in the folder is a symbolic link out of it", image: "c.avhdx",
			fs: func(o string) files {
				return files{"c.avhdx": pr.withLocator(vloc("parent_linkage", link, "relative_path", `.\sub\p.vhdx`))}
			}, outside: files{"p.vhdx": pr.parent}, links: map[string]string{"sub": "../../escape-outside/vhdx-symlink-dir"}},
		{name: "vhdx-grandparent", note: "the parent is in the folder, its parent outside", image: "c.avhdx",
			fs: func(o string) files {
				g := guidN("esc-mid", 0)
				mid := withDataWriteGUID(pr.withLocator(vloc("parent_linkage", link, "relative_path", up+"vhdx-grandparent\\p.vhdx")), g)
				return files{"m.avhdx": mid, "c.avhdx": pr.withLocator(vloc("parent_linkage", guidString(g), "relative_path", `.\m.avhdx`))}
			}, outside: files{"p.vhdx": pr.parent}},

		{name: "vhd-relative", note: "W2ru ..\\ out of the folder", image: "c.vhd",
			fs: func(o string) files {
				return files{"c.vhd": withParent(vchild, pid, "", []vhdLocator{{"W2ru", utf16le(up + `vhd-relative\p.vhd`)}})}
			}, outside: files{"p.vhd": vparent}},
		{name: "vhd-absolute", note: "W2ku out of the folder", image: "c.vhd",
			fs: func(o string) files {
				return files{"c.vhd": withParent(vchild, pid, "", []vhdLocator{{"W2ku", utf16le(winAbs(filepath.Join(o, "p.vhd")))}})}
			}, outside: files{"p.vhd": vparent}},
		{name: "vhd-name", note: "only the header's parent name, absolute, out of the folder", image: "c.vhd",
			fs: func(o string) files {
				return files{"c.vhd": withParent(vchild, pid, filepath.Join(o, "q.vhd"), nil)}
			}, outside: files{"q.vhd": vparent}},
		{name: "vhd-macx", note: "a MacX file URL out of the folder", image: "c.vhd",
			fs: func(o string) files {
				return files{"c.vhd": withParent(vchild, pid, "", []vhdLocator{{"MacX", []byte("file://" + filepath.Join(o, "q.vhd"))}})}
			}, outside: files{"q.vhd": vparent}},
		{name: "vhd-wi2r", note: "a Wi2r ..\\ out of the folder", image: "c.vhd",
			fs: func(o string) files {
				return files{"c.vhd": withParent(vchild, pid, "", []vhdLocator{{"Wi2r", []byte(up + `vhd-wi2r\q.vhd`)}})}
			}, outside: files{"q.vhd": vparent}},
		{name: "vhd-symlink", note: "the parent in the folder is a symbolic link out of it", image: "c.vhd",
			fs: func(o string) files {
				return files{"c.vhd": withParent(vchild, pid, "", []vhdLocator{{"W2ru", utf16le(`.\p.vhd`)}})}
			}, outside: files{"p.vhd": vparent}, links: map[string]string{"p.vhd": "../../escape-outside/vhd-symlink/p.vhd"}},
	}
	for _, e := range es {
		outRel := filepath.Join("escape-outside", e.name)
		outAbs := c.abs(outRel)
		if err := os.MkdirAll(outAbs, 0o755); err != nil {
			return err
		}
		for n, b := range e.outside {
			if err := writeSparse(filepath.Join(outAbs, n), b); err != nil {
				return err
			}
		}
		err := c.multi("escape", e.name, e.note, e.image, e.fs(outAbs), func(dir string) error {
			for n, target := range e.links {
				if err := os.Symlink(target, filepath.Join(dir, n)); err != nil {
					return err
				}
			}
			return nil
		})
		if err != nil {
			return err
		}
		c.cases[len(c.cases)-1].Outside = outRel
	}
	return nil
}
