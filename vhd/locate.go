package vhd

import (
	"fmt"

	"github.com/vhdkit/vhdkit/disk"
	"github.com/vhdkit/vhdkit/storage"
)

// fileLocator is what Locate asks of a parent (see Locate).
type fileLocator interface {
	Locate(off, n int64) (f storage.File, fileOff, m int64, err error)
}

// Locate reports where the bytes of [off, off+n) starting at off are
// stored: in f at fileOff, contiguously, for the first m bytes (0 < m <=
// n), so that a copy can move file ranges instead of bytes (a clone
// where the file system can; a VHD's data follows its block's 512-byte
// bitmap, so it lines up with a VHDX block only for a kernel copy). f is
// nil for a first m bytes stored in no file as they read (zeros, a
// parent that cannot tell). Runs end at block boundaries and where the
// sector bitmap changes.
func (im *Image) Locate(off, n int64) (f storage.File, fileOff, m int64, err error) {
	im.mu.RLock()
	defer im.mu.RUnlock()
	if im.closed {
		return nil, 0, 0, errClosed
	}
	if err := disk.CheckRange(off, n, im.size); err != nil {
		return nil, 0, 0, fmt.Errorf("vhd: locate [%d, +%d) on a %d-byte disk: %w", off, n, im.size, err)
	}
	if n == 0 {
		return nil, 0, 0, nil
	}
	if im.ft.DiskType == Fixed {
		return im.f, off, n, nil
	}
	bs := im.blockSize
	bi := off / bs
	in := off - bi*bs
	n = min(n, bs-in)
	e := im.bat.entry(bi)
	if e != batUnused {
		bm, err := im.bitmap(bi)
		if err != nil {
			return nil, 0, 0, err
		}
		s := in / SectorSize
		set, t := bitRun(bm, s, (in+n+SectorSize-1)/SectorSize)
		n = min(n, t*SectorSize-in)
		if set {
			return im.f, int64(e)*SectorSize + im.bitmapSize + in, n, nil
		}
	}
	// Not stored here: the parent's, or zeros.
	if im.parent == nil || off >= im.parent.Size() {
		return nil, 0, n, nil
	}
	n = min(n, im.parent.Size()-off)
	if l, ok := im.parent.(fileLocator); ok {
		return l.Locate(off, n)
	}
	return nil, 0, n, nil
}
