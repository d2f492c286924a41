package vhdx

// TEMPORARY: signatures the rest of the tree codes against while the
// engine is written. Replaced by the real implementation.

import (
	"errors"

	"github.com/vhdkit/vhdkit/disk"
	"github.com/vhdkit/vhdkit/storage"
)

var errTODO = errors.New("vhdx: not implemented yet")

// Type is the kind of a VHDX image.
type Type int

const (
	Fixed Type = iota
	Dynamic
	Differencing
)

func (t Type) String() string {
	switch t {
	case Fixed:
		return "fixed"
	case Dynamic:
		return "dynamic"
	case Differencing:
		return "differencing"
	}
	return "unknown"
}

// GUID is a GUID in its on-disk (Microsoft mixed-endian) byte order.
type GUID [16]byte

// CreateOptions describe a new image.
type CreateOptions struct {
	Type               Type   // Fixed, Dynamic (default) or Differencing (implied by Parent)
	Size               uint64 // virtual size in bytes; for a child, 0 means the parent's
	BlockSize          uint32 // 0: 32 MiB, or 2 MiB for differencing
	LogicalSectorSize  uint32 // 0: 512 (a child takes its parent's)
	PhysicalSectorSize uint32 // 0: 4096 (a child takes its parent's)
	Parent             string // parent path: makes a differencing image
}

// OpenOptions control Open.
type OpenOptions struct {
	ReadOnly   bool
	ParentDirs []string // confine parent resolution to these directories
	// ParentPath, when set, is used as the parent instead of resolving the locator.
	ParentPath string
}

// Info is what Get-VHD reports.
type Info struct {
	Path               string
	Type               Type
	VirtualSize        uint64
	FileSize           int64
	BlockSize          uint32
	LogicalSectorSize  uint32
	PhysicalSectorSize uint32
	DiskID             GUID
	DataWriteGUID      GUID
	FileWriteGUID      GUID
	ParentLinkage      GUID   // differencing only
	ParentPath         string // resolved parent path, differencing only
	Chain              []string
}

// Image is an open VHDX file.
type Image struct{}

func Create(path string, opts CreateOptions) (*Image, error) { return nil, errTODO }
func Open(path string, opts OpenOptions) (*Image, error)     { return nil, errTODO }
func CreateFile(f storage.File, path string, opts CreateOptions) (*Image, error) {
	return nil, errTODO
}
func OpenFile(f storage.File, path string, opts OpenOptions) (*Image, error) {
	return nil, errTODO
}

func (im *Image) ReadAt(p []byte, off int64) (int, error)            { return 0, errTODO }
func (im *Image) WriteAt(p []byte, off int64) (int, error)           { return 0, errTODO }
func (im *Image) Size() int64                                        { return 0 }
func (im *Image) Flush() error                                       { return errTODO }
func (im *Image) Close() error                                       { return errTODO }
func (im *Image) Trim(off, length int64) error                       { return errTODO }
func (im *Image) WriteZeroes(off, length int64, mayUnmap bool) error { return errTODO }
func (im *Image) Extents(off, length int64) ([]disk.Extent, error)   { return nil, errTODO }
func (im *Image) LogicalSectorSize() int                             { return 512 }
func (im *Image) PhysicalSectorSize() int                            { return 4096 }
func (im *Image) Info() Info                                         { return Info{} }

// Problem is one inconsistency found by Check.
type Problem struct {
	Offset int64  // file offset of the structure, -1 if none
	What   string // one line
}

// Check inspects the image at path like Test-VHD; with repair it replays a
// pending log. It returns the problems found (none: consistent).
func Check(path string, repair bool) ([]Problem, error) { return nil, errTODO }
