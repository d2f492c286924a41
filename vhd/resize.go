package vhd

import (
	"fmt"

	"github.com/vhdkit/vhdkit/disk"
	"github.com/vhdkit/vhdkit/storage"
)

// Resize changes the virtual size to size bytes, like Resize-VHD: a
// multiple of 512 up to MaxSize. Growing adds a range that reads as zeros
// (in a differencing image: as what lies below, which is zeros past the
// parent's end); shrinking drops what lies past the new end. The footer's
// current and original sizes both become size, and its geometry the one
// Create writes for it (footerGeometry); an image whose creator sizes
// disks by geometry (Virtual PC, old QEMU) can only take a size the
// spec's geometry describes exactly.
//
// Size reports the new size at once, and the change is durable when
// Resize returns; a crash before leaves the old size or the new one (see
// "Resizing" in the package doc). Writes not yet flushed are flushed
// first.
func (im *Image) Resize(size int64) error {
	im.mu.Lock()
	defer im.mu.Unlock()
	if err := im.writable(); err != nil {
		return err
	}
	if size <= 0 || size%SectorSize != 0 || size > MaxSize {
		return fmt.Errorf("vhd: %s: %w: size %d: must be a positive multiple of %d up to %d (2040 GiB)",
			im.path, disk.ErrUnsupported, size, SectorSize, int64(MaxSize))
	}
	ft := im.ft
	ft.CurrentSize, ft.OriginalSize = uint64(size), uint64(size)
	ft.Geometry = footerGeometry(size)
	if ft.sizedByGeometry() {
		// Virtual PC's own images: their geometry is their size.
		ft.Geometry = GeometryFor(size)
	}
	if vs, _ := ft.virtualSize(); vs != size {
		return fmt.Errorf("vhd: %s: %w: creator %q sizes disks by CHS geometry, and %s describes %d bytes, not %d",
			im.path, disk.ErrUnsupported, ft.CreatorApp[:], ft.Geometry, vs, size)
	}
	if size == im.size {
		return nil
	}
	var err error
	if ft.DiskType == Fixed {
		err = im.resizeFixed(size, ft)
	} else {
		if n := (size + im.blockSize - 1) / im.blockSize; n > maxBATEntries {
			return fmt.Errorf("vhd: %s: %w: %d blocks of %d bytes exceed the limit of %d BAT entries",
				im.path, disk.ErrUnsupported, n, im.blockSize, maxBATEntries)
		}
		err = im.resizeBlocks(size, ft)
	}
	if err != nil {
		im.failed = err
		return fmt.Errorf("vhd: %s: resize to %d: %w", im.path, size, err)
	}
	return nil
}

// resizeFixed moves the footer of a fixed image. The end of the file keeps
// a footer for the old size until a single sector write there switches to
// the new one, and the bytes the new size exposes are zeros before that.
func (im *Image) resizeFixed(size int64, ft footer) error {
	old, at := im.size, im.footerAt
	raw := ft.encode()
	// Earlier writes first, as Flush would make them: the new size must
	// not become durable without them.
	if err := im.f.Sync(); err != nil {
		return err
	}
	if size > old {
		// Bytes between the old end and the footer (a size from the
		// geometry, an interrupted shrink) are not zeros.
		if err := im.zeroFile(old, min(size, at)); err != nil {
			return err
		}
		if size > at {
			// The file grows: first the old footer at the new end, so that
			// the file ends in a footer for the old size throughout, then
			// zeros over the old footer, which becomes data.
			allocated := storage.Allocated(im.f, at)
			if _, err := im.f.WriteAt(im.footerRaw[:], size); err != nil {
				return err
			}
			if allocated {
				// Made with its space allocated (not --sparse): the new
				// data area gets its space too, as Create gives it.
				if err := storage.Allocate(im.f, at, size-at); err != nil {
					return err
				}
			}
			if err := im.f.Sync(); err != nil {
				return err
			}
			if err := im.zeroFile(at, min(size, at+footerSize)); err != nil {
				return err
			}
			im.footerAt, at = size, size
		}
		if err := im.f.Sync(); err != nil {
			return err
		}
	}
	// Commit.
	if _, err := im.f.WriteAt(raw[:], at); err != nil {
		return err
	}
	if err := im.f.Sync(); err != nil {
		return err
	}
	im.ft, im.footerRaw = ft, raw
	im.size, im.sizeFromCHS = ft.virtualSize()
	if at > size {
		// The data area is larger than the disk (a shrink): the footer
		// moves to right after the data, then the file is cut there.
		if _, err := im.f.WriteAt(raw[:], size); err != nil {
			return err
		}
		if err := im.f.Sync(); err != nil {
			return err
		}
		if err := im.f.Truncate(size + footerSize); err != nil {
			return err
		}
		if err := im.f.Sync(); err != nil {
			return err
		}
		im.footerAt = size
	}
	return nil
}

// zeroFile writes zeros over the file's bytes [from, to).
func (im *Image) zeroFile(from, to int64) error {
	zeros := zeros()
	for from < to {
		n := min(to-from, int64(len(zeros)))
		if _, err := im.f.WriteAt(zeros[:n], from); err != nil {
			return err
		}
		from += n
	}
	return nil
}

// resizeBlocks resizes a dynamic or differencing image: a new BAT for the
// new number of blocks and a header with the new MaxTableEntries are
// committed with the new size in the footer by moving the header.
func (im *Image) resizeBlocks(size int64, ft footer) error {
	old, bs := im.size, im.blockSize
	n := (size + bs - 1) / bs
	if size > old && old%bs != 0 {
		// The old last block may hold data past the old end (written
		// before a shrink): the new range must not show it.
		if err := im.clearTail(old, min(size, alignUp(old, bs))); err != nil {
			return err
		}
	}
	if err := im.flush(); err != nil {
		return err
	}
	h := im.hdr
	h.MaxTableEntries = uint32(n)
	if err := im.relocate(h, nil, im.batFor(n), ft); err != nil {
		return err
	}
	im.cache.mu.Lock()
	for bi := n; bi < im.bat.n; bi++ {
		delete(im.cache.m, bi)
	}
	im.cache.mu.Unlock()
	im.bat.n = n
	im.size, im.sizeFromCHS = ft.virtualSize()
	return nil
}

// clearTail makes [from, to), which lies past the disk's end within one
// block, read as zeros (dynamic: zeros over stored sectors, since QEMU
// ignores the bitmap) or as the parent (differencing: bits cleared). The
// old image does not show these bytes, so the change needs no ordering
// beyond the next flush.
func (im *Image) clearTail(from, to int64) error {
	bi := from / im.blockSize
	e := im.bat.entry(bi)
	if e == batUnused || from >= to {
		return nil
	}
	in := from - bi*im.blockSize
	if im.ft.DiskType == Differencing {
		return im.trimSectors(bi, e, in, to-from)
	}
	return im.zeroStored(bi, e, in, to-from)
}
