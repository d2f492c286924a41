package storage

import (
	"errors"

	"golang.org/x/sys/unix"
)

// IsHole reports whether [off, off+n) of f is known to read as zeros
// without reading it: a hole of an OS file (SEEK_DATA finds no data in the
// range, which lies within the file), or bytes of a MemFile that are
// zeros. False means not known (data there, another kind of File, an
// error): callers use it to save work, such as cloning one range across a
// gap instead of two ranges around it, never to decide what a range
// holds.
func IsHole(f File, off, n int64) bool {
	if off < 0 || n <= 0 || off > (1<<63-1)-n {
		return false
	}
	switch f := f.(type) {
	case osFile:
		return f.isHole(off, n)
	case *MemFile:
		return f.isZero(off, n)
	case *memHandle:
		return f.file.isZero(off, n)
	case *FaultFile:
		return IsHole(f.File, off, n)
	}
	return false
}

// isHole asks the file system for the first data at or after off. A range
// reaching past the end is not a hole: a clone of it would be refused.
func (f osFile) isHole(off, n int64) bool {
	var data int64
	var serr error
	err := withFd(f, func(fd int) { data, serr = unix.Seek(fd, off, unix.SEEK_DATA) })
	switch {
	case err != nil:
		return false
	case errors.Is(serr, unix.ENXIO): // no data at or after off
		size, err := f.Size()
		return err == nil && off+n <= size
	case serr != nil:
		return false
	}
	return data >= off+n
}

// withFd runs fn with f's descriptor, keeping it from closing meanwhile.
func withFd(f osFile, fn func(fd int)) error {
	c, err := f.SyscallConn()
	if err != nil {
		return err
	}
	return c.Control(func(fd uintptr) { fn(int(fd)) })
}

// isZero reports whether [off, off+n), within the size, reads as zeros.
func (f *MemFile) isZero(off, n int64) bool {
	f.mu.Lock()
	defer f.mu.Unlock()
	if f.closed || off+n > f.size || n > memFileMaxSize {
		return false
	}
	buf := make([]byte, n)
	f.read(buf, off)
	for _, b := range buf {
		if b != 0 {
			return false
		}
	}
	return true
}
