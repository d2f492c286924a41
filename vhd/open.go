package vhd

import (
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strings"
	"syscall"

	"github.com/vhdkit/vhdkit/disk"
	"github.com/vhdkit/vhdkit/storage"
)

func init() {
	disk.Register(disk.Format{
		Name:       "vhd",
		Extensions: []string{".vhd", ".avhd"},
		// Dynamic and differencing images start with a footer copy; every
		// VHD ends with its footer (512 bytes, or 511 in old images),
		// which is all a fixed image has.
		Match: func(head []byte) bool { return len(head) >= 8 && string(head[:8]) == footerCookie },
		MatchTail: func(tail []byte) bool {
			for _, n := range []int{footerSize, footerSize - 1} {
				if len(tail) >= n && string(tail[len(tail)-n:][:8]) == footerCookie {
					return true
				}
			}
			return false
		},
		Open: func(path string, o disk.OpenOptions) (disk.Image, error) {
			im, err := Open(path, OpenOptions{ReadOnly: o.ReadOnly, ForceShare: o.ForceShare, ParentDirs: o.ParentDirs})
			if err != nil {
				return nil, err
			}
			return im, nil
		},
	})
}

// OpenOptions control Open.
type OpenOptions struct {
	// ReadOnly opens the image without ever writing to it. Parents are
	// always opened read-only.
	ReadOnly bool
	// ForceShare, with ReadOnly, opens the chain's files without refusing
	// other users, even writers (see storage.OpenForceShare).
	ForceShare bool
	// ParentDirs, when not empty, confines the parents found through
	// locators to these directories (symbolic links resolved).
	ParentDirs []string
	// ParentPath, when set, is the parent of a differencing image instead
	// of what its locators say. Its unique id is still checked.
	ParentPath string
	// IgnoreChecksum reads structures whose checksum is wrong (for the
	// whole chain of VHDs). Their fields are still validated.
	IgnoreChecksum bool
	// NoParent opens a differencing image without looking for its parent,
	// to change its link (SetParent) or resize it when the parent is
	// missing or being replaced. Reading a range the file does not hold
	// fails with an error wrapping disk.ErrParentNotFound, and so does a
	// write that must complete a partial sector from the parent; Extents
	// reports such ranges as coming from the parent (depth 1).
	NoParent bool
	// FS, when set and not storage.OS, is the file system the image and
	// its VHD parents are opened in: the seam fault and crash sweeps use
	// (storage.MemFS).
	FS storage.FS
}

// open opens a file through the FS seam.
func (o OpenOptions) open(path string, flag int) (storage.File, error) {
	switch {
	case o.FS != nil && o.FS != storage.OS:
		return o.FS.OpenFile(path, flag, 0)
	case o.ForceShare && flag == os.O_RDONLY:
		return storage.OpenForceShare(path)
	case o.ForceShare:
		return nil, fmt.Errorf("%s: ForceShare needs ReadOnly", path)
	case flag&(os.O_WRONLY|os.O_RDWR) == 0:
		// A FIFO put where an image or a parent should be (a crafted
		// locator, a file swapped after its type was checked) must not
		// block the open forever; on a regular file O_NONBLOCK does
		// nothing, and reading a FIFO opened so finds no VHD.
		flag |= syscall.O_NONBLOCK
	}
	return storage.OpenFile(path, flag, 0)
}

// Open opens the VHD image at path.
func Open(path string, opts OpenOptions) (*Image, error) {
	return openPath(path, opts, nil)
}

// OpenFile opens the VHD image in f; path names it and locates parents.
// On success the image owns f and closes it in Close; on failure f is left
// open.
func OpenFile(f storage.File, path string, opts OpenOptions) (*Image, error) {
	return openFile(f, path, opts, nil)
}

func openPath(path string, opts OpenOptions, chain []os.FileInfo) (*Image, error) {
	flag := os.O_RDWR
	if opts.ReadOnly {
		flag = os.O_RDONLY
	}
	f, err := opts.open(path, flag)
	if err != nil {
		return nil, fmt.Errorf("vhd: %w", err)
	}
	im, err := openFile(f, path, opts, chain)
	if err != nil {
		f.Close()
		return nil, err
	}
	return im, nil
}

func openFile(f storage.File, path string, opts OpenOptions, chain []os.FileInfo) (*Image, error) {
	im := &Image{f: f, path: path, readOnly: opts.ReadOnly, fs: opts.FS}
	if err := im.load(opts.IgnoreChecksum); err != nil {
		return nil, fmt.Errorf("vhd: %s: %w", path, err)
	}
	if im.ft.DiskType == Differencing {
		if opts.NoParent {
			im.parent = missingParent{}
		} else {
			if fi, err := os.Stat(path); err == nil {
				chain = append(chain, fi)
			}
			if err := im.openParent(opts, chain); err != nil {
				return nil, fmt.Errorf("vhd: %s: %w", path, err)
			}
		}
	}
	if !im.readOnly {
		var err error
		switch {
		case im.fromCopy:
			err = im.restoreFooter()
		case im.copyStale:
			err = im.restoreCopy()
		}
		if err != nil {
			im.closeParent()
			return nil, fmt.Errorf("vhd: %s: restoring the footer: %w", path, err)
		}
	}
	return im, nil
}

// missingParent stands in for the parent of an image opened with
// NoParent. It is as large as a disk can be, so that every range the
// child does not hold is asked of it.
type missingParent struct{}

func (missingParent) ReadAt([]byte, int64) (int, error) {
	return 0, fmt.Errorf("vhd: parent not opened (NoParent): %w", disk.ErrParentNotFound)
}
func (missingParent) WriteAt([]byte, int64) (int, error) { return 0, disk.ErrReadOnly }
func (missingParent) Size() int64                        { return MaxSize }
func (missingParent) Flush() error                       { return nil }
func (missingParent) Close() error                       { return nil }

// load reads and checks every structure but the parent.
func (im *Image) load(ignoreChecksum bool) error {
	size, err := im.f.Size()
	if err != nil {
		return err
	}
	ft, raw, at, fromCopy, err := readFooter(im.f, size, ignoreChecksum)
	if err != nil {
		return err
	}
	im.ft, im.footerRaw, im.footerAt, im.fromCopy = ft, raw, at, fromCopy
	im.size, im.sizeFromCHS = ft.virtualSize()
	limit := at // data ends where the footer starts
	if fromCopy {
		limit = size
		im.warn(warnFromCopy)
	}
	if ft.DiskType == Fixed {
		if im.size > at {
			return formatErr("footer", at+48, "disk size %d exceeds the %d bytes before the footer (truncated?)", im.size, at)
		}
		return nil
	}
	if !fromCopy {
		var c [footerSize]byte
		if err := readFull(im.f, c[:], 0); err != nil {
			return err
		}
		if c != raw {
			im.warn(warnCopyStale)
			im.copyStale = true
		}
	}

	hdrOff := int64(ft.DataOffset) // Validate bounded it to 2^62
	if hdrOff > limit-headerSize {
		return formatErr("footer", at+16, "dynamic header at %#x does not fit in the %d data bytes of the file", hdrOff, limit)
	}
	var hb [headerSize]byte
	if err := readFull(im.f, hb[:], hdrOff); err != nil {
		return err
	}
	h := decodeHeader(hb[:])
	if err := h.Validate(limit); err != nil {
		return rebase(err, hdrOff)
	}
	if sum := checksum(hb[:], headerChecksumAt); sum != h.Checksum && !ignoreChecksum {
		return checksumErr("dynamic header", hdrOff+headerChecksumAt, h.Checksum, sum)
	}
	im.hdr, im.hdrOff = h, hdrOff
	im.blockSize = int64(h.BlockSize)
	im.bitmapSize = bitmapSize(im.blockSize)
	n := (im.size + im.blockSize - 1) / im.blockSize
	if n > int64(h.MaxTableEntries) {
		return formatErr("dynamic header", hdrOff+headerMaxEntAt, "%d BAT entries cannot map the %d-byte disk (%d needed)",
			h.MaxTableEntries, im.size, n)
	}
	t, err := readBAT(im.f, int64(h.TableOffset), n, limit)
	if err != nil {
		return err
	}
	im.bat = t
	batEnd := t.off + max(int64(len(t.raw)), 4*int64(h.MaxTableEntries))
	reserved := []span{
		{hdrOff, hdrOff + headerSize, "dynamic header"},
		{t.off, batEnd, "BAT"},
	}
	if ft.DiskType == Differencing {
		if im.locators, err = readLocators(im.f, &h, hdrOff, limit); err != nil {
			return err
		}
		for _, l := range im.locators {
			reserved = append(reserved, span{l.Offset, l.Offset + int64(l.Length), "parent locator " + l.Platform})
		}
	}
	if err := t.validateBlocks(im.bitmapSize+im.blockSize, limit, reserved); err != nil {
		return err
	}
	im.nextAlloc = at
	if fromCopy {
		// The next block goes after everything the file references,
		// including the space reserved for locators (which Hyper-V may
		// rewrite in place; it counts it in bytes, the spec in sectors).
		end := t.dataEnd(im.bitmapSize + im.blockSize)
		for _, r := range reserved {
			end = max(end, r.end)
		}
		for _, e := range h.Locators {
			if e.known() && e.DataLength > 0 {
				space := int64(e.DataSpace)
				if space < int64(e.DataLength) {
					space *= SectorSize
				}
				end = max(end, min(int64(e.DataOffset)+space, limit))
			}
		}
		im.nextAlloc = alignUp(end, SectorSize)
	}
	im.cache.m = make(map[int64][]byte)
	im.newBlocks = make(map[int64]bool)
	im.dirtyBitmaps = make(map[int64]bool)
	im.dirtyBAT = make(map[int64]bool)
	return nil
}

// restoreFooter puts the footer back at the end of a file whose end a
// crash damaged, dropping the unreferenced tail.
func (im *Image) restoreFooter() error {
	if err := im.f.Truncate(im.nextAlloc); err != nil {
		return err
	}
	if _, err := im.f.WriteAt(im.footerRaw[:], im.nextAlloc); err != nil {
		return err
	}
	if err := im.f.Sync(); err != nil {
		return err
	}
	im.footerAt, im.fromCopy = im.nextAlloc, false
	return nil
}

// restoreCopy rewrites the footer copy at offset 0 from the end footer in
// use: the copy is what Open falls back to when a crash damages the end,
// so it must describe the same header (see "Moving the header" in the
// package doc).
func (im *Image) restoreCopy() error {
	if _, err := im.f.WriteAt(im.footerRaw[:], 0); err != nil {
		return err
	}
	if err := im.f.Sync(); err != nil {
		return err
	}
	im.copyStale = false
	return nil
}

// openParent finds the parent (see the package doc), checks it and opens
// it read-only. chain holds the images below which it is opened, to refuse
// loops.
func (im *Image) openParent(opts OpenOptions, chain []os.FileInfo) error {
	if len(chain) > maxChainDepth {
		return unsupportedErr("dynamic header", im.hdrOff, "differencing chain deeper than %d", maxChainDepth)
	}
	want := im.hdr.ParentUniqueID
	var cands []string
	if opts.ParentPath != "" {
		cands = []string{opts.ParentPath}
	} else {
		cands = parentCandidates(filepath.Dir(absPath(im.path)), im.locators, im.hdr.parentName())
	}
	var tried []string
	var mismatch error
	for _, c := range cands {
		fi, err := os.Stat(c)
		if err != nil || !fi.Mode().IsRegular() {
			tried = append(tried, c)
			continue
		}
		if opts.ParentPath == "" && len(opts.ParentDirs) > 0 && !within(c, opts.ParentDirs) {
			tried = append(tried, c+" (outside the allowed parent folders)")
			continue
		}
		for _, s := range chain {
			if os.SameFile(s, fi) {
				return formatErr("dynamic header", im.hdrOff, "differencing chain loops back to %s", c)
			}
		}
		// The parent must be a VHD by its content, with the unique id the
		// child records: a locator may name any file (a hostile image
		// could serve a raw file or another format's disk as its own
		// content), and a stale one may name another disk.
		pf, err := peekFooterWith(opts, c, opts.IgnoreChecksum)
		if err != nil && !notVHD(err) {
			return fmt.Errorf("parent %s: %w", c, err)
		}
		if err != nil {
			if mismatch == nil {
				mismatch = fmt.Errorf("%w: %s is not a VHD (a differencing VHD's parent is a VHD)", disk.ErrParentMismatch, c)
			}
			continue
		}
		if pf.UniqueID != want {
			if mismatch == nil {
				mismatch = fmt.Errorf("%w: %s has unique id %s, the child expects %s", disk.ErrParentMismatch, c, pf.UniqueID, want)
			}
			continue
		}
		parent, err := openPath(c, OpenOptions{ReadOnly: true, ForceShare: opts.ForceShare, ParentDirs: opts.ParentDirs, IgnoreChecksum: opts.IgnoreChecksum, FS: opts.FS}, chain)
		if err != nil {
			return fmt.Errorf("parent: %w", err)
		}
		im.parent, im.parentPath = parent, c
		if ts := im.hdr.ParentTimeStamp; ts != 0 && ts != vhdTime(fi.ModTime()) && ts != pf.TimeStamp {
			im.parentTSMismatch = true
			im.warn(fmt.Sprintf("parent time stamp %s does not match %s (modified %s): the parent may have changed since the child was made",
				fromVHDTime(ts).Format("2006-01-02 15:04:05Z"), c, fi.ModTime().UTC().Format("2006-01-02 15:04:05Z")))
		}
		// A larger child is what Resize makes: it reads zeros past the
		// parent's end. A smaller one hides the parent's tail.
		if ps := parent.Size(); ps > im.size {
			im.warn(fmt.Sprintf("parent is %d bytes, the child only %d", ps, im.size))
		}
		return nil
	}
	if mismatch != nil {
		return mismatch
	}
	name := im.hdr.parentName()
	if name == "" && len(im.locators) > 0 {
		name = im.locators[0].Path
	}
	return fmt.Errorf("%w: %q (tried %s)", disk.ErrParentNotFound, name, strings.Join(tried, ", "))
}

// peekFooter reads the footer of the file at path, reporting whether it
// is a VHD.
func peekFooter(path string, ignoreChecksum bool) (footer, bool) {
	ft, err := peekFooterWith(OpenOptions{}, path, ignoreChecksum)
	return ft, err == nil
}

// peekFooterWith reads the footer of the file at path. The error is a
// *FormatError (errNotVHD) when the content is not a VHD, and the cause
// itself when the file could not be opened or read: an I/O error is not a
// verdict on the file.
func peekFooterWith(opts OpenOptions, path string, ignoreChecksum bool) (footer, error) {
	f, err := opts.open(path, os.O_RDONLY)
	if err != nil {
		return footer{}, err
	}
	defer f.Close()
	size, err := f.Size()
	if err != nil {
		return footer{}, err
	}
	ft, _, _, _, err := readFooter(f, size, ignoreChecksum)
	return ft, err
}

// notVHD reports whether err says a file's content is not a VHD (rather
// than that it could not be read).
func notVHD(err error) bool {
	var fe *FormatError
	return errors.As(err, &fe)
}

func absPath(p string) string {
	if a, err := filepath.Abs(p); err == nil {
		return a
	}
	return p
}

// within reports whether p lies in one of dirs, symbolic links resolved.
func within(p string, dirs []string) bool {
	rp, err := filepath.EvalSymlinks(p)
	if err != nil {
		return false
	}
	rp = absPath(rp)
	for _, d := range dirs {
		rd, err := filepath.EvalSymlinks(d)
		if err != nil {
			continue
		}
		rel, err := filepath.Rel(absPath(rd), rp)
		if err == nil && rel != ".." && !strings.HasPrefix(rel, ".."+string(filepath.Separator)) {
			return true
		}
	}
	return false
}

// readFull reads len(p) bytes at off; a short file is a format error.
func readFull(f storage.File, p []byte, off int64) error {
	n, err := f.ReadAt(p, off)
	if n == len(p) {
		return nil
	}
	if err == nil || errors.Is(err, io.EOF) {
		return formatErr("file", off+int64(n), "unexpected end of file reading %d bytes at %#x", len(p), off)
	}
	return err
}
