package vhd

import (
	"fmt"
	"os"
	"path/filepath"
	"strings"

	"github.com/vhdkit/vhdkit/disk"
	"github.com/vhdkit/vhdkit/storage"
)

// SetParent points a differencing image at the parent file at parentPath,
// recording what Create records for a new child of it: the parent's unique
// id (its footer's; the parent must be a VHD), its modification time as the parent time stamp, its absolute path as the
// parent name, and the W2ku (absolute) and W2ru (relative to the image's
// folder) locators in place of all the old ones. The parent's content is
// not compared with the old parent's: making sure the child reads the
// same over it is the caller's business (merge, a moved parent).
//
// The change moves the header (see "Moving the header" in the package
// doc): a crash leaves the old link or the new one, and the new one is
// durable when SetParent returns. Writes not yet flushed are flushed
// first. The open image keeps reading through the parent it was opened
// with (none with OpenOptions.NoParent); reopen it to read through the
// new one.
func (im *Image) SetParent(parentPath string) error {
	im.mu.Lock()
	defer im.mu.Unlock()
	if err := im.writable(); err != nil {
		return err
	}
	if im.ft.DiskType != Differencing {
		return fmt.Errorf("vhd: %s: %w: a %s image has no parent", im.path, disk.ErrUnsupported, im.ft.DiskType)
	}
	abs := absPath(parentPath)
	id, ts, err := parentLink(OpenOptions{FS: im.fs}, abs, im.path)
	if err != nil {
		return fmt.Errorf("vhd: %s: set parent: %w", im.path, err)
	}
	locs := newLocators(im.path, abs)
	for _, l := range locs {
		if len(l.data) > maxLocatorLength {
			return fmt.Errorf("vhd: %s: set parent: %w: a %d-byte locator for %s exceeds %d", im.path, disk.ErrUnsupported, len(l.data), abs, maxLocatorLength)
		}
	}
	h := im.hdr
	h.ParentUniqueID, h.ParentTimeStamp = id, ts
	h.setParentName(abs, filepath.Base(abs))
	h.MaxTableEntries = uint32(im.bat.n)
	if err := im.flush(); err != nil {
		im.failed = err
		return fmt.Errorf("vhd: %s: flush: %w", im.path, err)
	}
	if err := im.relocate(h, locs, im.batFor(im.bat.n), im.ft); err != nil {
		im.failed = err
		return fmt.Errorf("vhd: %s: set parent: %w", im.path, err)
	}
	return nil
}

// parentLink returns what a child records about the parent at path (an
// absolute path to a VHD): its unique id and its modification time.
func parentLink(opts OpenOptions, path, child string) (UUID, uint32, error) {
	fi, err := os.Stat(path)
	if err != nil {
		return UUID{}, 0, fmt.Errorf("parent: %w", err)
	}
	if !fi.Mode().IsRegular() {
		return UUID{}, 0, fmt.Errorf("parent %s is not a regular file", path)
	}
	if cfi, err := os.Stat(child); err == nil && os.SameFile(fi, cfi) {
		return UUID{}, 0, fmt.Errorf("%w: parent %s is the image itself", disk.ErrUnsupported, path)
	}
	pf, err := peekFooterWith(opts, path, false)
	if err != nil && !notVHD(err) {
		return UUID{}, 0, fmt.Errorf("parent %s: %w", path, err)
	}
	if err != nil {
		return UUID{}, 0, fmt.Errorf("parent %s: %w: not a VHD (a differencing VHD's parent is a VHD; convert it first)", path, disk.ErrUnsupported)
	}
	return pf.UniqueID, vhdTime(fi.ModTime()), nil
}

// newLocators are the locators of a child at path whose parent is at
// parent (absolute): W2ku, the absolute path, then W2ru, the path
// relative to the child's folder in Windows form (".\base.vhd").
func newLocators(path, parent string) []locatorData {
	return []locatorData{
		{platformW2ku, encodeUTF16LE(parent)},
		{platformW2ru, encodeUTF16LE(relativeLocator(filepath.Dir(absPath(path)), parent))},
	}
}

// batFor returns the BAT of a disk of n blocks as it goes on disk: the
// entries of the blocks kept, unused entries for new ones, padded to a
// whole sector with unused entries.
func (im *Image) batFor(n int64) []byte {
	raw := make([]byte, alignUp(4*n, SectorSize))
	for i := range raw {
		raw[i] = 0xFF
	}
	copy(raw, im.bat.raw[:4*min(n, im.bat.n)])
	return raw
}

// ParentLink is where a differencing VHD says its parent is.
type ParentLink struct {
	// Candidates are the paths the locators and the parent name lead to,
	// best first, in the order Open tries them.
	Candidates []string
	// Relative is the candidate a relative locator (W2ru, Wi2r) names,
	// taken from the child's folder; "" when there is none.
	Relative string
	// UniqueID is the unique id the parent must have (the footer id of a
	// VHD parent); zero when the child recorded none.
	UniqueID UUID
}

// ReadParentLink reads a differencing image's parent locators and parent
// unique id without opening the parent; it returns nil for an image that
// has no parent. Of opts only OpenFile is used.
func ReadParentLink(path string, opts OpenOptions) (*ParentLink, error) {
	f, err := opts.open(path, os.O_RDONLY)
	if err != nil {
		return nil, fmt.Errorf("vhd: %w", err)
	}
	defer f.Close()
	return readParentLink(f, path)
}

func readParentLink(f storage.File, path string) (*ParentLink, error) {
	im := &Image{f: f, path: path, readOnly: true}
	if err := im.load(false); err != nil {
		return nil, fmt.Errorf("vhd: %s: %w", path, err)
	}
	if im.ft.DiskType != Differencing {
		return nil, nil
	}
	dir := filepath.Dir(absPath(path))
	l := &ParentLink{
		Candidates: parentCandidates(dir, im.locators, im.hdr.parentName()),
		UniqueID:   im.hdr.ParentUniqueID,
	}
	for _, loc := range im.locators {
		if p := strings.TrimSpace(strings.ReplaceAll(loc.Path, `\`, "/")); (loc.Platform == "W2ru" || loc.Platform == "Wi2r") && p != "" && !isWindowsAbs(p) && !strings.HasPrefix(p, "/") {
			l.Relative = mapPath(dir, loc.Path)
			break
		}
	}
	return l, nil
}
