package vhd

import (
	"fmt"
	"io"
	"os"
	"slices"
	"strings"
	"sync"
	"time"

	"github.com/vhdkit/vhdkit/disk"
	"github.com/vhdkit/vhdkit/storage"
)

// Image is an open VHD image. It implements disk.Image, disk.Extenter,
// disk.Trimmer and disk.Zeroer, and is safe for concurrent use.
type Image struct {
	// mu: ReadAt and Extents hold it shared, everything that changes the
	// image holds it exclusively.
	mu       sync.RWMutex
	f        storage.File
	path     string
	readOnly bool
	// fs is the OpenOptions seam the image was opened with, for the
	// files it looks at later (a new parent).
	fs       storage.FS
	closed   bool
	failed   error // sticky: a Flush failed, the image takes no more writes
	warnings []string

	ft          footer
	footerRaw   [footerSize]byte // rewritten as is when the footer moves
	footerAt    int64
	fromCopy    bool  // the footer came from the copy at offset 0
	copyStale   bool  // the copy at offset 0 differs from the end footer
	size        int64 // changes under mu exclusively (Resize)
	sizeFromCHS bool

	// Dynamic and differencing images.
	hdr          header
	hdrOff       int64
	bat          *bat
	blockSize    int64
	bitmapSize   int64
	nextAlloc    int64 // where the footer sits and the next block goes
	cache        bitmapCache
	newBlocks    map[int64]bool // allocated since the last Flush: not on disk's BAT
	dirtyBitmaps map[int64]bool // bitmaps changed since the last Flush
	dirtyBAT     map[int64]bool // BAT sectors changed since the last Flush

	// Differencing images.
	locators         []Locator
	parent           disk.Image
	parentPath       string
	parentTSMismatch bool
}

// bitmapCache keeps sector bitmaps. Readers fill it under Image.mu held
// shared, hence its own lock. Bitmaps that are new or dirty stay until
// Flush writes them; clean ones are dropped when it grows too large.
type bitmapCache struct {
	mu sync.Mutex
	m  map[int64][]byte
}

const (
	maxCachedBitmaps = 8192
	// maxPendingBitmaps bounds the new and changed bitmaps a long run of
	// writes without Flush keeps in memory (8 GiB of data at the default
	// block size): past it a write flushes first.
	maxPendingBitmaps = 4096
)

var errClosed = fmt.Errorf("vhd: %w", os.ErrClosed)

// zeros returns a shared source of zero bytes for zero writes, allocated
// on first use rather than at every start of a program that links the
// package. Never modified.
var zeros = sync.OnceValue(func() []byte { return make([]byte, 1<<20) })

// Size returns the virtual size in bytes.
func (im *Image) Size() int64 {
	im.mu.RLock()
	defer im.mu.RUnlock()
	return im.size
}

// Type returns the image's kind.
func (im *Image) Type() Type {
	im.mu.RLock() // Resize and SetParent replace the footer
	defer im.mu.RUnlock()
	return im.ft.DiskType
}

// Parent returns the open parent of a differencing image, or nil.
func (im *Image) Parent() disk.Image { return im.parent }

// ReadAt reads len(p) bytes at off; the range must lie within the disk.
func (im *Image) ReadAt(p []byte, off int64) (int, error) {
	im.mu.RLock()
	defer im.mu.RUnlock()
	if im.closed {
		return 0, errClosed
	}
	// Under the lock: Resize changes the size.
	if err := disk.CheckRange(off, int64(len(p)), im.size); err != nil {
		return 0, fmt.Errorf("vhd: read [%d, +%d) on a %d-byte disk: %w", off, len(p), im.size, err)
	}
	var err error
	if im.ft.DiskType == Fixed {
		err = readFull(im.f, p, off)
	} else {
		err = im.readBlocks(p, off)
	}
	if err != nil {
		return 0, err
	}
	return len(p), nil
}

// readBlocks reads a dynamic or differencing image block by block, and
// within an allocated block run by run of equal bitmap bits.
func (im *Image) readBlocks(p []byte, off int64) error {
	bs := im.blockSize
	for len(p) > 0 {
		bi := off / bs
		in := off - bi*bs
		n := min(int64(len(p)), bs-in)
		chunk := p[:n]
		if e := im.bat.entry(bi); e == batUnused {
			if err := im.readBelow(chunk, off); err != nil {
				return err
			}
		} else {
			bm, err := im.bitmap(bi)
			if err != nil {
				return err
			}
			data := int64(e)*SectorSize + im.bitmapSize
			for s, end := in/SectorSize, (in+n+SectorSize-1)/SectorSize; s < end; {
				set, t := bitRun(bm, s, end)
				lo, hi := max(s*SectorSize, in), min(t*SectorSize, in+n)
				seg := chunk[lo-in : hi-in]
				if set {
					err = readFull(im.f, seg, data+lo)
				} else {
					err = im.readBelow(seg, bi*bs+lo)
				}
				if err != nil {
					return err
				}
				s = t
			}
		}
		p, off = p[n:], off+n
	}
	return nil
}

// readBelow reads what the image does not store: the parent's bytes, or
// zeros (also past the end of a shorter parent).
func (im *Image) readBelow(p []byte, off int64) error {
	if im.parent == nil {
		clear(p)
		return nil
	}
	m := min(int64(len(p)), max(0, im.parent.Size()-off))
	if m > 0 {
		n, err := im.parent.ReadAt(p[:m], off)
		if int64(n) != m {
			if err == nil {
				err = io.ErrUnexpectedEOF
			}
			return fmt.Errorf("vhd: reading parent %s: %w", im.parentPath, err)
		}
	}
	clear(p[m:])
	return nil
}

// bitmap returns the sector bitmap of allocated block bi.
func (im *Image) bitmap(bi int64) ([]byte, error) {
	c := &im.cache
	c.mu.Lock()
	b, ok := c.m[bi]
	c.mu.Unlock()
	if ok {
		return b, nil
	}
	b = make([]byte, im.bitmapSize)
	if err := readFull(im.f, b, int64(im.bat.entry(bi))*SectorSize); err != nil {
		return nil, err
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	if cur, ok := c.m[bi]; ok {
		return cur, nil
	}
	if len(c.m) >= maxCachedBitmaps {
		// Dirty maps change only under im.mu held exclusively, so they
		// are stable here whichever way im.mu is held.
		for k := range c.m {
			if !im.dirtyBitmaps[k] && !im.newBlocks[k] {
				delete(c.m, k)
				if len(c.m) < maxCachedBitmaps*3/4 {
					break
				}
			}
		}
	}
	c.m[bi] = b
	return b, nil
}

func bitSet(b []byte, s int64) bool { return b[s>>3]&(0x80>>(s&7)) != 0 }

// bitRun returns the bit of sector s and the end of the run of sectors
// from s, up to end, that share it.
func bitRun(b []byte, s, end int64) (set bool, t int64) {
	set = bitSet(b, s)
	full := byte(0)
	if set {
		full = 0xFF
	}
	t = s + 1
	for t < end {
		if t&7 == 0 && t+8 <= end && b[t>>3] == full {
			t += 8
			continue
		}
		if bitSet(b, t) != set {
			break
		}
		t++
	}
	return set, t
}

// changeBits sets or clears the bits of sectors [from, to) and reports
// whether any changed.
func changeBits(b []byte, from, to int64, set bool) bool {
	changed := false
	for s := from; s < to; s++ {
		m := byte(0x80 >> (s & 7))
		if old := b[s>>3]&m != 0; old != set {
			b[s>>3] ^= m
			changed = true
		}
	}
	return changed
}

func (im *Image) markBits(bi int64, bm []byte, from, to int64, set bool) {
	if changeBits(bm, from, to, set) {
		im.dirtyBitmaps[bi] = true
	}
}

// WriteAt writes p at off; the range must lie within the disk.
func (im *Image) WriteAt(p []byte, off int64) (int, error) {
	im.mu.Lock()
	defer im.mu.Unlock()
	if err := im.writable(); err != nil {
		return 0, err
	}
	if err := disk.CheckRange(off, int64(len(p)), im.size); err != nil {
		return 0, fmt.Errorf("vhd: write [%d, +%d) on a %d-byte disk: %w", off, len(p), im.size, err)
	}
	if err := im.write(p, off); err != nil {
		return 0, err
	}
	return len(p), nil
}

func (im *Image) writable() error {
	switch {
	case im.closed:
		return errClosed
	case im.readOnly:
		return fmt.Errorf("vhd: %s: %w", im.path, disk.ErrReadOnly)
	case im.failed != nil:
		return fmt.Errorf("vhd: %s: an earlier flush failed: %w", im.path, im.failed)
	}
	return nil
}

func (im *Image) write(p []byte, off int64) error {
	if im.ft.DiskType == Fixed {
		_, err := im.f.WriteAt(p, off)
		return err
	}
	bs := im.blockSize
	for len(p) > 0 {
		bi := off / bs
		in := off - bi*bs
		n := min(int64(len(p)), bs-in)
		if err := im.writeBlock(bi, in, p[:n]); err != nil {
			return err
		}
		p, off = p[n:], off+n
	}
	return nil
}

// writeBlock writes src at offset in of block bi, allocating the block if
// needed. A partial sector this image does not store yet is completed from
// below (parent or zeros) so that setting its bit exposes no stale bytes.
func (im *Image) writeBlock(bi, in int64, src []byte) error {
	if len(im.newBlocks)+len(im.dirtyBitmaps) >= maxPendingBitmaps {
		// Bound the bitmaps held for the next Flush by flushing early.
		if err := im.flush(); err != nil {
			im.failed = err
			return err
		}
	}
	e := im.bat.entry(bi)
	if e == batUnused {
		var err error
		if e, err = im.allocate(bi); err != nil {
			return err
		}
	}
	bm, err := im.bitmap(bi)
	if err != nil {
		return err
	}
	data := int64(e)*SectorSize + im.bitmapSize
	lo, hi := in, in+int64(len(src))
	if s := lo / SectorSize; lo%SectorSize != 0 && !bitSet(bm, s) {
		k, err := im.mergeSector(bi, bm, data, s, lo-s*SectorSize, src)
		if err != nil {
			return err
		}
		lo, src = lo+int64(k), src[k:]
	}
	if s := hi / SectorSize; hi > lo && hi%SectorSize != 0 && !bitSet(bm, s) {
		k := hi - s*SectorSize
		if _, err := im.mergeSector(bi, bm, data, s, 0, src[int64(len(src))-k:]); err != nil {
			return err
		}
		hi, src = s*SectorSize, src[:int64(len(src))-k]
	}
	if hi > lo {
		if _, err := im.f.WriteAt(src, data+lo); err != nil {
			return err
		}
		im.markBits(bi, bm, lo/SectorSize, (hi+SectorSize-1)/SectorSize, true)
	}
	return nil
}

// mergeSector writes sector s of block bi whole: what lies below, with src
// copied in at byte at. It returns how many bytes of src it took.
func (im *Image) mergeSector(bi int64, bm []byte, data, s, at int64, src []byte) (int, error) {
	var sec [SectorSize]byte
	if err := im.readBelow(sec[:], bi*im.blockSize+s*SectorSize); err != nil {
		return 0, err
	}
	k := copy(sec[at:], src)
	if _, err := im.f.WriteAt(sec[:], data+s*SectorSize); err != nil {
		return 0, err
	}
	im.markBits(bi, bm, s, s+1, true)
	return k, nil
}

// allocate appends block bi at the end of the file. The footer moves
// behind the new block first, so the file keeps ending in a footer; the
// BAT entry and the block's (empty) bitmap stay in memory until Flush.
func (im *Image) allocate(bi int64) (uint32, error) {
	align := int64(4096) // data on 4 KiB boundaries, as Hyper-V places it
	if im.blockSize < align {
		align = SectorSize
	}
	start := alignUp(alignUp(im.nextAlloc, SectorSize)+im.bitmapSize, align) - im.bitmapSize
	end := start + im.bitmapSize + im.blockSize
	if start/SectorSize >= batUnused {
		return 0, unsupportedErr("BAT", im.bat.off+4*bi, "a block at %#x is beyond what a BAT entry addresses", start)
	}
	if _, err := im.f.WriteAt(im.footerRaw[:], end); err != nil {
		return 0, err
	}
	e := uint32(start / SectorSize)
	im.bat.set(bi, e)
	im.dirtyBAT[4*bi/SectorSize] = true
	im.newBlocks[bi] = true
	im.cache.mu.Lock()
	im.cache.m[bi] = make([]byte, im.bitmapSize)
	im.cache.mu.Unlock()
	im.nextAlloc, im.footerAt = end, end
	return e, nil
}

// unallocate clears block bi's BAT entry. Its space is not reused.
func (im *Image) unallocate(bi int64) {
	im.bat.set(bi, batUnused)
	im.dirtyBAT[4*bi/SectorSize] = true
	delete(im.newBlocks, bi)
	delete(im.dirtyBitmaps, bi)
	im.cache.mu.Lock()
	delete(im.cache.m, bi)
	im.cache.mu.Unlock()
}

// Flush makes every completed write durable, following the commit
// protocol in the package doc.
func (im *Image) Flush() error {
	im.mu.Lock()
	defer im.mu.Unlock()
	if im.closed {
		return errClosed
	}
	if im.readOnly {
		return nil
	}
	if im.failed != nil {
		return fmt.Errorf("vhd: %s: an earlier flush failed: %w", im.path, im.failed)
	}
	if err := im.flush(); err != nil {
		im.failed = err
		return fmt.Errorf("vhd: %s: flush: %w", im.path, err)
	}
	return nil
}

func (im *Image) flush() error {
	if im.ft.DiskType == Fixed || len(im.newBlocks)+len(im.dirtyBitmaps)+len(im.dirtyBAT) == 0 {
		return im.f.Sync()
	}
	// 1. Bitmaps of blocks no BAT entry on disk points at yet.
	for _, bi := range sortedKeys(im.newBlocks) {
		if err := im.writeBitmap(bi); err != nil {
			return err
		}
	}
	// 2. Data, those bitmaps and the moved footer become durable.
	if err := im.f.Sync(); err != nil {
		return err
	}
	// 3. Publish: bitmaps of published blocks, then the BAT.
	for _, bi := range sortedKeys(im.dirtyBitmaps) {
		if im.newBlocks[bi] {
			continue
		}
		if err := im.writeBitmap(bi); err != nil {
			return err
		}
	}
	for _, k := range sortedKeys(im.dirtyBAT) {
		if _, err := im.f.WriteAt(im.bat.sector(k), im.bat.off+k*SectorSize); err != nil {
			return err
		}
	}
	// 4.
	if err := im.f.Sync(); err != nil {
		return err
	}
	clear(im.newBlocks)
	clear(im.dirtyBitmaps)
	clear(im.dirtyBAT)
	return nil
}

func (im *Image) writeBitmap(bi int64) error {
	im.cache.mu.Lock()
	b := im.cache.m[bi]
	im.cache.mu.Unlock()
	_, err := im.f.WriteAt(b, int64(im.bat.entry(bi))*SectorSize)
	return err
}

func sortedKeys(m map[int64]bool) []int64 {
	keys := make([]int64, 0, len(m))
	for k := range m {
		keys = append(keys, k)
	}
	slices.Sort(keys)
	return keys
}

// Close flushes a writable image and closes it and its parent.
func (im *Image) Close() error {
	im.mu.Lock()
	defer im.mu.Unlock()
	if im.closed {
		return nil
	}
	var err error
	if !im.readOnly {
		if im.failed != nil {
			err = fmt.Errorf("vhd: %s: an earlier flush failed: %w", im.path, im.failed)
		} else if ferr := im.flush(); ferr != nil {
			err = fmt.Errorf("vhd: %s: flush: %w", im.path, ferr)
		}
	}
	im.closed = true
	if cerr := im.f.Close(); err == nil {
		err = cerr
	}
	if perr := im.closeParent(); err == nil {
		err = perr
	}
	return err
}

func (im *Image) closeParent() error {
	if im.parent == nil {
		return nil
	}
	err := im.parent.Close()
	im.parent = nil
	return err
}

// Trim discards [off, off+length): afterwards it reads as zeros, or in a
// differencing image as the parent. See the package doc for what happens
// to the space.
func (im *Image) Trim(off, length int64) error { return im.discard(off, length, true, true) }

// WriteZeroes makes [off, off+length) read as zeros. With mayUnmap, whole
// blocks of a dynamic image are unallocated.
func (im *Image) WriteZeroes(off, length int64, mayUnmap bool) error {
	return im.discard(off, length, false, mayUnmap)
}

func (im *Image) discard(off, length int64, trim, mayUnmap bool) error {
	im.mu.Lock()
	defer im.mu.Unlock()
	if err := im.writable(); err != nil {
		return err
	}
	if err := disk.CheckRange(off, length, im.size); err != nil {
		return fmt.Errorf("vhd: discard [%d, +%d) on a %d-byte disk: %w", off, length, im.size, err)
	}
	if im.ft.DiskType == Fixed {
		return im.writeZeros(off, length)
	}
	diff := im.ft.DiskType == Differencing
	bs := im.blockSize
	for length > 0 {
		bi := off / bs
		in := off - bi*bs
		n := min(length, bs-in)
		whole := in == 0 && (n == bs || off+n == im.size)
		e := im.bat.entry(bi)
		var err error
		switch {
		case diff && !trim:
			// Zeros must hide the parent: write them.
			err = im.writeZeros(off, n)
		case e == batUnused:
			// Reads as zeros (dynamic) or the parent (trim) already.
		case whole && mayUnmap:
			im.unallocate(bi)
		case diff:
			err = im.trimSectors(bi, e, in, n)
		default:
			err = im.zeroStored(bi, e, in, n)
		}
		if err != nil {
			return err
		}
		off, length = off+n, length-n
	}
	return nil
}

func (im *Image) writeZeros(off, length int64) error {
	zeros := zeros()
	for length > 0 {
		n := min(length, int64(len(zeros)))
		if err := im.write(zeros[:n], off); err != nil {
			return err
		}
		off, length = off+n, length-n
	}
	return nil
}

// zeroStored overwrites with zeros the stored sectors of [in, in+n) in
// allocated block bi; the others read as zeros already. Bits stay set:
// readers that ignore the bitmap must see zeros too.
func (im *Image) zeroStored(bi int64, e uint32, in, n int64) error {
	bm, err := im.bitmap(bi)
	if err != nil {
		return err
	}
	data := int64(e)*SectorSize + im.bitmapSize
	zeros := zeros()
	for s, end := in/SectorSize, (in+n+SectorSize-1)/SectorSize; s < end; {
		set, t := bitRun(bm, s, end)
		if set {
			for lo, hi := max(s*SectorSize, in), min(t*SectorSize, in+n); lo < hi; {
				k := min(hi-lo, int64(len(zeros)))
				if _, err := im.f.WriteAt(zeros[:k], data+lo); err != nil {
					return err
				}
				lo += k
			}
		}
		s = t
	}
	return nil
}

// trimSectors makes [in, in+n) of differencing block bi read from the
// parent: whole sectors by clearing their bits, the stored part of a
// partial sector by copying the parent's bytes over it.
func (im *Image) trimSectors(bi int64, e uint32, in, n int64) error {
	bm, err := im.bitmap(bi)
	if err != nil {
		return err
	}
	data := int64(e)*SectorSize + im.bitmapSize
	lo, hi := in, in+n
	copyParent := func(from, to int64) error {
		if s := from / SectorSize; !bitSet(bm, s) {
			return nil
		}
		buf := make([]byte, to-from)
		if err := im.readBelow(buf, bi*im.blockSize+from); err != nil {
			return err
		}
		_, err := im.f.WriteAt(buf, data+from)
		return err
	}
	first, last := alignUp(lo, SectorSize), hi/SectorSize*SectorSize
	if first > last { // within one sector
		return copyParent(lo, hi)
	}
	if lo < first {
		if err := copyParent(lo, first); err != nil {
			return err
		}
	}
	if last < hi {
		if err := copyParent(last, hi); err != nil {
			return err
		}
	}
	im.markBits(bi, bm, first/SectorSize, last/SectorSize, false)
	return nil
}

// Extents describes [off, off+length) (see disk.Extenter). Stored sectors
// are Data at depth 0; the rest comes from the parent one level deeper,
// or is a Hole.
func (im *Image) Extents(off, length int64) ([]disk.Extent, error) {
	im.mu.RLock()
	defer im.mu.RUnlock()
	if im.closed {
		return nil, errClosed
	}
	if err := disk.CheckRange(off, length, im.size); err != nil {
		return nil, fmt.Errorf("vhd: extents [%d, +%d) on a %d-byte disk: %w", off, length, im.size, err)
	}
	if im.ft.DiskType == Fixed {
		return disk.AppendExtent(nil, disk.Extent{Offset: off, Length: length, Type: disk.Data}), nil
	}
	var out []disk.Extent
	var pendOff, pendLen int64 // a range to ask below, gathered across blocks
	flushBelow := func() error {
		if pendLen == 0 {
			return nil
		}
		var err error
		out, err = im.belowExtents(out, pendOff, pendLen)
		pendLen = 0
		return err
	}
	below := func(o, n int64) error {
		if pendLen > 0 && pendOff+pendLen == o {
			pendLen += n
			return nil
		}
		if err := flushBelow(); err != nil {
			return err
		}
		pendOff, pendLen = o, n
		return nil
	}
	bs := im.blockSize
	for end := off + length; off < end; {
		bi := off / bs
		in := off - bi*bs
		n := min(end-off, bs-in)
		if im.bat.entry(bi) == batUnused {
			if err := below(off, n); err != nil {
				return nil, err
			}
		} else {
			bm, err := im.bitmap(bi)
			if err != nil {
				return nil, err
			}
			for s, se := in/SectorSize, (in+n+SectorSize-1)/SectorSize; s < se; {
				set, t := bitRun(bm, s, se)
				lo, hi := max(s*SectorSize, in), min(t*SectorSize, in+n)
				if set {
					if err := flushBelow(); err != nil {
						return nil, err
					}
					out = disk.AppendExtent(out, disk.Extent{Offset: bi*bs + lo, Length: hi - lo, Type: disk.Data})
				} else if err := below(bi*bs+lo, hi-lo); err != nil {
					return nil, err
				}
				s = t
			}
		}
		off += n
	}
	if err := flushBelow(); err != nil {
		return nil, err
	}
	return out, nil
}

// belowExtents appends the extents of what this image does not store.
func (im *Image) belowExtents(out []disk.Extent, off, n int64) ([]disk.Extent, error) {
	if im.parent == nil {
		return disk.AppendExtent(out, disk.Extent{Offset: off, Length: n, Type: disk.Hole, Depth: 1}), nil
	}
	m := min(n, max(0, im.parent.Size()-off))
	if m > 0 {
		if x, ok := im.parent.(disk.Extenter); ok {
			pe, err := x.Extents(off, m)
			if err != nil {
				return nil, err
			}
			for _, e := range pe {
				e.Depth++
				out = disk.AppendExtent(out, e)
			}
		} else {
			out = disk.AppendExtent(out, disk.Extent{Offset: off, Length: m, Type: disk.Data, Depth: 1})
		}
	}
	if n > m {
		out = disk.AppendExtent(out, disk.Extent{Offset: off + m, Length: n - m, Type: disk.Hole, Depth: im.layers()})
	}
	return out, nil
}

// layers counts the images in the chain from this one down.
func (im *Image) layers() int {
	switch p := im.parent.(type) {
	case nil:
		return 1
	case *Image:
		return 1 + p.layers()
	}
	return 2
}

// Info describes an image the way Get-VHD does, plus what the VHD format
// records.
type Info struct {
	Path     string
	Type     Type
	FileSize int64
	// Size is the virtual size the image presents; SizeFromGeometry says
	// it comes from the CHS geometry rather than CurrentSize (see the
	// package doc).
	Size               int64
	SizeFromGeometry   bool
	CurrentSize        uint64
	OriginalSize       uint64
	Geometry           Geometry
	BlockSize          uint32 // 0 for fixed images
	LogicalSectorSize  uint32
	PhysicalSectorSize uint32
	UniqueID           UUID   // Get-VHD's DiskIdentifier
	Creator            string // "win", "d2v", "qemu", "vhdk" (padding trimmed)
	CreatorVersion     string // major.minor
	CreatorHostOS      string
	Created            time.Time
	SavedState         bool
	AllocatedBlocks    int64
	TotalBlocks        int64

	// Differencing images.
	ParentUniqueID          UUID
	ParentTimeStamp         time.Time // zero when not recorded
	ParentName              string    // the header's parent name
	ParentLocators          []Locator
	ParentPath              string // the parent opened
	ParentTimeStampMismatch bool
	// Chain is this image's path followed by its ancestors'.
	Chain []string

	// Warnings are oddities that did not prevent opening.
	Warnings []string
}

// Info returns what the image records about itself and its chain.
func (im *Image) Info() Info {
	im.mu.RLock()
	defer im.mu.RUnlock()
	ft := &im.ft
	info := Info{
		Path:               im.path,
		Type:               ft.DiskType,
		Size:               im.size,
		SizeFromGeometry:   im.sizeFromCHS,
		CurrentSize:        ft.CurrentSize,
		OriginalSize:       ft.OriginalSize,
		Geometry:           ft.Geometry,
		LogicalSectorSize:  SectorSize,
		PhysicalSectorSize: SectorSize,
		UniqueID:           ft.UniqueID,
		Creator:            strings.TrimRight(string(ft.CreatorApp[:]), " \x00"),
		CreatorVersion:     fmt.Sprintf("%d.%d", ft.CreatorVersion>>16, ft.CreatorVersion&0xFFFF),
		CreatorHostOS:      strings.TrimRight(string(ft.CreatorHostOS[:]), " \x00"),
		Created:            fromVHDTime(ft.TimeStamp),
		SavedState:         ft.SavedState != 0,
		Chain:              []string{im.path},
		Warnings:           slices.Clone(im.warnings),
	}
	if !im.closed {
		info.FileSize, _ = im.f.Size()
	}
	if ft.DiskType != Fixed {
		info.BlockSize = im.hdr.BlockSize
		info.TotalBlocks = im.bat.n
		info.AllocatedBlocks = im.bat.allocated()
	}
	if ft.DiskType == Differencing {
		info.ParentUniqueID = im.hdr.ParentUniqueID
		if ts := im.hdr.ParentTimeStamp; ts != 0 {
			info.ParentTimeStamp = fromVHDTime(ts)
		}
		info.ParentName = im.hdr.parentName()
		info.ParentLocators = slices.Clone(im.locators)
		info.ParentPath = im.parentPath
		info.ParentTimeStampMismatch = im.parentTSMismatch
		if p, ok := im.parent.(*Image); ok {
			info.Chain = append(info.Chain, p.Info().Chain...)
		} else if im.parentPath != "" {
			info.Chain = append(info.Chain, im.parentPath)
		}
	}
	return info
}

func (im *Image) warn(s string) { im.warnings = append(im.warnings, s) }

var _ interface {
	disk.Image
	disk.Extenter
	disk.Trimmer
	disk.Zeroer
} = (*Image)(nil)
