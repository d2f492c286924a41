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
	"path/filepath"
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

// osFile adapts *os.File to File.
type osFile struct{ *os.File }

func (f osFile) Size() (int64, error) {
	fi, err := f.Stat()
	if err != nil {
		return 0, err
	}
	return fi.Size(), nil
}

// OpenFile opens the named file with os.OpenFile's flag and perm.
func OpenFile(name string, flag int, perm os.FileMode) (File, error) {
	f, err := os.OpenFile(name, flag, perm)
	if err != nil {
		return nil, err
	}
	return osFile{f}, nil
}

// FromOS wraps an already open *os.File.
func FromOS(f *os.File) File { return osFile{f} }

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

// WriteFile replaces the file at path with data durably and atomically: a
// crash leaves the old content or the new, never a mix. The data goes to
// a temporary file beside path, which is synced and renamed over path,
// and then the directory is synced.
func WriteFile(path string, data []byte, perm os.FileMode) error {
	tmp := path + ".tmp"
	f, err := os.OpenFile(tmp, os.O_WRONLY|os.O_CREATE|os.O_TRUNC, perm)
	if err != nil {
		return err
	}
	_, err = f.Write(data)
	if err == nil {
		err = f.Sync()
	}
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	if err == nil {
		err = os.Rename(tmp, path)
	}
	if err == nil {
		err = SyncDir(filepath.Dir(path))
	}
	if err != nil {
		os.Remove(tmp)
	}
	return err
}
