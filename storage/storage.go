// Package storage is the file seam under the image formats.
//
// Formats do all their I/O through a File so tests can substitute a file
// that simulates a crash (MemFile.CrashClone) or fails the n-th operation
// (FaultFile). OpenFile returns the operating system's file.
package storage

import (
	"errors"
	"io"
	"os"
)

// File is what an image format needs from its backing store.
//
// ReadAt and WriteAt follow io.ReaderAt/io.WriterAt. Sync makes every
// completed write durable. Truncate changes the size; growing reads as zeros.
type File interface {
	io.ReaderAt
	io.WriterAt
	Sync() error
	Truncate(size int64) error
	Size() (int64, error)
	Close() error
}

// ErrClosed is returned by operations on a closed File.
var ErrClosed = errors.New("storage: file closed")

// osFile adapts *os.File to File. Files from OpenFile carry their share
// of the image lock, released when they close.
type osFile struct {
	*os.File
	lock *openLock
}

// Size is the file's size; a block device's is where its end is (stat
// reports 0 for it).
func (f osFile) Size() (int64, error) {
	fi, err := f.Stat()
	if err != nil {
		return 0, err
	}
	if m := fi.Mode(); m&os.ModeDevice != 0 && m&os.ModeCharDevice == 0 {
		return f.Seek(0, io.SeekEnd)
	}
	return fi.Size(), nil
}

func (f osFile) Close() error {
	err := f.File.Close()
	if f.lock != nil {
		f.lock.release()
	}
	return err
}

// OpenFile opens the named file with os.OpenFile's flag and perm and locks
// it as QEMU locks images (see lock.go): a file opened for writing
// exclusively, one opened read-only shared with other readers. An open
// that conflicts with another user of the file fails with a *LockError
// (errors.Is ErrInUse) naming the processes that hold it.
func OpenFile(name string, flag int, perm os.FileMode) (File, error) {
	mode := lockRead
	if flag&(os.O_WRONLY|os.O_RDWR) != 0 {
		mode = lockWrite
	}
	return openLocked(name, flag, perm, mode)
}

// OpenForceShare opens the named file read-only without refusing anyone
// (qemu-img's --force-share): a file another process is writing can be
// inspected, though what is read may be inconsistent while it writes.
func OpenForceShare(name string) (File, error) {
	return openLocked(name, os.O_RDONLY, 0, lockForceShare)
}

func openLocked(name string, flag int, perm os.FileMode, mode lockMode) (File, error) {
	f, err := os.OpenFile(name, flag, perm)
	if err != nil {
		return nil, err
	}
	l, err := lock(f, name, mode)
	if err != nil {
		f.Close()
		return nil, err
	}
	return osFile{f, l}, nil
}

// StopWriting tells the locks that f, opened for writing, will only be
// read from now on (a disk frozen as a checkpoint's parent): it no longer
// keeps other readers out, nor a writer in this process. Files not from
// OpenFile are left alone.
func StopWriting(f File) {
	if o, ok := f.(osFile); ok && o.lock != nil {
		o.lock.downgrade()
	}
}

// FromOS wraps an already open *os.File, without locking it.
func FromOS(f *os.File) File { return osFile{File: f} }

// SyncDir makes a directory's entries durable: a file created, renamed or
// removed in it survives a crash once SyncDir returns.
func SyncDir(dir string) error {
	d, err := os.Open(dir)
	if err != nil {
		return err
	}
	defer d.Close()
	return d.Sync()
}
