package vhdx

import (
	"fmt"
	"os"
	"path/filepath"
	"strings"
)

// Parent locator keys (MS-VHDX 2.6.2.6.1).
const (
	keyLinkage      = "parent_linkage"
	keyLinkage2     = "parent_linkage2"
	keyRelativePath = "relative_path"
	keyVolumePath   = "volume_path"
	keyAbsolutePath = "absolute_win32_path"
)

// openParent resolves, opens (read-only) and checks the parent of a
// differencing image. seen holds the files already in the chain, to refuse
// a loop.
func (im *Image) openParent(opts OpenOptions, seen []os.FileInfo) error {
	if p := opts.ParentImage; p != nil {
		if err := im.checkParent(p); err != nil {
			return err
		}
		im.parent, im.parentPath = p, p.path
		return nil
	}
	if fi, err := os.Stat(im.path); err == nil {
		seen = append(seen, fi)
	}
	var tried []string
	for _, c := range im.parentCandidates(opts.ParentPath) {
		if len(opts.ParentDirs) > 0 && !within(c, opts.ParentDirs) {
			tried = append(tried, c+" (outside the allowed directories)")
			continue
		}
		fi, err := os.Stat(c)
		if err != nil {
			tried = append(tried, c)
			continue
		}
		for _, s := range seen {
			if os.SameFile(s, fi) {
				return fmt.Errorf("vhdx: %s: parent chain loops back to %s: %w", im.path, c, ErrParentMismatch)
			}
		}
		parent, err := openChain(c, OpenOptions{ReadOnly: true, ForceShare: opts.ForceShare, ParentDirs: opts.ParentDirs, OpenFile: opts.OpenFile}, seen)
		if err != nil {
			return fmt.Errorf("vhdx: %s: opening parent: %w", im.path, err)
		}
		if err := im.checkParent(parent); err != nil {
			parent.Close()
			return err
		}
		im.parent, im.parentPath = parent, c
		return nil
	}
	return fmt.Errorf("vhdx: %s: parent not found (tried %s): %w", im.path, strings.Join(tried, ", "), ErrParentNotFound)
}

// parentCandidates lists where the parent may be, best first: the caller's
// path, else the locator's relative path from the child's folder, then the
// file name of its absolute paths in the child's folder.
func (im *Image) parentCandidates(explicit string) []string {
	if explicit != "" {
		return []string{explicit}
	}
	dir := filepath.Dir(im.path)
	var out []string
	add := func(p string) {
		for _, q := range out {
			if q == p {
				return
			}
		}
		out = append(out, p)
	}
	loc := im.p.Locator
	if rel, ok := loc.Get(keyRelativePath); ok && rel != "" {
		rel = strings.ReplaceAll(rel, `\`, "/")
		if filepath.IsAbs(rel) {
			add(filepath.Clean(rel))
		} else {
			add(filepath.Join(dir, rel))
		}
	}
	for _, k := range []string{keyAbsolutePath, keyVolumePath} {
		if abs, ok := loc.Get(k); ok && abs != "" {
			if strings.HasPrefix(abs, "/") || (strings.HasPrefix(abs, `\`) && !strings.HasPrefix(abs, `\\`)) {
				// A path without a drive: ours, written from a POSIX path.
				add(filepath.Clean(strings.ReplaceAll(abs, `\`, "/")))
			}
			name := abs[strings.LastIndexAny(abs, `\/`)+1:]
			if name != "" && name != "." && name != ".." {
				add(filepath.Join(dir, name))
			}
		}
	}
	return out
}

// within reports whether path lies in one of dirs, after resolving
// symbolic links so a link cannot lead outside.
func within(path string, dirs []string) bool {
	p, err := filepath.EvalSymlinks(path)
	if err != nil {
		p = path
	}
	if p, err = filepath.Abs(p); err != nil {
		return false
	}
	for _, d := range dirs {
		if r, err := filepath.EvalSymlinks(d); err == nil {
			d = r
		}
		d, err := filepath.Abs(d)
		if err != nil {
			continue
		}
		if rel, err := filepath.Rel(d, p); err == nil && rel != ".." && !strings.HasPrefix(rel, "../") {
			return true
		}
	}
	return false
}

// linkages returns the parent linkage GUIDs the child accepts.
func (im *Image) linkages() (l1, l2 GUID, err error) {
	s, _ := im.p.Locator.Get(keyLinkage)
	if l1, err = ParseGUID(s); err != nil {
		return l1, l2, formatErr("parent locator", int64(im.regs.Metadata.Offset), "parent_linkage %q is not a GUID", s)
	}
	if s, ok := im.p.Locator.Get(keyLinkage2); ok {
		if l2, err = ParseGUID(s); err != nil {
			return l1, l2, formatErr("parent locator", int64(im.regs.Metadata.Offset), "parent_linkage2 %q is not a GUID", s)
		}
	}
	return l1, l2, nil
}

// checkParent verifies that parent is the image the child was made from.
// Their sizes may differ, as after Hyper-V expands a differencing disk: the
// child reads zeros where it holds nothing past the parent's end, and a
// smaller child sees a prefix of its parent.
func (im *Image) checkParent(parent *Image) error {
	l1, l2, err := im.linkages()
	if err != nil {
		return err
	}
	got := parent.hdr.DataWriteGUID
	if got != l1 && (l2.IsZero() || got != l2) {
		want := "{" + l1.String() + "}"
		if !l2.IsZero() {
			want += " or {" + l2.String() + "}"
		}
		return fmt.Errorf("vhdx: %s: parent %s has DataWriteGuid {%s}, the child expects %s: %w",
			im.path, parent.path, got, want, ErrParentMismatch)
	}
	if parent.p.LogicalSectorSize != im.p.LogicalSectorSize {
		return fmt.Errorf("vhdx: %s: parent %s has %d-byte sectors, the child %d-byte: %w",
			im.path, parent.path, parent.p.LogicalSectorSize, im.p.LogicalSectorSize, ErrParentMismatch)
	}
	return nil
}

// relativeLocator returns the relative_path Hyper-V writes for a parent at
// parentPath seen from a child at childPath: backslashes, ".\" for the
// same folder.
func relativeLocator(childPath, parentPath string) string {
	cd, err1 := filepath.Abs(filepath.Dir(childPath))
	pp, err2 := filepath.Abs(parentPath)
	if err1 != nil || err2 != nil {
		return `.\` + filepath.Base(parentPath)
	}
	rel, err := filepath.Rel(cd, pp)
	if err != nil {
		return `.\` + filepath.Base(parentPath)
	}
	if !strings.HasPrefix(rel, "..") {
		rel = "./" + rel
	}
	return strings.ReplaceAll(rel, "/", `\`)
}
