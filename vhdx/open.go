package vhdx

import (
	"cmp"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"os"
	"slices"
	"sync"
	"sync/atomic"
	"syscall"

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
	// FS, when set and not storage.OS, is the file system the image and
	// its parents are opened in: the seam fault and crash sweeps use
	// (storage.MemFS).
	FS storage.FS
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
	// logLost is set when a header update naming a new LogGuid failed:
	// whether the disk holds it is unknown, so the entry it names must
	// not be overwritten. Every later Flush fails with it.
	logLost error
	logLen  int64
	replay  *pendingLog // the log replayed at open, nil if none

	parent     disk.Image // differencing only; opened read-only
	parentPath string

	flushMu sync.Mutex // serialises Flush and Close

	size atomic.Int64 // the virtual size, for Size without the lock

	mu        sync.RWMutex
	bat       []uint64
	bitmaps   []atomic.Pointer[chunkBitmap] // per chunk, loaded lazily
	bmLoad    sync.Mutex
	dirty     map[int64]struct{} // file offsets of 4 KiB metadata pages to log
	metaBuf   []byte             // the metadata region as rewritten, if it was
	regionBuf []byte             // the region table as rewritten (both copies), if it was
	// regionTable is every entry of the region table in effect (the copy
	// open chose, as Resize rewrote it), unknown regions included: their
	// space is not ours to allocate.
	regionTable []regionEntry
	fileEnd     int64 // where the next block is allocated (1 MiB-aligned)
	writing     bool  // header updated: GUIDs changed
	logSeq      uint64
	logw        logWriter // the log's state for writing (log.go); flushMu and mu to change
	space       freeSpace // file ranges no live block holds (freespace.go)
	closed      bool
}

// Open opens the VHDX file at path, and for a differencing image its chain
// of parents (read-only).
func Open(path string, opts OpenOptions) (*Image, error) {
	return openChain(path, opts, nil)
}

func openChain(path string, opts OpenOptions, seen []os.FileInfo) (*Image, error) {
	f, err := openImageFile(path, opts, false)
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

// openImageFile opens the file of an image. A FIFO or a character device
// would block the open or every read forever (a hostile parent locator
// naming one wedged every verb), so what is not a regular file (nor, for
// an image that is not a parent, a block device) is refused before it is
// opened; it is opened without blocking in case it was swapped meanwhile,
// and what was opened is checked again.
func openImageFile(path string, opts OpenOptions, parent bool) (storage.File, error) {
	flag := os.O_RDWR
	if opts.ReadOnly {
		flag = os.O_RDONLY
	}
	if opts.FS != nil && opts.FS != storage.OS {
		return opts.FS.OpenFile(path, flag, 0)
	}
	if opts.ForceShare && !opts.ReadOnly {
		return nil, fmt.Errorf("vhdx: %s: ForceShare needs ReadOnly", path)
	}
	fi, err := os.Stat(path)
	if err == nil {
		err = checkFileKind(path, fi, parent)
	}
	if err != nil {
		return nil, err
	}
	var f storage.File
	if opts.ForceShare {
		f, err = storage.OpenForceShare(path)
	} else {
		f, err = storage.OpenFile(path, flag|syscall.O_NONBLOCK, 0)
	}
	if err != nil {
		return nil, err
	}
	if of, ok := f.(interface {
		Stat() (os.FileInfo, error)
		Fd() uintptr
	}); ok {
		fi, err := of.Stat()
		if err == nil {
			err = checkFileKind(path, fi, parent)
		}
		if err == nil {
			err = syscall.SetNonblock(int(of.Fd()), false)
		}
		if err != nil {
			f.Close()
			return nil, err
		}
	}
	return f, nil
}

// checkFileKind refuses what an image cannot be stored in: anything but a
// regular file, or a block device for an image that is not a parent.
func checkFileKind(path string, fi os.FileInfo, parent bool) error {
	m := fi.Mode()
	if m.IsRegular() || (!parent && m&os.ModeDevice != 0 && m&os.ModeCharDevice == 0) {
		return nil
	}
	if parent {
		return fmt.Errorf("vhdx: %s is not a regular file (%v)", path, m.Type())
	}
	return fmt.Errorf("vhdx: %s is neither a regular file nor a block device (%v)", path, m.Type())
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

// readStructure reads everything but the BAT: headers, the log, region
// table and metadata. A pending log is read first and the rest through it
// (what replay will make of the file), so that what the log may do is
// checked against the image it leaves before any of it is written; then
// it is replayed (see replayLog). It returns the file size after replay.
func (im *Image) readStructure() (int64, error) {
	size, err := im.f.Size()
	if err != nil {
		return 0, err
	}
	if err := im.readHeaders(size); err != nil {
		return 0, err
	}
	pl, err := readLog(im.f, &im.hdr, size)
	if err != nil {
		return 0, err
	}
	file, view := im.f, size
	if pl != nil {
		im.f, view = newOverlay(file, pl), max(size, pl.last)
	}
	if err := im.readRegions(view); err != nil {
		return 0, err
	}
	if err := im.readMetadata(); err != nil {
		return 0, err
	}
	if pl == nil {
		return size, nil
	}
	if err := im.checkLogTarget(pl, size); err != nil {
		return 0, err
	}
	im.replay = pl
	if im.readOnly {
		return view, nil // reads go through the overlay
	}
	im.f = file
	if err := im.replayLog(pl); err != nil {
		return 0, err
	}
	return im.f.Size()
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
		return notVHDXErr("not a VHDX file")
	}
	// The identifier's signature and creator, then each header, fit in
	// one page.
	b := make([]byte, headerSize)
	if err := im.readAt(b, fileIdentOffset, "file identifier"); err != nil {
		return err
	}
	if binary.LittleEndian.Uint64(b) != sigFileIdent {
		return notVHDXErr(fmt.Sprintf("not a VHDX file (signature %q)", b[:8]))
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

// replayLog replays a pending log on the file (a read-only open reads
// through it instead, see readStructure):
//
//  1. a new FileWriteGuid, written and synced before anything else
//     changes: MS-VHDX 2.2.2 asks for it before the first modification,
//     log playback included. The LogGuid stays, so a crash during replay
//     replays again;
//  2. the log's writes, and the file extended to its LastFileOffset, then
//     sync;
//  3. the log closed (LogGuid zero), so no later reader replays it again
//     over newer data.
func (im *Image) replayLog(pl *pendingLog) error {
	h := im.hdr
	h.FileWriteGUID = newGUID()
	if err := im.writeHeader(h); err != nil {
		return fmt.Errorf("vhdx: updating header before log replay: %w", err)
	}
	if err := pl.apply(im.f); err != nil {
		return fmt.Errorf("vhdx: replaying log: %w", err)
	}
	if err := im.f.Sync(); err != nil {
		return err
	}
	h = im.hdr
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

// tableBuffers hold the 64 KiB an open reads a region table or the
// metadata table into, parses and drops. A merge or a checkpoint opens
// each file of a chain several times: fresh buffers would cost a page
// fault per 4 KiB each time, which on some virtual machines (16-20 us a
// fault measured under Firecracker) is more than reading the table.
var tableBuffers = sync.Pool{New: func() any { return new([64 * kib]byte) }}

func (im *Image) readRegions(size int64) error {
	buf := tableBuffers.Get().(*[64 * kib]byte)
	defer tableBuffers.Put(buf)
	b := buf[:regionTableSize]
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
			im.regionTable = entries
			break
		}
	}
	if errs[0] != nil && errs[1] != nil {
		return fmt.Errorf("no valid region table: %w; %v", errs[0], errs[1])
	}
	log := regionEntry{Offset: uint64(im.logOff), Length: uint32(im.logLen)}
	for _, r := range im.regs.all() {
		if r.Offset < log.Offset+uint64(log.Length) && log.Offset < r.Offset+uint64(r.Length) {
			return formatErr("region table", region1Offset, "region %s [%#x, +%#x) overlaps the log [%#x, +%#x)", r.GUID, r.Offset, r.Length, log.Offset, log.Length)
		}
	}
	return nil
}

func (im *Image) readMetadata() error {
	off := int64(im.regs.Metadata.Offset)
	buf := tableBuffers.Get().(*[64 * kib]byte)
	defer tableBuffers.Put(buf)
	b := buf[:metaTableSize]
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
	// Read a piece at a time into the entries: a large BAT is not held
	// twice, as bytes and as entries.
	im.bat = make([]uint64, g.totalEntries)
	buf := make([]byte, min(g.totalEntries*8, mib))
	for i := int64(0); i < g.totalEntries; {
		n := min(int64(len(buf))/8, g.totalEntries-i)
		if err := im.readAt(buf[:8*n], off+8*i, "BAT"); err != nil {
			return err
		}
		for j := range n {
			im.bat[i+j] = binary.LittleEndian.Uint64(buf[8*j:])
		}
		i += n
	}
	var bad error
	batPlacement(im.bat, g, im.p.HasParent, off, size, im.reservedExtents(), func(err error) bool { bad = err; return false })
	if bad != nil {
		return bad
	}
	end := max(size, int64(im.regs.BAT.Offset)+int64(im.regs.BAT.Length), int64(im.regs.Metadata.Offset)+int64(im.regs.Metadata.Length))
	for i, e := range im.bat {
		if st := batState(e); st == payloadFullyPresent || st == payloadPartiallyPresent || (st == bitmapPresent && (int64(i)+1)%(g.chunkRatio+1) == 0) {
			blk := g.blockSize
			if (int64(i)+1)%(g.chunkRatio+1) == 0 {
				blk = bitmapBlockSize
			}
			end = max(end, batOffset(e)+blk)
		}
	}
	im.fileEnd = alignUp(end, mib)
	im.bitmaps = make([]atomic.Pointer[chunkBitmap], g.bitmapBlocks)
	return nil
}

// overlay is a read-only view of a file with a pending log applied in
// memory: reads see what replay would leave, each byte's last write over
// the file's bytes.
type overlay struct {
	storage.File
	segs []logSegment // sorted, disjoint
	size int64
}

func newOverlay(f storage.File, pl *pendingLog) *overlay {
	size, _ := f.Size()
	return &overlay{File: f, segs: logSegments(pl.writes), size: max(size, pl.last)}
}

func (o *overlay) Size() (int64, error) { return o.size, nil }

func (o *overlay) ReadAt(p []byte, off int64) (int, error) {
	n, err := o.File.ReadAt(p, off)
	if err == io.EOF && off+int64(len(p)) <= o.size {
		clear(p[n:]) // the file grows to LastFileOffset on replay
		n, err = len(p), nil
	}
	end := off + int64(n)
	i, _ := slices.BinarySearchFunc(o.segs, off, func(s logSegment, off int64) int { return cmp.Compare(s.end, off+1) })
	for ; i < len(o.segs) && o.segs[i].off < end; i++ {
		s := o.segs[i]
		lo, hi := max(off, s.off), min(end, s.end)
		if s.w.data == nil {
			clear(p[lo-off : hi-off])
		} else {
			copy(p[lo-off:hi-off], s.w.data[lo-s.w.off:hi-s.w.off])
		}
	}
	return n, err
}

func (o *overlay) WriteAt([]byte, int64) (int, error) { return 0, ErrReadOnly }
func (o *overlay) Truncate(int64) error               { return ErrReadOnly }
func (o *overlay) Sync() error                        { return nil }
