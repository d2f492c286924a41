package api

import (
	"context"
	"fmt"
)

// AddDisk is the body of POST /v1/vms/{vm}/disks (Add-VMHardDiskDrive):
// a new dynamic VHDX of Size bytes in the machine's folder, or the
// existing VHDX file Path (absolute), as vm create's --disk and --attach.
// A running machine gets it hot-plugged.
type AddDisk struct {
	Size int64  `json:"size,omitempty"`
	Path string `json:"path,omitempty"`
}

// RemoveDisk says what DELETE /v1/vms/{vm}/disks/{index} may do
// (Remove-VMHardDiskDrive): the disk leaves the machine, unplugged first
// if it runs; its file stays unless Delete (files the daemon created
// only: an attached file is the user's).
type RemoveDisk struct {
	Delete bool `json:"delete,omitempty"`
}

// RemovedDisk is the reply to DELETE /v1/vms/{vm}/disks/{index}.
type RemovedDisk struct {
	VM      VM     `json:"vm"`
	Path    string `json:"path"`    // the file the disk ran on
	Deleted bool   `json:"deleted"` // removed (Delete), else kept
}

// AddDisk adds a disk to a machine; the reply shows it last.
func (c *Client) AddDisk(ctx context.Context, vm string, req AddDisk) (*VM, error) {
	var v VM
	return &v, c.do(ctx, "POST", "/v1/vms/"+esc(vm)+"/disks", req, &v)
}

// RemoveDisk removes disk index from a machine.
func (c *Client) RemoveDisk(ctx context.Context, vm string, index int, req RemoveDisk) (*RemovedDisk, error) {
	path := fmt.Sprintf("/v1/vms/%s/disks/%d", esc(vm), index)
	if req.Delete {
		path += "?delete=1"
	}
	var out RemovedDisk
	return &out, c.do(ctx, "DELETE", path, nil, &out)
}
