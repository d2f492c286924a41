package host

import (
	"fmt"
	"os"
	"syscall"

	"github.com/vhdkit/vhdkit/disk"
	"github.com/vhdkit/vhdkit/internal/api"
	"github.com/vhdkit/vhdkit/vhdx"
)

const (
	// maxMapExtents bounds a disk map reply.
	maxMapExtents = 20000
	// mapWindow is how much of the disk one Extents call covers, so that
	// a huge, fragmented disk is mapped piece by piece.
	mapWindow = 1 << 30
)

// DiskDetails describes a machine's disk: each file of its chain (format,
// type, block and sector sizes, size on disk) and, with withMap, the
// allocation map of the running disk by chain depth.
func (h *Host) DiskDetails(name string, index int, withMap bool) (*api.DiskDetails, error) {
	h.mu.Lock()
	v, err := h.working(name)
	if err != nil {
		h.mu.Unlock()
		return nil, err
	}
	if index < 0 || index >= len(v.disks) {
		h.mu.Unlock()
		return nil, errorf(statusNotFound, "machine %s has no disk %d (it has %d)", name, index, len(v.disks))
	}
	d := v.disks[index]
	out := &api.DiskDetails{VM: name, Index: index, Export: exportName(name, index), Size: d.Size()}
	// The files are read and the map taken without mu: a large map
	// takes a while, and the disk is safe for concurrent use.
	h.mu.Unlock()
	for _, inf := range d.Files() {
		out.Files = append(out.Files, describeFile(inf))
	}
	if !withMap {
		return out, nil
	}
	for off := int64(0); off < out.Size; off += mapWindow {
		list, err := d.Extents(off, min(mapWindow, out.Size-off))
		if err != nil {
			return nil, fmt.Errorf("machine %s disk %d: allocation map at %d: %w", name, index, off, err)
		}
		for _, e := range list {
			out.Map = appendExtent(out.Map, e)
		}
		if len(out.Map) > maxMapExtents {
			out.Map = out.Map[:maxMapExtents]
			last := out.Map[len(out.Map)-1]
			out.MapTruncated, out.MapEnd = true, last.Offset+last.Length
			break
		}
	}
	return out, nil
}

// appendExtent appends e, joining it to the last extent when they
// continue each other (as disk.AppendExtent).
func appendExtent(list []api.Extent, e disk.Extent) []api.Extent {
	n := len(list)
	if n > 0 {
		last := &list[n-1]
		if last.Offset+last.Length == e.Offset && last.Type == e.Type.String() && last.Depth == e.Depth {
			last.Length += e.Length
			return list
		}
	}
	return append(list, api.Extent{Offset: e.Offset, Length: e.Length, Type: e.Type.String(), Depth: e.Depth})
}

// describeFile describes one chain file: what its open image says, and
// the space it takes on its file system.
func describeFile(inf vhdx.Info) api.DiskFile {
	f := api.DiskFile{Path: inf.Path, Format: "vhdx", Type: inf.Type.String(), BlockSize: inf.BlockSize,
		LogicalSectorSize: inf.LogicalSectorSize, PhysicalSectorSize: inf.PhysicalSectorSize, FileSize: inf.FileSize}
	fi, err := os.Stat(inf.Path)
	if err != nil {
		f.Error = err.Error()
		return f
	}
	if st, ok := fi.Sys().(*syscall.Stat_t); ok {
		f.Allocated = st.Blocks * 512
	}
	return f
}
