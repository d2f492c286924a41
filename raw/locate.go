package raw

import (
	"fmt"

	"github.com/vhdkit/vhdkit/storage"
)

// Locate reports where [off, off+n) is stored: in the file at the same
// offset, all of it (holes too: they read as zeros from the file). It
// lets a copy move file ranges instead of bytes (see vhdx.Locate).
func (img *Image) Locate(off, n int64) (f storage.File, fileOff, m int64, err error) {
	if err := img.check("locate", off, n, false); err != nil {
		return nil, 0, 0, err
	}
	return img.f, off, n, nil
}

// WriteFromFile writes [off, off+n) with the n bytes of src at srcOff,
// moved file to file (storage.CopyRange: cloned, copied in the kernel,
// or copied).
func (img *Image) WriteFromFile(off, n int64, src storage.File, srcOff int64) (storage.Moved, error) {
	if err := img.check("write", off, n, true); err != nil {
		return storage.Moved{}, err
	}
	m, err := storage.CopyRange(img.f, off, src, srcOff, n)
	if err != nil {
		return m, fmt.Errorf("raw: moving %d bytes to %d: %w", n, off, err)
	}
	return m, nil
}
