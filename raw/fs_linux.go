package raw

import (
	"errors"
	"syscall"

	"github.com/vhdkit/vhdkit/disk"
	"github.com/vhdkit/vhdkit/storage"
)

// From linux/falloc.h and unistd.h; the syscall package lacks them.
const (
	fallocKeepSize  = 0x01
	fallocPunchHole = 0x02
	fallocZeroRange = 0x10

	seekData = 3
	seekHole = 4
)

// rawConn returns the descriptor access of an OS file (storage.OpenFile's
// files promote *os.File's SyscallConn); ok is false for other Files, such
// as MemFile or a FaultFile wrapping an OS file, which must see every write.
func rawConn(f storage.File) (syscall.RawConn, bool) {
	sc, ok := f.(interface {
		SyscallConn() (syscall.RawConn, error)
	})
	if !ok {
		return nil, false
	}
	rc, err := sc.SyscallConn()
	return rc, err == nil
}

// fallocate runs fallocate(2) on f; done is false, with a nil error, when
// f is not an OS file or its file system lacks mode.
func fallocate(f storage.File, mode uint32, off, length int64) (done bool, err error) {
	rc, ok := rawConn(f)
	if !ok {
		return false, nil
	}
	var errno error
	if err := rc.Control(func(fd uintptr) {
		for {
			errno = syscall.Fallocate(int(fd), mode, off, length)
			if errno != syscall.EINTR {
				return
			}
		}
	}); err != nil {
		return false, err
	}
	switch {
	case errno == nil:
		return true, nil
	case errors.Is(errno, syscall.EOPNOTSUPP), errors.Is(errno, syscall.ENOSYS), errors.Is(errno, syscall.EINVAL):
		return false, nil
	}
	return false, errno
}

// seekExtents maps [off, end) with SEEK_DATA/SEEK_HOLE; ok is false when f
// is not an OS file or its file system cannot tell.
func seekExtents(f storage.File, off, end int64) (list []disk.Extent, ok bool, err error) {
	rc, ok := rawConn(f)
	if !ok {
		return nil, false, nil
	}
	// lseek moves the descriptor's offset, which nothing else here uses:
	// all I/O is pread/pwrite.
	cerr := rc.Control(func(fd uintptr) {
		list, ok, err = seekMap(int(fd), off, end)
	})
	if cerr != nil {
		return nil, false, cerr
	}
	return list, ok, err
}

func seekMap(fd int, off, end int64) ([]disk.Extent, bool, error) {
	var list []disk.Extent
	for pos := off; pos < end; {
		data, err := syscall.Seek(fd, pos, seekData)
		switch {
		case err == syscall.ENXIO:
			data = end // only holes from pos to the end of the file
		case err == syscall.EINVAL && pos == off:
			return nil, false, nil // no SEEK_DATA here
		case err != nil:
			return nil, false, err
		}
		data = min(data, end)
		list = disk.AppendExtent(list, disk.Extent{Offset: pos, Length: data - pos, Type: disk.Hole, Depth: 1})
		if data == end {
			break
		}
		hole, err := syscall.Seek(fd, data, seekHole)
		if err == syscall.ENXIO {
			hole = end // the file shrank under us
		} else if err != nil {
			return nil, false, err
		}
		// A file system is free to round; never go backwards.
		hole = max(min(hole, end), data+1)
		list = disk.AppendExtent(list, disk.Extent{Offset: data, Length: hole - data, Type: disk.Data})
		pos = hole
	}
	return list, true, nil
}
