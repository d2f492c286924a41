package vhdx

import (
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"os"
	"sync"
	"sync/atomic"

	"github.com/vhdkit/vhdkit/disk"
	"github.com/vhdkit/vhdkit/storage"
)

func init() {
	disk.Register(disk.Format{
		Name:       "vhdx",
		Extensions: []string{".vhdx", ".avhdx"},
		Match: func(head []byte) bool {
			return len(head) >= 8 && binary.LittleEndian.Uint64(head) == sigFileIdent
		},
		Open: func(path string, opts disk.OpenOptions) (disk.Image, error) {
			im, err := Open(path, OpenOptions{ReadOnly: opts.ReadOnly, ForceShare: opts.ForceShare, ParentDirs: opts.ParentDirs})
			if err != nil {
				return nil, err // not a typed nil inside the interface
			}
			return im, nil
		},
	})
}

// Type is the kind of a VHDX image.
type Type int

const (
	Dynamic Type = iota // the zero value, as New-VHD's default
	Fixed
	Differencing
)

func (t Type) String() string {
	switch t {
	case Fixed:
		return "fixed"
	case Dynamic:
		return "dynamic"
	case Differencing:
		return "differencing"
	}
	return "unknown"
}

// OpenOptions control Open.
type OpenOptions struct {
	// ReadOnly opens without modifying the file: a pending log is replayed
	// in memory only.
	ReadOnly bool
	// ForceShare, with ReadOnly, opens the chain's files without refusing
	// other users, even writers (see storage.OpenForceShare).
	ForceShare bool
	// ParentDirs, when not empty, confines parent resolution to these
	// directories (and their subdirectories).
	ParentDirs []string
	// ParentPath, when set, is the parent of a differencing image instead of
	// the one its locator names. Its DataWriteGuid must still match.
	ParentPath string
	// ParentImage, when set, is the open parent to read through (it must
	// still match the child's linkage); the child owns it from then on.
	ParentImage *Image
	// NoParent opens a differencing image without its parent, to change
	// its links (SetParent, SetParentLinkage2): reading a range the file
	// does not hold fails with ErrParentNotFound.
	NoParent bool
	// OpenFile, when set, opens the image's and its parents' files instead
	// of storage.OpenFile: the seam fault and crash tests use.
	OpenFile func(path string, flag int) (storage.File, error)
}

// Image is an open VHDX file. It is safe for concurrent use.
type Image struct {
	f        storage.File // with any read-only log overlay
	path     string
	readOnly bool        // opened read-only
	frozen   atomic.Bool // made read-only by Freeze
	creator  string

	hdr     header
	hdrSlot int // 0: header 1 is current, 1: header 2
	regs    regions
	p       params
	meta    []metaEntry
	geo     geometry
	logOff  int64
	logLen  int64
	replay  *pendingLog // the log replayed at open, nil if none

	parent     disk.Image // differencing only; opened read-only
	parentPath string

	flushMu sync.Mutex // serialises Flush and Close

	size atomic.Int64 // the virtual size, for Size without the lock

	mu        sync.RWMutex
	bat       []uint64
	bitmaps   []atomic.Pointer[[]byte] // per chunk, loaded lazily
	bmLoad    sync.Mutex
	dirty     map[int64]struct{} // file offsets of 4 KiB metadata pages to log
	metaBuf   []byte             // the metadata region as rewritten, if it was
	regionBuf []byte             // the region table as rewritten (both copies), if it was
	fileEnd   int64              // where the next block is allocated (1 MiB-aligned)
	writing   bool               // header updated: GUIDs changed
	logSeq    uint64
	logw      logWriter // the log's state for writing (log.go); flushMu and mu to change
	space     freeSpace // file ranges no live block holds (freespace.go)
	closed    bool
}

// Open opens the VHDX file at path, and for a differencing image its chain
// of parents (read-only).
func Open(path string, opts OpenOptions) (*Image, error) {
	return openChain(path, opts, nil)
}

func openChain(path string, opts OpenOptions, seen []os.FileInfo) (*Image, error) {
	flag := os.O_RDWR
	if opts.ReadOnly {
		flag = os.O_RDONLY
	}
	var f storage.File
	var err error
	switch {
	case opts.OpenFile != nil:
		f, err = opts.OpenFile(path, flag)
	case opts.ForceShare:
		if !opts.ReadOnly {
			return nil, fmt.Errorf("vhdx: %s: ForceShare needs ReadOnly", path)
		}
		f, err = storage.OpenForceShare(path)
	default:
		f, err = storage.OpenFile(path, flag, 0)
	}
	if err != nil {
		return nil, err
	}
	im, err := openFile(f, path, opts, seen)
	if err != nil {
		f.Close()
		return nil, err
	}
	return im, nil
}

// OpenFile opens an image stored in f; path names it (parent locators are
// resolved relative to its directory). On success the Image owns f.
func OpenFile(f storage.File, path string, opts OpenOptions) (*Image, error) {
	return openFile(f, path, opts, nil)
}

func openFile(f storage.File, path string, opts OpenOptions, seen []os.FileInfo) (*Image, error) {
	im := &Image{f: f, path: path, readOnly: opts.ReadOnly, dirty: map[int64]struct{}{}}
	size, err := im.readStructure()
	if err != nil {
		return nil, err
	}
	if err := im.readBAT(size); err != nil {
		return nil, err
	}
	if im.p.HasParent {
		if opts.NoParent {
			im.parent = missingParent{im.geo.virtualSize}
		} else if err := im.openParent(opts, seen); err != nil {
			return nil, err
		}
	}
	return im, nil
}

// missingParent stands in for a parent not opened (OpenOptions.NoParent).
type missingParent struct{ size int64 }

func (missingParent) ReadAt([]byte, int64) (int, error) {
	return 0, fmt.Errorf("vhdx: parent not opened: %w", ErrParentNotFound)
}
func (missingParent) WriteAt([]byte, int64) (int, error) { return 0, ErrReadOnly }
func (p missingParent) Size() int64                      { return p.size }
func (missingParent) Flush() error                       { return nil }
func (missingParent) Close() error                       { return nil }

// readStructure reads everything but the BAT: headers, the log (replayed),
// region table and metadata. It returns the file size after replay.
func (im *Image) readStructure() (int64, error) {
	size, err := im.f.Size()
	if err != nil {
		return 0, err
	}
	if err := im.readHeaders(size); err != nil {
		return 0, err
	}
	if err := im.replayLog(size); err != nil {
		return 0, err
	}
	if size, err = im.f.Size(); err != nil {
		return 0, err
	}
	if err := im.readRegions(size); err != nil {
		return 0, err
	}
	return size, im.readMetadata()
}

func (im *Image) readAt(p []byte, off int64, what string) error {
	if _, err := im.f.ReadAt(p, off); err != nil {
		if errors.Is(err, io.EOF) {
			return formatErr(what, off, "file ends inside it")
		}
		return fmt.Errorf("vhdx: reading %s at %#x: %w", what, off, err)
	}
	return nil
}

// readHeaders reads the file identifier and both headers and picks the
// current one: the valid header with the higher sequence number.
func (im *Image) readHeaders(size int64) error {
	if size < 2*mib {
		var sig [8]byte
		if n, _ := im.f.ReadAt(sig[:], 0); n == 8 && binary.LittleEndian.Uint64(sig[:]) == sigFileIdent {
			return formatErr("file", 0, "%d bytes, too short for a VHDX file", size)
		}
		return formatErr("file identifier", 0, "not a VHDX file")
	}
	b := make([]byte, 64*kib)
	if err := im.readAt(b, fileIdentOffset, "file identifier"); err != nil {
		return err
	}
	if binary.LittleEndian.Uint64(b) != sigFileIdent {
		return formatErr("file identifier", 0, "not a VHDX file (signature %q)", b[:8])
	}
	im.creator = parseCreator(b)
	var hs [2]header
	var errs [2]error
	for i, off := range []int64{header1Offset, header2Offset} {
		name := fmt.Sprintf("header %d", i+1)
		if errs[i] = im.readAt(b[:headerSize], off, name); errs[i] != nil {
			continue
		}
		if hs[i], errs[i] = parseHeader(b, name, off); errs[i] == nil {
			errs[i] = hs[i].validate(name, off, size)
		}
	}
	switch {
	case errs[0] != nil && errs[1] != nil:
		return fmt.Errorf("no valid header: %w; %v", errs[0], errs[1])
	case errs[1] != nil || (errs[0] == nil && hs[0].Seq >= hs[1].Seq):
		im.hdr, im.hdrSlot = hs[0], 0
	default:
		im.hdr, im.hdrSlot = hs[1], 1
	}
	im.logOff, im.logLen = int64(im.hdr.LogOffset), int64(im.hdr.LogLength)
	return nil
}

// replayLog replays a pending log: on the file when it is writable, in
// memory (an overlay under every later read) when it is read-only.
func (im *Image) replayLog(size int64) error {
	pl, err := readLog(im.f, &im.hdr, size)
	if err != nil || pl == nil {
		return err
	}
	im.replay = pl
	if im.readOnly {
		im.f = newOverlay(im.f, pl)
		return nil
	}
	if err := pl.apply(im.f); err != nil {
		return fmt.Errorf("vhdx: replaying log: %w", err)
	}
	if err := im.f.Sync(); err != nil {
		return err
	}
	// The log is applied and durable: close it so no later reader replays
	// it again over newer data.
	h := im.hdr
	h.FileWriteGUID = newGUID()
	h.LogGUID = GUID{}
	return im.writeHeader(h)
}

// writeHeader makes h current: it is written over the non-current copy with
// the next sequence number, then synced.
func (im *Image) writeHeader(h header) error {
	h.Seq = im.hdr.Seq + 1
	slot := 1 - im.hdrSlot
	off := int64(header1Offset)
	if slot == 1 {
		off = header2Offset
	}
	if _, err := im.f.WriteAt(h.marshal(), off); err != nil {
		return err
	}
	if err := im.f.Sync(); err != nil {
		return err
	}
	im.hdr, im.hdrSlot = h, slot
	return nil
}

func (im *Image) readRegions(size int64) error {
	b := make([]byte, regionTableSize)
	var errs [2]error
	for i, off := range []int64{region1Offset, region2Offset} {
		name := fmt.Sprintf("region table %d", i+1)
		if errs[i] = im.readAt(b, off, name); errs[i] != nil {
			continue
		}
		var entries []regionEntry
		if entries, errs[i] = parseRegionTable(b, name, off); errs[i] != nil {
			continue
		}
		if im.regs, errs[i] = validateRegions(entries, name, off, size); errs[i] == nil {
			break
		}
	}
	if errs[0] != nil && errs[1] != nil {
		return fmt.Errorf("no valid region table: %w; %v", errs[0], errs[1])
	}
	log := regionEntry{Offset: uint64(im.logOff), Length: uint32(im.logLen)}
	for _, r := range []regionEntry{im.regs.BAT, im.regs.Metadata} {
		if r.Offset < log.Offset+uint64(log.Length) && log.Offset < r.Offset+uint64(r.Length) {
			return formatErr("region table", region1Offset, "region %s overlaps the log", r.GUID)
		}
	}
	return nil
}

func (im *Image) readMetadata() error {
	off := int64(im.regs.Metadata.Offset)
	b := make([]byte, metaTableSize)
	if err := im.readAt(b, off, "metadata table"); err != nil {
		return err
	}
	entries, err := parseMetaTable(b, off, im.regs.Metadata.Length)
	if err != nil {
		return err
	}
	im.meta = entries
	read := func(e metaEntry) ([]byte, error) {
		b := make([]byte, e.Length)
		return b, im.readAt(b, off+int64(e.Offset), "metadata item "+itemName(e.ID))
	}
	if im.p, err = parseParams(entries, read, off); err != nil {
		return err
	}
	im.geo = newGeometry(im.p.BlockSize, im.p.LogicalSectorSize, im.p.VirtualSize, im.p.HasParent)
	im.size.Store(im.geo.virtualSize)
	return nil
}

func (im *Image) readBAT(size int64) error {
	g := &im.geo
	off := int64(im.regs.BAT.Offset)
	if g.totalEntries*8 > int64(im.regs.BAT.Length) {
		return formatErr("BAT region", off, "%d bytes hold fewer than the %d entries a %d-byte disk needs", im.regs.BAT.Length, g.totalEntries, g.virtualSize)
	}
	b := make([]byte, g.totalEntries*8)
	if err := im.readAt(b, off, "BAT"); err != nil {
		return err
	}
	im.bat = make([]uint64, g.totalEntries)
	end := max(size, int64(im.regs.BAT.Offset)+int64(im.regs.BAT.Length), int64(im.regs.Metadata.Offset)+int64(im.regs.Metadata.Length))
	for i := range im.bat {
		e := binary.LittleEndian.Uint64(b[8*i:])
		if err := g.checkEntry(int64(i), e, size, im.p.HasParent, off); err != nil {
			return err
		}
		im.bat[i] = e
		if st := batState(e); st == payloadFullyPresent || st == payloadPartiallyPresent || (st == bitmapPresent && (int64(i)+1)%(g.chunkRatio+1) == 0) {
			blk := g.blockSize
			if (int64(i)+1)%(g.chunkRatio+1) == 0 {
				blk = bitmapBlockSize
			}
			end = max(end, batOffset(e)+blk)
		}
	}
	im.fileEnd = alignUp(end, mib)
	im.bitmaps = make([]atomic.Pointer[[]byte], g.bitmapBlocks)
	return nil
}

// overlay is a read-only view of a file with a pending log applied in
// memory: reads see the log's writes, in order, over the file's bytes.
type overlay struct {
	storage.File
	log  *pendingLog
	size int64
}

func newOverlay(f storage.File, pl *pendingLog) *overlay {
	size, _ := f.Size()
	return &overlay{File: f, log: pl, size: max(size, pl.last)}
}

func (o *overlay) Size() (int64, error) { return o.size, nil }

func (o *overlay) ReadAt(p []byte, off int64) (int, error) {
	n, err := o.File.ReadAt(p, off)
	if err == io.EOF && off+int64(len(p)) <= o.size {
		clear(p[n:]) // the file grows to LastFileOffset on replay
		n, err = len(p), nil
	}
	end := off + int64(n)
	for _, w := range o.log.writes {
		lo, hi := max(off, w.off), min(end, w.off+w.length)
		if lo >= hi {
			continue
		}
		if w.data == nil {
			clear(p[lo-off : hi-off])
		} else {
			copy(p[lo-off:hi-off], w.data[lo-w.off:hi-w.off])
		}
	}
	return n, err
}

func (o *overlay) WriteAt([]byte, int64) (int, error) { return 0, ErrReadOnly }
func (o *overlay) Truncate(int64) error               { return ErrReadOnly }
func (o *overlay) Sync() error                        { return nil }
