package storage

import (
	"errors"
	"fmt"

	"golang.org/x/sys/unix"
)

// ErrPunchUnsupported says the file system cannot deallocate a range of a
// file (fallocate(2) with FALLOC_FL_PUNCH_HOLE fails with EOPNOTSUPP: ext2/3
// files without extents, some network file systems). Errors from Punch wrap
// it; the range then keeps its blocks and its bytes.
var ErrPunchUnsupported = errors.New("the file system cannot punch holes")

// Punch makes [off, off+length) of f read as zeros and gives its blocks back
// to the file system, without changing the file's size: what a discard of
// a disk's unused space asks for. The part of the range past the end of
// the file is left alone.
//
// An OS file asks the file system (fallocate PUNCH_HOLE|KEEP_SIZE); a file
// system without it gives an error wrapping ErrPunchUnsupported and leaves
// the range as it was. Other Files (MemFile, FaultFile) hold no file
// system's blocks, so for them Punch writes zeros: the same content, and
// the same durability (until the next Sync, a crash may keep either).
func Punch(f File, off, length int64) error {
	if off < 0 || length < 0 || off > (1<<63-1)-length {
		return fmt.Errorf("storage: punch %d bytes at %d: invalid range", length, off)
	}
	if length == 0 {
		return nil
	}
	if p, ok := f.(interface{ punch(off, length int64) error }); ok {
		return p.punch(off, length)
	}
	size, err := f.Size()
	if err != nil {
		return err
	}
	zeros := make([]byte, min(length, 1<<20))
	for end := min(off+length, size); off < end; {
		n := min(int64(len(zeros)), end-off)
		if _, err := f.WriteAt(zeros[:n], off); err != nil {
			return err
		}
		off += n
	}
	return nil
}

// punch runs fallocate(2) with PUNCH_HOLE|KEEP_SIZE.
func (f osFile) punch(off, length int64) error {
	return f.fallocate("punch", unix.FALLOC_FL_PUNCH_HOLE|unix.FALLOC_FL_KEEP_SIZE, off, length, ErrPunchUnsupported)
}
