package vhd

import (
	"encoding/binary"
	"fmt"
	"slices"

	"github.com/vhdkit/vhdkit/disk"
	"github.com/vhdkit/vhdkit/storage"
)

// The strict checks: every rule of the VHD specification (v1.0, October
// 2006) that can be checked in a file, and what the strictest readers
// (QEMU, 7-Zip, Hyper-V) refuse or misread, read from the raw bytes so
// that every finding is reported, with its structure and file offset,
// not only the first one Open stops at.
//
// Rule ids (Problem.Rule), by structure:
//
//	footer            footer.cookie footer.checksum footer.features
//	                  footer.version footer.data-offset footer.disk-type
//	                  footer.size footer.geometry footer.geometry-short
//	                  footer.saved-state footer.reserved footer.unique-id
//	                  footer.host-os footer.legacy-511 footer.end-damaged
//	footer copy       footer.copy footer.copy-stale
//	dynamic header    header.bounds header.cookie header.checksum
//	                  header.data-offset header.version header.block-size
//	                  header.max-table-entries header.table-offset
//	                  header.reserved header.parent-fields
//	                  header.parent-unique-id
//	BAT               bat.bounds bat.overlap bat.beyond-disk
//	parent locator N  locator.platform locator.unused locator.data
//	                  locator.length locator.overlap locator.none
//	parent            parent (from Open: not found, not a VHD, unique id,
//	                  time stamp, size)
//	file              file.leak (whole blocks of space nothing refers to)

// Problem is one finding of Check. Its fields are exported for JSON
// (`check --json`).
type Problem struct {
	// Offset is the file offset of the offending field or structure, -1
	// when there is none (a missing parent).
	Offset int64 `json:"offset"`
	// Struct names the structure: "footer", "footer copy", "dynamic
	// header", "BAT", "parent locator 2", "parent", "file".
	Struct string `json:"structure,omitempty"`
	// Rule is the stable id of the rule broken (see the list above);
	// empty for errors Open reports that no strict rule covers.
	Rule string `json:"rule,omitempty"`
	// What says what is wrong, in one line.
	What string `json:"message"`
	// Warning: the image opens and reads correctly anyway (a tolerated
	// oddity, leaked space, a parent time stamp mismatch, a state a crash
	// leaves that a writable open repairs).
	Warning bool `json:"warning"`
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

// inspector collects the findings of the strict checks of one file.
type inspector struct {
	f     storage.File
	size  int64
	probs []Problem
	// count is the findings of each rule; past maxPerRule they are only
	// counted (a hostile BAT may break a rule millions of times).
	count map[string]int
}

const maxPerRule = 100

func (in *inspector) report(warning bool, structure, rule string, off int64, format string, args ...any) {
	if in.count == nil {
		in.count = map[string]int{}
	}
	if in.count[rule]++; in.count[rule] > maxPerRule {
		return
	}
	in.probs = append(in.probs, Problem{Offset: off, Struct: structure, Rule: rule,
		What: structure + ": " + fmt.Sprintf(format, args...), Warning: warning})
}

// findings returns the findings, with one more for each rule broken more
// than maxPerRule times.
func (in *inspector) findings() []Problem {
	probs := in.probs
	for _, p := range in.probs {
		if n := in.count[p.Rule]; n > maxPerRule {
			probs = append(probs, Problem{Offset: -1, Struct: p.Struct, Rule: p.Rule, Warning: p.Warning,
				What: fmt.Sprintf("%s: %d more findings of rule %s", p.Struct, n-maxPerRule, p.Rule)})
			in.count[p.Rule] = 0
		}
	}
	return probs
}

func (in *inspector) errorf(structure, rule string, off int64, format string, args ...any) {
	in.report(false, structure, rule, off, format, args...)
}

func (in *inspector) warnf(structure, rule string, off int64, format string, args ...any) {
	in.report(true, structure, rule, off, format, args...)
}

// footerCreatorsByCurrentSize are the creators QEMU before 10.0 sizes by
// the current size (block/vpc.c); it sizes every other creator's image by
// its geometry unless the geometry is the maximum.
var footerCreatorsByCurrentSize = []string{"win ", "qem2", "d2v ", "CTXS", "tap\x00"}

// strictFooter checks the footer fields in raw, found at at; name is
// "footer" or "footer copy". It reports whether the footer is usable (its
// cookie and checksum are right and its type and offsets make sense).
func (in *inspector) strictFooter(raw [footerSize]byte, at int64, name string) bool {
	if string(raw[:8]) != footerCookie {
		in.errorf(name, "footer.cookie", at, "cookie %q, want %q", raw[:8], footerCookie)
		return false
	}
	ft := decodeFooter(raw[:])
	usable := true
	if sum := checksum(raw[:], footerChecksumAt); sum != ft.Checksum {
		in.errorf(name, "footer.checksum", at+footerChecksumAt, "checksum %#08x, computed %#08x", ft.Checksum, sum)
		usable = false
	}
	if ft.Features&featureReserved == 0 {
		in.errorf(name, "footer.features", at+8, "features %#x lack the reserved bit 0x2, which must always be set", ft.Features)
	}
	if extra := ft.Features &^ (featureReserved | 1); extra != 0 {
		in.warnf(name, "footer.features", at+8, "features %#x hold undefined bits %#x", ft.Features, extra)
	}
	if ft.Version != formatVersion {
		in.errorf(name, "footer.version", at+12, "file format version %#08x, want %#08x", ft.Version, formatVersion)
		usable = usable && ft.Version>>16 == formatVersion>>16
	}
	switch ft.DiskType {
	case Fixed:
		if ft.DataOffset != noDataOffset && ft.DataOffset != 0xFFFFFFFF {
			in.errorf(name, "footer.data-offset", at+16, "data offset %#x of a fixed disk, want 0xFFFFFFFF", ft.DataOffset)
		}
	case Dynamic, Differencing:
		// Where the header lies is checked with the header.
	default:
		in.errorf(name, "footer.disk-type", at+60, "disk type %d is none of fixed (2), dynamic (3), differencing (4)", uint32(ft.DiskType))
		usable = false
	}
	if ft.CurrentSize > MaxSize {
		in.errorf(name, "footer.size", at+48, "current size %d exceeds the format's 2040 GiB", ft.CurrentSize)
		usable = false
	} else if ft.CurrentSize == 0 || ft.CurrentSize%SectorSize != 0 {
		in.warnf(name, "footer.size", at+48, "current size %d is not a positive whole number of sectors", ft.CurrentSize)
	}
	g, cur := ft.Geometry, int64(ft.CurrentSize)
	switch {
	case g == maxGeometry:
		// Larger than CHS can say: every reader takes the current size.
	case g.Size() > cur:
		in.errorf(name, "footer.geometry", at+56, "geometry %v describes %d bytes, more than the current size %d (readers that size disks by geometry read past the disk)", g, g.Size(), cur)
	case g.Size() < cur && !ft.sizedByGeometry() && !slices.Contains(footerCreatorsByCurrentSize, string(ft.CreatorApp[:])):
		in.warnf(name, "footer.geometry-short", at+56, "geometry %v describes %d of the %d bytes: QEMU before 10.0 sizes a %q image by its geometry and loses the rest", g, g.Size(), cur, ft.CreatorApp[:])
	}
	switch ft.SavedState {
	case 0:
	case 1:
		in.warnf(name, "footer.saved-state", at+84, "saved state is set: the image belongs to a suspended machine")
	default:
		in.errorf(name, "footer.saved-state", at+84, "saved state %#x is neither 0 nor 1", ft.SavedState)
	}
	if i := firstNonZero(raw[85:]); i >= 0 {
		in.errorf(name, "footer.reserved", at+85+int64(i), "reserved bytes are not zero (7-Zip refuses the image)")
	}
	if ft.UniqueID.IsZero() {
		in.warnf(name, "footer.unique-id", at+68, "unique id is zero: a child cannot tell this disk from another")
	}
	if h := string(ft.CreatorHostOS[:]); h != hostWindows && h != "Mac " {
		in.warnf(name, "footer.host-os", at+36, "creator host OS %q is neither \"Wi2k\" nor \"Mac \"", ft.CreatorHostOS[:])
	}
	return usable
}

// layout is what the strict checks learned of a file's structures.
type layout struct {
	ft       footer
	footerAt int64 // where the footer in use lies (the end's, or 0 for the copy)
	limit    int64 // where the data ends: the end footer's offset
}

// inspectFile runs the strict checks on the file's bytes. It returns an
// error for I/O failures only.
func (in *inspector) inspectFile() error {
	if in.size < footerSize-1 {
		in.errorf("file", "footer.cookie", 0, "%d bytes are too few for a VHD footer", in.size)
		return nil
	}
	var end [footerSize]byte
	endAt := in.size - footerSize
	if in.size >= footerSize {
		if err := in.read(end[:], endAt); err != nil {
			return err
		}
	}
	if in.size < footerSize || string(end[:8]) != footerCookie {
		var b [footerSize]byte
		if err := in.read(b[:footerSize-1], in.size-(footerSize-1)); err != nil {
			return err
		}
		if string(b[:8]) == footerCookie {
			end, endAt = b, in.size-(footerSize-1)
			in.warnf("footer", "footer.legacy-511", endAt, "a 511-byte footer (images from before Virtual PC 2004): readers other than the oldest expect 512 bytes")
		}
	}
	var head [footerSize]byte
	if in.size >= 2*footerSize {
		if err := in.read(head[:], 0); err != nil {
			return err
		}
	}
	// The end footer is the one in use; when a crash damaged it, a dynamic
	// image's copy at 0 stands in (see "Writing and crash safety").
	endOK := string(end[:8]) == footerCookie && checkFooter(end, endAt, false) == nil
	copyOK := string(head[:8]) == footerCookie && checkFooter(head, 0, false) == nil && decodeFooter(head[:]).DiskType != Fixed
	var lay layout
	switch {
	case endOK:
		in.strictFooter(end, endAt, "footer")
		lay = layout{ft: decodeFooter(end[:]), footerAt: endAt, limit: endAt}
	case copyOK:
		in.warnf("footer", "footer.end-damaged", endAt, "no valid footer at the end of the file (a write a crash interrupted): readers that need it refuse the file, the copy at offset 0 is valid, and a writable open or check --repair rewrites the end from it")
		in.strictFooter(head, 0, "footer copy")
		lay = layout{ft: decodeFooter(head[:]), footerAt: 0, limit: in.size}
	default:
		in.strictFooter(end, endAt, "footer")
		return nil
	}
	if lay.ft.DiskType == Fixed {
		if int64(lay.ft.CurrentSize) > lay.limit {
			in.errorf("footer", "footer.size", lay.footerAt+48, "current size %d exceeds the %d bytes before the footer (truncated?)", lay.ft.CurrentSize, lay.limit)
		}
		return nil
	}
	if endOK && head != end {
		in.inspectCopy(head, end)
	}
	return in.inspectDynamic(lay)
}

// inspectCopy reports a footer copy at 0 that differs from a valid end
// footer. QEMU reads the copy, not the end: a copy that is not a valid
// footer, or that describes another disk, is an error. A valid copy of the
// same disk leading to a valid older header is what a crash between the
// two footer writes of a header move leaves (see "Moving the header"):
// QEMU then sees the disk as it was before the move, and a writable open
// rewrites the copy.
func (in *inspector) inspectCopy(head, end [footerSize]byte) {
	if string(head[:8]) != footerCookie || checkFooter(head, 0, false) != nil {
		in.errorf("footer copy", "footer.copy", 0, "the footer copy at offset 0 is not a valid footer (QEMU reads the copy, not the end)")
		return
	}
	c, e := decodeFooter(head[:]), decodeFooter(end[:])
	if c.UniqueID != e.UniqueID || c.DiskType != e.DiskType {
		in.errorf("footer copy", "footer.copy", 0, "the footer copy at offset 0 describes another disk (unique id %s, %v) than the end footer (%s, %v)", c.UniqueID, c.DiskType, e.UniqueID, e.DiskType)
		return
	}
	var hb [headerSize]byte
	if int64(c.DataOffset) > in.size-footerSize-headerSize || in.read(hb[:], int64(c.DataOffset)) != nil ||
		string(hb[:8]) != headerCookie || checksum(hb[:], headerChecksumAt) != binary.BigEndian.Uint32(hb[headerChecksumAt:]) {
		in.errorf("footer copy", "footer.copy", 16, "the footer copy at offset 0 differs from the end footer and leads to no valid dynamic header at %#x", c.DataOffset)
		return
	}
	in.warnf("footer copy", "footer.copy-stale", 0, "the footer copy at offset 0 differs from the end footer (a header move a crash interrupted): QEMU, which reads the copy, sees the disk as it was before; a writable open or check --repair rewrites it")
}

// inspectDynamic checks the dynamic header, the BAT, the parent locators
// and where each block lies.
func (in *inspector) inspectDynamic(lay layout) error {
	const hs = "dynamic header"
	ft := &lay.ft
	hdrOff := int64(ft.DataOffset)
	if ft.DataOffset < footerSize || ft.DataOffset > uint64(lay.limit) || uint64(lay.limit)-ft.DataOffset < headerSize {
		in.errorf("footer", "footer.data-offset", lay.footerAt+16, "dynamic header offset %#x: the header does not fit between the footer copy and the %d data bytes of the file", ft.DataOffset, lay.limit)
		return nil
	}
	var hb [headerSize]byte
	if err := in.read(hb[:], hdrOff); err != nil {
		return err
	}
	if string(hb[:8]) != headerCookie {
		in.errorf(hs, "header.cookie", hdrOff, "cookie %q, want %q", hb[:8], headerCookie)
		return nil
	}
	h := decodeHeader(hb[:])
	if sum := checksum(hb[:], headerChecksumAt); sum != h.Checksum {
		in.errorf(hs, "header.checksum", hdrOff+headerChecksumAt, "checksum %#08x, computed %#08x", h.Checksum, sum)
	}
	if h.DataOffset != noDataOffset && h.DataOffset != 0xFFFFFFFF {
		in.errorf(hs, "header.data-offset", hdrOff+8, "data offset %#x, want 0xFFFFFFFFFFFFFFFF (unused)", h.DataOffset)
	}
	if h.Version != formatVersion {
		in.errorf(hs, "header.version", hdrOff+24, "header version %#08x, want %#08x", h.Version, formatVersion)
	}
	if h.Reserved != 0 {
		in.errorf(hs, "header.reserved", hdrOff+60, "reserved field is %#x, must be zero (7-Zip refuses the image)", h.Reserved)
	}
	if i := firstNonZero(hb[768:]); i >= 0 {
		in.errorf(hs, "header.reserved", hdrOff+768+int64(i), "reserved bytes 768-1023 are not zero")
	}
	blockOK := isPowerOfTwo(uint64(h.BlockSize)) && h.BlockSize >= minBlockSize && h.BlockSize <= maxBlockSize
	if !blockOK {
		in.errorf(hs, "header.block-size", hdrOff+headerBlockSizeAt, "block size %d is not a power of two from %d to %d", h.BlockSize, minBlockSize, maxBlockSize)
	}
	size := int64(ft.CurrentSize) / SectorSize * SectorSize
	var need int64
	if blockOK {
		need = (size + int64(h.BlockSize) - 1) / int64(h.BlockSize)
		switch m := int64(h.MaxTableEntries); {
		case m < need:
			in.errorf(hs, "header.max-table-entries", hdrOff+headerMaxEntAt, "%d BAT entries cannot map the %d-byte disk (%d needed)", m, size, need)
		case m > need:
			in.warnf(hs, "header.max-table-entries", hdrOff+headerMaxEntAt, "%d BAT entries for a disk needing %d (7-Zip refuses such images)", m, need)
		}
	}
	batOff := int64(h.TableOffset)
	batSpace := alignUp(4*int64(h.MaxTableEntries), SectorSize)
	batFits := h.MaxTableEntries <= maxBATEntries && h.TableOffset >= footerSize && h.TableOffset <= uint64(lay.limit) &&
		uint64(batSpace) <= uint64(lay.limit)-h.TableOffset
	if !batFits {
		in.errorf(hs, "header.table-offset", hdrOff+headerTableOffAt, "BAT of %d entries at %#x does not fit between the footer copy and the %d data bytes of the file", h.MaxTableEntries, h.TableOffset, lay.limit)
	} else if batOff%SectorSize != 0 {
		in.warnf(hs, "header.table-offset", hdrOff+headerTableOffAt, "BAT offset %#x is not on a sector boundary", batOff)
	}
	reserved := []span{{0, footerSize, "footer copy"}, {hdrOff, hdrOff + headerSize, "dynamic header"}}
	if batFits {
		reserved = append(reserved, span{batOff, batOff + batSpace, "BAT"})
	}
	// The header, the BAT and the footer copy must not overlap.
	for i := range reserved {
		for j := range i {
			if a, b := reserved[i], reserved[j]; a.off < b.end && b.off < a.end {
				in.errorf(hs, "header.table-offset", hdrOff+headerTableOffAt, "the %s [%#x, %#x) overlaps the %s [%#x, %#x)", a.what, a.off, a.end, b.what, b.off, b.end)
			}
		}
	}
	locs := in.inspectLocators(&h, hdrOff, lay, ft.DiskType == Differencing)
	for _, l := range locs {
		for _, r := range reserved {
			if l.off < r.end && r.off < l.end {
				in.errorf(l.what, "locator.overlap", l.off, "data [%#x, %#x) overlaps the %s [%#x, %#x)", l.off, l.end, r.what, r.off, r.end)
			}
		}
	}
	if !blockOK || !batFits {
		return nil
	}
	bat := make([]byte, 4*int64(h.MaxTableEntries))
	if err := in.read(bat, batOff); err != nil {
		return err
	}
	in.inspectBAT(bat, batOff, need, int64(h.BlockSize), lay.limit, append(reserved, locs...))
	return nil
}

// inspectLocators checks the eight parent locator entries and returns the
// spans of their data.
func (in *inspector) inspectLocators(h *header, hdrOff int64, lay layout, differencing bool) []span {
	const hs = "dynamic header"
	if !differencing {
		if !h.ParentUniqueID.IsZero() || h.ParentTimeStamp != 0 || !disk.IsZero(h.ParentName[:]) {
			in.warnf(hs, "header.parent-fields", hdrOff+headerParentIDAt, "parent fields of a %v disk are not zero", lay.ft.DiskType)
		}
		for i, e := range h.Locators {
			if e != (locatorEntry{}) {
				in.warnf(fmt.Sprintf("parent locator %d", i), "locator.unused", hdrOff+headerLocatorsAt+int64(i)*locatorEntrySize, "entry of a %v disk is not zero", lay.ft.DiskType)
			}
		}
		return nil
	}
	if h.ParentUniqueID.IsZero() {
		in.warnf(hs, "header.parent-unique-id", hdrOff+headerParentIDAt, "parent unique id is zero: the parent's identity cannot be checked")
	}
	var spans []span
	usable := 0
	for i, e := range h.Locators {
		s := fmt.Sprintf("parent locator %d", i)
		at := hdrOff + headerLocatorsAt + int64(i)*locatorEntrySize
		switch e.Code {
		case platformNone:
			if e != (locatorEntry{}) {
				in.warnf(s, "locator.unused", at, "entry without a platform code is not zero")
			}
			continue
		case platformWi2r, platformWi2k, platformW2ru, platformW2ku, platformMac, platformMacX:
		default:
			in.errorf(s, "locator.platform", at, "platform code %s is not one the specification defines", platformName(e.Code))
			continue
		}
		s += " (" + platformName(e.Code) + ")"
		if e.DataLength == 0 {
			in.warnf(s, "locator.data", at+8, "no data")
			continue
		}
		// The spec counts the data space in sectors; Hyper-V writes bytes.
		space := int64(e.DataSpace)
		if space < int64(e.DataLength) {
			space *= SectorSize
		}
		if int64(e.DataLength) > space {
			in.errorf(s, "locator.length", at+8, "data length %d exceeds the data space %d", e.DataLength, e.DataSpace)
		}
		if e.DataOffset < footerSize || e.DataOffset > uint64(lay.limit) || uint64(e.DataLength) > uint64(lay.limit)-e.DataOffset {
			in.errorf(s, "locator.data", at+16, "data [%#x, +%d) lies outside the %d data bytes of the file", e.DataOffset, e.DataLength, lay.limit)
			continue
		}
		if e.DataOffset%SectorSize != 0 {
			in.warnf(s, "locator.data", at+16, "data offset %#x is not on a sector boundary", e.DataOffset)
		}
		if (e.Code == platformW2ru || e.Code == platformW2ku) && e.DataLength%2 != 0 {
			in.errorf(s, "locator.length", at+8, "odd length %d of UTF-16 data", e.DataLength)
		}
		if e.DataLength > maxLocatorLength {
			in.errorf(s, "locator.length", at+8, "data length %d exceeds %d (a path of 32767 UTF-16 units)", e.DataLength, maxLocatorLength)
			continue
		}
		if e.known() {
			usable++
		}
		spans = append(spans, span{int64(e.DataOffset), int64(e.DataOffset) + int64(e.DataLength), s})
	}
	for i := range spans {
		for j := range i {
			if a, b := spans[i], spans[j]; a.off < b.end && b.off < a.end {
				in.errorf(a.what, "locator.overlap", a.off, "data [%#x, %#x) overlaps the %s data [%#x, %#x)", a.off, a.end, b.what, b.off, b.end)
			}
		}
	}
	if usable == 0 && h.parentName() == "" {
		in.errorf(hs, "locator.none", hdrOff+headerLocatorsAt, "a differencing disk with neither a path locator nor a parent name: its parent cannot be found")
	}
	return spans
}

// inspectBAT checks every allocated entry: its block (bitmap and data)
// lies within the data bytes of the file and overlaps neither another
// block nor a reserved structure. It sorts the blocks by offset: n log n
// time, and 4 bytes per allocated block besides the BAT itself.
func (in *inspector) inspectBAT(bat []byte, batOff, need, blockSize, limit int64, reserved []span) {
	blockSpan := bitmapSize(blockSize) + blockSize
	entry := func(i uint32) int64 { return int64(binary.BigEndian.Uint32(bat[4*int64(i):])) * SectorSize }
	var blocks []uint32 // entry numbers, by block offset
	for i := int64(0); i < int64(len(bat))/4; i++ {
		if binary.BigEndian.Uint32(bat[4*i:]) == batUnused {
			continue
		}
		off := entry(uint32(i))
		if i >= need {
			in.warnf("BAT", "bat.beyond-disk", batOff+4*i, "entry %d, past the %d the disk needs, points at %#x", i, need, off)
		}
		if off < footerSize || off > limit-blockSpan {
			in.errorf("BAT", "bat.bounds", batOff+4*i, "block %d at [%#x, %#x) lies outside the %d data bytes of the file (truncated?)", i, off, off+blockSpan, limit)
			continue
		}
		blocks = append(blocks, uint32(i))
	}
	slices.SortFunc(blocks, func(a, b uint32) int { return int(min(max(entry(a)-entry(b), -1), 1)) })
	for k := 1; k < len(blocks); k++ {
		if prev, cur := blocks[k-1], blocks[k]; entry(cur) < entry(prev)+blockSpan {
			in.errorf("BAT", "bat.overlap", batOff+4*int64(cur), "block %d at %#x overlaps block %d at %#x", cur, entry(cur), prev, entry(prev))
		}
	}
	for _, r := range reserved {
		// The first block ending after r starts.
		k, _ := slices.BinarySearchFunc(blocks, r.off, func(b uint32, off int64) int {
			if entry(b)+blockSpan <= off {
				return -1
			}
			return 1
		})
		for ; k < len(blocks) && entry(blocks[k]) < r.end; k++ {
			b := blocks[k]
			in.errorf("BAT", "bat.overlap", batOff+4*int64(b), "block %d at [%#x, %#x) overlaps the %s at [%#x, %#x)", b, entry(b), entry(b)+blockSpan, r.what, r.off, r.end)
		}
	}
}

// firstNonZero returns the index of the first byte of b that is not zero,
// or -1.
func firstNonZero(b []byte) int {
	for i, c := range b {
		if c != 0 {
			return i
		}
	}
	return -1
}

// read reads len(p) bytes at off; a short file is an I/O error here, since
// every read is bounded by the file's size first.
func (in *inspector) read(p []byte, off int64) error {
	if off < 0 || off > in.size || int64(len(p)) > in.size-off {
		return fmt.Errorf("vhd: check: read [%d, +%d) past the %d-byte file", off, len(p), in.size)
	}
	return readFull(in.f, p, off)
}
