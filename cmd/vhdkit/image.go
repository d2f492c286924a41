package main

import (
	"fmt"
	"path/filepath"
	"slices"
	"strings"

	"github.com/vhdkit/vhdkit/disk"
	_ "github.com/vhdkit/vhdkit/raw" // registers the raw format with package disk
	"github.com/vhdkit/vhdkit/vhdx"
)

// vhdxExtensions are the file extensions of VHDX images.
var vhdxExtensions = []string{".vhdx", ".avhdx"}

// formatOf names the image format of path from its extension: "vhdx", or
// the name of a format registered with package disk ("raw", ...).
func formatOf(path string) (string, error) {
	ext := strings.ToLower(filepath.Ext(path))
	if slices.Contains(vhdxExtensions, ext) {
		return "vhdx", nil
	}
	if f, ok := disk.FormatForPath(path); ok {
		return f.Name, nil
	}
	if ext == "" {
		return "", fmt.Errorf("%s: no file extension to tell the image format by (use .vhdx, .avhdx, .img or .raw)", path)
	}
	return "", fmt.Errorf("%s: unknown image format %q (use .vhdx, .avhdx, .img or .raw)", path, ext)
}

// openImage opens the image at path, a differencing image with its whole
// chain. A read-only open never modifies any file.
func openImage(path string, readOnly bool) (disk.Image, error) {
	format, err := formatOf(path)
	if err != nil {
		return nil, err
	}
	if format == "vhdx" {
		im, err := vhdx.Open(path, vhdx.OpenOptions{ReadOnly: readOnly})
		if err != nil {
			return nil, err
		}
		return im, nil
	}
	f, _ := disk.FormatByName(format)
	return f.Open(path, disk.OpenOptions{ReadOnly: readOnly})
}

// sectorSizes returns an image's logical and physical sector sizes, 512
// for images that do not say.
func sectorSizes(im disk.Image) (logical, physical int) {
	if s, ok := im.(disk.SectorSizer); ok {
		return s.LogicalSectorSize(), s.PhysicalSectorSize()
	}
	return 512, 512
}

// extentWindow is how much of the disk one Extents call covers, so that a
// huge, fragmented disk is mapped piece by piece.
const extentWindow = 1 << 30

// imageExtents describes [off, off+n) of im. Images without an allocation
// map are one data extent at depth 0.
func imageExtents(im disk.Image, off, n int64) ([]disk.Extent, error) {
	if e, ok := im.(disk.Extenter); ok {
		return e.Extents(off, n)
	}
	return []disk.Extent{{Offset: off, Length: n, Type: disk.Data}}, nil
}
