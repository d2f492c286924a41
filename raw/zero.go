package raw

import (
	"fmt"
)

// zeros is written where the file cannot punch a hole; never modified.
var zeros [64 << 10]byte

// Trim deallocates [off, off+length), which then reads as zeros.
func (img *Image) Trim(off, length int64) error {
	return img.zero("trim", off, length, true)
}

// WriteZeroes makes [off, off+length) read as zeros. With mayUnmap it
// punches a hole; otherwise it keeps the range allocated where the file
// system can zero in place, so later writes there cannot fail for space.
func (img *Image) WriteZeroes(off, length int64, mayUnmap bool) error {
	return img.zero("write zeroes", off, length, mayUnmap)
}

func (img *Image) zero(op string, off, length int64, unmap bool) error {
	if err := img.check(op, off, length, true); err != nil {
		return err
	}
	if length == 0 {
		return nil
	}
	mode := uint32(fallocZeroRange | fallocKeepSize)
	if unmap {
		mode = fallocPunchHole | fallocKeepSize
	}
	done, err := fallocate(img.f, mode, off, length)
	if err != nil {
		return fmt.Errorf("raw: %s at %d: %w", op, off, err)
	}
	if done {
		return nil
	}
	// Not an OS file, or a file system without the operation.
	for length > 0 {
		n, err := img.f.WriteAt(zeros[:min(length, int64(len(zeros)))], off)
		if err != nil {
			return fmt.Errorf("raw: %s at %d: %w", op, off+int64(n), err)
		}
		off, length = off+int64(n), length-int64(n)
	}
	return nil
}
