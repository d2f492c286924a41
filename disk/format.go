package disk

import (
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strings"
	"sync"
)

// OpenOptions are the format-independent options of Open.
type OpenOptions struct {
	// ReadOnly opens the image (and its whole chain) without modifying
	// anything on disk, not even to replay a log.
	ReadOnly bool
	// ForceShare, with ReadOnly, opens the chain without refusing other
	// users of its files, even one writing them (qemu-img's -U): for
	// inspecting a disk in use, whose view may then be inconsistent.
	ForceShare bool
	// ParentDirs, when not empty, confines parent resolution of
	// differencing images to these directories: a parent outside them is
	// refused.
	ParentDirs []string
}

// Format describes one image format for Open.
type Format struct {
	Name       string   // "vhdx", "vhd", "raw"
	Extensions []string // lower-case, with the dot: ".vhdx"
	// Match reports whether the first bytes of a file (up to 64 KiB; fewer
	// for a short file) look like this format. Nil for formats without a
	// signature (raw).
	Match func(head []byte) bool
	// MatchTail, when set, reports whether the last bytes of a file (up
	// to tailSize; fewer for a short file) look like this format: a fixed
	// VHD has its only signature in a footer at the end.
	MatchTail func(tail []byte) bool
	Open      func(path string, opts OpenOptions) (Image, error)
}

// The sizes of what Detect reads at the start and the end of a file.
const (
	headSize = 64 << 10
	tailSize = 1 << 10
)

var (
	formatsMu sync.RWMutex
	formats   []Format
)

// Register makes a format known to Open. Format packages call it from init.
func Register(f Format) {
	formatsMu.Lock()
	defer formatsMu.Unlock()
	formats = append(formats, f)
}

// FormatByName returns the registered format called name.
func FormatByName(name string) (Format, bool) {
	formatsMu.RLock()
	defer formatsMu.RUnlock()
	for _, f := range formats {
		if f.Name == name {
			return f, true
		}
	}
	return Format{}, false
}

// FormatForPath picks the format of path from its extension alone; ok is
// false for an unknown extension. It is what a name says, not what a
// file is: Detect decides that.
func FormatForPath(path string) (Format, bool) {
	ext := strings.ToLower(filepath.Ext(path))
	formatsMu.RLock()
	defer formatsMu.RUnlock()
	for _, f := range formats {
		for _, e := range f.Extensions {
			if e == ext {
				return f, true
			}
		}
	}
	return Format{}, false
}

// ErrFormatMismatch is wrapped by Detect's errors for a file whose name
// and content disagree, or whose format cannot be told.
var ErrFormatMismatch = errors.New("image format cannot be told safely")

// detectError is a refusal of Detect; its message says why.
type detectError struct{ msg string }

func (e *detectError) Error() string { return e.msg }
func (e *detectError) Unwrap() error { return ErrFormatMismatch }

func refuse(format string, args ...any) error {
	return &detectError{fmt.Sprintf(format, args...)}
}

// claimed reports whether f's extensions promise its content: those of a
// format with a signature do, raw's (.img, .raw, .bin) name disks of any
// kind.
func (f Format) claimed() bool { return f.Match != nil || f.MatchTail != nil }

// foreign are signatures of image formats vhdkit does not read, so that
// such a file is named for what it is rather than read as raw.
var foreign = []struct {
	name  string
	magic string
}{
	{"QCOW2", "QFI\xfb"},
	{"VMDK", "KDMV"},
	{"VMDK", "# Disk DescriptorFile"},
}

// Detect returns the format of the image at path. The content decides:
//
//  1. A file whose start or end holds a registered format's signature (a
//     VHDX file identifier at 0; a VHD footer at 0 or in the last 512
//     bytes) is of that format, whatever its name, unless its extension
//     claims another format (a VHDX named .vhd): that is refused.
//  2. A file without a signature is raw when its name says so (.img,
//     .raw, .bin) or it is a block device. A name that claims a format
//     (.vhdx, .vhd, ...) without its signature is refused, and so is a
//     file with no signature and no raw name, as is one holding an image
//     format vhdkit does not read (QCOW2, VMDK).
//
// Errors for files that exist wrap ErrFormatMismatch. Callers that know
// the format (a user's --format) use FormatByName instead.
func Detect(path string) (Format, error) {
	bufs := endBuffers.Get().(*[headSize + tailSize]byte)
	defer endBuffers.Put(bufs)
	head, tail, device, err := readEnds(path, bufs)
	if err != nil {
		return Format{}, err
	}
	named, hasName := FormatForPath(path)
	var found Format
	formatsMu.RLock()
	for _, f := range formats {
		if (f.Match != nil && f.Match(head)) || (f.MatchTail != nil && len(tail) > 0 && f.MatchTail(tail)) {
			found = f
			break
		}
	}
	formatsMu.RUnlock()
	ext := filepath.Ext(path)
	switch {
	case found.Name != "" && hasName && named.claimed() && named.Name != found.Name:
		return Format{}, refuse("%s holds a %s image, but its name (%s) says %s",
			path, strings.ToUpper(found.Name), ext, strings.ToUpper(named.Name))
	case found.Name != "":
		return found, nil
	}
	for _, fo := range foreign {
		if strings.HasPrefix(string(head), fo.magic) {
			return Format{}, refuse("%s holds a %s image, which vhdkit does not read", path, fo.name)
		}
	}
	switch {
	case hasName && named.claimed():
		return Format{}, refuse("%s is not a %s image (no %s signature), though its name (%s) says so",
			path, strings.ToUpper(named.Name), strings.ToUpper(named.Name), ext)
	case hasName:
		return named, nil
	case device:
		if r, ok := FormatByName("raw"); ok {
			return r, nil
		}
	}
	return Format{}, refuse("%s: unknown image format: no VHDX or VHD signature, and its name does not say raw (.img, .raw, .bin)", path)
}

// Open opens the image at path in the format Detect finds.
func Open(path string, opts OpenOptions) (Image, error) {
	f, err := Detect(path)
	if err != nil {
		return nil, err
	}
	return f.Open(path, opts)
}

// IsBlockDevice reports whether path is a block device (a raw disk).
func IsBlockDevice(path string) bool {
	fi, err := os.Stat(path)
	return err == nil && fi.Mode()&os.ModeDevice != 0 && fi.Mode()&os.ModeCharDevice == 0
}

// endBuffers hold what Detect reads: it runs for every image a command
// opens, several times in a merge, and fresh buffers cost a page fault
// per 4 KiB (16-20 us on some virtual machines).
var endBuffers = sync.Pool{New: func() any { return new([headSize + tailSize]byte) }}

// readEnds reads the first headSize and the last tailSize bytes of path
// (fewer for a short file) into bufs and says whether it is a block
// device. The size of a device is where its end is.
func readEnds(path string, bufs *[headSize + tailSize]byte) (head, tail []byte, device bool, err error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, nil, false, err
	}
	defer f.Close()
	fi, err := f.Stat()
	if err != nil {
		return nil, nil, false, err
	}
	size := fi.Size()
	if fi.Mode()&os.ModeDevice != 0 && fi.Mode()&os.ModeCharDevice == 0 {
		device = true
		if size, err = f.Seek(0, io.SeekEnd); err != nil {
			return nil, nil, false, err
		}
	} else if !fi.Mode().IsRegular() {
		return nil, nil, false, refuse("%s is neither a regular file nor a block device", path)
	}
	head = bufs[:min(size, headSize)]
	if _, err := f.ReadAt(head, 0); err != nil && !errors.Is(err, io.EOF) {
		return nil, nil, false, err
	}
	tail = bufs[headSize : headSize+min(size, tailSize)]
	if _, err := f.ReadAt(tail, size-int64(len(tail))); err != nil && !errors.Is(err, io.EOF) {
		return nil, nil, false, err
	}
	return head, tail, device, nil
}
