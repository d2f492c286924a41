package host

import (
	"fmt"

	"github.com/vhdkit/vhdkit/internal/api"
	"github.com/vhdkit/vhdkit/vhdx"
)

// OptimizeVM compacts the files of a running machine's disks, as
// Optimize-VHD does; Hyper-V needs the disk detached (or read-only
// mounted) for that, but the host owns the I/O path, so the guest keeps
// running: its I/O waits for one step of the work at a time. Only the
// files the disks run on change (a checkpoint's frozen files are left as
// they are). Checkpoint changes are refused meanwhile, and the call is
// refused while a checkpoint job runs on the machine.
func (h *Host) OptimizeVM(name string, req api.OptimizeVM) (*api.Optimized, error) {
	h.mu.Lock()
	v, err := h.checkpointable(name)
	if err != nil {
		h.mu.Unlock()
		return nil, err
	}
	v.optimizing = true
	disks := v.disks
	h.mu.Unlock()
	defer func() {
		h.mu.Lock()
		v.optimizing = false
		h.mu.Unlock()
	}()

	out := &api.Optimized{VM: name, Disks: []api.OptimizedDisk{}}
	for i, d := range disks {
		res, err := d.Optimize(vhdx.OptimizeOptions{Full: req.Full})
		if err != nil {
			return nil, fmt.Errorf("machine %s disk %d (%s): %w", name, i, d.Leaf(), err)
		}
		h.log.Info("disk optimized", "vm", name, "disk", i, "path", d.Leaf(), "before", res.SizeBefore, "after", res.SizeAfter, "released", res.Released, "moved", res.Moved)
		out.Disks = append(out.Disks, api.OptimizedDisk{Disk: i, Path: d.Leaf(), SizeBefore: res.SizeBefore, SizeAfter: res.SizeAfter, Released: res.Released, Moved: res.Moved})
	}
	return out, nil
}
