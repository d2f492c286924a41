package vhdx

import (
	"encoding/binary"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"

	"github.com/vhdkit/vhdkit/storage"
)

// Creator is written into the file type identifier of new images.
const Creator = "vhdkit"

// CreateOptions describe a new image.
type CreateOptions struct {
	Type               Type   // Fixed or Dynamic (the zero value); Differencing is implied by Parent
	Size               uint64 // virtual size in bytes; for a child 0 means the parent's
	BlockSize          uint32 // 0: 32 MiB, or 2 MiB for differencing (as Hyper-V)
	LogicalSectorSize  uint32 // 0: 512, or the parent's
	PhysicalSectorSize uint32 // 0: 4096, or the parent's
	Parent             string // parent path: makes a differencing image
	// Sparse leaves a Fixed image's payload unallocated in the host file:
	// quicker to make and smaller until written, but a later write can then
	// fail for lack of space, which a fixed disk otherwise never does.
	Sparse bool
	// FS, when set and not storage.OS, is the file system the image is
	// made in (the temporary file, its rename into place, the folder's
	// sync) and its parent and the new image are opened in: the seam the
	// fault and crash sweeps use (storage.MemFS).
	FS storage.FS
}

// layout of a new image: the first 1 MiB of headers, then the log, the
// metadata region and the BAT, then payload.
const (
	newLogOffset  = 1 * mib
	newMetaOffset = 2 * mib
	newMetaLength = 1 * mib
	newBATOffset  = 3 * mib
)

// Create makes a new image at path, which must not exist, and opens it. The
// file appears under its name only once complete, so a crash during Create
// never leaves a half-made image at path.
func Create(path string, opts CreateOptions) (*Image, error) {
	if err := createFile(path, opts); err != nil {
		return nil, err
	}
	return Open(path, OpenOptions{FS: opts.FS})
}

// CreateChild freezes im (flushed, log closed, read-only from now on) and
// makes a differencing child of it at path: a checkpoint. The child is
// returned open, reading through im, which it then owns. opts.Parent is
// ignored.
func (im *Image) CreateChild(path string, opts CreateOptions) (*Image, error) {
	if err := im.Freeze(); err != nil {
		return nil, err
	}
	opts.Parent = im.path
	if err := createFile(path, opts); err != nil {
		return nil, err
	}
	return Open(path, OpenOptions{ParentImage: im, FS: opts.FS})
}

// createFile writes a new image at path atomically: into a temporary
// file, synced, then linked into place (a link, unlike a rename, refuses
// to replace a file made meanwhile) and the folder synced.
func createFile(path string, opts CreateOptions) error {
	fsys := storage.OrOS(opts.FS)
	if _, err := fsys.Stat(path); err == nil {
		return fmt.Errorf("vhdx: %s: %w", path, os.ErrExist)
	}
	// A disk holds a guest's data: only its owner may read it (0600).
	tmpName := tempName(path)
	f, err := fsys.OpenFile(tmpName, os.O_RDWR|os.O_CREATE|os.O_EXCL, 0o600)
	if err != nil {
		return err
	}
	err = build(f, path, opts)
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	if err == nil {
		err = fsys.Link(tmpName, path)
	}
	// The temporary name goes whatever happened (a second name of a disk
	// left in the folder would be litter holding its blocks); a failed
	// removal is tried once more.
	if rerr := fsys.Remove(tmpName); rerr != nil && !errors.Is(rerr, os.ErrNotExist) {
		if rerr = fsys.Remove(tmpName); rerr != nil && !errors.Is(rerr, os.ErrNotExist) && err == nil {
			err = fmt.Errorf("vhdx: %s is made, but its temporary name %s remains: %w", path, tmpName, rerr)
		}
	}
	if err != nil {
		return err
	}
	return fsys.SyncDir(filepath.Dir(path))
}

// tempName is where the image for path is built: a hidden name in its
// folder, unique.
func tempName(path string) string {
	return filepath.Join(filepath.Dir(path), "."+filepath.Base(path)+".tmp-"+newGUID().String())
}

// CreateFile writes a new image into the empty file f and opens it; path
// names it (a parent's relative locator is computed from its folder).
func CreateFile(f storage.File, path string, opts CreateOptions) (*Image, error) {
	if err := build(f, path, opts); err != nil {
		return nil, err
	}
	return OpenFile(f, path, OpenOptions{})
}

// resolveOptions fills defaults and checks opts; for a child it reads the
// parent's size, sector sizes and DataWriteGuid.
func resolveOptions(opts *CreateOptions) (linkage GUID, err error) {
	if opts.Parent != "" {
		opts.Type = Differencing
		parent, err := Open(opts.Parent, OpenOptions{ReadOnly: true, FS: opts.FS})
		if err != nil {
			return linkage, fmt.Errorf("vhdx: parent: %w", err)
		}
		defer parent.Close()
		if opts.Size != 0 && opts.Size != uint64(parent.geo.virtualSize) {
			return linkage, fmt.Errorf("vhdx: a differencing image has its parent's size (%d bytes), not %d", parent.geo.virtualSize, opts.Size)
		}
		if opts.LogicalSectorSize != 0 && opts.LogicalSectorSize != parent.p.LogicalSectorSize {
			return linkage, fmt.Errorf("vhdx: a differencing image has its parent's logical sector size (%d), not %d", parent.p.LogicalSectorSize, opts.LogicalSectorSize)
		}
		opts.Size = uint64(parent.geo.virtualSize)
		opts.LogicalSectorSize = parent.p.LogicalSectorSize
		if opts.PhysicalSectorSize == 0 {
			opts.PhysicalSectorSize = parent.p.PhysicalSectorSize
		}
		linkage = parent.hdr.DataWriteGUID
	} else if opts.Type == Differencing {
		return linkage, errors.New("vhdx: a differencing image needs a parent")
	}
	if opts.BlockSize == 0 {
		opts.BlockSize = defaultBlockSize
		if opts.Type == Differencing {
			opts.BlockSize = defaultDiffBlockSize
		}
	}
	if opts.LogicalSectorSize == 0 {
		opts.LogicalSectorSize = 512
	}
	if opts.PhysicalSectorSize == 0 {
		opts.PhysicalSectorSize = 4096
	}
	switch {
	case opts.Type != Fixed && opts.Type != Dynamic && opts.Type != Differencing:
		return linkage, fmt.Errorf("vhdx: unknown image type %d", opts.Type)
	case opts.BlockSize < minBlockSize || opts.BlockSize > maxBlockSize || opts.BlockSize&(opts.BlockSize-1) != 0:
		return linkage, fmt.Errorf("vhdx: block size %d is not a power of two from 1 MiB to 256 MiB", opts.BlockSize)
	case opts.LogicalSectorSize != 512 && opts.LogicalSectorSize != 4096:
		return linkage, fmt.Errorf("vhdx: logical sector size %d is neither 512 nor 4096", opts.LogicalSectorSize)
	case opts.PhysicalSectorSize != 512 && opts.PhysicalSectorSize != 4096:
		return linkage, fmt.Errorf("vhdx: physical sector size %d is neither 512 nor 4096", opts.PhysicalSectorSize)
	case opts.LogicalSectorSize > opts.PhysicalSectorSize:
		return linkage, fmt.Errorf("vhdx: logical sector size %d larger than physical %d", opts.LogicalSectorSize, opts.PhysicalSectorSize)
	case opts.Size == 0 || opts.Size > MaxVirtualSize:
		return linkage, fmt.Errorf("vhdx: virtual size %d not in (0, 64 TiB]", opts.Size)
	case opts.Size%uint64(opts.LogicalSectorSize) != 0:
		return linkage, fmt.Errorf("vhdx: virtual size %d is not a multiple of the %d-byte logical sector", opts.Size, opts.LogicalSectorSize)
	}
	return linkage, nil
}

// build writes a complete new image into f: everything but the headers,
// a sync, then the headers and a sync, so the file becomes an image only
// once all it points to is in place.
func build(f storage.File, path string, opts CreateOptions) error {
	linkage, err := resolveOptions(&opts)
	if err != nil {
		return err
	}
	hasParent := opts.Type == Differencing
	g := newGeometry(opts.BlockSize, opts.LogicalSectorSize, opts.Size, hasParent)
	batLen := g.batBytes()
	payload := newBATOffset + batLen
	end := payload
	if opts.Type == Fixed {
		end += g.dataBlocks * g.blockSize
	}

	w := &errWriter{f: f}
	w.write(marshalFileIdent(Creator), fileIdentOffset)
	regions := []regionEntry{
		{GUID: regionBAT, Offset: newBATOffset, Length: uint32(batLen), Required: true},
		{GUID: regionMetadata, Offset: newMetaOffset, Length: newMetaLength, Required: true},
	}
	rt := marshalRegionTable(regions)
	w.write(rt, region1Offset)
	w.write(rt, region2Offset)
	w.write(marshalMetadata(opts, linkage, path), newMetaOffset)
	if opts.Type == Fixed {
		bat := make([]byte, g.totalEntries*8)
		for b := int64(0); b < g.dataBlocks; b++ {
			e := batEntry(payloadFullyPresent, payload+b*g.blockSize)
			binary.LittleEndian.PutUint64(bat[8*g.payloadIndex(b):], e)
		}
		w.write(bat, newBATOffset)
	}
	if w.err != nil {
		return w.err
	}
	// A fixed image has all its blocks from the start (the spec's
	// LeaveBlockAllocated): the file system allocates them now, so that no
	// write fails for space later, or the create fails instead.
	if opts.Type == Fixed && !opts.Sparse {
		err = storage.Allocate(f, 0, end)
	} else {
		err = f.Truncate(end)
	}
	if err != nil {
		return err
	}
	if err := f.Sync(); err != nil {
		return err
	}
	h := header{FileWriteGUID: newGUID(), DataWriteGUID: newGUID(), Version: 1,
		LogLength: defaultLogSize, LogOffset: newLogOffset}
	w.write(h.marshal(), header1Offset)
	h.Seq = 1
	w.write(h.marshal(), header2Offset)
	if w.err != nil {
		return w.err
	}
	return f.Sync()
}

// marshalMetadata builds the metadata region's table and items.
func marshalMetadata(opts CreateOptions, linkage GUID, path string) []byte {
	b := make([]byte, metaTableSize, metaTableSize+256)
	var entries []metaEntry
	add := func(id GUID, data []byte, virtualDisk bool) {
		entries = append(entries, metaEntry{ID: id, Offset: uint32(len(b)), Length: uint32(len(data)),
			IsVirtualDisk: virtualDisk, IsRequired: true})
		b = append(b, data...)
	}
	var fp [8]byte
	binary.LittleEndian.PutUint32(fp[0:], opts.BlockSize)
	switch opts.Type {
	case Fixed:
		binary.LittleEndian.PutUint32(fp[4:], 1) // LeaveBlockAllocated
	case Differencing:
		binary.LittleEndian.PutUint32(fp[4:], 2) // HasParent
	}
	add(itemFileParameters, fp[:], false)
	add(itemVirtualDiskSize, binary.LittleEndian.AppendUint64(nil, opts.Size), true)
	add(itemLogicalSectorSize, binary.LittleEndian.AppendUint32(nil, opts.LogicalSectorSize), true)
	add(itemPhysicalSectorSize, binary.LittleEndian.AppendUint32(nil, opts.PhysicalSectorSize), true)
	id := newGUID()
	add(itemVirtualDiskID, id[:], true)
	if opts.Type == Differencing {
		loc := parentLocator{Type: locatorTypeVHDX}
		loc.Set(keyLinkage, "{"+linkage.String()+"}")
		loc.Set(keyRelativePath, relativeLocator(path, opts.Parent))
		if abs, err := filepath.Abs(opts.Parent); err == nil {
			// Windows-style separators, no drive: libvhdi finds the
			// parent by this key's file name; we map it back to a path.
			loc.Set(keyAbsolutePath, strings.ReplaceAll(abs, "/", `\`))
		}
		add(itemParentLocator, loc.marshal(), false)
	}
	copy(b, marshalMetaTable(entries))
	return b
}

// errWriter remembers the first write error so a sequence of writes reads
// as one.
type errWriter struct {
	f   storage.File
	err error
}

func (w *errWriter) write(p []byte, off int64) {
	if w.err == nil {
		_, w.err = w.f.WriteAt(p, off)
	}
}
