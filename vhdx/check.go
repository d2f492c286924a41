package vhdx

import (
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"math"
	"os"
	"slices"
	"sort"
	"unicode/utf16"

	"github.com/vhdkit/vhdkit/storage"
)

// Problem is one finding of Check: a rule of MS-VHDX (a MUST the file
// breaks, or a refusal of the strictest reader, Microsoft's OpenVMM vhdx
// crate, which follows the MUSTs), a pending log, or a warning. The JSON
// form is what `vhdkit check --json` prints.
type Problem struct {
	Offset    int64  `json:"offset"`    // file offset of the structure or field, -1 when none applies
	Structure string `json:"structure"` // "header 1", "BAT entry 17", "log entry at log offset 0x2000", ...
	Rule      Rule   `json:"rule"`      // which rule, a stable identifier
	Spec      string `json:"spec"`      // where the rule is written: "MS-VHDX 2.2.2", ...
	What      string `json:"what"`      // one line
	// Warning: readers accept the file anyway (a SHOULD, or a value the
	// spec leaves open that some reader handles badly).
	Warning bool `json:"warning,omitempty"`
}

func (p Problem) String() string {
	s := p.What
	if p.Warning {
		s = "warning: " + s
	}
	if p.Offset >= 0 {
		s += fmt.Sprintf(" (offset %#x)", p.Offset)
	}
	return s + " [" + string(p.Rule) + "]"
}

// Violation reports whether p makes the file invalid: not a warning, and
// not a pending log (a valid state that any writable open replays).
func (p Problem) Violation() bool { return !p.Warning && p.Rule != RulePendingLog }

// Rule identifies a rule Check enforces. The values are stable: tests and
// `check --json` consumers match on them.
type Rule string

const (
	RuleOpen           Rule = "open"            // vhdkit's reader refuses the file (a parent not found or not matching, ...)
	RuleFileIdentifier Rule = "file-identifier" // signature "vhdxfile" at 0
	RuleFileSize       Rule = "file-size"       // the file ends inside a structure

	RuleHeader            Rule = "header"              // no header copy with a valid signature and checksum
	RuleHeaderSequence    Rule = "header-sequence"     // two valid, different headers with the same sequence number
	RuleHeaderVersion     Rule = "header-version"      // Version must be 1
	RuleHeaderLogVersion  Rule = "header-log-version"  // LogVersion must be 0
	RuleHeaderReserved    Rule = "header-reserved"     // reserved bytes must be 0
	RuleHeaderLogLocation Rule = "header-log-location" // LogOffset/LogLength: 1 MiB multiples, past the first 1 MiB, inside the file, at most 1 GiB

	RuleLogGUIDWithoutEntries Rule = "log-guid-without-entries" // LogGuid names no valid log sequence
	RuleLogEntryLength        Rule = "log-entry-length"         // an entry as long as the log, or not as long as its descriptors say
	RuleLogFull               Rule = "log-full"                 // the active sequence leaves no sector free
	RuleLogEntry              Rule = "log-entry"                // a field of an entry of the active sequence
	RuleLogDescriptor         Rule = "log-descriptor"           // a descriptor of an entry of the active sequence
	RuleLogFileOffset         Rule = "log-file-offset"          // FlushedFileOffset past the end of the file
	RuleLogLimits             Rule = "log-limits"               // a log this check does not validate within its bounds
	RulePendingLog            Rule = "log-pending"              // not a violation: a log to replay

	RuleRegionTable    Rule = "region-table"    // signature, checksum, entry count, reserved fields
	RuleRegionCopies   Rule = "region-copies"   // the two copies differ, or one is damaged
	RuleRegionEntry    Rule = "region-entry"    // alignment, length, bounds, duplicates
	RuleRegionRequired Rule = "region-required" // BAT or metadata missing, an unknown required region
	RuleRegionOverlap  Rule = "region-overlap"  // regions overlapping each other, the headers or the log

	RuleMetadataTable    Rule = "metadata-table"    // signature, entry count, reserved fields, region size
	RuleMetadataEntry    Rule = "metadata-entry"    // item placement, duplicates, overlaps, flags
	RuleMetadataRequired Rule = "metadata-required" // a known item missing, an unknown required item
	RuleMetadataValue    Rule = "metadata-value"    // an item's size, flags or value out of range
	RuleParentLocator    Rule = "parent-locator"    // the locator's header, keys and values, parent_linkage

	RuleBATSize          Rule = "bat-size"           // the BAT region holds fewer entries than the disk needs
	RuleBATState         Rule = "bat-state"          // a state the entry's kind and the image's kind do not allow
	RuleBATReserved      Rule = "bat-reserved"       // reserved bits of an entry
	RuleBATOffset        Rule = "bat-offset"         // FileOffsetMB set in a state that reserves it (NOT_PRESENT, ZERO, SB_NOT_PRESENT)
	RuleBATBeyondEOF     Rule = "bat-beyond-eof"     // a block past the end of the file
	RuleBATOverlap       Rule = "bat-overlap"        // a block overlapping another block, a region or the headers
	RuleBATBitmapMissing Rule = "bat-bitmap-missing" // PARTIALLY_PRESENT under a chunk without a sector bitmap block
)

// ruleSpec says where each rule is written.
var ruleSpec = map[Rule]string{
	RuleOpen:                  "vhdkit",
	RuleFileIdentifier:        "MS-VHDX 2.2.1",
	RuleFileSize:              "MS-VHDX 2.2",
	RuleHeader:                "MS-VHDX 2.2.2",
	RuleHeaderSequence:        "MS-VHDX 2.2.2.1",
	RuleHeaderVersion:         "MS-VHDX 2.2.2",
	RuleHeaderLogVersion:      "MS-VHDX 2.2.2",
	RuleHeaderReserved:        "MS-VHDX 2.2.2",
	RuleHeaderLogLocation:     "MS-VHDX 2.2.2",
	RuleLogGUIDWithoutEntries: "MS-VHDX 2.3.3",
	RuleLogEntryLength:        "MS-VHDX 2.3.1.1",
	RuleLogFull:               "MS-VHDX 2.3.2",
	RuleLogEntry:              "MS-VHDX 2.3.1.1",
	RuleLogDescriptor:         "MS-VHDX 2.3.1.2-2.3.1.4",
	RuleLogFileOffset:         "MS-VHDX 2.3.1.1",
	RuleLogLimits:             "vhdkit",
	RulePendingLog:            "MS-VHDX 2.3.3",
	RuleRegionTable:           "MS-VHDX 2.2.3.1",
	RuleRegionCopies:          "MS-VHDX 2.2.3",
	RuleRegionEntry:           "MS-VHDX 2.2.3.2",
	RuleRegionRequired:        "MS-VHDX 2.2.3.2",
	RuleRegionOverlap:         "MS-VHDX 2.2.3.2",
	RuleMetadataTable:         "MS-VHDX 2.6.1.1",
	RuleMetadataEntry:         "MS-VHDX 2.6.1.2",
	RuleMetadataRequired:      "MS-VHDX 2.6.2",
	RuleMetadataValue:         "MS-VHDX 2.6.2",
	RuleParentLocator:         "MS-VHDX 2.6.2.6",
	RuleBATSize:               "MS-VHDX 2.5",
	RuleBATState:              "MS-VHDX 2.5.1.1-2.5.1.2",
	RuleBATReserved:           "MS-VHDX 2.5.1",
	RuleBATOffset:             "MS-VHDX 2.5.1.1-2.5.1.2",
	RuleBATBeyondEOF:          "MS-VHDX 2.5.1",
	RuleBATOverlap:            "MS-VHDX 2.4",
	RuleBATBitmapMissing:      "MS-VHDX 2.5.1.2",
}

// Check validates the image at path against every rule of MS-VHDX that can
// be checked in a file (see Rule), follows a differencing image to its
// parent (wherever its locators lead: CheckWith confines them), and
// returns what it found; no Problem means valid. A pending log
// is checked, then everything after it is checked as the log's replay
// leaves it (a RulePendingLog problem says a replay is due). With repair, a
// pending log is replayed into the file first. The error is for failures
// to run the check at all (the file cannot be opened or read).
//
// Time and memory are bounded for any file: the BAT is read in pieces, the
// space map holds one bit per MiB of the file up to 256 TiB, the log is
// validated only up to 64 MiB, and each rule reports at most a few dozen
// findings, then how many more there were.
func Check(path string, repair bool) ([]Problem, error) {
	return CheckWith(path, CheckOptions{Repair: repair})
}

// CheckOptions control CheckWith.
type CheckOptions struct {
	// Repair replays a pending log into the file first.
	Repair bool
	// ForceShare checks a file that may be in use, without repair: the
	// file and its chain are opened without refusing their other users
	// (see storage.OpenForceShare), so a file being written may show
	// problems that are only writes in flight.
	ForceShare bool
	// ParentDirs, when not empty, confines the parents followed to these
	// folders, as OpenOptions.ParentDirs: a parent elsewhere is not opened
	// and is reported. The locators are written by whoever made the file.
	ParentDirs []string
}

// CheckWith is Check with options.
func CheckWith(path string, opts CheckOptions) ([]Problem, error) {
	if opts.ForceShare {
		if opts.Repair {
			return nil, fmt.Errorf("vhdx: %s: ForceShare checks without repair", path)
		}
		f, err := storage.OpenForceShare(path)
		if err != nil {
			return nil, err
		}
		defer f.Close()
		return checkFile(f, path, OpenOptions{ReadOnly: true, ForceShare: true, ParentDirs: opts.ParentDirs})
	}
	if opts.Repair {
		f, err := storage.OpenFile(path, os.O_RDONLY, 0)
		if err != nil {
			return nil, err
		}
		pending := false
		if im, err := openFile(keepOpen{f}, path, OpenOptions{ReadOnly: true, ParentDirs: opts.ParentDirs}, nil); err == nil {
			pending = im.replay != nil
			im.Close()
		}
		f.Close()
		if pending {
			// A read-write open replays the log; Close marks the file clean.
			rw, err := Open(path, OpenOptions{ParentDirs: opts.ParentDirs})
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
	return checkFile(f, path, OpenOptions{ReadOnly: true, ParentDirs: opts.ParentDirs})
}

// CheckForceShare is Check without repair of a file that may be in use:
// it opens the file and its chain without refusing their other users (see
// storage.OpenForceShare), so a file being written may show problems that
// are only writes in flight.
func CheckForceShare(path string) ([]Problem, error) {
	return CheckWith(path, CheckOptions{ForceShare: true})
}

// CheckFile is Check without repair for an image stored in f, named path
// (for its parent locator). It does not close f.
func CheckFile(f storage.File, path string) ([]Problem, error) {
	return checkFile(f, path, OpenOptions{ReadOnly: true})
}

// CheckStructure is CheckFile without the parent: only what the file itself
// holds is validated, so a differencing image is checked without its chain
// (the crash tests check files whose parents exist only in memory).
func CheckStructure(f storage.File) ([]Problem, error) {
	c, err := validate(f)
	if err != nil {
		return nil, err
	}
	return c.result(), nil
}

func checkFile(f storage.File, path string, opts OpenOptions) ([]Problem, error) {
	c, err := validate(f)
	if err != nil {
		return nil, err
	}
	if !c.violated {
		// The chain: the parent found and matching, and anything else
		// vhdkit's reader refuses that the rules above do not name.
		im, err := openFile(keepOpen{f}, path, opts, nil)
		if err != nil {
			p := problemOf(err)
			c.add(RuleOpen, "", p.Offset, false, "%s", p.What)
			c.probs[len(c.probs)-1].Structure = p.Structure // its What names it already
		} else {
			im.Close()
		}
	}
	return c.result(), nil
}

// keepOpen lends a file to an Image without letting Close close it.
type keepOpen struct{ storage.File }

func (keepOpen) Close() error { return nil }

func problemOf(err error) Problem {
	var fe *FormatError
	if errors.As(err, &fe) {
		return Problem{Offset: fe.Offset, Structure: fe.Structure, Rule: RuleOpen, Spec: ruleSpec[RuleOpen], What: fe.Error()}
	}
	return Problem{Offset: -1, Rule: RuleOpen, Spec: ruleSpec[RuleOpen], What: err.Error()}
}

const (
	// maxFindingsPerRule bounds the report: past it a rule only counts.
	maxFindingsPerRule = 32
	// maxCheckedLog is the largest log validated entry by entry (it is
	// read whole); Hyper-V, QEMU and vhdkit write 1 MiB logs.
	maxCheckedLog = 64 * mib
	// maxLogBytesChecked bounds the bytes checksummed while looking for
	// the active sequence, as a multiple of the log's length: legitimate
	// logs hold each byte in about one candidate entry; a crafted log
	// with overlapping candidates would otherwise cost quadratic time.
	maxLogChecksumFactor = 8
	// maxSpaceUnits is the largest file offset, in MiB, a block may have:
	// OpenVMM keeps 28 bits of FileOffsetMB (256 TiB) and refuses more.
	maxSpaceUnits = 1 << 28
	// batChunk is how much of the BAT is read at a time.
	batChunk = 1 * mib
	// Metadata limits the strict reader enforces (OpenVMM).
	maxMetaRegion       = 128 * mib
	maxMetaPerCategory  = 40 * mib
	maxSystemMetaItems  = 1023
	maxUserMetaItems    = 1024
	maxLocatorEntries   = 256
	maxLogLength        = 1 << 30
	loggableOffset      = region1Offset // log writes may not touch the identifier or headers
	headerAreaSize      = 1 * mib
	regionFlagsRequired = 1
)

// checker accumulates findings while validating one file.
type checker struct {
	r        io.ReaderAt // the file, then the file with the pending log applied
	size     int64       // its size (after replay: at least the log's LastFileOffset)
	probs    []Problem
	counts   map[Rule]int
	violated bool
}

func (c *checker) add(rule Rule, structure string, off int64, warning bool, format string, args ...any) {
	if !warning && rule != RulePendingLog {
		c.violated = true
	}
	c.counts[rule]++
	if c.counts[rule] > maxFindingsPerRule {
		return
	}
	what := fmt.Sprintf(format, args...)
	if structure != "" {
		what = structure + ": " + what
	}
	c.probs = append(c.probs, Problem{Offset: off, Structure: structure, Rule: rule, Spec: ruleSpec[rule], What: what, Warning: warning})
}

func (c *checker) result() []Problem {
	probs := c.probs
	for _, p := range c.probs {
		if n := c.counts[p.Rule]; n > maxFindingsPerRule {
			probs = append(probs, Problem{Offset: -1, Rule: p.Rule, Spec: p.Spec, Warning: p.Warning,
				What: fmt.Sprintf("%d more findings of rule %s not listed", n-maxFindingsPerRule, p.Rule)})
			c.counts[p.Rule] = 0 // once
		}
	}
	return probs
}

// read fills p from off. A read that ends past the end of the file is
// reported (false, nil); other read errors end the check.
func (c *checker) read(p []byte, off int64) (bool, error) {
	n, err := c.r.ReadAt(p, off)
	if n == len(p) {
		return true, nil
	}
	if err == nil || errors.Is(err, io.EOF) || errors.Is(err, io.ErrUnexpectedEOF) {
		return false, nil
	}
	return false, fmt.Errorf("vhdx: check: reading at %#x: %w", off, err)
}

// readOrReport reads a structure; a file ending inside it is a finding.
func (c *checker) readOrReport(p []byte, off int64, structure string) (bool, error) {
	ok, err := c.read(p, off)
	if err == nil && !ok {
		c.add(RuleFileSize, structure, off, false, "the file (%d bytes) ends inside it (%d bytes at %#x)", c.size, len(p), off)
	}
	return ok, err
}

// validate runs every rule on f. A finding that makes later structures
// unknowable (no header, no region table, no metadata) ends the checks
// that need them.
func validate(f storage.File) (*checker, error) {
	size, err := f.Size()
	if err != nil {
		return nil, err
	}
	c := &checker{r: f, size: size, counts: map[Rule]int{}}
	h, hdrOff, ok, err := c.checkHeaders()
	if err != nil || !ok {
		return c, err
	}
	if err := c.checkLog(f, h, hdrOff); err != nil {
		return c, err
	}
	regs, unknown, ok, err := c.checkRegions(h)
	if err != nil || !ok {
		return c, err
	}
	p, ok, err := c.checkMetadata(regs.Metadata)
	if err != nil || !ok {
		return c, err
	}
	return c, c.checkBAT(h, regs, unknown, p)
}

// checkHeaders checks the file identifier and the headers, and returns the
// current header (the valid copy with the higher sequence number, as every
// reader picks it) and its offset.
func (c *checker) checkHeaders() (header, int64, bool, error) {
	var h header
	if c.size < headerAreaSize {
		var sig [8]byte
		if n, _ := c.r.ReadAt(sig[:], 0); n == 8 && binary.LittleEndian.Uint64(sig[:]) == sigFileIdent {
			c.add(RuleFileSize, "file", 0, false, "%d bytes, shorter than the 1 MiB header section", c.size)
		} else {
			c.add(RuleFileIdentifier, "file identifier", 0, false, "not a VHDX file")
		}
		return h, 0, false, nil
	}
	var sig [8]byte
	if ok, err := c.read(sig[:], 0); err != nil || !ok {
		return h, 0, false, err
	}
	if binary.LittleEndian.Uint64(sig[:]) != sigFileIdent {
		c.add(RuleFileIdentifier, "file identifier", 0, false, "signature %q, must be \"vhdxfile\"", sig[:])
		return h, 0, false, nil
	}
	var raw [2][]byte
	var hs [2]header
	var valid [2]bool
	var why [2]string
	for i, off := range []int64{header1Offset, header2Offset} {
		raw[i] = make([]byte, headerSize)
		if ok, err := c.read(raw[i], off); err != nil || !ok {
			return h, 0, false, err
		}
		// Only signature and checksum decide validity: a damaged copy is
		// what a crash during a header update leaves, and readers use
		// the other one.
		b := raw[i]
		switch {
		case binary.LittleEndian.Uint32(b[0:]) != sigHeader:
			why[i] = fmt.Sprintf("signature %q", b[0:4])
		case binary.LittleEndian.Uint32(b[4:]) != checksum(b, 4):
			why[i] = fmt.Sprintf("checksum %#08x, computed %#08x", binary.LittleEndian.Uint32(b[4:]), checksum(b, 4))
		default:
			hs[i], _ = parseHeader(b, "", off)
			valid[i] = true
		}
	}
	cur := 0
	switch {
	case !valid[0] && !valid[1]:
		c.add(RuleHeader, "header 1", header1Offset, false, "no valid header: copy 1 %s, copy 2 %s", why[0], why[1])
		return h, 0, false, nil
	case !valid[0]:
		cur = 1
	case valid[1] && hs[1].Seq > hs[0].Seq:
		cur = 1
	case valid[1] && hs[1].Seq == hs[0].Seq && !slices.Equal(raw[0], raw[1]):
		c.add(RuleHeaderSequence, "header 2", header2Offset+8, false, "same sequence number %d as header 1 with different contents: neither is current (MS-VHDX 2.2.2: the file is corrupt)", hs[1].Seq)
	case valid[1] && hs[1].Seq == hs[0].Seq:
		// MS-VHDX 2.2.2 names no current header here either, but the
		// copies are identical (Disk2vhd writes them so) and Hyper-V,
		// QEMU and OpenVMM read either.
		c.add(RuleHeaderSequence, "header 2", header2Offset+8, true, "same sequence number %d as header 1 (identical copies): MS-VHDX 2.2.2 makes neither current", hs[1].Seq)
	}
	h = hs[cur]
	off := int64(header1Offset)
	if cur == 1 {
		off = header2Offset
	}
	name := fmt.Sprintf("header %d", cur+1)
	b := raw[cur]
	if h.Version != 1 {
		c.add(RuleHeaderVersion, name, off+66, false, "version %d, must be 1", h.Version)
	}
	if h.Seq == math.MaxUint64 && !h.LogGUID.IsZero() {
		// Replaying the log ends by writing a header with a higher
		// sequence number, which does not exist.
		c.add(RuleHeaderSequence, name, off+8, false, "sequence number %d with a log to replay: no later header can follow (OpenVMM refuses)", h.Seq)
	}
	if h.LogVersion != 0 {
		c.add(RuleHeaderLogVersion, name, off+64, false, "log version %d, must be 0", h.LogVersion)
	}
	for i := 80; i < headerSize; i++ {
		if b[i] != 0 {
			c.add(RuleHeaderReserved, name, off+int64(i), false, "reserved byte %d is %#02x, must be 0", i, b[i])
			break
		}
	}
	logOK := true
	switch {
	case h.LogLength%mib != 0 || h.LogOffset%mib != 0:
		c.add(RuleHeaderLogLocation, name, off+68, false, "log at %#x, %#x bytes: offset and length must be multiples of 1 MiB", h.LogOffset, h.LogLength)
		logOK = false
	case h.LogLength == 0:
		if !h.LogGUID.IsZero() {
			c.add(RuleHeaderLogLocation, name, off+68, false, "no log (length 0) but LogGuid %s", h.LogGUID)
		}
		logOK = false
	case h.LogOffset < headerAreaSize:
		c.add(RuleHeaderLogLocation, name, off+72, false, "log at %#x, inside the 1 MiB header section", h.LogOffset)
		logOK = false
	case h.LogLength > maxLogLength:
		c.add(RuleHeaderLogLocation, name, off+68, false, "log of %d bytes, more than 1 GiB (OpenVMM refuses)", h.LogLength)
		logOK = false
	case h.LogOffset > uint64(c.size) || uint64(h.LogLength) > uint64(c.size)-h.LogOffset:
		c.add(RuleHeaderLogLocation, name, off+72, false, "log [%#x, +%#x) past the end of the file (%d bytes)", h.LogOffset, h.LogLength, c.size)
		logOK = false
	}
	if !logOK {
		h.LogLength = 0 // nothing of the log can be checked
	}
	return h, off, true, nil
}

// checkedEntry is a log entry parsed leniently (as vhdkit's reader
// accepts entries), with what a strict reader would refuse in it.
type checkedEntry struct {
	pos, length, tail int64
	seq               uint64
	flushed, last     int64
	writes            []logWrite
	strict            []string // what the strict reader refuses, each one line
	lengthBad         bool     // among strict: the length rule (RuleLogEntryLength)
}

// checkLog validates the log a non-zero LogGuid names: its active sequence
// must exist (else a reader refuses the file, or replays nothing), and
// every entry of it must follow the rules. It then makes c read the file
// as replaying the sequence leaves it.
func (c *checker) checkLog(f storage.File, h header, hdrOff int64) error {
	if h.LogGUID.IsZero() || h.LogLength == 0 {
		return nil // no log to replay: its content does not matter
	}
	logOff, logLen := int64(h.LogOffset), int64(h.LogLength)
	if logLen > maxCheckedLog {
		c.add(RuleLogLimits, "log", logOff, true, "a %d-byte log is not validated (at most %d bytes are); the rest is checked without replaying it", logLen, maxCheckedLog)
		return nil
	}
	log := make([]byte, logLen)
	if ok, err := c.read(log, logOff); err != nil || !ok {
		return err // the header check reported a log past the end
	}
	// at returns n bytes from log position pos, wrapping at the end.
	at := func(pos, n int64) []byte {
		pos %= logLen
		if pos+n <= logLen {
			return log[pos : pos+n]
		}
		b := make([]byte, 0, n)
		b = append(b, log[pos:]...)
		return append(b, log[:n-(logLen-pos)]...)
	}
	budget := maxLogChecksumFactor * logLen
	byPos := map[int64]*checkedEntry{}
	var heads []*checkedEntry
	for pos := int64(0); pos < logLen; pos += logSectorSize {
		s := log[pos : pos+logEntryHeaderSize]
		if binary.LittleEndian.Uint32(s[0:]) != sigLogEntry || GUID(s[32:48]) != h.LogGUID {
			continue
		}
		length := int64(binary.LittleEndian.Uint32(s[8:]))
		if length < logSectorSize || length%logSectorSize != 0 || length > logLen {
			continue
		}
		if budget -= length; budget < 0 {
			c.add(RuleLogLimits, "log", logOff+pos, false, "more overlapping candidate entries than a valid log holds (over %d bytes to checksum)", maxLogChecksumFactor*logLen)
			return nil
		}
		if e := parseCheckedEntry(at(pos, length), pos, logLen, logOff); e != nil {
			byPos[pos] = e
			heads = append(heads, e)
		}
	}
	seq := activeCheckedSequence(byPos, heads, logLen)
	if len(seq) == 0 {
		what := "LogGuid %s names no log entry: a reader must refuse the file (OpenVMM: no valid log entries)"
		if len(byPos) > 0 {
			what = "LogGuid %s names entries, but none forms a valid sequence: a reader must refuse the file"
		}
		c.add(RuleLogGUIDWithoutEntries, fmt.Sprintf("header %d", 1+(hdrOff-header1Offset)/(header2Offset-header1Offset)), hdrOff+48, false, what, h.LogGUID)
		return nil
	}
	var total int64
	for _, e := range seq {
		total += e.length
		name := fmt.Sprintf("log entry at log offset %#x", e.pos)
		for _, s := range e.strict {
			rule := RuleLogDescriptor
			if e.lengthBad && s == e.strict[0] {
				rule = RuleLogEntryLength
			}
			c.add(rule, name, logOff+e.pos, false, "%s", s)
		}
	}
	head := seq[len(seq)-1]
	if total >= logLen {
		c.add(RuleLogFull, fmt.Sprintf("log entry at log offset %#x", head.pos), logOff+head.pos, false,
			"the active sequence fills the whole %d-byte log: readers keep one sector free and refuse it", logLen)
	}
	if head.flushed > c.size {
		c.add(RuleLogFileOffset, fmt.Sprintf("log entry at log offset %#x", head.pos), logOff+head.pos+48, false,
			"FlushedFileOffset %d past the end of the file (%d bytes): the file lost data the log relies on", head.flushed, c.size)
	}
	// The rest is checked as replay leaves the file.
	pl := &pendingLog{flushed: head.flushed, last: head.last, entries: len(seq)}
	for _, e := range seq {
		pl.writes = append(pl.writes, e.writes...)
	}
	c.add(RulePendingLog, "log", logOff+seq[0].pos, false, "log has %d pending entries (check --repair replays them)", len(seq))
	c.r = newOverlay(f, pl)
	c.size = max(c.size, pl.last)
	return nil
}

// parseCheckedEntry parses the entry in b, at log position pos, as
// vhdkit's reader does, and lists what the strict reader refuses in it
// (OpenVMM's rules, which follow MS-VHDX 2.3.1). It returns nil for what
// no reader takes as an entry.
func parseCheckedEntry(b []byte, pos, logLen, logOff int64) *checkedEntry {
	length := int64(len(b))
	tail := int64(binary.LittleEndian.Uint32(b[12:]))
	count := int64(binary.LittleEndian.Uint32(b[24:]))
	if tail%logSectorSize != 0 || tail >= logLen || logEntryHeaderSize+count*logDescSize > length {
		return nil
	}
	if binary.LittleEndian.Uint32(b[4:]) != checksum(b, 4) {
		return nil
	}
	e := &checkedEntry{pos: pos, length: length, tail: tail,
		seq:     binary.LittleEndian.Uint64(b[16:]),
		flushed: int64(binary.LittleEndian.Uint64(b[48:])),
		last:    int64(binary.LittleEndian.Uint64(b[56:])),
	}
	if e.flushed < 0 || e.last < 0 {
		return nil
	}
	descArea := alignUp(logEntryHeaderSize+count*logDescSize, logSectorSize)
	sector := descArea
	var data int64
	var strict []string
	for i := int64(0); i < count; i++ {
		d := b[logEntryHeaderSize+i*logDescSize:]
		if binary.LittleEndian.Uint64(d[24:]) != e.seq {
			return nil
		}
		fileOff := int64(binary.LittleEndian.Uint64(d[16:]))
		var n int64
		switch binary.LittleEndian.Uint32(d[0:]) {
		case sigZeroDesc:
			n = int64(binary.LittleEndian.Uint64(d[8:]))
			if fileOff < 0 || fileOff%logSectorSize != 0 || n <= 0 || n%logSectorSize != 0 || n > MaxVirtualSize {
				return nil
			}
			if binary.LittleEndian.Uint32(d[4:]) != 0 {
				strict = append(strict, fmt.Sprintf("zero descriptor %d: reserved field is not 0", i))
			}
			e.writes = append(e.writes, logWrite{off: fileOff, length: n})
		case sigDataDesc:
			n = logSectorSize
			if fileOff < 0 || fileOff%logSectorSize != 0 || sector+logSectorSize > length {
				return nil
			}
			s := b[sector : sector+logSectorSize]
			sector += logSectorSize
			data++
			if binary.LittleEndian.Uint32(s[0:]) != sigDataSect ||
				uint64(binary.LittleEndian.Uint32(s[4:]))<<32|uint64(binary.LittleEndian.Uint32(s[4092:])) != e.seq {
				return nil
			}
			page := make([]byte, logSectorSize)
			copy(page[0:8], d[8:16])
			copy(page[8:4092], s[8:4092])
			copy(page[4092:], d[4:8])
			e.writes = append(e.writes, logWrite{off: fileOff, length: n, data: page})
		default:
			return nil
		}
		if fileOff < loggableOffset {
			strict = append(strict, fmt.Sprintf("descriptor %d writes [%#x, +%#x), before %#x (the file identifier and headers are never logged)", i, fileOff, n, loggableOffset))
		}
		if fileOff < logOff+logLen && logOff < fileOff+n {
			strict = append(strict, fmt.Sprintf("descriptor %d writes [%#x, +%#x), inside the log", i, fileOff, n))
		}
	}
	if sector != length {
		// The strict reader computes the length from the descriptors;
		// ours accepts only this too (data sectors fill the entry).
		return nil
	}
	if length >= logLen {
		e.lengthBad = true
		strict = append([]string{fmt.Sprintf("entry of %d bytes, as long as the whole log: readers keep one sector free and refuse it", length)}, strict...)
	}
	if binary.LittleEndian.Uint32(b[28:]) != 0 {
		strict = append(strict, "reserved field of the entry header is not 0")
	}
	e.strict = strict
	return e
}

// activeCheckedSequence finds the active sequence as vhdkit's reader does:
// of the valid entries, the one with the highest sequence number whose
// tail leads, through entries with consecutive sequence numbers laid end
// to end, to itself. The walks are bounded in total by a few times the
// number of entries, so a crafted log cannot make this quadratic.
func activeCheckedSequence(byPos map[int64]*checkedEntry, heads []*checkedEntry, logLen int64) []*checkedEntry {
	sort.Slice(heads, func(i, j int) bool { return heads[i].seq > heads[j].seq })
	steps := 4*len(heads) + 64
	for _, head := range heads {
		var seq []*checkedEntry
		e := byPos[head.tail]
		for e != nil && len(seq) <= len(byPos) && steps > 0 {
			steps--
			if len(seq) > 0 && e.seq != seq[len(seq)-1].seq+1 {
				break
			}
			seq = append(seq, e)
			if e == head {
				return seq
			}
			e = byPos[(e.pos+e.length)%logLen]
		}
		if steps <= 0 {
			break
		}
	}
	return nil
}

// extent is a named range of the file.
type extent struct {
	start, end int64
	what       string
}

// checkRegions checks both region table copies and returns the regions of
// the one readers use (copy 1 when valid), and the unknown regions.
func (c *checker) checkRegions(h header) (regions, []extent, bool, error) {
	var tables [2][]byte
	var entries [2][]regionEntry // of the valid copies
	var valid [2]bool
	for i, off := range []int64{region1Offset, region2Offset} {
		name := fmt.Sprintf("region table %d", i+1)
		b := make([]byte, regionTableSize)
		if ok, err := c.readOrReport(b, off, name); err != nil || !ok {
			return regions{}, nil, false, err
		}
		tables[i] = b
		if binary.LittleEndian.Uint32(b[0:]) != sigRegion {
			c.add(RuleRegionCopies, name, off, false, "signature %q, must be \"regi\"", b[0:4])
			continue
		}
		if got, want := binary.LittleEndian.Uint32(b[4:]), checksum(b, 4); got != want {
			c.add(RuleRegionCopies, name, off+4, false, "checksum %#08x, computed %#08x", got, want)
			continue
		}
		valid[i] = true
		n := binary.LittleEndian.Uint32(b[8:])
		if n > maxRegionEntries {
			c.add(RuleRegionTable, name, off+8, false, "%d entries, at most %d allowed", n, maxRegionEntries)
			n = maxRegionEntries
		}
		if binary.LittleEndian.Uint32(b[12:]) != 0 {
			c.add(RuleRegionTable, name, off+12, false, "reserved field is %#x, must be 0", binary.LittleEndian.Uint32(b[12:]))
		}
		entries[i] = parseRegionEntries(b, int(n))
	}
	if valid[0] && valid[1] && !slices.Equal(tables[0], tables[1]) {
		c.add(RuleRegionCopies, "region table 2", region2Offset, false, "differs from region table 1")
	}
	use := 0
	if !valid[0] {
		use = 1
		if !valid[1] {
			c.add(RuleRegionTable, "region table 1", region1Offset, false, "neither region table copy is valid")
			return regions{}, nil, false, nil
		}
	}
	name := fmt.Sprintf("region table %d", use+1)
	tableOff := []int64{region1Offset, region2Offset}[use]
	b := tables[use]
	var r regions
	var haveBAT, haveMeta bool
	exts := []extent{{0, headerAreaSize, "the header section"}}
	if h.LogLength > 0 {
		exts = append(exts, extent{int64(h.LogOffset), int64(h.LogOffset) + int64(h.LogLength), "the log"})
	}
	var unknown []extent
	seen := map[GUID]bool{}
	for i, e := range entries[use] {
		eoff := tableOff + 16 + 32*int64(i)
		if flags := binary.LittleEndian.Uint32(b[16+32*i+28:]); flags&^regionFlagsRequired != 0 {
			c.add(RuleRegionEntry, name, eoff+28, false, "entry %d: reserved flag bits %#x, must be 0", i, flags&^regionFlagsRequired)
		}
		if seen[e.GUID] {
			c.add(RuleRegionEntry, name, eoff, false, "entry %d: region %s listed twice", i, e.GUID)
			continue
		}
		seen[e.GUID] = true
		what := "region " + e.GUID.String()
		switch e.GUID {
		case regionBAT:
			haveBAT, r.BAT, what = true, e, "the BAT"
		case regionMetadata:
			haveMeta, r.Metadata, what = true, e, "the metadata region"
		default:
			if e.Required {
				c.add(RuleRegionRequired, name, eoff, false, "entry %d: unknown region %s marked required: readers must refuse the file", i, e.GUID)
			}
		}
		placed := true
		switch {
		case e.Length == 0 || e.Offset%mib != 0 || e.Length%mib != 0:
			c.add(RuleRegionEntry, name, eoff+16, false, "entry %d: %s at %#x, %#x bytes: offset and length must be non-zero multiples of 1 MiB", i, what, e.Offset, e.Length)
			placed = false
		case e.Offset > uint64(c.size) || uint64(e.Length) > uint64(c.size)-e.Offset:
			c.add(RuleFileSize, name, eoff+16, false, "entry %d: %s [%#x, +%#x) past the end of the file (%d bytes)", i, what, e.Offset, e.Length, c.size)
		}
		if e.Offset >= 1<<62 {
			placed = false
		}
		if !placed {
			if e.GUID == regionBAT {
				haveBAT = false
			}
			if e.GUID == regionMetadata {
				haveMeta = false
			}
			continue
		}
		x := extent{int64(e.Offset), int64(e.Offset) + int64(e.Length), what}
		for _, o := range exts {
			if x.start < o.end && o.start < x.end {
				c.add(RuleRegionOverlap, name, eoff+16, false, "entry %d: %s [%#x, +%#x) overlaps %s", i, what, e.Offset, e.Length, o.what)
			}
		}
		exts = append(exts, x)
		if e.GUID != regionBAT && e.GUID != regionMetadata {
			unknown = append(unknown, x)
		}
	}
	if !haveBAT || !haveMeta {
		missing := "BAT"
		if haveBAT {
			missing = "metadata"
		}
		c.add(RuleRegionRequired, name, tableOff, false, "no usable %s region", missing)
		return r, nil, false, nil
	}
	return r, unknown, true, nil
}

// parseRegionEntries decodes the first n entries of a region table.
func parseRegionEntries(b []byte, n int) []regionEntry {
	entries := make([]regionEntry, n)
	for i := range entries {
		e := b[16+32*i:]
		copy(entries[i].GUID[:], e[0:16])
		entries[i].Offset = binary.LittleEndian.Uint64(e[16:])
		entries[i].Length = binary.LittleEndian.Uint32(e[24:])
		entries[i].Required = binary.LittleEndian.Uint32(e[28:])&1 != 0
	}
	return entries
}

// Flags a known system item must have (MS-VHDX 2.6.2): IsVirtualDisk, and
// the item's size (0: variable).
var knownItems = []struct {
	id      GUID
	virtual bool
	size    uint32
}{
	{itemFileParameters, false, 8},
	{itemVirtualDiskSize, true, 8},
	{itemVirtualDiskID, true, 16},
	{itemLogicalSectorSize, true, 4},
	{itemPhysicalSectorSize, true, 4},
	{itemParentLocator, false, 0},
}

// Other system items the strict reader knows (and so accepts as required).
var (
	itemCHSParameters = mustGUID("DA02D7BC-3D3A-423C-AC88-2A36AB21479B")
	itemPMemLabel     = mustGUID("10E1AE8A-4B7E-4169-A40F-CD70DE928393")
)

// checkMetadata checks the metadata table and the known items, and returns
// the decoded parameters.
func (c *checker) checkMetadata(region regionEntry) (params, bool, error) {
	var p params
	off := int64(region.Offset)
	const name = "metadata table"
	if region.Length > maxMetaRegion {
		c.add(RuleMetadataTable, "metadata region", off, false, "%d bytes, more than 128 MiB (OpenVMM refuses)", region.Length)
	}
	if region.Length < metaTableSize {
		c.add(RuleMetadataTable, name, off, false, "the %d-byte region cannot hold the 64 KiB table", region.Length)
		return p, false, nil
	}
	b := make([]byte, metaTableSize)
	if ok, err := c.readOrReport(b, off, name); err != nil || !ok {
		return p, false, err
	}
	if binary.LittleEndian.Uint64(b[0:]) != sigMetadata {
		c.add(RuleMetadataTable, name, off, false, "signature %q, must be \"metadata\"", b[0:8])
		return p, false, nil
	}
	if binary.LittleEndian.Uint16(b[8:]) != 0 || !isZero(b[12:32]) {
		c.add(RuleMetadataTable, name, off+8, false, "reserved fields are not 0")
	}
	n := int(binary.LittleEndian.Uint16(b[10:]))
	if n > maxMetaEntries {
		c.add(RuleMetadataTable, name, off+10, false, "%d entries, at most %d allowed", n, maxMetaEntries)
		n = maxMetaEntries
	}
	type item struct {
		metaEntry
		at int64 // file offset of the table entry
	}
	var items []item
	var sizes, counts [2]int64 // system, user
	type key struct {
		id   GUID
		user bool
	}
	seen := map[key]bool{}
	for i := 0; i < n; i++ {
		e := b[32+32*i:]
		eoff := off + 32 + 32*int64(i)
		var m metaEntry
		copy(m.ID[:], e[0:16])
		m.Offset = binary.LittleEndian.Uint32(e[16:])
		m.Length = binary.LittleEndian.Uint32(e[20:])
		flags := binary.LittleEndian.Uint32(e[24:])
		m.IsUser, m.IsVirtualDisk, m.IsRequired = flags&1 != 0, flags&2 != 0, flags&4 != 0
		what := fmt.Sprintf("entry %d (item %s)", i, m.ID)
		if flags&^7 != 0 || binary.LittleEndian.Uint32(e[28:]) != 0 {
			c.add(RuleMetadataEntry, name, eoff+24, false, "%s: reserved bits are not 0", what)
		}
		if m.ID.IsZero() {
			c.add(RuleMetadataEntry, name, eoff, false, "%s: the item id is zero (OpenVMM refuses)", what)
		}
		if m.IsUser && m.IsRequired {
			c.add(RuleMetadataEntry, name, eoff+24, false, "%s: a user item marked required", what)
		}
		if seen[key{m.ID, m.IsUser}] {
			c.add(RuleMetadataEntry, name, eoff, false, "%s: listed twice", what)
			continue
		}
		seen[key{m.ID, m.IsUser}] = true
		cat := 0
		if m.IsUser {
			cat = 1
		}
		counts[cat]++
		sizes[cat] += int64(m.Length)
		switch {
		case m.Length == 0:
			if m.Offset != 0 {
				c.add(RuleMetadataEntry, name, eoff+16, false, "%s: zero length at offset %#x, must be 0", what, m.Offset)
			}
		case m.Length > mib:
			c.add(RuleMetadataEntry, name, eoff+20, false, "%s: %d bytes, more than 1 MiB", what, m.Length)
			continue
		case m.Offset < metaTableSize || m.Offset > region.Length || m.Length > region.Length-m.Offset:
			c.add(RuleMetadataEntry, name, eoff+16, false, "%s: [%#x, +%#x) outside the metadata region past its table (%#x bytes)", what, m.Offset, m.Length, region.Length)
			continue
		}
		if !m.IsUser && m.IsRequired && itemName(m.ID) == "" && m.ID != itemCHSParameters && m.ID != itemPMemLabel {
			c.add(RuleMetadataRequired, name, eoff, false, "%s: unknown item marked required: readers must refuse the file", what)
		}
		items = append(items, item{m, eoff})
	}
	if counts[0] > maxSystemMetaItems || counts[1] > maxUserMetaItems {
		c.add(RuleMetadataTable, name, off+10, false, "%d system and %d user items, at most %d and %d", counts[0], counts[1], maxSystemMetaItems, maxUserMetaItems)
	}
	if sizes[0] > maxMetaPerCategory || sizes[1] > maxMetaPerCategory {
		c.add(RuleMetadataTable, name, off+10, false, "%d bytes of system and %d of user items, at most 40 MiB each", sizes[0], sizes[1])
	}
	// No two items may share bytes.
	byOff := slices.Clone(items)
	slices.SortFunc(byOff, func(a, b item) int { return int(int64(a.Offset) - int64(b.Offset)) })
	var reach uint32
	var reachID GUID
	for _, it := range byOff {
		if it.Length == 0 {
			continue
		}
		if it.Offset < reach {
			c.add(RuleMetadataEntry, name, it.at+16, false, "item %s [%#x, +%#x) overlaps item %s", it.ID, it.Offset, it.Length, reachID)
		}
		if end := it.Offset + it.Length; end > reach {
			reach, reachID = end, it.ID
		}
	}
	// The known items: present, sized, flagged and valued as 2.6.2 says.
	values := map[GUID][]byte{}
	ioffs := map[GUID]int64{}
	for _, k := range knownItems {
		var found *item
		for i := range items {
			if items[i].ID == k.id && !items[i].IsUser {
				found = &items[i]
				break
			}
		}
		iname := "metadata item " + itemName(k.id)
		if found == nil {
			if k.id != itemParentLocator {
				c.add(RuleMetadataRequired, iname, off, false, "missing")
			}
			continue
		}
		if k.size != 0 && found.Length != k.size {
			c.add(RuleMetadataValue, iname, found.at+20, false, "%d bytes, must be %d", found.Length, k.size)
			continue
		}
		if found.IsVirtualDisk != k.virtual {
			c.add(RuleMetadataValue, iname, found.at+24, false, "IsVirtualDisk is %v, must be %v", found.IsVirtualDisk, k.virtual)
		}
		if !found.IsRequired {
			c.add(RuleMetadataValue, iname, found.at+24, true, "IsRequired is not set (MS-VHDX 2.6.2 lists it set)")
		}
		v := make([]byte, found.Length)
		ioff := off + int64(found.Offset)
		if ok, err := c.readOrReport(v, ioff, iname); err != nil || !ok {
			return p, false, err
		}
		values[k.id], ioffs[k.id] = v, ioff
	}
	ok := true
	if v := values[itemFileParameters]; v != nil {
		p.BlockSize = binary.LittleEndian.Uint32(v[0:])
		flags := binary.LittleEndian.Uint32(v[4:])
		p.LeaveAllocated, p.HasParent = flags&1 != 0, flags&2 != 0
		if flags&^3 != 0 {
			c.add(RuleMetadataValue, "file parameters", ioffs[itemFileParameters]+4, false, "reserved flag bits %#x, must be 0", flags&^3)
		}
		if p.BlockSize < minBlockSize || p.BlockSize > maxBlockSize || p.BlockSize&(p.BlockSize-1) != 0 {
			c.add(RuleMetadataValue, "file parameters", ioffs[itemFileParameters], false, "block size %d is not a power of two in [1 MiB, 256 MiB]", p.BlockSize)
			ok = false
		}
	} else {
		ok = false
	}
	sector := func(id GUID, dst *uint32) {
		v := values[id]
		if v == nil {
			ok = false
			return
		}
		*dst = binary.LittleEndian.Uint32(v)
		if *dst != 512 && *dst != 4096 {
			c.add(RuleMetadataValue, itemName(id), ioffs[id], false, "%d, must be 512 or 4096", *dst)
			ok = false
		}
	}
	sector(itemLogicalSectorSize, &p.LogicalSectorSize)
	sector(itemPhysicalSectorSize, &p.PhysicalSectorSize)
	if v := values[itemVirtualDiskSize]; v != nil {
		p.VirtualSize = binary.LittleEndian.Uint64(v)
		if p.VirtualSize == 0 || p.VirtualSize > MaxVirtualSize || (p.LogicalSectorSize != 0 && p.VirtualSize%uint64(p.LogicalSectorSize) != 0) {
			c.add(RuleMetadataValue, "virtual disk size", ioffs[itemVirtualDiskSize], false, "%d is not a multiple of the logical sector size in (0, 64 TiB]", p.VirtualSize)
			ok = false
		}
	} else {
		ok = false
	}
	if v := values[itemVirtualDiskID]; v != nil {
		copy(p.DiskID[:], v)
	}
	if p.HasParent {
		if v := values[itemParentLocator]; v == nil {
			c.add(RuleMetadataRequired, "metadata item parent locator", off, false, "missing in a differencing image (HasParent set)")
		} else {
			c.checkLocator(v, ioffs[itemParentLocator])
		}
	}
	return p, ok, nil
}

// checkLocator checks a parent locator item (MS-VHDX 2.6.2.6) at file
// offset off.
func (c *checker) checkLocator(b []byte, off int64) {
	const name = "parent locator"
	if len(b) < 20 {
		c.add(RuleParentLocator, name, off, false, "%d bytes, shorter than its 20-byte header", len(b))
		return
	}
	if GUID(b[0:16]) != locatorTypeVHDX {
		c.add(RuleParentLocator, name, off, false, "locator type %s, must be %s", GUID(b[0:16]), locatorTypeVHDX)
	}
	if binary.LittleEndian.Uint16(b[16:]) != 0 {
		c.add(RuleParentLocator, name, off+16, false, "reserved field is not 0")
	}
	n := int(binary.LittleEndian.Uint16(b[18:]))
	if n == 0 || n > maxLocatorEntries {
		c.add(RuleParentLocator, name, off+18, false, "%d key/value entries, must be 1 to %d", n, maxLocatorEntries)
		if n == 0 {
			return
		}
	}
	if 20+12*n > len(b) {
		c.add(RuleParentLocator, name, off+18, false, "%d entries do not fit in the %d-byte item", n, len(b))
		return
	}
	str := func(o uint32, l uint16, what string, eoff int64) (string, bool) {
		switch {
		case l == 0 || l%2 != 0 || o%2 != 0:
			c.add(RuleParentLocator, name, eoff, false, "%s at %#x, %d bytes: must be a non-empty, even-aligned UTF-16 string", what, o, l)
		case uint64(o)+uint64(l) > uint64(len(b)):
			c.add(RuleParentLocator, name, eoff, false, "%s [%#x, +%d) past the end of the %d-byte item", what, o, l, len(b))
		default:
			if uint64(o) < 20+12*uint64(n) {
				// Not forbidden in words, but no writer does it.
				c.add(RuleParentLocator, name, eoff, true, "%s [%#x, +%d) overlaps the locator's header or entries", what, o, l)
			}
			u := make([]uint16, l/2)
			for i := range u {
				u[i] = binary.LittleEndian.Uint16(b[int(o)+2*i:])
			}
			for i := 0; i < len(u); i++ {
				switch {
				case u[i] == 0:
					c.add(RuleParentLocator, name, eoff, false, "%s holds a NUL character", what)
					return "", false
				case utf16.IsSurrogate(rune(u[i])):
					if u[i] < 0xdc00 && i+1 < len(u) && u[i+1] >= 0xdc00 && u[i+1] < 0xe000 {
						i++
						continue
					}
					c.add(RuleParentLocator, name, eoff, false, "%s is not well-formed UTF-16 (unpaired surrogate %#04x)", what, u[i])
					return "", false
				}
			}
			return string(utf16.Decode(u)), true
		}
		return "", false
	}
	keys := map[string]bool{}
	for i := 0; i < n; i++ {
		e := b[20+12*i:]
		eoff := off + 20 + 12*int64(i)
		k, kok := str(binary.LittleEndian.Uint32(e[0:]), binary.LittleEndian.Uint16(e[8:]), fmt.Sprintf("entry %d's key", i), eoff)
		v, vok := str(binary.LittleEndian.Uint32(e[4:]), binary.LittleEndian.Uint16(e[10:]), fmt.Sprintf("entry %d's value", i), eoff)
		if !kok {
			continue
		}
		if keys[k] {
			c.add(RuleParentLocator, name, eoff, false, "key %q listed twice", k)
		}
		keys[k] = true
		if vok && (k == "parent_linkage" || k == "parent_linkage2") {
			if _, err := ParseGUID(v); err != nil {
				c.add(RuleParentLocator, name, eoff, false, "%s %q is not a GUID", k, v)
			}
		}
	}
	if !keys["parent_linkage"] {
		c.add(RuleParentLocator, name, off, false, "no parent_linkage key")
	}
}

func isZero(b []byte) bool {
	for _, x := range b {
		if x != 0 {
			return false
		}
	}
	return true
}

// spaceMap records which MiB of the file are in use, one bit each, in
// pages allocated as they are touched: at most 32 MiB for a 256 TiB file.
type spaceMap struct {
	pages map[int64]*[spacePageWords]uint64
}

const spacePageWords = 4096 // 256 Ki MiB per page

// claim marks [start, start+n) MiB in use and returns the first unit that
// already was, or -1.
func (s *spaceMap) claim(start, n int64) int64 {
	first := int64(-1)
	for u := start; u < start+n && u < maxSpaceUnits; u++ {
		pg := s.pages[u/(spacePageWords*64)]
		if pg == nil {
			pg = new([spacePageWords]uint64)
			s.pages[u/(spacePageWords*64)] = pg
		}
		w, bit := (u%(spacePageWords*64))/64, uint64(1)<<(u%64)
		if pg[w]&bit != 0 && first < 0 {
			first = u
		}
		pg[w] |= bit
	}
	return first
}

// checkBAT checks every BAT entry: states allowed for the entry's and the
// image's kind, reserved bits and fields, blocks inside the file and not
// overlapping the header section, a region or each other, and sector
// bitmaps under PARTIALLY_PRESENT blocks. The BAT is read in pieces.
func (c *checker) checkBAT(h header, regs regions, unknown []extent, p params) error {
	g := newGeometry(p.BlockSize, p.LogicalSectorSize, p.VirtualSize, p.HasParent)
	batOff := int64(regs.BAT.Offset)
	if g.totalEntries*8 > int64(regs.BAT.Length) {
		c.add(RuleBATSize, "BAT region", batOff, false, "%d bytes hold fewer than the %d entries a %d-byte disk with %d-byte blocks needs", regs.BAT.Length, g.totalEntries, g.virtualSize, g.blockSize)
		return nil
	}
	fixed := []extent{{0, headerAreaSize, "the header section"}}
	if h.LogLength > 0 {
		fixed = append(fixed, extent{int64(h.LogOffset), int64(h.LogOffset) + int64(h.LogLength), "the log"})
	}
	fixed = append(fixed,
		extent{int64(regs.Metadata.Offset), int64(regs.Metadata.Offset) + int64(regs.Metadata.Length), "the metadata region"},
		extent{batOff, batOff + int64(regs.BAT.Length), "the BAT"})
	fixed = append(fixed, unknown...)
	space := &spaceMap{pages: map[int64]*[spacePageWords]uint64{}}
	for _, x := range fixed {
		space.claim(x.start/mib, (x.end-x.start)/mib) // their overlaps are reported by checkRegions
	}
	// A block may end inside the file's last, partial MiB (OpenVMM rounds
	// the file's length up to 1 MiB), not past it.
	fileEnd := alignUp(c.size, mib)
	var conflicts []batConflict
	partial := false // a PARTIALLY_PRESENT block in the current chunk
	buf := make([]byte, batChunk)
	for first := int64(0); first < g.totalEntries; first += batChunk / 8 {
		n := min(batChunk/8, g.totalEntries-first)
		if ok, err := c.readOrReport(buf[:n*8], batOff+first*8, "BAT"); err != nil || !ok {
			return err
		}
		for j := int64(0); j < n; j++ {
			i := first + j
			e := binary.LittleEndian.Uint64(buf[8*j:])
			eoff := batOff + 8*i
			st := batState(e)
			mb := int64(e >> 20)
			isBitmap := (i+1)%(g.chunkRatio+1) == 0
			if e&0xffff8 != 0 {
				c.add(RuleBATReserved, entryName(i), eoff, false, "reserved bits %#x, must be 0", e&0xffff8)
			}
			length := g.blockSize
			occupies := false
			if isBitmap {
				length = bitmapBlockSize
				switch st {
				case bitmapNotPresent:
					if mb != 0 {
						c.add(RuleBATOffset, entryName(i), eoff, false, "SB_BLOCK_NOT_PRESENT with FileOffsetMB %d: the field is reserved, must be 0", mb)
					}
					if partial {
						c.add(RuleBATBitmapMissing, entryName(i), eoff, false, "chunk %d has PARTIALLY_PRESENT blocks but no sector bitmap block", i/(g.chunkRatio+1))
					}
				case bitmapPresent:
					if !p.HasParent {
						c.add(RuleBATState, entryName(i), eoff, false, "SB_BLOCK_PRESENT in an image without a parent: it MUST NOT be in this state")
					}
					occupies = true
				default:
					c.add(RuleBATState, entryName(i), eoff, false, "sector bitmap state %d (only 0 and 6 are defined)", st)
				}
				partial = false
			} else {
				switch st {
				case payloadNotPresent, payloadZero:
					if mb != 0 {
						c.add(RuleBATOffset, entryName(i), eoff, false, "%s with FileOffsetMB %d: the field is reserved, must be 0 (Hyper-V refuses)", stateName(st), mb)
					}
				case payloadUndefined, payloadUnmapped:
					// MS-VHDX 2.5.1.1 lets these keep their offset: the
					// block then still holds its space (OpenVMM keeps it).
					occupies = mb != 0
				case payloadFullyPresent:
					occupies = true
				case payloadPartiallyPresent:
					if !p.HasParent {
						c.add(RuleBATState, entryName(i), eoff, false, "PARTIALLY_PRESENT in an image without a parent")
					}
					occupies, partial = true, partial || p.HasParent
				default:
					c.add(RuleBATState, entryName(i), eoff, false, "payload state %d (4 and 5 are reserved)", st)
				}
			}
			if !occupies {
				continue
			}
			start := mb * mib
			if mb >= maxSpaceUnits || start+length > fileEnd {
				what := stateName(st) + " block"
				if isBitmap {
					what = "SB_BLOCK_PRESENT sector bitmap block"
				}
				c.add(RuleBATBeyondEOF, entryName(i), eoff, false, "%s [%#x, +%#x) ends past the end of the file (%d bytes)", what, start, length, c.size)
				if mb >= maxSpaceUnits {
					continue
				}
			}
			if u := space.claim(mb, length/mib); u >= 0 {
				var owner string
				for _, x := range fixed {
					if u*mib >= x.start && u*mib < x.end {
						owner = x.what
						break
					}
				}
				if owner != "" {
					c.add(RuleBATOverlap, entryName(i), eoff, false, "block [%#x, +%#x) overlaps %s", start, length, owner)
				} else if len(conflicts) < maxFindingsPerRule {
					conflicts = append(conflicts, batConflict{i, u})
				} else {
					c.add(RuleBATOverlap, entryName(i), eoff, false, "block [%#x, +%#x) overlaps another block", start, length)
				}
			}
		}
	}
	if partial {
		// A differencing BAT ends with a bitmap entry, so this is only
		// reached by a BAT cut short; say so anyway.
		c.add(RuleBATBitmapMissing, "BAT", batOff, false, "the last chunk has PARTIALLY_PRESENT blocks but no sector bitmap entry")
	}
	return c.nameConflicts(g, batOff, conflicts)
}

// batConflict is a block (BAT entry) found overlapping an earlier one at
// the MiB unit.
type batConflict struct{ entry, unit int64 }

// nameConflicts reports blocks found overlapping an earlier block, naming
// that block: a second pass over the BAT finds, for each, the first entry
// holding the contested MiB.
func (c *checker) nameConflicts(g geometry, batOff int64, conflicts []batConflict) error {
	if len(conflicts) == 0 {
		return nil
	}
	owners := make([]int64, len(conflicts))
	for k := range owners {
		owners[k] = -1
	}
	buf := make([]byte, batChunk)
	for first := int64(0); first < g.totalEntries; first += batChunk / 8 {
		n := min(batChunk/8, g.totalEntries-first)
		if ok, err := c.read(buf[:n*8], batOff+first*8); err != nil || !ok {
			return err
		}
		for j := int64(0); j < n; j++ {
			i := first + j
			e := binary.LittleEndian.Uint64(buf[8*j:])
			st, mb := batState(e), int64(e>>20)
			length := g.blockSize / mib
			if (i+1)%(g.chunkRatio+1) == 0 {
				if st != bitmapPresent {
					continue
				}
				length = 1
			} else if st != payloadFullyPresent && st != payloadPartiallyPresent && (st != payloadUndefined && st != payloadUnmapped || mb == 0) {
				continue
			}
			for k, x := range conflicts {
				if owners[k] < 0 && i < x.entry && x.unit >= mb && x.unit < mb+length {
					owners[k] = i
				}
			}
		}
	}
	for k, x := range conflicts {
		other := "another block"
		if owners[k] >= 0 {
			other = "the block of " + entryName(owners[k])
		}
		c.add(RuleBATOverlap, entryName(x.entry), batOff+8*x.entry, false, "block overlaps %s at %#x", other, x.unit*mib)
	}
	return nil
}

func stateName(st uint8) string {
	switch st {
	case payloadNotPresent:
		return "NOT_PRESENT"
	case payloadUndefined:
		return "UNDEFINED"
	case payloadZero:
		return "ZERO"
	case payloadUnmapped:
		return "UNMAPPED"
	case payloadFullyPresent:
		return "FULLY_PRESENT"
	case payloadPartiallyPresent:
		return "PARTIALLY_PRESENT"
	}
	return fmt.Sprintf("state %d", st)
}
