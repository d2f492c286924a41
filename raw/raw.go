// Package raw implements the raw image format: the virtual disk's bytes as
// they are, in a file exactly the disk's size.
//
//	offset 0                                   Size()
//	+------------------------------------------+
//	| sector 0 | sector 1 | ...                |   no header, no footer
//	+------------------------------------------+
//
// Unwritten ranges are the file's holes: Create makes a sparse file
// (CreateAllocated one with every block allocated: a fixed disk), Trim
// and WriteZeroes punch holes where the file system allows, and Extents
// reports holes with SEEK_DATA/SEEK_HOLE. A raw image is a single layer, so
// its holes have depth 1.
package raw

import (
	"errors"
	"fmt"
	"io"
	"os"

	"github.com/vhdkit/vhdkit/disk"
	"github.com/vhdkit/vhdkit/storage"
)

func init() {
	disk.Register(disk.Format{
		Name:       "raw",
		Extensions: []string{".img", ".raw", ".bin"},
		Open: func(path string, opts disk.OpenOptions) (disk.Image, error) {
			img, err := Open(path, opts)
			if err != nil {
				return nil, err // not a typed nil in a non-nil interface
			}
			return img, nil
		},
	})
}

// Image is a raw image. Its size is the file's size when opened. It is
// safe for concurrent use as far as its File is (OS files and MemFile are).
type Image struct {
	f        storage.File
	size     int64
	readOnly bool
}

var (
	_ disk.Image    = (*Image)(nil)
	_ disk.Trimmer  = (*Image)(nil)
	_ disk.Zeroer   = (*Image)(nil)
	_ disk.Extenter = (*Image)(nil)
)

// Create makes a new sparse raw image of size bytes at path: its blocks
// are allocated as they are written. It refuses to overwrite an existing
// file.
func Create(path string, size int64) (*Image, error) {
	return create(path, size, false)
}

// CreateAllocated makes a new raw image of size bytes at path with all
// its blocks allocated, so that no write to it can fail for lack of space
// (a fixed disk). Without the space, or on a file system that cannot
// allocate ahead of writes (the error wraps
// storage.ErrAllocateUnsupported), it fails and leaves no file. It
// refuses to overwrite an existing file.
func CreateAllocated(path string, size int64) (*Image, error) {
	return create(path, size, true)
}

func create(path string, size int64, allocate bool) (*Image, error) {
	if size < 0 {
		return nil, fmt.Errorf("raw: create %s: negative size %d", path, size)
	}
	f, err := storage.OpenFile(path, os.O_RDWR|os.O_CREATE|os.O_EXCL, 0o600) // a guest's data: its owner's only
	if err != nil {
		return nil, fmt.Errorf("raw: create: %w", err)
	}
	if allocate {
		err = storage.Allocate(f, 0, size)
	} else {
		err = f.Truncate(size)
	}
	if err != nil {
		f.Close()
		os.Remove(path)
		return nil, fmt.Errorf("raw: create %s: %w", path, err)
	}
	return New(f, false)
}

// Open opens the raw image at path; of opts only ReadOnly and ForceShare
// matter to raw.
func Open(path string, opts disk.OpenOptions) (*Image, error) {
	flag := os.O_RDWR
	if opts.ReadOnly {
		flag = os.O_RDONLY
	}
	var f storage.File
	var err error
	switch {
	case opts.ForceShare && !opts.ReadOnly:
		return nil, fmt.Errorf("raw: open %s: ForceShare needs ReadOnly", path)
	case opts.ForceShare:
		f, err = storage.OpenForceShare(path)
	default:
		f, err = storage.OpenFile(path, flag, 0)
	}
	if err != nil {
		return nil, fmt.Errorf("raw: open: %w", err)
	}
	img, err := New(f, opts.ReadOnly)
	if err != nil {
		f.Close()
		return nil, fmt.Errorf("raw: open %s: %w", path, err)
	}
	return img, nil
}

// New makes an image of f, whose current size is the disk's size. The
// image owns f: Close closes it.
func New(f storage.File, readOnly bool) (*Image, error) {
	size, err := f.Size()
	if err != nil {
		return nil, fmt.Errorf("raw: %w", err)
	}
	return &Image{f: f, size: size, readOnly: readOnly}, nil
}

// Size returns the disk's size in bytes.
func (img *Image) Size() int64 { return img.size }

// ReadAt reads len(p) bytes at off; the range must lie within the disk.
func (img *Image) ReadAt(p []byte, off int64) (int, error) {
	if err := img.check("read", off, int64(len(p)), false); err != nil {
		return 0, err
	}
	n, err := img.f.ReadAt(p, off)
	if n == len(p) {
		return n, nil // io.EOF at the very end is not an error here
	}
	if errors.Is(err, io.EOF) || err == nil {
		// The file shrank under us: not a state a disk can be in.
		err = io.ErrUnexpectedEOF
	}
	return n, fmt.Errorf("raw: read at %d: %w", off+int64(n), err)
}

// WriteAt writes p at off; the range must lie within the disk.
func (img *Image) WriteAt(p []byte, off int64) (int, error) {
	if err := img.check("write", off, int64(len(p)), true); err != nil {
		return 0, err
	}
	n, err := img.f.WriteAt(p, off)
	if err != nil {
		return n, fmt.Errorf("raw: write at %d: %w", off+int64(n), err)
	}
	return n, nil
}

// Flush makes every completed write durable.
func (img *Image) Flush() error {
	if img.readOnly {
		return nil // nothing of ours to make durable
	}
	if err := img.f.Sync(); err != nil {
		return fmt.Errorf("raw: flush: %w", err)
	}
	return nil
}

// Close closes the file without flushing.
func (img *Image) Close() error { return img.f.Close() }

// check validates an operation on [off, off+n).
func (img *Image) check(op string, off, n int64, write bool) error {
	if write && img.readOnly {
		return fmt.Errorf("raw: %s at %d: %w", op, off, disk.ErrReadOnly)
	}
	if err := disk.CheckRange(off, n, img.size); err != nil {
		return fmt.Errorf("raw: %s of %d bytes at %d in a %d-byte image: %w", op, n, off, img.size, err)
	}
	return nil
}
