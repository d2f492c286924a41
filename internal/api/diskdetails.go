package api

import (
	"context"
	"strconv"
)

// DiskDetails is GET /v1/vms/{vm}/disks/{disk}: the disk's files and,
// with ?map=1, its allocation map through the chain (what "vhdkit map"
// prints for its leaf).
type DiskDetails struct {
	VM     string `json:"vm"`
	Index  int    `json:"index"`
	Export string `json:"export,omitempty"`
	Size   int64  `json:"size"`
	// Files is the chain, the file the disk runs on first; depth i of the
	// map is Files[i].
	Files []DiskFile `json:"files"`
	Map   []Extent   `json:"map,omitempty"`
	// MapTruncated says the map stopped at MapEnd: the disk has more
	// extents than one reply carries.
	MapTruncated bool  `json:"map_truncated,omitempty"`
	MapEnd       int64 `json:"map_end,omitempty"`
}

// DiskFile is one file of a disk's chain.
type DiskFile struct {
	Path               string `json:"path"`
	Format             string `json:"format"` // "vhdx"
	Type               string `json:"type"`   // fixed, dynamic or differencing
	BlockSize          uint32 `json:"block_size,omitempty"`
	LogicalSectorSize  uint32 `json:"logical_sector_size,omitempty"`
	PhysicalSectorSize uint32 `json:"physical_sector_size,omitempty"`
	FileSize           int64  `json:"file_size"`
	// Allocated is the space the file takes on its file system.
	Allocated int64 `json:"allocated"`
	// Error says why the file system could not say how much space the
	// file takes.
	Error string `json:"error,omitempty"`
}

// Extent is a range of the allocation map: as "vhdkit map --json".
type Extent struct {
	Offset int64  `json:"offset"`
	Length int64  `json:"length"`
	Type   string `json:"type"` // data, zero or hole
	Depth  int    `json:"depth"`
}

// DiskDetails describes a machine's disk; withMap adds its allocation map.
func (c *Client) DiskDetails(ctx context.Context, vm string, disk int, withMap bool) (*DiskDetails, error) {
	q := ""
	if withMap {
		q = "?map=1"
	}
	var v DiskDetails
	return &v, c.do(ctx, "GET", "/v1/vms/"+esc(vm)+"/disks/"+strconv.Itoa(disk)+q, nil, &v)
}
