package vhdx

import (
	"errors"
	"fmt"
	"os"
	"slices"

	"github.com/vhdkit/vhdkit/storage"
)

// Problem is one inconsistency found by Check.
type Problem struct {
	Offset int64  // file offset of the structure, -1 when none applies
	What   string // one line
}

func (p Problem) String() string {
	if p.Offset < 0 {
		return p.What
	}
	return fmt.Sprintf("%s (offset %#x)", p.What, p.Offset)
}

// Check inspects the image at path like Test-VHD and qemu-img check: both
// headers and region tables, a pending log, the BAT (states, blocks inside
// the file, no two blocks sharing space) and, for a differencing image, that
// its parent is found and matches. It returns the problems found; none
// means consistent. With repair, a pending log is replayed first. The error
// is for failures to run the check at all (the file cannot be read).
func Check(path string, repair bool) ([]Problem, error) {
	if repair {
		f, err := storage.OpenFile(path, os.O_RDONLY, 0)
		if err != nil {
			return nil, err
		}
		pending := false
		if im, err := openFile(keepOpen{f}, path, OpenOptions{ReadOnly: true}, nil); err == nil {
			pending = im.replay != nil
			im.Close()
		}
		f.Close()
		if pending {
			// A read-write open replays the log; Close marks the file clean.
			rw, err := Open(path, OpenOptions{})
			if err != nil {
				return []Problem{problemOf(err)}, nil
			}
			if err := rw.Close(); err != nil {
				return nil, err
			}
		}
	}
	f, err := storage.OpenFile(path, os.O_RDONLY, 0)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	return CheckFile(f, path)
}

// CheckForceShare is Check without repair of a file that may be in use:
// it opens the file and its chain without refusing their other users (see
// storage.OpenForceShare), so a file being written may show problems that
// are only writes in flight.
func CheckForceShare(path string) ([]Problem, error) {
	f, err := storage.OpenForceShare(path)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	return checkFile(f, path, OpenOptions{ReadOnly: true, ForceShare: true})
}

// CheckFile is Check without repair for an image stored in f, named path
// (for its parent locator). It does not close f.
func CheckFile(f storage.File, path string) ([]Problem, error) {
	return checkFile(f, path, OpenOptions{ReadOnly: true})
}

func checkFile(f storage.File, path string, opts OpenOptions) ([]Problem, error) {
	size, err := f.Size()
	if err != nil {
		return nil, err
	}
	probs := checkCopies(f, size)
	im, err := openFile(keepOpen{f}, path, opts, nil)
	if err != nil {
		return append(probs, problemOf(err)), nil
	}
	defer im.Close()
	if im.replay != nil {
		probs = append(probs, Problem{im.logOff, fmt.Sprintf("log has %d pending entries (check --repair replays them)", im.replay.entries)})
	}
	return append(probs, im.checkBlocks(size)...), nil
}

// keepOpen lends a file to an Image without letting Close close it.
type keepOpen struct{ storage.File }

func (keepOpen) Close() error { return nil }

func problemOf(err error) Problem {
	var fe *FormatError
	if errors.As(err, &fe) {
		return Problem{fe.Offset, fe.Error()}
	}
	return Problem{-1, err.Error()}
}

// checkCopies reports a header or region table copy that cannot be read
// while the other one can (openFile reports when neither can). A bad
// header alone is what a crash during a header update leaves and is
// repaired by the next update, so only region tables count.
func checkCopies(f storage.File, size int64) []Problem {
	var probs []Problem
	b := make([]byte, regionTableSize)
	var tables [2][]regionEntry
	for i, off := range []int64{region1Offset, region2Offset} {
		name := fmt.Sprintf("region table %d", i+1)
		if _, err := f.ReadAt(b, off); err != nil {
			continue
		}
		t, err := parseRegionTable(b, name, off)
		if err == nil {
			_, err = validateRegions(t, name, off, size)
		}
		if err != nil {
			probs = append(probs, problemOf(err))
			continue
		}
		tables[i] = t
	}
	if tables[0] != nil && tables[1] != nil && !slices.Equal(tables[0], tables[1]) {
		probs = append(probs, Problem{region2Offset, "region tables 1 and 2 differ"})
	}
	if len(probs) == 2 {
		return nil // neither is readable: openFile says so
	}
	return probs
}

// checkBlocks reports blocks that lie outside the file, overlap one
// another, or overlap the headers, log, metadata or BAT.
func (im *Image) checkBlocks(size int64) []Problem {
	type extent struct {
		start, end int64
		what       string
	}
	fixed := []extent{
		{0, mib, "the headers"},
		{im.logOff, im.logOff + im.logLen, "the log"},
		{int64(im.regs.Metadata.Offset), int64(im.regs.Metadata.Offset) + int64(im.regs.Metadata.Length), "the metadata region"},
		{int64(im.regs.BAT.Offset), int64(im.regs.BAT.Offset) + int64(im.regs.BAT.Length), "the BAT"},
	}
	exts := slices.Clone(fixed)
	var probs []Problem
	g := &im.geo
	batOff := int64(im.regs.BAT.Offset)
	for i, e := range im.bat {
		idx := int64(i)
		isBitmap := (idx+1)%(g.chunkRatio+1) == 0
		st := batState(e)
		length := g.blockSize
		switch {
		case isBitmap && st == bitmapPresent && im.p.HasParent:
			length = bitmapBlockSize
		case !isBitmap && (st == payloadFullyPresent || st == payloadPartiallyPresent):
		default:
			continue
		}
		start := batOffset(e)
		what := fmt.Sprintf("BAT entry %d", idx)
		if start+length > size {
			probs = append(probs, Problem{batOff + 8*idx, fmt.Sprintf("%s: block [%#x, +%#x) ends past the end of the file (%d bytes)", what, start, length, size)})
		}
		exts = append(exts, extent{start, start + length, what})
	}
	slices.SortFunc(exts, func(a, b extent) int {
		if a.start != b.start {
			return int(min(max(a.start-b.start, -1), 1))
		}
		return int(min(max(a.end-b.end, -1), 1))
	})
	reach := extent{end: -1}
	for _, x := range exts {
		if x.start < reach.end {
			probs = append(probs, Problem{x.start, fmt.Sprintf("%s overlaps %s", x.what, reach.what)})
		}
		if x.end > reach.end {
			reach = x
		}
	}
	return probs
}
