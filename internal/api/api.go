// Package api is the vhdkit daemon's management API as its clients see it:
// the JSON documents it exchanges and a client for the HTTP API the daemon
// serves on the unix socket DIR/vhdkit.sock.
//
// Routes (JSON bodies; errors are {"error": "..."} with a 4xx or 5xx status):
//
//	GET    /v1/vms                                list machines
//	POST   /v1/vms                                create (CreateVM)
//	POST   /v1/vms/import                         import a Hyper-V VM folder (ImportVM)
//	GET    /v1/vms/{vm}                           one machine
//	PATCH  /v1/vms/{vm}                           change its settings while off (SetVM)
//	POST   /v1/vms/{vm}/disks                     add a disk, hot-plugged if it runs (AddDisk)
//	DELETE /v1/vms/{vm}/disks/{i}                 remove disk i (?delete=1): RemovedDisk
//	DELETE /v1/vms/{vm}                           delete it (?force=1, ?delete_disks=1): DeletedVM
//	POST   /v1/vms/{vm}/repair                    re-open a failed machine (RepairVM)
//	POST   /v1/vms/{vm}/optimize                  compact its disks' files (OptimizeVM)
//	POST   /v1/vms/{vm}/start|stop|pause|resume   run it under QEMU (stop: StopVM)
//	GET    /v1/vms/{vm}/checkpoints               the checkpoint tree
//	POST   /v1/vms/{vm}/checkpoints               create (CreateCheckpoint)
//	PATCH  /v1/vms/{vm}/checkpoints/{cp}          rename (RenameCheckpoint)
//	POST   /v1/vms/{vm}/checkpoints/{cp}/apply    revert to it (ApplyCheckpoint)
//	POST   /v1/vms/{vm}/checkpoints/{cp}/export   flatten it (ExportCheckpoint)
//	DELETE /v1/vms/{vm}/checkpoints/{cp}          delete: starts a merge job (?subtree=1, ?bandwidth=N)
//
// A checkpoint {cp} is its name, or its ID ("cp-3"): no name has the form
// of an ID, so neither can be taken for the other.
//
//	GET    /v1/jobs, /v1/jobs/{id}                jobs
//	POST   /v1/jobs/{id}/pause|resume|cancel      control a job
//	PATCH  /v1/jobs/{id}                          set its bandwidth (SetJob)
//	GET    /v1/vms/{vm}/disks/{disk}              a disk's files and map (DiskDetails; ?map=1)
//	GET    /v1/events                             what the host did (Event; ?after=SEQ)
//	GET    /v1/events/stream                      the same, and job progress, as server-sent events
package api

import "time"

// Machine states: whether its disks are served. Whether QEMU runs it is
// its power state (Power).
const (
	// VMServing: the machine's disks are open and exported.
	VMServing = "serving"
	// VMFailed: a disk could not be opened (a file missing, damaged or
	// locked by another program); Error says why. Its exports are absent;
	// "vhdkit vm repair" retries or re-attaches a moved file.
	VMFailed = "failed"
)

// VM is a machine: its disks and where it is in its checkpoint tree.
type VM struct {
	Name    string    `json:"name"`
	Created time.Time `json:"created"`
	State   string    `json:"state"`           // VMServing or VMFailed
	Error   string    `json:"error,omitempty"` // why it failed
	Disks   []Disk    `json:"disks"`
	// Current is the ID of the checkpoint the running state continues
	// from, CurrentName its name; empty before the first checkpoint.
	Current     string `json:"current,omitempty"`
	CurrentName string `json:"current_name,omitempty"`
	Checkpoints int    `json:"checkpoints"`
	// Disconnected counts the NBD clients a forced request disconnected.
	Disconnected int `json:"disconnected,omitempty"`
	// Power is whether the daemon runs it under QEMU (PowerOff, ...);
	// Settings how, Runtime the QEMU it runs (see run.go).
	Power    string    `json:"power"`
	Settings *Settings `json:"settings,omitempty"`
	Runtime  *Runtime  `json:"runtime,omitempty"`
}

// Disk is one of a machine's disks.
type Disk struct {
	Index  int    `json:"index"`
	Export string `json:"export,omitempty"` // NBD export name; none while the machine is failed
	Size   int64  `json:"size"`
	// Path is the file the disk runs on now; Chain is its chain of files,
	// Path first (empty while the machine is failed).
	Path     string   `json:"path"`
	Chain    []string `json:"chain"`
	Attached bool     `json:"attached,omitempty"` // an existing file: kept when the machine is deleted
}

// Checkpoint is a node of a machine's checkpoint tree.
type Checkpoint struct {
	ID      string    `json:"id"` // "cp-N"
	Name    string    `json:"name"`
	Parent  string    `json:"parent,omitempty"` // parent checkpoint's ID
	Created time.Time `json:"created"`
	Files   []string  `json:"files"` // the frozen file of each disk
	// Current is set on the checkpoint the running state continues from.
	Current bool `json:"current,omitempty"`
	// Type is how it was taken: CheckpointProduction, CheckpointStandard
	// or CheckpointCrash (checkpoints from before types are crash).
	Type string `json:"type"`
	// StunMS is how long the guest was frozen (production) or paused
	// (standard) for it, or its disks' I/O held (crash: its CPUs ran
	// on), in milliseconds.
	StunMS float64 `json:"stun_ms,omitempty"`
	// StateFile is a standard checkpoint's memory and device state.
	StateFile string `json:"state_file,omitempty"`
	// Frozen is how many file systems the guest agent froze
	// (production), AgentStatus what the agent reported while the disks
	// switched ("frozen").
	Frozen      int    `json:"frozen_filesystems,omitempty"`
	AgentStatus string `json:"agent_status,omitempty"`
	// Note says why the type is not the one asked for (the agent did
	// not answer, the machine is off).
	Note string `json:"note,omitempty"`
}

// Checkpoints is a machine's tree, in creation order.
type Checkpoints struct {
	VM          string       `json:"vm"`
	Current     string       `json:"current,omitempty"` // ID of the checkpoint the running state continues from
	Checkpoints []Checkpoint `json:"checkpoints"`
}

// Job states.
const (
	JobQueued     = "queued"
	JobRunning    = "running"
	JobPaused     = "paused"
	JobCompleting = "completing"
	JobDone       = "done"
	JobFailed     = "failed"
	JobCanceled   = "canceled"
)

// Job is a checkpoint deletion: the merges it takes, as a state machine.
type Job struct {
	ID         string `json:"id"`
	Kind       string `json:"kind"` // "delete-checkpoint"
	VM         string `json:"vm"`
	Checkpoint string `json:"checkpoint"` // name at the time of the request
	// CheckpointID is the checkpoint's ID.
	CheckpointID string `json:"checkpoint_id,omitempty"`
	Subtree      bool   `json:"subtree,omitempty"`
	State        string `json:"state"`
	// Reason says why a job is paused or failed, or what a cancel did.
	Reason string `json:"reason,omitempty"`
	// Done and Total are bytes merged and to merge; Done never decreases,
	// also across a daemon crash (a copy that starts over after one is
	// counted from where Done stood).
	Done      int64 `json:"done"`
	Total     int64 `json:"total"`
	Bandwidth int64 `json:"bandwidth,omitempty"` // bytes per second, 0: unlimited
	// ETA is the time left in seconds at the rate measured over the last
	// few seconds; 0 when unknown.
	ETA float64 `json:"eta_seconds,omitempty"`
	// StallMS is the longest time guest I/O was held while a disk
	// switched from the merged file to its parent, in milliseconds.
	StallMS float64 `json:"stall_ms,omitempty"`
	// Cloned, KernelCopied and Copied say how the merges' data went:
	// block clones (XFS, btrfs), copies in the kernel (copy_file_range),
	// copies through memory.
	Cloned       int64     `json:"cloned,omitempty"`
	KernelCopied int64     `json:"kernel_copied,omitempty"`
	Copied       int64     `json:"copied,omitempty"`
	Created      time.Time `json:"created"`
	Updated      time.Time `json:"updated"`
}

// Finished reports whether the job has reached a final state.
func (j *Job) Finished() bool {
	return j.State == JobDone || j.State == JobFailed || j.State == JobCanceled
}

// CreateVM is the body of POST /v1/vms: new dynamic VHDX disks of the
// given sizes, or existing files attached.
type CreateVM struct {
	Name   string   `json:"name"`
	Disks  []int64  `json:"disks,omitempty"`
	Attach []string `json:"attach,omitempty"`
	// Settings are how it runs; nil takes the defaults.
	Settings *Settings `json:"settings,omitempty"`
}

// CreateCheckpoint is the body of POST /v1/vms/{vm}/checkpoints.
type CreateCheckpoint struct {
	Name string `json:"name,omitempty"` // default: a timestamp
	// Type is CheckpointProduction (the default), CheckpointStandard or
	// CheckpointCrash. A production checkpoint whose agent does not
	// answer in time is taken standard, unless ProductionOnly (then it
	// fails and nothing changes). A machine that is off gets a crash
	// checkpoint whatever the type, with a Note saying so.
	Type           string `json:"type,omitempty"`
	ProductionOnly bool   `json:"production_only,omitempty"`
}

// RenameCheckpoint is the body of PATCH /v1/vms/{vm}/checkpoints/{cp}.
type RenameCheckpoint struct {
	Name string `json:"name"`
}

// ApplyCheckpoint is the body of POST .../apply.
type ApplyCheckpoint struct {
	// Save checkpoints the current state first instead of discarding it.
	Save     bool   `json:"save,omitempty"`
	SaveName string `json:"save_name,omitempty"`
	// Force disconnects the machine's NBD clients first; without it, an
	// apply with clients connected is refused (the disk would change
	// under them).
	Force bool `json:"force,omitempty"`
}

// DeleteVM says what DELETE /v1/vms/{vm} may do.
type DeleteVM struct {
	// Force disconnects the machine's NBD clients; without it, a machine
	// with clients connected is not deleted.
	Force bool
	// DeleteDisks lets the files the daemon created for the machine go
	// (its disks and checkpoints); without it, a machine that has such
	// files is not deleted. Attached files are always kept.
	DeleteDisks bool
}

// DeletedVM is the reply to DELETE /v1/vms/{vm}.
type DeletedVM struct {
	Name         string   `json:"name"`
	Removed      []string `json:"removed"` // files removed
	Kept         []string `json:"kept"`    // attached files, left in place
	Disconnected int      `json:"disconnected,omitempty"`
}

// OptimizeVM is the body of POST /v1/vms/{vm}/optimize.
type OptimizeVM struct {
	// Full also releases blocks that read as zeros and moves blocks down
	// so the files can be cut (Optimize-VHD -Mode Full); otherwise only
	// space already released is given back (-Mode Quick).
	Full bool `json:"full,omitempty"`
}

// Optimized is what POST /v1/vms/{vm}/optimize did, disk by disk.
type Optimized struct {
	VM    string          `json:"vm"`
	Disks []OptimizedDisk `json:"disks"`
}

// OptimizedDisk is one disk's file before and after.
type OptimizedDisk struct {
	Disk       int    `json:"disk"`
	Path       string `json:"path"`
	SizeBefore int64  `json:"size_before"`
	SizeAfter  int64  `json:"size_after"`
	Released   int    `json:"blocks_released"`
	Moved      int    `json:"blocks_moved"`
}

// RepairVM is the body of POST /v1/vms/{vm}/repair. Empty, it retries
// opening a failed machine's disks.
type RepairVM struct {
	// Path re-attaches disk Disk to a file that moved: the file the disk
	// runs on (a leaf .avhdx must be a child of the checkpoint's file;
	// a disk without checkpoints accepts any file of its size that opens).
	Disk *int   `json:"disk,omitempty"`
	Path string `json:"path,omitempty"`
	// DropCheckpoint removes a checkpoint whose files are lost from the
	// tree, with its descendants; a machine that ran from it continues
	// from the checkpoint's parent (what was written since is lost).
	DropCheckpoint string `json:"drop_checkpoint,omitempty"`
}

// ExportCheckpoint is the body of POST .../export.
type ExportCheckpoint struct {
	Dir string `json:"dir"`
}

// Exported lists the files an export wrote.
type Exported struct {
	Files []string `json:"files"`
}

// SetJob is the body of PATCH /v1/jobs/{id}.
type SetJob struct {
	Bandwidth *int64 `json:"bandwidth,omitempty"`
}

// Error is the body of every error response.
type Error struct {
	Error string `json:"error"`
}
