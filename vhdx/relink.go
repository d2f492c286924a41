package vhdx

import (
	"fmt"
	"os"
	"path/filepath"
	"strings"

	"github.com/vhdkit/vhdkit/storage"
)

// Changes to a chain's links: a child's parent locator and a parent's
// DataWriteGuid. They are what merge and re-parenting are made of, and
// they follow the rules that keep a chain openable at every moment: the
// locator changes through the log like any metadata, and a parent's new
// DataWriteGuid is chosen by the caller so it can be recorded in the child
// (parent_linkage2) before the parent changes.

// BeginDataChange makes g the image's DataWriteGuid, before any change to
// its data: the header update that opens the image for writing uses g
// instead of a random GUID. It fails if the image was already written to
// with another DataWriteGuid.
func (im *Image) BeginDataChange(g GUID) error {
	if err := im.writable(); err != nil {
		return err
	}
	im.mu.Lock()
	defer im.mu.Unlock()
	if im.closed {
		return errClosed
	}
	if im.writing {
		if im.hdr.DataWriteGUID != g {
			return fmt.Errorf("vhdx: %s: already written with DataWriteGuid {%s}", im.path, im.hdr.DataWriteGUID)
		}
		return nil
	}
	return im.startWriting(g)
}

// NewGUID returns a random GUID, for BeginDataChange.
func NewGUID() GUID { return newGUID() }

// SetParentLinkage2 records g as a second DataWriteGuid the parent may
// have: the child then opens over its parent before and after the parent
// changes to g. Durable once Flush returns.
func (im *Image) SetParentLinkage2(g GUID) error {
	return im.updateLocator(func(l *parentLocator) {
		l.Set(keyLinkage2, "{"+g.String()+"}")
	})
}

// SetParent points the child at a new parent file whose DataWriteGuid is
// linkage: the locator's paths are rewritten for parentPath (relative to
// the child's folder, and absolute), parent_linkage becomes linkage and
// parent_linkage2 is dropped. The open image keeps reading through the
// parent it had; reopen it to use the new one. Durable once Flush returns.
func (im *Image) SetParent(parentPath string, linkage GUID) error {
	abs, err := filepath.Abs(parentPath)
	if err != nil {
		return err
	}
	return im.updateLocator(func(l *parentLocator) {
		var kept []locatorEntry
		for _, e := range l.Entries {
			switch e.Key {
			case keyLinkage2, keyVolumePath:
				// Stale with a new parent.
			default:
				kept = append(kept, e)
			}
		}
		l.Entries = kept
		l.Set(keyLinkage, "{"+linkage.String()+"}")
		l.Set(keyRelativePath, relativeLocator(im.path, parentPath))
		l.Set(keyAbsolutePath, strings.ReplaceAll(abs, "/", `\`))
	})
}

// updateLocator applies change to a copy of the parent locator and logs
// the rewritten metadata region.
func (im *Image) updateLocator(change func(*parentLocator)) error {
	if err := im.writable(); err != nil {
		return err
	}
	im.mu.Lock()
	defer im.mu.Unlock()
	if im.closed {
		return errClosed
	}
	if !im.p.HasParent {
		return fmt.Errorf("vhdx: %s: not a differencing image", im.path)
	}
	loc := parentLocator{Type: im.p.Locator.Type, Entries: append([]locatorEntry(nil), im.p.Locator.Entries...)}
	change(&loc)
	if err := im.beginWrite(false); err != nil {
		return err
	}
	if err := im.rewriteMetadata(itemParentLocator, loc.marshal()); err != nil {
		return err
	}
	im.p.Locator = &loc
	return nil
}

// rewriteMetadata replaces item id's content by data in memory and marks
// the pages that change for the log. The caller holds mu.
func (im *Image) rewriteMetadata(id GUID, data []byte) error {
	buf, entries, pages, err := im.renderMetadata(id, data)
	if err != nil {
		return err
	}
	im.metaBuf, im.meta = buf, entries
	for _, off := range pages {
		im.dirty[off] = struct{}{}
	}
	return nil
}

// renderMetadata renders the metadata region with item id's content
// replaced by data, items packed after the table in their table order. It
// returns the region's used part, the new table and the file offsets of
// the pages to log. The caller holds mu.
func (im *Image) renderMetadata(id GUID, data []byte) (buf []byte, entries []metaEntry, pages []int64, err error) {
	regionOff := int64(im.regs.Metadata.Offset)
	buf = make([]byte, metaTableSize)
	entries = append([]metaEntry(nil), im.meta...)
	oldEnd := int64(metaTableSize)
	for i := range entries {
		e := &entries[i]
		oldEnd = max(oldEnd, int64(e.Offset)+int64(e.Length))
		item := data
		if e.ID != id || e.IsUser {
			item = make([]byte, e.Length)
			switch {
			case e.Length == 0:
			case im.metaBuf != nil:
				// Rewritten before: memory is newer than the file.
				copy(item, im.metaBuf[e.Offset:])
			default:
				if err := im.readAt(item, regionOff+int64(e.Offset), "metadata item"); err != nil {
					return nil, nil, nil, err
				}
			}
		}
		e.Offset, e.Length = 0, uint32(len(item))
		if len(item) > 0 {
			e.Offset = uint32(len(buf))
			buf = append(buf, item...)
		}
	}
	if int64(len(buf)) > int64(im.regs.Metadata.Length) {
		return nil, nil, nil, fmt.Errorf("vhdx: %s: metadata does not fit its %d-byte region", im.path, im.regs.Metadata.Length)
	}
	copy(buf, marshalMetaTable(entries))
	end := max(oldEnd, int64(len(buf)))
	// The table's used part and every page of items, old or new.
	for off := int64(0); off < end; off += pageSize {
		if off >= alignUp(32+32*int64(len(entries)), pageSize) && off < metaTableSize {
			continue
		}
		pages = append(pages, regionOff+off)
	}
	return buf, entries, pages, nil
}

// ParentLink is where a differencing image says its parent is.
type ParentLink struct {
	Candidates []string // paths the locator names, best first
	Linkage    GUID     // parent_linkage
	Linkage2   GUID     // parent_linkage2, zero when absent
	// Relative is the candidate the locator's relative_path names (taken
	// from the child's folder); "" when it has none.
	Relative string
}

// ReadParentLink reads a differencing image's parent locator without
// opening the parent; it returns nil for an image without a parent. Of
// opts only OpenFile is used.
func ReadParentLink(path string, opts OpenOptions) (*ParentLink, error) {
	var f storage.File
	var err error
	if opts.FS != nil {
		f, err = opts.FS.OpenFile(path, os.O_RDONLY, 0)
	} else {
		f, err = storage.OpenFile(path, os.O_RDONLY, 0)
	}
	if err != nil {
		return nil, err
	}
	im := &Image{f: f, path: path, readOnly: true, dirty: map[int64]struct{}{}}
	defer f.Close()
	if _, err := im.readStructure(); err != nil {
		return nil, err
	}
	if !im.p.HasParent {
		return nil, nil
	}
	l := &ParentLink{Candidates: im.parentCandidates("")}
	if rel, ok := im.p.Locator.Get(keyRelativePath); ok && rel != "" && !filepath.IsAbs(strings.ReplaceAll(rel, `\`, "/")) {
		l.Relative = l.Candidates[0] // parentCandidates puts it first
	}
	if l.Linkage, l.Linkage2, err = im.linkages(); err != nil {
		return nil, err
	}
	return l, nil
}

// Reparent points the open child at parentPath, whose DataWriteGuid must
// be linkage, and reads through that file from then on: the locator
// changes (SetParent) and is made durable, then the new parent, opened
// read-only, replaces the old one, which is closed. It is how a running
// disk whose parent was merged away goes on without being reopened.
func (im *Image) Reparent(parentPath string, linkage GUID, opts OpenOptions) error {
	p, err := openChain(parentPath, OpenOptions{ReadOnly: true, ParentDirs: opts.ParentDirs, FS: opts.FS}, nil)
	if err != nil {
		return fmt.Errorf("vhdx: %s: opening the new parent: %w", im.path, err)
	}
	if got := p.hdr.DataWriteGUID; got != linkage {
		p.Close()
		return fmt.Errorf("vhdx: %s: new parent %s has DataWriteGuid {%s}, not {%s}: %w", im.path, parentPath, got, linkage, ErrParentMismatch)
	}
	if err := im.SetParent(parentPath, linkage); err != nil {
		p.Close()
		return err
	}
	if err := im.Flush(); err != nil {
		p.Close()
		return err
	}
	return im.swapParent(p, parentPath)
}

// ReopenParent opens the parent's chain afresh, read-only, and reads
// through it from then on: for an open child whose ancestors' links
// changed under it (a merge re-pointed its parent at a grandparent).
func (im *Image) ReopenParent(opts OpenOptions) error {
	im.mu.RLock()
	path := im.parentPath
	im.mu.RUnlock()
	if path == "" {
		return fmt.Errorf("vhdx: %s: no parent to reopen", im.path)
	}
	p, err := openChain(path, OpenOptions{ReadOnly: true, ParentDirs: opts.ParentDirs, FS: opts.FS}, nil)
	if err != nil {
		return fmt.Errorf("vhdx: %s: reopening the parent: %w", im.path, err)
	}
	return im.swapParent(p, path)
}

// swapParent makes p, which must match the child's linkage, the parent
// and closes the old one.
func (im *Image) swapParent(p *Image, path string) error {
	im.mu.Lock()
	if err := im.checkParent(p); err != nil {
		im.mu.Unlock()
		p.Close()
		return err
	}
	old := im.parent
	im.parent, im.parentPath = p, path
	im.mu.Unlock()
	if old != nil {
		old.Close()
	}
	return nil
}
