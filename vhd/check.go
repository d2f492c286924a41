package vhd

import (
	"errors"
	"fmt"
	"os"
	"slices"

	"github.com/vhdkit/vhdkit/disk"
	"github.com/vhdkit/vhdkit/storage"
)

// Check inspects the image at path, and its chain, like Test-VHD, but
// strictly: every rule of the VHD specification that can be checked in a
// file, on the footer and its copy, the dynamic header, the BAT and where
// its blocks lie, the parent locators, and the parent's identity (see the
// rule list in strict.go), each finding with its structure and file
// offset. Errors are what the specification forbids or a strict reader
// refuses; warnings what readers tolerate (and a state a crash leaves
// that a writable open repairs). It returns the problems found (none:
// consistent). With repair, a damaged footer (at the end or the copy at 0)
// is rewritten from the intact one when nothing worse is wrong, and a fixed
// image whose resize a crash tore (see "Resizing" in the package doc) is
// cut after the footer the resize left. The error is for I/O failures
// only.
func Check(path string, repair bool) ([]Problem, error) {
	return check(path, repair, OpenOptions{ReadOnly: true})
}

// CheckOptions control CheckWith.
type CheckOptions struct {
	// Repair rewrites a damaged footer or geometry, as Check's repair.
	Repair bool
	// ForceShare checks a file that may be in use, without repair (see
	// CheckForceShare).
	ForceShare bool
	// ParentDirs, when not empty, confines the parents followed to these
	// folders, as OpenOptions.ParentDirs: a parent elsewhere is not opened
	// and is reported. The locators are written by whoever made the file.
	ParentDirs []string
}

// CheckWith is Check with options.
func CheckWith(path string, opts CheckOptions) ([]Problem, error) {
	if opts.ForceShare && opts.Repair {
		return nil, fmt.Errorf("vhd: %s: ForceShare checks without repair", path)
	}
	return check(path, opts.Repair, OpenOptions{ReadOnly: true, ForceShare: opts.ForceShare, ParentDirs: opts.ParentDirs})
}

// CheckForceShare is Check without repair of a file that may be in use:
// it opens the file and its chain without refusing their other users (see
// storage.OpenForceShare), so a file being written may show problems that
// are only writes in flight.
func CheckForceShare(path string) ([]Problem, error) {
	return check(path, false, OpenOptions{ReadOnly: true, ForceShare: true})
}

// CheckFile is Check without repair of the image in f, which path names
// (it locates the parents, opened by path). f stays open.
func CheckFile(f storage.File, path string) ([]Problem, error) {
	return checkFile(f, path, OpenOptions{ReadOnly: true})
}

func check(path string, repair bool, opts OpenOptions) ([]Problem, error) {
	f, err := opts.open(path, os.O_RDONLY)
	if err != nil {
		return nil, fmt.Errorf("vhd: %w", err)
	}
	defer f.Close()
	probs, openErr, err := checkImage(f, path, opts)
	if err != nil || !repair {
		return probs, err
	}
	var fromCopy, copyDiffers, checksumBad, geometryShort bool
	for _, p := range probs {
		switch {
		case p.Rule == "footer.geometry-short":
			geometryShort = true
		case p.Rule == "footer.end-damaged":
			fromCopy = true
		case p.Rule == "footer.copy-stale" || p.Rule == "footer.copy":
			copyDiffers = true
		case p.Rule == "footer.checksum" || p.Rule == "header.checksum":
			checksumBad = true
		}
	}
	if openErr != nil {
		if !errors.Is(openErr, disk.ErrFormat) {
			return probs, nil
		}
		// Open refuses the file: perhaps a fixed image whose resize a
		// crash tore.
		at, err := findFixedFooter(f)
		if err != nil || at < 0 {
			return probs, err
		}
		if err := cutAfter(path, at+footerSize); err != nil {
			return probs, err
		}
		return append(probs, Problem{Offset: at, Struct: "footer", Rule: "footer.end-damaged", Warning: true,
			What: "no footer at the end (a resize torn by a crash): file cut after the fixed image footer found here"}), nil
	}
	// Only a footer that passed its checksum is copied over the other.
	if (fromCopy || copyDiffers) && !checksumBad {
		if err := repairFooters(path); err != nil {
			return probs, err
		}
		probs = append(probs, Problem{Offset: -1, Struct: "footer", What: "footers rewritten", Warning: true})
	}
	if geometryShort && !checksumBad {
		fixed, err := repairGeometry(path)
		if err != nil {
			return probs, err
		}
		if fixed {
			probs = append(probs, Problem{Offset: -1, Struct: "footer", Warning: true,
				What: "footer geometry set to the maximum, so that QEMU before 10.0 reads the whole disk"})
		}
	}
	return probs, nil
}

// repairGeometry gives an image that vhdkit made before it wrote
// footerGeometry (creator "vhdk", a size its geometry rounds down) the
// geometry it writes now, so that QEMU before 10.0 reads the whole disk:
// the end footer, then the copy at 0, each a one-sector write, synced;
// between the two the copy differs only in its geometry, which a writable
// open repairs. It reports whether it changed anything; images of other
// creators are left alone (what their size means is theirs to say).
func repairGeometry(path string) (bool, error) {
	im, err := Open(path, OpenOptions{})
	if err != nil {
		return false, err
	}
	ft := im.ft
	g := footerGeometry(int64(ft.CurrentSize))
	if string(ft.CreatorApp[:]) != CreatorApp || ft.CurrentSize%SectorSize != 0 || g == ft.Geometry {
		return false, im.Close()
	}
	ft.Geometry = g
	raw := ft.encode()
	err = func() error {
		if _, err := im.f.WriteAt(raw[:], im.footerAt); err != nil {
			return err
		}
		if err := im.f.Sync(); err != nil {
			return err
		}
		im.ft, im.footerRaw = ft, raw
		if ft.DiskType == Fixed {
			return nil
		}
		if _, err := im.f.WriteAt(raw[:], 0); err != nil {
			return err
		}
		return im.f.Sync()
	}()
	if cerr := im.Close(); err == nil {
		err = cerr
	}
	return err == nil, err
}

// Warnings of Open that the strict checks report themselves.
const (
	warnFromCopy  = "no valid footer at the end of the file (interrupted write?); using the copy at offset 0"
	warnCopyStale = "the footer copy at offset 0 differs from the footer at the end"
)

func checkFile(f storage.File, path string, opts OpenOptions) ([]Problem, error) {
	probs, _, err := checkImage(f, path, opts)
	return probs, err
}

// checkImage runs the strict checks on f's bytes, then opens the image
// (and its chain) as Open does, adding what only opening finds: the
// parent. It also returns why Open refused the image, if it did.
func checkImage(f storage.File, path string, opts OpenOptions) (probs []Problem, openErr, err error) {
	size, err := f.Size()
	if err != nil {
		return nil, nil, fmt.Errorf("vhd: %w", err)
	}
	in := &inspector{f: f, size: size}
	if err := in.inspectFile(); err != nil {
		return in.findings(), nil, err
	}
	probs = in.findings()
	strictErrors := slices.ContainsFunc(probs, func(p Problem) bool { return !p.Warning })
	im, err := openFile(f, path, opts, nil)
	if errors.Is(err, disk.ErrChecksum) {
		// Reported by the strict checks; look further.
		opts.IgnoreChecksum = true
		im, err = openFile(f, path, opts, nil)
	}
	if err != nil {
		var pe *os.PathError
		if errors.As(err, &pe) && !errors.Is(err, os.ErrNotExist) {
			return probs, nil, err
		}
		parentErr := errors.Is(err, disk.ErrParentNotFound) || errors.Is(err, disk.ErrParentMismatch)
		if parentErr || !strictErrors {
			p := Problem{Offset: -1, What: err.Error()}
			if parentErr {
				p.Struct, p.Rule = "parent", "parent"
			}
			var fe *FormatError
			if errors.As(err, &fe) {
				p.Offset, p.Struct = fe.Offset, fe.Struct
			}
			probs = append(probs, p)
		}
		return probs, err, nil
	}
	defer im.closeParent()
	for _, w := range im.warnings {
		if w != warnFromCopy && w != warnCopyStale {
			probs = append(probs, Problem{Offset: -1, Struct: "parent", Rule: "parent", What: w, Warning: true})
		}
	}
	if im.ft.DiskType != Fixed {
		probs = append(probs, im.lintSpace()...)
	}
	return probs, nil, nil
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

// lintSpace reports whole blocks' worth of file space nothing refers to:
// blocks leaked by trims or by writes a crash interrupted.
func (im *Image) lintSpace() []Problem {
	blockSpan := im.bitmapSize + im.blockSize
	meta := []span{{0, footerSize, ""}, {im.hdrOff, im.hdrOff + headerSize, ""},
		{im.bat.off, im.bat.off + max(int64(len(im.bat.raw)), 4*int64(im.hdr.MaxTableEntries)), ""}}
	for _, l := range im.locators {
		meta = append(meta, span{l.Offset, l.Offset + int64(l.Length), ""})
	}
	slices.SortFunc(meta, func(a, b span) int { return int(min(max(a.off-b.off, -1), 1)) })
	// Blocks as their sector numbers: 4 bytes each, however many.
	var blocks []uint32
	for i := range im.bat.n {
		if e := im.bat.entry(i); e != batUnused {
			blocks = append(blocks, e)
		}
	}
	slices.Sort(blocks)
	var leaked, gaps, pos int64
	visit := func(off, end int64) {
		if off-pos >= blockSpan {
			leaked += off - pos
			gaps++
		}
		pos = max(pos, end)
	}
	for len(meta) > 0 || len(blocks) > 0 {
		if len(blocks) == 0 || len(meta) > 0 && meta[0].off <= int64(blocks[0])*SectorSize {
			visit(meta[0].off, meta[0].end)
			meta = meta[1:]
			continue
		}
		off := int64(blocks[0]) * SectorSize
		visit(off, off+blockSpan)
		blocks = blocks[1:]
	}
	visit(im.footerAt, im.footerAt)
	if leaked == 0 {
		return nil
	}
	return []Problem{{Offset: -1, Struct: "file", Rule: "file.leak", Warning: true,
		What: fmt.Sprintf("%d bytes in %d gaps of the file are referenced by nothing (leaked blocks; optimize compacts it)", leaked, gaps)}}
}
