package vhd

import (
	"crypto/rand"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"time"

	"github.com/vhdkit/vhdkit/disk"
	"github.com/vhdkit/vhdkit/storage"
)

// CreateOptions describe a new image.
type CreateOptions struct {
	// Type is Fixed, Dynamic (the default) or Differencing (implied by
	// Parent).
	Type Type
	// Size is the virtual size: a multiple of 512 up to MaxSize. For a
	// differencing image 0 means the parent's size, the only size allowed.
	// It is kept exactly: when the spec's geometry does not describe it
	// exactly, the footer holds the maximum geometry, so that readers
	// that size disks by geometry (QEMU before 10.0) use the current size
	// (see footerGeometry).
	Size uint64
	// BlockSize of a dynamic or differencing image: a power of two from
	// 512 bytes to 256 MiB; 0 means DefaultBlockSize.
	BlockSize uint32
	// Parent is the parent's path; it makes a differencing image. The
	// parent must be a VHD; its unique id is recorded.
	Parent string
	// UniqueID of the new image; zero means a random one.
	UniqueID UUID
	// Sparse leaves a Fixed image's data unallocated in the host file:
	// quicker to make and smaller until written, but a later write can then
	// fail for lack of space, which a fixed disk otherwise never does.
	Sparse bool
}

// Create creates the image at path, which must not exist, and opens it
// for writing.
//
// A fixed image is the data followed by the footer, its blocks allocated
// (unless opts.Sparse). A dynamic or differencing image holds, in order: the
// footer copy, the header, the BAT, the parent locators (W2ku: the
// parent's absolute path; W2ru: its path relative to the new image's
// folder, in Windows form ".\base.vhd"), then the footer; blocks are
// appended as they are written.
func Create(path string, opts CreateOptions) (*Image, error) {
	f, err := storage.OpenFile(path, os.O_RDWR|os.O_CREATE|os.O_EXCL, 0o600) // a guest's data: its owner's only
	if err != nil {
		return nil, fmt.Errorf("vhd: %w", err)
	}
	im, err := CreateFile(f, path, opts)
	if err != nil {
		f.Close()
		os.Remove(path)
		return nil, err
	}
	return im, nil
}

// CreateFile writes a new image into f, discarding its content, and opens
// it; path names the image and anchors the parent's relative locator. On
// success the image owns f; on failure f is left open.
func CreateFile(f storage.File, path string, opts CreateOptions) (*Image, error) {
	im, err := create(f, path, opts)
	if err != nil {
		return nil, fmt.Errorf("vhd: create %s: %w", path, err)
	}
	return im, nil
}

func create(f storage.File, path string, opts CreateOptions) (*Image, error) {
	t := opts.Type
	if opts.Parent != "" {
		if t != 0 && t != Differencing {
			return nil, fmt.Errorf("a %s image has no parent", t)
		}
		t = Differencing
	}
	switch t {
	case 0:
		t = Dynamic
	case Fixed, Dynamic:
	case Differencing:
		if opts.Parent == "" {
			return nil, fmt.Errorf("a differencing image needs a parent")
		}
	default:
		return nil, fmt.Errorf("%w: image type %d", disk.ErrUnsupported, uint32(t))
	}
	size := opts.Size
	var parentAbs string
	var parentID UUID
	var parentTS uint32
	if t == Differencing {
		parentAbs = absPath(opts.Parent)
		psize, id, ts, err := inspectParent(parentAbs)
		if err != nil {
			return nil, err
		}
		if size == 0 {
			size = uint64(psize)
		} else if size != uint64(psize) {
			return nil, fmt.Errorf("%w: size %d differs from the parent's %d", disk.ErrUnsupported, size, psize)
		}
		parentID, parentTS = id, ts
	}
	if size == 0 || size%SectorSize != 0 || size > MaxSize {
		return nil, fmt.Errorf("%w: size %d: must be a positive multiple of %d up to %d (2040 GiB)",
			disk.ErrUnsupported, size, SectorSize, uint64(MaxSize))
	}
	bs := opts.BlockSize
	if bs == 0 {
		bs = DefaultBlockSize
	}
	if t != Fixed && (!isPowerOfTwo(uint64(bs)) || bs < minBlockSize || bs > maxBlockSize) {
		return nil, fmt.Errorf("%w: block size %d: must be a power of two from %d to %d",
			disk.ErrUnsupported, bs, minBlockSize, maxBlockSize)
	}
	id := opts.UniqueID
	if id.IsZero() {
		id = newUUID()
	}
	ft := footer{
		Features:       featureReserved,
		Version:        formatVersion,
		DataOffset:     footerSize,
		TimeStamp:      vhdTime(time.Now()),
		CreatorVersion: CreatorVersion,
		OriginalSize:   size,
		CurrentSize:    size,
		Geometry:       footerGeometry(int64(size)),
		DiskType:       t,
		UniqueID:       id,
	}
	copy(ft.Cookie[:], footerCookie)
	copy(ft.CreatorApp[:], CreatorApp)
	copy(ft.CreatorHostOS[:], hostWindows)

	if err := f.Truncate(0); err != nil {
		return nil, err
	}
	if t == Fixed {
		ft.DataOffset = noDataOffset
		raw := ft.encode()
		// A fixed disk's blocks are allocated now, so that no write fails
		// for space later: the create fails instead.
		var err error
		if opts.Sparse {
			err = f.Truncate(int64(size))
		} else {
			err = storage.Allocate(f, 0, int64(size)+footerSize)
		}
		if err != nil {
			return nil, err
		}
		if _, err := f.WriteAt(raw[:], int64(size)); err != nil {
			return nil, err
		}
	} else {
		n := (int64(size) + int64(bs) - 1) / int64(bs)
		batOff := int64(footerSize + headerSize)
		h := header{
			DataOffset:      noDataOffset,
			TableOffset:     uint64(batOff),
			Version:         formatVersion,
			MaxTableEntries: uint32(n), // exactly what the size needs: 7-Zip insists
			BlockSize:       bs,
		}
		copy(h.Cookie[:], headerCookie)
		next := batOff + alignUp(4*n, SectorSize)
		batRaw := make([]byte, next-batOff)
		for i := range batRaw {
			batRaw[i] = 0xFF
		}
		if _, err := f.WriteAt(batRaw, batOff); err != nil {
			return nil, err
		}
		if t == Differencing {
			h.ParentUniqueID, h.ParentTimeStamp = parentID, parentTS
			h.setParentName(parentAbs, filepath.Base(parentAbs))
			for i, l := range newLocators(path, parentAbs) {
				space := alignUp(int64(len(l.data)), SectorSize)
				// Data space in bytes, as Hyper-V writes it (the spec says
				// sectors; readers use the length).
				h.Locators[i] = locatorEntry{Code: l.code, DataSpace: uint32(space), DataLength: uint32(len(l.data)), DataOffset: uint64(next)}
				buf := make([]byte, space)
				copy(buf, l.data)
				if _, err := f.WriteAt(buf, next); err != nil {
					return nil, err
				}
				next += space
			}
		}
		hb := h.encode()
		if _, err := f.WriteAt(hb[:], footerSize); err != nil {
			return nil, err
		}
		raw := ft.encode()
		if _, err := f.WriteAt(raw[:], 0); err != nil {
			return nil, err
		}
		// The copy at 0 and what it leads to are durable before the end
		// footer is written: a crash must not leave an end footer over a
		// zeroed copy, which Open would read but QEMU refuses (it reads
		// the copy). Without the end footer the file opens from the copy
		// (footer.end-damaged), and a writable open writes it.
		if err := f.Sync(); err != nil {
			return nil, err
		}
		if _, err := f.WriteAt(raw[:], next); err != nil {
			return nil, err
		}
	}
	if err := f.Sync(); err != nil {
		return nil, err
	}
	return openFile(f, path, OpenOptions{ParentPath: parentAbs}, nil)
}

// inspectParent opens a would-be parent, which must be a VHD (a child
// over another format would not open: see openParent), to learn its size
// and unique id; the time stamp recorded is its modification time (as
// DiscUtils and blktap do).
func inspectParent(path string) (size int64, id UUID, ts uint32, err error) {
	fi, err := os.Stat(path)
	if err != nil {
		return 0, id, 0, fmt.Errorf("parent: %w", err)
	}
	if !fi.Mode().IsRegular() {
		return 0, id, 0, fmt.Errorf("parent %s is not a regular file", path)
	}
	if _, ok := peekFooter(path, false); !ok {
		return 0, id, 0, fmt.Errorf("parent %s: %w: not a VHD (a differencing VHD's parent is a VHD; convert it first)", path, disk.ErrUnsupported)
	}
	p, err := Open(path, OpenOptions{ReadOnly: true})
	if err != nil {
		return 0, id, 0, fmt.Errorf("parent: %w", err)
	}
	size, id = p.Size(), p.ft.UniqueID
	if err := p.Close(); err != nil {
		return 0, id, 0, fmt.Errorf("parent: %w", err)
	}
	return size, id, vhdTime(fi.ModTime()), nil
}

// relativeLocator is the W2ru path of parent seen from dir: ".\base.vhd",
// "..\base\base.vhd".
func relativeLocator(dir, parent string) string {
	rel, err := filepath.Rel(dir, parent)
	if err != nil {
		rel = filepath.Base(parent)
	}
	rel = strings.ReplaceAll(filepath.ToSlash(rel), "/", `\`)
	if !strings.HasPrefix(rel, `..\`) {
		rel = `.\` + rel
	}
	return rel
}

func newUUID() UUID {
	var u UUID
	rand.Read(u[:])
	u[6] = u[6]&0x0F | 0x40 // version 4
	u[8] = u[8]&0x3F | 0x80 // RFC 4122 variant
	return u
}
