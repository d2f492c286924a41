package api

// Checkpoint types (Hyper-V's checkpoint types; CreateCheckpoint.Type,
// Checkpoint.Type).
const (
	// CheckpointProduction: the guest's file systems are frozen through
	// its agent (QEMU's guest agent) while the disks switch, so the
	// checkpoint holds them as after a clean sync: what a backup wants.
	// Applying one leaves the machine off; it boots from the disks.
	CheckpointProduction = "production"
	// CheckpointStandard: the machine is paused and its memory and device
	// state saved with the checkpoint (a file beside its disks) while the
	// disks switch. Applying one runs the machine on from that instant.
	CheckpointStandard = "standard"
	// CheckpointCrash: the disks switch at one instant, the guest unaware:
	// the checkpoint holds them as after a power cut. The only kind of a
	// machine that is off (whose disks no guest changes).
	CheckpointCrash = "crash"
)

// PowerCheckpointing is the power state of a running or paused machine
// while a production or standard checkpoint waits on its guest agent or
// saves its memory: its power and disks cannot change meanwhile (stop,
// save, pause, another checkpoint are refused). It goes back to what it
// was when the checkpoint ends.
const PowerCheckpointing = "checkpointing"
