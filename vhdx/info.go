package vhdx

import (
	"github.com/vhdkit/vhdkit/disk"
)

// Info is what Get-VHD reports about an image.
type Info struct {
	Path               string
	Creator            string
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
	ParentLinkage2     GUID   // differencing only; zero when absent
	ParentPath         string // the parent opened, differencing only
	Chain              []string
	LogReplayed        bool // a pending log was replayed at open
}

// Info describes the image.
func (im *Image) Info() Info {
	im.mu.RLock()
	defer im.mu.RUnlock()
	size, _ := im.f.Size()
	inf := Info{
		Path: im.path, Creator: im.creator, Type: im.kind(), VirtualSize: uint64(im.geo.virtualSize),
		FileSize: size, BlockSize: im.p.BlockSize, LogicalSectorSize: im.p.LogicalSectorSize,
		PhysicalSectorSize: im.p.PhysicalSectorSize, DiskID: im.p.DiskID,
		DataWriteGUID: im.hdr.DataWriteGUID, FileWriteGUID: im.hdr.FileWriteGUID,
		ParentPath: im.parentPath, LogReplayed: im.replay != nil,
	}
	if im.p.HasParent {
		inf.ParentLinkage, inf.ParentLinkage2, _ = im.linkages()
	}
	for p := im; p != nil; p = p.Parent() {
		inf.Chain = append(inf.Chain, p.path)
	}
	return inf
}

func (im *Image) kind() Type {
	switch {
	case im.p.HasParent:
		return Differencing
	case im.p.LeaveAllocated:
		return Fixed
	}
	return Dynamic
}

// Parent returns the open parent of a differencing image, or nil.
func (im *Image) Parent() *Image {
	p, _ := im.parent.(*Image)
	return p
}

// Path returns the path the image was opened with.
func (im *Image) Path() string { return im.path }

// Depth is the number of layers in the chain: 1 for an image without a
// parent.
func (im *Image) Depth() int {
	n := 0
	for p := im; p != nil; p = p.Parent() {
		n++
	}
	return n
}

// Extents describes [off, off+n) through the chain.
func (im *Image) Extents(off, n int64) ([]disk.Extent, error) {
	im.mu.RLock()
	defer im.mu.RUnlock()
	if err := im.checkIO(off, n); err != nil {
		return nil, err
	}
	return im.extents(nil, off, n)
}

func (im *Image) extents(list []disk.Extent, off, n int64) ([]disk.Extent, error) {
	g := &im.geo
	for end := off + n; off < end; {
		blk, in := off/g.blockSize, off%g.blockSize
		seg := min(end-off, g.blockSize-in)
		e := im.bat[g.payloadIndex(blk)]
		var err error
		switch batState(e) {
		case payloadFullyPresent:
			list = disk.AppendExtent(list, disk.Extent{Offset: off, Length: seg, Type: disk.Data})
		case payloadPartiallyPresent:
			list, err = im.partialExtents(list, off, seg, blk)
		case payloadNotPresent:
			if im.parent != nil {
				list, err = im.parentExtents(list, off, seg)
			} else {
				list = disk.AppendExtent(list, disk.Extent{Offset: off, Length: seg, Type: disk.Hole, Depth: 1})
			}
		case payloadZero:
			list = disk.AppendExtent(list, disk.Extent{Offset: off, Length: seg, Type: disk.Zero})
		default: // UNMAPPED, UNDEFINED
			if im.parent != nil {
				list = disk.AppendExtent(list, disk.Extent{Offset: off, Length: seg, Type: disk.Zero})
			} else {
				list = disk.AppendExtent(list, disk.Extent{Offset: off, Length: seg, Type: disk.Hole, Depth: 1})
			}
		}
		if err != nil {
			return nil, err
		}
		off += seg
	}
	return list, nil
}

func (im *Image) partialExtents(list []disk.Extent, off, n, blk int64) ([]disk.Extent, error) {
	bm, err := im.bitmap(blk)
	if err != nil {
		return nil, err
	}
	ss := im.geo.sectorSize
	for end := off + n; off < end; {
		present, run := bitRun(bm, im.bitIndex(off), (end+ss-1)/ss-off/ss)
		seg := min(end-off, (off/ss+run)*ss-off)
		if present {
			list = disk.AppendExtent(list, disk.Extent{Offset: off, Length: seg, Type: disk.Data})
		} else if list, err = im.parentExtents(list, off, seg); err != nil {
			return nil, err
		}
		off += seg
	}
	return list, nil
}

// parentExtents appends the parent's extents for a range, one level
// deeper. Past the end of a parent smaller than its child nothing in the
// chain holds the range: a hole, as deep as the chain.
func (im *Image) parentExtents(list []disk.Extent, off, n int64) ([]disk.Extent, error) {
	if ps := im.parent.Size(); off+n > ps {
		if ps > off {
			var err error
			if list, err = im.parentExtents(list, off, ps-off); err != nil {
				return nil, err
			}
		}
		below := 1
		if p := im.Parent(); p != nil {
			below = p.Depth()
		}
		past := max(ps, off)
		return disk.AppendExtent(list, disk.Extent{Offset: past, Length: off + n - past, Type: disk.Hole, Depth: 1 + below}), nil
	}
	if p := im.Parent(); p != nil {
		p.mu.RLock()
		sub, err := p.extents(nil, off, n)
		p.mu.RUnlock()
		if err != nil {
			return nil, err
		}
		for _, e := range sub {
			e.Depth++
			list = disk.AppendExtent(list, e)
		}
		return list, nil
	}
	if x, ok := im.parent.(disk.Extenter); ok {
		sub, err := x.Extents(off, n)
		if err != nil {
			return nil, err
		}
		for _, e := range sub {
			e.Depth++
			list = disk.AppendExtent(list, e)
		}
		return list, nil
	}
	return disk.AppendExtent(list, disk.Extent{Offset: off, Length: n, Type: disk.Data, Depth: 1}), nil
}
