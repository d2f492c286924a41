package storage

import (
	"errors"
	"fmt"

	"golang.org/x/sys/unix"
)

// ErrAllocateUnsupported says the file system cannot allocate a file's
// blocks ahead of the writes (fallocate(2) fails with EOPNOTSUPP: ext2/3
// files without extents, some network file systems). Errors from Allocate
// wrap it; the file can then only be made sparse.
var ErrAllocateUnsupported = errors.New("the file system cannot allocate space ahead of writes")

// Allocate makes the file system allocate the blocks of [off, off+length)
// in f, growing f to off+length if it is shorter (never shrinking it), so
// that later writes there cannot fail for lack of space: what a fixed disk
// promises. Bytes already written keep their contents; the rest read as
// zeros. When the space is not there, the error wraps unix.ENOSPC and part
// of the range may be allocated: the caller removes the file.
//
// An OS file asks the file system (fallocate mode 0); a file system
// without it gives an error wrapping ErrAllocateUnsupported. Other Files
// (MemFile, FaultFile) hold no file system's blocks, so for them Allocate
// only grows the file.
func Allocate(f File, off, length int64) error {
	if off < 0 || length < 0 || off > (1<<63-1)-length {
		return fmt.Errorf("storage: allocate %d bytes at %d: invalid range", length, off)
	}
	if length == 0 {
		return nil
	}
	if a, ok := f.(interface{ allocate(off, length int64) error }); ok {
		return a.allocate(off, length)
	}
	size, err := f.Size()
	if err != nil {
		return err
	}
	if size < off+length {
		return f.Truncate(off + length)
	}
	return nil
}

// Allocated reports whether f's file has blocks on disk for all of its
// first n bytes, as after Allocate: a fixed image made with its space
// allocated keeps it so as it grows, while one made sparse (--sparse)
// stays sparse. Files that cannot tell (not OS files) report false.
func Allocated(f File, n int64) bool {
	o, ok := f.(osFile)
	if !ok {
		return false
	}
	var st unix.Stat_t
	if err := unix.Fstat(int(o.Fd()), &st); err != nil {
		return false
	}
	return st.Blocks*512 >= n
}

// allocate runs fallocate(2) in its default mode, which allocates and
// extends the file.
func (f osFile) allocate(off, length int64) error {
	return f.fallocate("allocate", 0, off, length, ErrAllocateUnsupported)
}

// fallocate runs fallocate(2) with mode on the range, for op (the verb of
// its errors); a file system without that mode gives an error wrapping
// unsupported.
func (f osFile) fallocate(op string, mode uint32, off, length int64, unsupported error) error {
	rc, err := f.SyscallConn()
	if err != nil {
		return err
	}
	var errno error
	if err := rc.Control(func(fd uintptr) {
		// Go's runtime preempts with signals: a long call can be
		// interrupted, and starting over skips what is already done.
		for {
			errno = unix.Fallocate(int(fd), mode, off, length)
			if errno != unix.EINTR {
				return
			}
		}
	}); err != nil {
		return err
	}
	switch {
	case errno == nil:
		return nil
	case errors.Is(errno, unix.EOPNOTSUPP), errors.Is(errno, unix.ENOSYS):
		return fmt.Errorf("storage: %s %d bytes of %s: %w (fallocate: %w)", op, length, f.Name(), unsupported, errno)
	}
	return fmt.Errorf("storage: %s %d bytes at %d of %s: %w", op, length, off, f.Name(), errno)
}
