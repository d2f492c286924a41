package vhdx

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"

	"github.com/vhdkit/vhdkit/storage"
)

// Parent locator keys (MS-VHDX 2.6.2.6.1).
const (
	keyLinkage      = "parent_linkage"
	keyLinkage2     = "parent_linkage2"
	keyRelativePath = "relative_path"
	keyVolumePath   = "volume_path"
	keyAbsolutePath = "absolute_win32_path"
)

// maxChainDepth bounds a differencing chain, in images. Each image of a
// chain holds an open file, its BAT and a level of recursion while the
// chain opens, so a crafted chain of thousands of files (each naming the
// next) would hold thousands of open files. Hyper-V allows 50 checkpoints
// per machine; 256, as the vhd package, leaves room for any real chain.
const maxChainDepth = 256

// openParent resolves, opens (read-only) and checks the parent of a
// differencing image. seen holds the files already in the chain, to refuse
// a loop and a chain deeper than maxChainDepth.
//
// The locator's paths are tried in the order MS-VHDX 2.6.2.6 gives
// (parentCandidates); a candidate is taken only if it is a regular file
// holding a VHDX whose DataWriteGuid is the child's parent_linkage (or
// parent_linkage2): anything else is passed over for the next one, and
// named in the error when none is taken.
func (im *Image) openParent(opts OpenOptions, seen []os.FileInfo) error {
	if p := opts.ParentImage; p != nil {
		if err := im.checkParent(p); err != nil {
			return err
		}
		im.parent, im.parentPath = p, p.path
		return nil
	}
	fi, _ := os.Stat(im.path) // nil when it fails: still one more level
	seen = append(seen, fi)
	if len(seen) >= maxChainDepth {
		return &chainDepthError{im.path}
	}
	popts := OpenOptions{ReadOnly: true, ForceShare: opts.ForceShare, ParentDirs: opts.ParentDirs, FS: opts.FS}
	var tried []string
	var mismatch error
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
		if !fi.Mode().IsRegular() {
			tried = append(tried, c+" (not a regular file)")
			continue
		}
		for _, s := range seen {
			if s != nil && os.SameFile(s, fi) {
				return fmt.Errorf("vhdx: %s: parent chain loops back to %s: %w", im.path, c, ErrParentMismatch)
			}
		}
		f, err := openImageFile(c, popts, true)
		if err != nil {
			return fmt.Errorf("vhdx: %s: opening parent: %w", im.path, err)
		}
		got, err := peekDataWriteGUID(f)
		if err == nil {
			err = im.checkLinkage(got, c)
		}
		switch {
		case errors.Is(err, errNotVHDX):
			tried = append(tried, c+" (not a VHDX file)")
		case errors.Is(err, ErrParentMismatch):
			tried = append(tried, c+" (another DataWriteGuid)")
			if mismatch == nil {
				mismatch = err
			}
		case err != nil:
			f.Close()
			return fmt.Errorf("vhdx: %s: opening parent %s: %w", im.path, c, err)
		default:
			parent, err := openFile(f, c, popts, seen)
			if err != nil {
				f.Close()
				var deep *chainDepthError
				if errors.As(err, &deep) {
					return err // one line, not one per level
				}
				return fmt.Errorf("vhdx: %s: opening parent: %w", im.path, err)
			}
			if err := im.checkParent(parent); err != nil {
				parent.Close()
				return err
			}
			im.parent, im.parentPath = parent, c
			return nil
		}
		f.Close()
	}
	if mismatch != nil {
		if len(tried) > 1 {
			return fmt.Errorf("%w (tried %s)", mismatch, strings.Join(tried, ", "))
		}
		return mismatch
	}
	return fmt.Errorf("vhdx: %s: parent not found (tried %s): %w", im.path, strings.Join(tried, ", "), ErrParentNotFound)
}

// chainDepthError refuses a chain deeper than maxChainDepth.
type chainDepthError struct{ path string } // the image whose parent was not opened

func (e *chainDepthError) Error() string {
	return fmt.Sprintf("vhdx: differencing chain deeper than %d images (the parent of %s, image %d, not opened)", maxChainDepth, e.path, maxChainDepth)
}

func (e *chainDepthError) Unwrap() error { return ErrUnsupported }

// peekDataWriteGUID reads the current header of the VHDX in f, without
// the rest of it: a candidate parent is checked before its chain is
// opened.
func peekDataWriteGUID(f storage.File) (GUID, error) {
	size, err := f.Size()
	if err != nil {
		return GUID{}, err
	}
	im := &Image{f: f}
	if err := im.readHeaders(size); err != nil {
		return GUID{}, err
	}
	return im.hdr.DataWriteGUID, nil
}

// parentCandidates lists where the parent may be, in the order MS-VHDX
// 2.6.2.6 asks: the caller's path alone if given, else relative_path
// (from the child's folder), volume_path, then absolute_win32_path. A
// Windows path is tried by its file name in the child's folder (Hyper-V's
// chains are moved folder and all); one without a drive or volume is ours,
// written from a POSIX path, and is tried as it is first.
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
	for _, k := range []string{keyVolumePath, keyAbsolutePath} {
		if abs, ok := loc.Get(k); ok && abs != "" {
			if strings.HasPrefix(abs, "/") || (strings.HasPrefix(abs, `\`) && !strings.HasPrefix(abs, `\\`)) {
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
	if err := im.checkLinkage(parent.hdr.DataWriteGUID, parent.path); err != nil {
		return err
	}
	if parent.p.LogicalSectorSize != im.p.LogicalSectorSize {
		return fmt.Errorf("vhdx: %s: parent %s has %d-byte sectors, the child %d-byte: %w",
			im.path, parent.path, parent.p.LogicalSectorSize, im.p.LogicalSectorSize, ErrParentMismatch)
	}
	return nil
}

// checkLinkage checks that got, the DataWriteGuid of the parent at path,
// is one the child accepts.
func (im *Image) checkLinkage(got GUID, path string) error {
	l1, l2, err := im.linkages()
	if err != nil {
		return err
	}
	if got != l1 && (l2.IsZero() || got != l2) {
		want := "{" + l1.String() + "}"
		if !l2.IsZero() {
			want += " or {" + l2.String() + "}"
		}
		return fmt.Errorf("vhdx: %s: parent %s has DataWriteGuid {%s}, the child expects %s: %w",
			im.path, path, got, want, ErrParentMismatch)
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
