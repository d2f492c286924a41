package disk

import (
	"fmt"
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
	Open  func(path string, opts OpenOptions) (Image, error)
}

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

// FormatForPath picks the format of path from its extension; ok is false
// for an unknown extension.
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

// Detect reads the start of path and returns the format whose signature
// matches, falling back to the extension.
func Detect(path string) (Format, error) {
	head, err := readHead(path)
	if err != nil {
		return Format{}, err
	}
	formatsMu.RLock()
	for _, f := range formats {
		if f.Match != nil && f.Match(head) {
			formatsMu.RUnlock()
			return f, nil
		}
	}
	formatsMu.RUnlock()
	if f, ok := FormatForPath(path); ok {
		return f, nil
	}
	return Format{}, fmt.Errorf("%s: unknown image format (extension %q)", path, filepath.Ext(path))
}

// Open opens the image at path, choosing the format by its signature or,
// for formats without one, its extension.
func Open(path string, opts OpenOptions) (Image, error) {
	f, err := Detect(path)
	if err != nil {
		return nil, err
	}
	return f.Open(path, opts)
}

func readHead(path string) ([]byte, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	buf := make([]byte, 64<<10)
	n, err := f.ReadAt(buf, 0)
	if n > 0 || err == nil {
		return buf[:n], nil
	}
	if n == 0 {
		return buf[:0], nil
	}
	return nil, err
}
