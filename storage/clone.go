package storage

import (
	"errors"
	"fmt"
	"io"
	"os"
	"syscall"

	"golang.org/x/sys/unix"
)

// Moved counts the bytes a range copy moved, by how it moved them. The
// choice is made per range, by what the two files and their file system
// allow, in this order:
//
//  1. Cloned: the file system shares the source's blocks with the target
//     (FICLONERANGE on XFS with reflink, btrfs): metadata only, no bytes
//     read or written. Both offsets and the length must be multiples of
//     the file system's block size (4 KiB is assumed; a refusal falls
//     through).
//  2. KernelCopied: copy_file_range(2), which copies in the kernel (or
//     clones where the file system can, unaligned ranges included).
//  3. Copied: read into memory and written, the way every File can.
type Moved struct {
	Cloned       int64
	KernelCopied int64
	Copied       int64
}

// Total is every byte moved.
func (m Moved) Total() int64 { return m.Cloned + m.KernelCopied + m.Copied }

// Add sums two counts.
func (m Moved) Add(o Moved) Moved {
	return Moved{m.Cloned + o.Cloned, m.KernelCopied + o.KernelCopied, m.Copied + o.Copied}
}

// RangeCopier is implemented by Files that can take a range of another
// File without its bytes passing through the caller. CopyRangeFrom moves
// n bytes of src at srcOff to dstOff of the receiver, growing it as
// WriteAt would; a File that cannot (src is not of its kind) returns an
// error wrapping errors.ErrUnsupported having moved nothing, and
// CopyRange copies through memory instead. Wrappers (FaultFile) count the
// operation and pass it on with CopyRange.
type RangeCopier interface {
	CopyRangeFrom(src File, srcOff, dstOff, n int64) (Moved, error)
}

// cloneAlign is the alignment a clone asks of offsets and lengths: the
// block size of the file systems that clone (XFS, btrfs) as made today.
//
// Short runs are cloned too, with no minimum length: copying them through
// memory instead was measured slower (Linux 6.18, loop-mounted XFS and
// btrfs: a 4-64 KiB clone costs 8-20 us, reading and writing the same
// 10-60 us once the write-back at the next sync is counted, and a source
// that was itself cloned is not in the page cache); copy_file_range would
// clone them anyway.
const cloneAlign = 4096

// CopyRange copies n bytes of src at srcOff to dst at dstOff: cloned or
// copied in the kernel where dst can (RangeCopier), else through memory.
// Bytes past the end of src read as zeros, as File reads them nowhere
// else: image formats let a block end past the end of its file.
func CopyRange(dst File, dstOff int64, src File, srcOff, n int64) (Moved, error) {
	if srcOff < 0 || dstOff < 0 || n < 0 || srcOff > (1<<63-1)-n || dstOff > (1<<63-1)-n {
		return Moved{}, fmt.Errorf("storage: copy %d bytes from %d to %d: invalid range", n, srcOff, dstOff)
	}
	if n == 0 {
		return Moved{}, nil
	}
	if c, ok := dst.(RangeCopier); ok {
		m, err := c.CopyRangeFrom(src, srcOff, dstOff, n)
		if !errors.Is(err, errors.ErrUnsupported) {
			return m, err
		}
	}
	return copyThroughMemory(dst, dstOff, src, srcOff, n)
}

// copyPiece is the most copyThroughMemory holds at once.
const copyPiece = 1 << 20

// copyThroughMemory copies by reading and writing; bytes past src's end
// are zeros.
func copyThroughMemory(dst File, dstOff int64, src File, srcOff, n int64) (Moved, error) {
	buf := make([]byte, min(n, copyPiece))
	var m Moved
	for n > 0 {
		p := buf[:min(n, int64(len(buf)))]
		k, err := src.ReadAt(p, srcOff)
		if err == io.EOF {
			clear(p[k:])
		} else if err != nil {
			return m, err
		}
		if _, err := dst.WriteAt(p, dstOff); err != nil {
			return m, err
		}
		m.Copied += int64(len(p))
		n, srcOff, dstOff = n-int64(len(p)), srcOff+int64(len(p)), dstOff+int64(len(p))
	}
	return m, nil
}

// CopyRangeFrom clones what it can of the range from another OS file
// (its aligned middle, when both offsets share their misalignment), and
// copies the rest with copy_file_range; what the kernel refuses (another
// file system, a range past src's end) is copied through memory.
func (f osFile) CopyRangeFrom(src File, srcOff, dstOff, n int64) (Moved, error) {
	s, ok := src.(osFile)
	if !ok {
		return Moved{}, fmt.Errorf("storage: %T is not an OS file: %w", src, errors.ErrUnsupported)
	}
	var m Moved
	// Clone the aligned middle; the unaligned ends go to the kernel copy.
	if (srcOff-dstOff)%cloneAlign == 0 {
		lo := (srcOff + cloneAlign - 1) / cloneAlign * cloneAlign
		hi := (srcOff + n) / cloneAlign * cloneAlign
		if lo < hi && f.clone(s, lo, dstOff+lo-srcOff, hi-lo) == nil {
			km, err := f.kernelCopy(s, srcOff, dstOff, lo-srcOff)
			m = m.Add(km)
			if err != nil {
				return m, err
			}
			m.Cloned += hi - lo
			km, err = f.kernelCopy(s, hi, dstOff+hi-srcOff, srcOff+n-hi)
			return m.Add(km), err
		}
	}
	km, err := f.kernelCopy(s, srcOff, dstOff, n)
	return m.Add(km), err
}

// clone runs FICLONERANGE for an aligned range.
func (f osFile) clone(src osFile, srcOff, dstOff, n int64) error {
	var cerr error
	err := withFds(f.File, src.File, func(dfd, sfd int) {
		cerr = unix.IoctlFileCloneRange(dfd, &unix.FileCloneRange{
			Src_fd: int64(sfd), Src_offset: uint64(srcOff), Src_length: uint64(n), Dest_offset: uint64(dstOff)})
	})
	if err != nil {
		return err
	}
	return cerr
}

// kernelCopy copies with copy_file_range, then through memory for what
// the kernel does not take (a file system pair it refuses, src's end).
func (f osFile) kernelCopy(src osFile, srcOff, dstOff, n int64) (Moved, error) {
	var m Moved
	var cerr error
	err := withFds(f.File, src.File, func(dfd, sfd int) {
		for n > 0 {
			so, do := srcOff, dstOff
			k, err := unix.CopyFileRange(sfd, &so, dfd, &do, int(min(n, 1<<30)), 0)
			if err == syscall.EINTR {
				continue
			}
			if err != nil {
				if !kernelCopyRefused(err) {
					cerr = fmt.Errorf("storage: copy_file_range %d bytes from %d to %d: %w", n, srcOff, dstOff, err)
				}
				return
			}
			if k == 0 {
				return // src's end: the rest reads as zeros
			}
			m.KernelCopied += int64(k)
			n, srcOff, dstOff = n-int64(k), srcOff+int64(k), dstOff+int64(k)
		}
	})
	if err == nil {
		err = cerr
	}
	if err != nil || n == 0 {
		return m, err
	}
	cm, err := copyThroughMemory(f, dstOff, src, srcOff, n)
	return m.Add(cm), err
}

// kernelCopyRefused tells the errors by which copy_file_range declines a
// pair of files (so a copy through memory is due) from I/O errors.
func kernelCopyRefused(err error) bool {
	switch err {
	case unix.EXDEV, unix.EINVAL, unix.EOPNOTSUPP, unix.ENOSYS, unix.EBADF, unix.EPERM, unix.ETXTBSY:
		return true
	}
	return false
}

// withFds runs fn with the descriptors of two open files, keeping both
// from closing meanwhile.
func withFds(dst, src *os.File, fn func(dfd, sfd int)) error {
	dc, err := dst.SyscallConn()
	if err != nil {
		return err
	}
	sc, err := src.SyscallConn()
	if err != nil {
		return err
	}
	var inner error
	err = dc.Control(func(dfd uintptr) {
		inner = sc.Control(func(sfd uintptr) { fn(int(dfd), int(sfd)) })
	})
	if err == nil {
		err = inner
	}
	return err
}

// CopyRangeFrom stands in for a clone: the bytes are read from src
// (through its ReadAt, so a wrapper around src counts the read) and
// written as one write, kept or lost per sector by a crash like any
// unsynced write, and counted as Cloned so that tests over MemFiles go
// through the cloning path of the formats and the copy engine.
func (f *MemFile) CopyRangeFrom(src File, srcOff, dstOff, n int64) (Moved, error) {
	if n > memFileMaxSize {
		return Moved{}, errMemTooLarge
	}
	buf := make([]byte, n)
	k, err := src.ReadAt(buf, srcOff)
	if err == io.EOF {
		clear(buf[k:])
	} else if err != nil {
		return Moved{}, err
	}
	if _, err := f.WriteAt(buf, dstOff); err != nil {
		return Moved{}, err
	}
	return Moved{Cloned: n}, nil
}

// CopyRangeFrom counts an OpWrite and passes the copy on to File. A
// failing one moves nothing (a clone is not torn).
func (f *FaultFile) CopyRangeFrom(src File, srcOff, dstOff, n int64) (Moved, error) {
	if err := f.fault(OpWrite); err != nil {
		return Moved{}, err
	}
	return CopyRange(f.File, dstOff, src, srcOff, n)
}
