package api

import "context"

// ImportVM makes a machine of a Hyper-V VM folder: its VHDX and AVHDX
// files (in Dir or Dir/Virtual Hard Disks) become the machine's disks and
// checkpoint tree, rebuilt from the files' parent links.
type ImportVM struct {
	Name string `json:"name"`
	Dir  string `json:"dir"` // absolute: the daemon may run elsewhere
	// Copy copies the files into the daemon's folder for the machine and
	// links the copies to each other; otherwise they are used in place
	// (and from then on changed, merged and deleted by the daemon).
	Copy bool `json:"copy,omitempty"`
}

// ImportVM imports a Hyper-V VM folder as a machine.
func (c *Client) ImportVM(ctx context.Context, req ImportVM) (*VM, error) {
	var v VM
	return &v, c.do(ctx, "POST", "/v1/vms/import", req, &v)
}
