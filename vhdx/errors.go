package vhdx

import (
	"fmt"

	"github.com/vhdkit/vhdkit/disk"
)

// Re-exported so callers of this package need not import disk for them.
var (
	ErrFormat         = disk.ErrFormat
	ErrChecksum       = disk.ErrChecksum
	ErrUnsupported    = disk.ErrUnsupported
	ErrReadOnly       = disk.ErrReadOnly
	ErrParentMismatch = disk.ErrParentMismatch
	ErrParentNotFound = disk.ErrParentNotFound
)

// FormatError describes a structure of the file that cannot be used.
type FormatError struct {
	Structure string // "header 1", "region table 2", "BAT entry 17", ...
	Offset    int64  // file offset of the structure or field
	Msg       string
	Err       error // ErrFormat, ErrChecksum or ErrUnsupported
}

func (e *FormatError) Error() string {
	return fmt.Sprintf("vhdx: %s at offset %#x: %s", e.Structure, e.Offset, e.Msg)
}

func (e *FormatError) Unwrap() error { return e.Err }

func formatErr(structure string, off int64, format string, args ...any) error {
	return &FormatError{Structure: structure, Offset: off, Msg: fmt.Sprintf(format, args...), Err: ErrFormat}
}

func checksumErr(structure string, off int64, got, want uint32) error {
	return &FormatError{Structure: structure, Offset: off,
		Msg: fmt.Sprintf("checksum %#08x, computed %#08x", got, want), Err: ErrChecksum}
}

func unsupportedErr(structure string, off int64, format string, args ...any) error {
	return &FormatError{Structure: structure, Offset: off, Msg: fmt.Sprintf(format, args...), Err: ErrUnsupported}
}

// errNotVHDX is what a file without the VHDX signature is refused with
// (it is an ErrFormat): a parent locator naming one names no parent.
var errNotVHDX = fmt.Errorf("not a VHDX file: %w", ErrFormat)

func notVHDXErr(msg string) error {
	return &FormatError{Structure: "file identifier", Offset: 0, Msg: msg, Err: errNotVHDX}
}
