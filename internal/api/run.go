package api

import "context"

// Power states of a machine run by the daemon under QEMU (VM.Power).
const (
	PowerOff      = "off"
	PowerStarting = "starting"
	PowerRunning  = "running"
	PowerPaused   = "paused"
	PowerStopping = "stopping"
	// PowerSaved: QEMU ended after writing the machine's memory and device
	// state to a file (vm save, Save-VM); vm start goes on from it.
	PowerSaved = "saved"
	// PowerFailed: QEMU did not start or ended on its own with an error;
	// Runtime.Reason says why and Runtime.Log keeps QEMU's log.
	PowerFailed = "failed"
)

// Settings are how a machine runs: what vm create sets.
type Settings struct {
	MemoryMiB int    `json:"memory_mib"`
	CPUs      int    `json:"cpus"`
	Accel     string `json:"accel"` // auto, kvm or tcg
	// Direct kernel boot (QEMU's -kernel, -initrd, -append); without a
	// kernel the firmware boots from the first disk.
	Kernel string `json:"kernel,omitempty"`
	Initrd string `json:"initrd,omitempty"`
	Append string `json:"append,omitempty"`
	// Generation is the machine's hardware, as Hyper-V's: 1 boots BIOS
	// (SeaBIOS, QEMU's i440fx), 2 boots UEFI (OVMF, q35); 0, in a state
	// from before generations, is 1.
	Generation int `json:"generation,omitempty"`
	// CDROM is an ISO image the machine reads in its DVD drive
	// (read-only): an absolute path; "" is no drive.
	CDROM string `json:"cdrom,omitempty"`
	// Network is "none" (no adapter; "" too), "user" (QEMU's user-mode
	// NAT: the guest reaches out, nothing reaches in) or "bridge=BR" (a
	// tap on the host's bridge BR, made by qemu-bridge-helper).
	Network string `json:"network,omitempty"`
	// MAC is the network adapter's address, chosen at create (a random
	// locally administered one) so that machines on one bridge differ.
	MAC string `json:"mac,omitempty"`
}

// SetVM is the body of PATCH /v1/vms/{vm}: the settings to change; nil
// fields stay. A string set to "" clears it (Kernel, Initrd, Append,
// CDROM: none; Network: none; Accel: auto). The machine must be off:
// like Hyper-V's Set-VM, none of them changes on a running machine.
type SetVM struct {
	MemoryMiB  *int    `json:"memory_mib,omitempty"`
	CPUs       *int    `json:"cpus,omitempty"`
	Generation *int    `json:"generation,omitempty"`
	Accel      *string `json:"accel,omitempty"`
	Kernel     *string `json:"kernel,omitempty"`
	Initrd     *string `json:"initrd,omitempty"`
	Append     *string `json:"append,omitempty"`
	CDROM      *string `json:"cdrom,omitempty"`
	Network    *string `json:"network,omitempty"`
}

// Runtime is a running (or failed) machine's QEMU.
type Runtime struct {
	Pid     int    `json:"pid,omitempty"`
	Accel   string `json:"accel,omitempty"`   // the accelerator chosen
	QMP     string `json:"qmp,omitempty"`     // QMP unix socket
	Serial  string `json:"serial,omitempty"`  // the serial console's unix socket
	Console string `json:"console,omitempty"` // what the console printed
	Log     string `json:"log,omitempty"`     // QEMU's own output
	Reason  string `json:"reason,omitempty"`  // why it failed
}

// StopVM is the body of POST /v1/vms/{vm}/stop.
type StopVM struct {
	// TurnOff ends QEMU at once instead of pressing the ACPI power button
	// first (Stop-VM -TurnOff).
	TurnOff bool `json:"turn_off,omitempty"`
	// TimeoutSeconds is how long the guest has to power off after the
	// ACPI power button before it is turned off; 0 means 60.
	TimeoutSeconds int `json:"timeout_seconds,omitempty"`
}

// StartVM starts a machine under QEMU.
func (c *Client) StartVM(ctx context.Context, name string) (*VM, error) {
	var v VM
	return &v, c.do(ctx, "POST", "/v1/vms/"+esc(name)+"/start", nil, &v)
}

// StopVM powers a machine off (ACPI, then turned off) or turns it off.
func (c *Client) StopVM(ctx context.Context, name string, req StopVM) (*VM, error) {
	var v VM
	return &v, c.do(ctx, "POST", "/v1/vms/"+esc(name)+"/stop", req, &v)
}

// PauseVM stops a running machine's CPUs.
func (c *Client) PauseVM(ctx context.Context, name string) (*VM, error) {
	var v VM
	return &v, c.do(ctx, "POST", "/v1/vms/"+esc(name)+"/pause", nil, &v)
}

// ResumeVM runs a paused machine's CPUs again.
func (c *Client) ResumeVM(ctx context.Context, name string) (*VM, error) {
	var v VM
	return &v, c.do(ctx, "POST", "/v1/vms/"+esc(name)+"/resume", nil, &v)
}

// RestartVM resets a running or paused machine (system_reset): the guest
// reboots at once.
func (c *Client) RestartVM(ctx context.Context, name string) (*VM, error) {
	var v VM
	return &v, c.do(ctx, "POST", "/v1/vms/"+esc(name)+"/restart", nil, &v)
}

// SaveVM writes a running or paused machine's state to a file and ends
// its QEMU; StartVM goes on from it.
func (c *Client) SaveVM(ctx context.Context, name string) (*VM, error) {
	var v VM
	return &v, c.do(ctx, "POST", "/v1/vms/"+esc(name)+"/save", nil, &v)
}

// SetVM changes a machine's settings (Set-VM); it must be off.
func (c *Client) SetVM(ctx context.Context, name string, req SetVM) (*VM, error) {
	var v VM
	return &v, c.do(ctx, "PATCH", "/v1/vms/"+esc(name), req, &v)
}
