package vhd

import (
	"errors"
	"fmt"
	"os"
	"slices"

	"github.com/vhdkit/vhdkit/disk"
	"github.com/vhdkit/vhdkit/storage"
)

// Problem is one inconsistency found by Check.
type Problem struct {
	Offset int64  // file offset of the structure, -1 if none
	What   string // one line
	// Warning: the image opens and reads correctly anyway (a tolerated
	// oddity, leaked space, a parent time stamp mismatch).
	Warning bool
}

func (p Problem) String() string {
	kind := "error"
	if p.Warning {
		kind = "warning"
	}
	if p.Offset < 0 {
		return kind + ": " + p.What
	}
	return fmt.Sprintf("%s at offset %d: %s", kind, p.Offset, p.What)
}

// Check inspects the image at path, and its chain, like Test-VHD: the
// footer and its copy, the header, the BAT and the blocks it points at,
// the parent locators and the parent. It returns the problems found (none:
// consistent). A checksum failure is reported, then checking goes on as
// if the checksum were right. With repair, a damaged footer (at the end
// or the copy at 0) is rewritten from the intact one when nothing worse
// is wrong, and a fixed image whose resize a crash tore (see "Resizing"
// in the package doc) is cut after the footer the resize left. The error
// is for I/O failures only.
func Check(path string, repair bool) ([]Problem, error) {
	return check(path, repair, OpenOptions{ReadOnly: true})
}

// CheckForceShare is Check without repair of a file that may be in use:
// it opens the file and its chain without refusing their other users (see
// storage.OpenForceShare), so a file being written may show problems that
// are only writes in flight.
func CheckForceShare(path string) ([]Problem, error) {
	return check(path, false, OpenOptions{ReadOnly: true, ForceShare: true})
}

func check(path string, repair bool, opts OpenOptions) ([]Problem, error) {
	f, err := opts.open(path, os.O_RDONLY)
	if err != nil {
		return nil, fmt.Errorf("vhd: %w", err)
	}
	defer f.Close()
	var probs []Problem
	add := func(err error) {
		p := Problem{Offset: -1, What: err.Error()}
		var fe *FormatError
		if errors.As(err, &fe) {
			p.Offset = fe.Offset
		}
		probs = append(probs, p)
	}
	im, err := openFile(f, path, opts, nil)
	checksumBad := errors.Is(err, disk.ErrChecksum)
	if checksumBad {
		add(err)
		opts.IgnoreChecksum = true
		im, err = openFile(f, path, opts, nil)
	}
	if err != nil {
		var pe *os.PathError
		if errors.As(err, &pe) && !errors.Is(err, os.ErrNotExist) {
			return probs, err
		}
		add(err)
		if repair && errors.Is(err, disk.ErrFormat) {
			at, err := findFixedFooter(f)
			if err != nil || at < 0 {
				return probs, err
			}
			if err := cutAfter(path, at+footerSize); err != nil {
				return probs, err
			}
			probs = append(probs, Problem{Offset: at, Warning: true,
				What: "no footer at the end (a resize torn by a crash): file cut after the fixed image footer found here"})
		}
		return probs, nil
	}
	defer im.closeParent()
	repairable := im.fromCopy
	for _, w := range im.warnings {
		probs = append(probs, Problem{Offset: -1, What: w, Warning: true})
	}
	probs = append(probs, im.lint()...)
	if im.ft.DiskType != Fixed && !im.fromCopy {
		var c [footerSize]byte
		if err := readFull(f, c[:], 0); err != nil {
			return probs, err
		}
		repairable = repairable || c != im.footerRaw
	}
	// Only a footer that passed its checksum is copied over the other.
	if repair && repairable && !checksumBad {
		if err := repairFooters(path); err != nil {
			return probs, err
		}
		probs = append(probs, Problem{Offset: -1, What: "footers rewritten", Warning: true})
	}
	return probs, nil
}

// repairFooters rewrites the end footer (a writable open does) and the
// copy at 0 from the footer in use.
func repairFooters(path string) error {
	im, err := Open(path, OpenOptions{})
	if err != nil {
		return err
	}
	if _, err := im.f.WriteAt(im.footerRaw[:], 0); err != nil {
		im.Close()
		return err
	}
	return im.Close() // syncs
}

// findFixedFooter searches a file that ends without a footer for the one
// a torn resize of a fixed image left: from the end backwards, the first
// sector holding a valid footer of a fixed image whose current size is its
// own offset. It returns -1 when there is none, or when the file starts
// with a footer copy (a dynamic or differencing image). It may read the
// whole file, so only Check's repair uses it.
func findFixedFooter(f storage.File) (int64, error) {
	size, err := f.Size()
	if err != nil {
		return -1, err
	}
	var head [footerSize]byte
	if size < footerSize {
		return -1, nil
	}
	if err := readFull(f, head[:], 0); err != nil {
		return -1, err
	}
	if checkFooter(head, 0, false) == nil {
		return -1, nil
	}
	buf := make([]byte, 1<<20)
	for end := size / SectorSize * SectorSize; end > 0; {
		n := min(end, int64(len(buf)))
		start := end - n
		if err := readFull(f, buf[:n], start); err != nil {
			return -1, err
		}
		for s := n - SectorSize; s >= 0; s -= SectorSize {
			raw := [footerSize]byte(buf[s : s+SectorSize])
			if string(raw[:8]) != footerCookie {
				continue
			}
			at := start + s
			if ft := decodeFooter(raw[:]); ft.DiskType == Fixed && int64(ft.CurrentSize) == at && checkFooter(raw, at, false) == nil {
				return at, nil
			}
		}
		end = start
	}
	return -1, nil
}

// cutAfter truncates the file at path to size and syncs it.
func cutAfter(path string, size int64) error {
	f, err := storage.OpenFile(path, os.O_RDWR, 0)
	if err != nil {
		return err
	}
	if err := f.Truncate(size); err != nil {
		f.Close()
		return err
	}
	if err := f.Sync(); err != nil {
		f.Close()
		return err
	}
	return f.Close()
}

// lint reports what Open tolerates but other readers may not.
func (im *Image) lint() []Problem {
	var probs []Problem
	warn := func(off int64, format string, args ...any) {
		probs = append(probs, Problem{Offset: off, What: fmt.Sprintf(format, args...), Warning: true})
	}
	ft := &im.ft
	if ft.Features&featureReserved == 0 {
		warn(im.footerAt+8, "footer features %#x lack the reserved bit 0x2", ft.Features)
	}
	if ft.CurrentSize%SectorSize != 0 {
		warn(im.footerAt+48, "current size %d is not a whole number of sectors", ft.CurrentSize)
	}
	if ft.SavedState != 0 {
		warn(im.footerAt+84, "saved state is set: the image belongs to a suspended machine")
	}
	if !disk.IsZero(im.footerRaw[85:]) {
		warn(im.footerAt+85, "footer reserved bytes are not zero (7-Zip refuses such images)")
	}
	if ft.DiskType == Fixed {
		return probs
	}
	h := &im.hdr
	if h.Reserved != 0 {
		warn(im.hdrOff+60, "header reserved field is %#x (7-Zip refuses such images)", h.Reserved)
	}
	if n := im.bat.n; int64(h.MaxTableEntries) != n {
		warn(im.hdrOff+headerMaxEntAt, "%d BAT entries for a disk needing %d (7-Zip refuses such images)", h.MaxTableEntries, n)
	}
	if ft.DiskType == Dynamic {
		return append(probs, im.lintSpace()...)
	}
	for i, l := range h.Locators {
		if l.Code != platformNone && !l.known() && l.Code != platformMac {
			warn(im.hdrOff+headerLocatorsAt+int64(i)*locatorEntrySize, "unknown parent locator platform %s", platformName(l.Code))
		}
	}
	return append(probs, im.lintSpace()...)
}

// lintSpace reports whole blocks' worth of file space nothing refers to:
// blocks leaked by trims or by writes a crash interrupted.
func (im *Image) lintSpace() []Problem {
	blockSpan := im.bitmapSize + im.blockSize
	used := []span{{0, footerSize, ""}, {im.hdrOff, im.hdrOff + headerSize, ""},
		{im.bat.off, im.bat.off + max(int64(len(im.bat.raw)), 4*int64(im.hdr.MaxTableEntries)), ""}}
	for _, l := range im.locators {
		used = append(used, span{l.Offset, l.Offset + int64(l.Length), ""})
	}
	for i := range im.bat.n {
		if e := im.bat.entry(i); e != batUnused {
			used = append(used, span{int64(e) * SectorSize, int64(e)*SectorSize + blockSpan, ""})
		}
	}
	slices.SortFunc(used, func(a, b span) int { return int(min(max(a.off-b.off, -1), 1)) })
	var leaked, gaps, pos int64
	for _, u := range append(used, span{im.footerAt, im.footerAt, ""}) {
		if u.off-pos >= blockSpan {
			leaked += u.off - pos
			gaps++
		}
		pos = max(pos, u.end)
	}
	if leaked == 0 {
		return nil
	}
	return []Problem{{Offset: -1, Warning: true,
		What: fmt.Sprintf("%d bytes in %d gaps of the file are referenced by nothing (leaked blocks; converting the image compacts it)", leaked, gaps)}}
}
