// Package disk defines the virtual-disk contract shared by every image
// format (raw, VHD, VHDX) and by their users (the CLI, the NBD server, the
// merge engine).
//
// An Image is a flat array of Size() bytes. Formats that keep an allocation
// map expose it through Extenter; differencing formats report for each range
// the depth in the chain that holds it (0 = the image itself, 1 = its
// parent, …), which is what NBD's qemu:allocation-depth needs.
package disk

import (
	"bytes"
	"errors"
	"io"
)

// Image is an open virtual disk.
//
// ReadAt and WriteAt take any offset and length within [0, Size()); formats
// handle unaligned I/O themselves. A write is durable once Flush returns.
// Implementations are safe for concurrent use by multiple goroutines.
type Image interface {
	io.ReaderAt
	io.WriterAt
	Size() int64
	Flush() error
	Close() error
}

// Trimmer is implemented by images that can discard a range: afterwards the
// range reads as zeros (or, in a differencing image, as the parent's data
// where the format defines it so).
type Trimmer interface {
	Trim(off, length int64) error
}

// Zeroer is implemented by images that can make a range read as zeros
// without writing zero bytes. With mayUnmap the image may deallocate space.
type Zeroer interface {
	WriteZeroes(off, length int64, mayUnmap bool) error
}

// Extenter is implemented by images that know their allocation map.
type Extenter interface {
	// Extents describes [off, off+length) as consecutive extents, merged
	// where adjacent ones have the same Type and Depth.
	Extents(off, length int64) ([]Extent, error)
}

// SectorSizer is implemented by images with a logical sector size other
// than 512 or a physical sector size worth advertising.
type SectorSizer interface {
	LogicalSectorSize() int
	PhysicalSectorSize() int
}

// ExtentType says how a range of the virtual disk is stored.
type ExtentType uint8

const (
	// Data: the range is stored and may hold any bytes.
	Data ExtentType = iota
	// Zero: the range reads as zeros and is stored as such (allocated or not).
	Zero
	// Hole: the range is unallocated in the whole chain and reads as zeros.
	Hole
)

func (t ExtentType) String() string {
	switch t {
	case Data:
		return "data"
	case Zero:
		return "zero"
	case Hole:
		return "hole"
	}
	return "unknown"
}

// Extent is a range of the virtual disk with one allocation state.
type Extent struct {
	Offset int64
	Length int64
	Type   ExtentType
	// Depth is the chain level whose layer defines the range: 0 for the
	// image itself, 1 for its parent and so on. For a Hole, Depth is the
	// number of layers (nothing in the chain holds it).
	Depth int
}

// Sentinel errors shared by the formats. Format errors wrap these.
var (
	ErrFormat         = errors.New("malformed image")
	ErrChecksum       = errors.New("checksum mismatch")
	ErrUnsupported    = errors.New("unsupported image feature")
	ErrReadOnly       = errors.New("image is read-only")
	ErrParentMismatch = errors.New("parent does not match")
	ErrParentNotFound = errors.New("parent not found")
	ErrOutOfRange     = errors.New("offset out of range")
)

// AppendExtent appends e to list, merging it into the last extent when they
// are adjacent with the same type and depth.
func AppendExtent(list []Extent, e Extent) []Extent {
	if e.Length <= 0 {
		return list
	}
	if n := len(list); n > 0 {
		last := &list[n-1]
		if last.Type == e.Type && last.Depth == e.Depth && last.Offset+last.Length == e.Offset {
			last.Length += e.Length
			return list
		}
	}
	return append(list, e)
}

// CheckRange reports ErrOutOfRange unless [off, off+n) lies within size.
func CheckRange(off, n, size int64) error {
	if off < 0 || n < 0 || off > size || n > size-off {
		return ErrOutOfRange
	}
	return nil
}

var zeroChunk [64 << 10]byte

// IsZero reports whether p holds only zero bytes: how writers tell data
// that need not be stored.
func IsZero(p []byte) bool {
	for len(p) > 0 {
		n := min(len(p), len(zeroChunk))
		if !bytes.Equal(p[:n], zeroChunk[:n]) {
			return false
		}
		p = p[n:]
	}
	return true
}
