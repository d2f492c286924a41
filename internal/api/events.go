package api

import (
	"context"
	"strconv"
	"time"
)

// Event is one thing the host did, from its log at level Info and above:
// a checkpoint made, applied or deleted, a merge's steps, a machine's
// power change, an error. GET /v1/events lists the most recent ones (a
// bounded ring: older events drop out); GET /v1/events/stream sends them
// as they happen, as server-sent events.
type Event struct {
	// Seq numbers events from 1 in the order they happened, per daemon
	// run; ?after=SEQ (or the stream's Last-Event-ID) skips the ones seen.
	Seq     int64     `json:"seq"`
	Time    time.Time `json:"time"`
	Level   string    `json:"level"` // INFO, WARN or ERROR
	Message string    `json:"message"`
	VM      string    `json:"vm,omitempty"`
	Job     string    `json:"job,omitempty"`
	// Fields are the log record's other attributes, as text.
	Fields map[string]string `json:"fields,omitempty"`
}

// The stream's server-sent event types: "event" carries an Event, "jobs"
// every job as GET /v1/jobs lists them (sent first), "job" one job whose
// state or progress changed since it was last sent.
const (
	StreamEvent = "event"
	StreamJobs  = "jobs"
	StreamJob   = "job"
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

// Events lists the events after seq (0: all the host still keeps).
func (c *Client) Events(ctx context.Context, after int64) ([]Event, error) {
	var v []Event
	return v, c.do(ctx, "GET", "/v1/events?after="+strconv.FormatInt(after, 10), nil, &v)
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
