// Package vmm runs a machine under QEMU and controls it through QMP: it
// builds the command line (accelerator, memory, CPUs, direct kernel boot,
// the disks as NBD exports of the daemon with a reconnect delay, the
// serial console and QMP on unix sockets), starts QEMU in a session of
// its own so that the daemon's death leaves it running, and re-adopts a
// QEMU a previous daemon started from the pid and sockets it recorded.
//
// Files of one machine's run live in its run directory:
//
//	RUN/qmp.sock      QMP, for the daemon
//	RUN/serial.sock   the serial console (server; one client at a time)
//	RUN/qga.sock      the guest agent's channel (agent.go; one client at a time)
//	RUN/console.log   everything the serial console printed
//	RUN/qemu.log      QEMU's own stdout and stderr
package vmm

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"time"

	"github.com/digitalocean/go-qemu/qmp"
)

// Accelerators.
const (
	AccelAuto = "auto"
	AccelKVM  = "kvm"
	AccelTCG  = "tcg"
)

// QEMUBinary is the emulator vmm runs; Debian ships it in qemu-system-x86.
const QEMUBinary = "qemu-system-x86_64"

// FindQEMU finds QEMUBinary on $PATH, or says which package to install.
func FindQEMU() (string, error) {
	p, err := exec.LookPath(QEMUBinary)
	if err != nil {
		return "", fmt.Errorf("%s not found on $PATH: install it (Debian and Ubuntu: apt install qemu-system-x86)", QEMUBinary)
	}
	return p, nil
}

// ChooseAccel resolves want ("auto", "kvm", "tcg", or "" for auto). Auto
// takes KVM only where /dev/kvm opens read-write and the CPU offers
// hardware virtualization (vmx or svm in /proc/cpuinfo); else TCG. An
// explicit "kvm" that is not usable is an error that says why.
func ChooseAccel(want string) (string, error) {
	switch want {
	case "", AccelAuto:
		if kvmUsable() == nil {
			return AccelKVM, nil
		}
		return AccelTCG, nil
	case AccelKVM:
		if err := kvmUsable(); err != nil {
			return "", err
		}
		return AccelKVM, nil
	case AccelTCG:
		return AccelTCG, nil
	}
	return "", fmt.Errorf("accelerator %q: use auto, kvm or tcg", want)
}

func kvmUsable() error {
	f, err := os.OpenFile("/dev/kvm", os.O_RDWR, 0)
	if err != nil {
		return fmt.Errorf("KVM is not usable: %w", err)
	}
	f.Close()
	info, err := os.ReadFile("/proc/cpuinfo")
	if err != nil {
		return fmt.Errorf("KVM is not usable: %w", err)
	}
	for _, line := range strings.Split(string(info), "\n") {
		if !strings.HasPrefix(line, "flags") {
			continue
		}
		for _, f := range strings.Fields(line) {
			if f == "vmx" || f == "svm" {
				return nil
			}
		}
	}
	return errors.New("KVM is not usable: the CPU offers neither vmx nor svm")
}

// Disk is one of the machine's disks: an export of the daemon's NBD
// server.
type Disk struct {
	Socket string // the NBD server's unix socket
	Export string
}

// Config is what one run of a machine needs.
type Config struct {
	Name      string // the machine's name, for QEMU's -name
	RunDir    string // where the sockets and logs go (see the package comment)
	Accel     string // AccelKVM or AccelTCG (see ChooseAccel)
	MemoryMiB int
	CPUs      int
	Kernel    string // direct kernel boot: -kernel, -initrd, -append
	Initrd    string
	Append    string
	Disks     []Disk
	// Generation is Gen1 (BIOS, i440fx) or Gen2 (UEFI, q35); see
	// devices.go for the hardware of each.
	Generation int
	CDROM      string // an ISO image in the DVD drive; "" for no drive
	Network    string // NetworkNone ("" too), NetworkUser or NetworkBridge+BR
	MAC        string // the network adapter's address; "" lets QEMU choose
	// ReconnectDelay is how long QEMU holds a disk's I/O while the NBD
	// server is gone (a daemon restart) before failing it.
	ReconnectDelay time.Duration
	// Incoming is a state file SaveState wrote: QEMU loads it at start
	// (-incoming) and the guest goes on from the instant it was saved.
	Incoming string
}

// Process is a running QEMU: what a daemon records to re-adopt it.
type Process struct {
	Pid    int    `json:"pid"`
	QMP    string `json:"qmp"`
	Serial string `json:"serial"`
	Log    string `json:"log"`     // QEMU's stdout and stderr
	Cons   string `json:"console"` // the console's log
	// Agent is the guest agent's channel (agent.go); "" for a QEMU
	// started before machines had one.
	Agent string `json:"agent,omitempty"`
}

// Args renders the QEMU command line of c, without the program.
func (c *Config) Args() []string {
	qmpSock, serialSock, consLog := c.paths()
	args := []string{
		"-name", "vhdkit-" + c.Name,
		"-accel", c.Accel,
		"-m", fmt.Sprint(c.MemoryMiB),
		"-smp", fmt.Sprint(c.CPUs),
		"-nodefaults", "-no-user-config", "-display", "none",
		"-qmp", "unix:" + escape(qmpSock) + ",server=on,wait=off",
		"-chardev", "socket,id=serial0,path=" + escape(serialSock) + ",server=on,wait=off,logfile=" + escape(consLog) + ",logappend=on",
		"-serial", "chardev:serial0",
		// The guest agent's channel: a virtio-serial port qemu-ga finds by
		// name, on a socket the daemon dials.
		"-device", "virtio-serial-pci,id=vser0",
		"-chardev", "socket,id=qga0,path=" + escape(c.agentPath()) + ",server=on,wait=off",
		"-device", "virtserialport,bus=vser0.0,chardev=qga0,name=" + AgentPortName,
	}
	args = append(args, c.machineArgs()...)
	if c.Kernel != "" {
		args = append(args, "-kernel", c.Kernel)
		if c.Initrd != "" {
			args = append(args, "-initrd", c.Initrd)
		}
		if c.Append != "" {
			args = append(args, "-append", c.Append)
		}
	}
	if c.Incoming != "" {
		args = append(args, "-incoming", "exec:cat "+shellQuote(c.Incoming))
	}
	return append(args, c.diskArgs()...)
}

func (c *Config) agentPath() string { return filepath.Join(c.RunDir, "qga.sock") }

func (c *Config) paths() (qmpSock, serialSock, consLog string) {
	return filepath.Join(c.RunDir, "qmp.sock"), filepath.Join(c.RunDir, "serial.sock"), filepath.Join(c.RunDir, "console.log")
}

// escape doubles the commas of a QEMU option value.
func escape(s string) string { return strings.ReplaceAll(s, ",", ",,") }

// startTimeout bounds the wait for QEMU's QMP socket to answer.
const startTimeout = 30 * time.Second

// Start starts QEMU for c in a session of its own (a signal to the
// daemon's process group, or its death, does not reach it) and waits until
// its QMP socket answers. exited receives QEMU's exit once it ends (the
// daemon that started it reaps it; a daemon that re-adopts it polls).
func Start(ctx context.Context, c Config) (p *Process, exited <-chan error, err error) {
	bin, err := FindQEMU()
	if err != nil {
		return nil, nil, err
	}
	if c.MemoryMiB <= 0 || c.CPUs <= 0 {
		return nil, nil, fmt.Errorf("machine %s: memory %d MiB and %d CPUs: both must be positive", c.Name, c.MemoryMiB, c.CPUs)
	}
	if c.Generation == 0 {
		c.Generation = Gen1
	}
	if err := c.checkDevices(); err != nil {
		return nil, nil, err
	}
	if err := os.MkdirAll(c.RunDir, 0o700); err != nil {
		return nil, nil, err
	}
	if err := c.prepareFirmware(); err != nil {
		return nil, nil, err
	}
	qmpSock, serialSock, consLog := c.paths()
	// Sockets a previous run left would make QEMU fail to bind.
	for _, s := range []string{qmpSock, serialSock, c.agentPath()} {
		if err := os.Remove(s); err != nil && !errors.Is(err, os.ErrNotExist) {
			return nil, nil, err
		}
	}
	logPath := filepath.Join(c.RunDir, "qemu.log")
	logf, err := os.OpenFile(logPath, os.O_WRONLY|os.O_CREATE|os.O_TRUNC, 0o600)
	if err != nil {
		return nil, nil, err
	}
	defer logf.Close()
	cmd := exec.Command(bin, c.Args()...)
	cmd.Stdout, cmd.Stderr = logf, logf
	cmd.Dir = c.RunDir
	cmd.SysProcAttr = &syscall.SysProcAttr{Setsid: true}
	if err := cmd.Start(); err != nil {
		return nil, nil, fmt.Errorf("starting %s: %w", bin, err)
	}
	done := make(chan error, 1)
	go func() { done <- cmd.Wait() }()
	p = &Process{Pid: cmd.Process.Pid, QMP: qmpSock, Serial: serialSock, Log: logPath, Cons: consLog, Agent: c.agentPath()}
	deadline := time.Now().Add(startTimeout)
	for {
		_, err := p.Status(ctx)
		if err == nil {
			return p, done, nil
		}
		select {
		case werr := <-done:
			return nil, nil, fmt.Errorf("QEMU exited at start (%v): %s%s", werr, p.LogTail(), c.startHint())
		case <-ctx.Done():
			cmd.Process.Kill()
			return nil, nil, ctx.Err()
		case <-time.After(50 * time.Millisecond):
		}
		if time.Now().After(deadline) {
			cmd.Process.Kill()
			return nil, nil, fmt.Errorf("QEMU's QMP socket did not answer in %v: %v; %s", startTimeout, err, p.LogTail())
		}
	}
}

// LogTail is the end of QEMU's log, on one line, for an error message.
func (p *Process) LogTail() string {
	b, _ := os.ReadFile(p.Log)
	b = bytes.TrimSpace(b)
	if len(b) > 400 {
		b = b[len(b)-400:]
	}
	if len(b) == 0 {
		return "QEMU's log is empty"
	}
	return "QEMU's log: " + strings.ReplaceAll(string(b), "\n", " | ")
}

// Alive reports whether the recorded pid is still this QEMU: the process
// exists, its executable is QEMUBinary and it serves QMP on p.QMP (a pid
// reused after QEMU ended, even by another QEMU, does not count).
func (p *Process) Alive() bool {
	if p == nil || p.Pid <= 0 {
		return false
	}
	if err := syscall.Kill(p.Pid, 0); err != nil && !errors.Is(err, syscall.EPERM) {
		return false
	}
	cmdline, err := os.ReadFile(fmt.Sprintf("/proc/%d/cmdline", p.Pid))
	if err != nil {
		return false
	}
	argv0, _, _ := bytes.Cut(cmdline, []byte{0})
	if filepath.Base(string(argv0)) != QEMUBinary || !bytes.Contains(cmdline, []byte("unix:"+escape(p.QMP)+",")) {
		return false // another program, or another machine's QEMU
	}
	// A zombie (our child, exited, not yet reaped) is not running.
	stat, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", p.Pid))
	if err != nil {
		return false
	}
	if i := bytes.LastIndexByte(stat, ')'); i >= 0 && i+2 < len(stat) && stat[i+2] == 'Z' {
		return false
	}
	return true
}

// qmpTimeout bounds one QMP exchange: connect, handshake, command.
const qmpTimeout = 10 * time.Second

// Execute runs one QMP command on a connection of its own (QEMU's QMP
// socket serves one client at a time; the daemon holds none between
// commands, so a restarted daemon finds it free) and returns the
// command's "return" value.
func (p *Process) Execute(ctx context.Context, command string, args any) (json.RawMessage, error) {
	ctx, cancel := context.WithTimeout(ctx, qmpTimeout)
	defer cancel()
	mon, err := qmp.NewSocketMonitor("unix", p.QMP, qmpTimeout)
	if err != nil {
		return nil, fmt.Errorf("QMP %s: %w", p.QMP, err)
	}
	type result struct {
		out []byte
		err error
	}
	res := make(chan result, 1)
	go func() {
		if err := mon.Connect(); err != nil {
			res <- result{err: fmt.Errorf("QMP handshake: %w", err)}
			return
		}
		cmd, err := json.Marshal(qmp.Command{Execute: command, Args: args})
		if err != nil {
			res <- result{err: err}
			return
		}
		out, err := mon.Run(cmd)
		res <- result{out, err}
	}()
	var r result
	select {
	case r = <-res:
	case <-ctx.Done():
		// Closing the connection ends the exchange under way.
		mon.Disconnect()
		<-res
		return nil, fmt.Errorf("QMP %s: no answer in %v", command, qmpTimeout)
	}
	mon.Disconnect()
	if r.err != nil {
		return nil, fmt.Errorf("QMP %s: %w", command, r.err)
	}
	var reply struct {
		Return json.RawMessage `json:"return"`
	}
	if err := json.Unmarshal(r.out, &reply); err != nil {
		return nil, fmt.Errorf("QMP %s: reply %q: %w", command, r.out, err)
	}
	return reply.Return, nil
}

// Status is QEMU's run state (query-status): "running", "paused",
// "shutdown", "internal-error", ...
func (p *Process) Status(ctx context.Context) (string, error) {
	out, err := p.Execute(ctx, "query-status", nil)
	if err != nil {
		return "", err
	}
	var st struct {
		Status string `json:"status"`
	}
	if err := json.Unmarshal(out, &st); err != nil {
		return "", fmt.Errorf("QMP query-status: %w", err)
	}
	return st.Status, nil
}

// Pause stops the guest's CPUs (QMP stop).
func (p *Process) Pause(ctx context.Context) error {
	_, err := p.Execute(ctx, "stop", nil)
	return err
}

// Resume runs the guest's CPUs again (QMP cont).
func (p *Process) Resume(ctx context.Context) error {
	_, err := p.Execute(ctx, "cont", nil)
	return err
}

// Powerdown presses the ACPI power button: a guest that handles it shuts
// down and QEMU exits.
func (p *Process) Powerdown(ctx context.Context) error {
	_, err := p.Execute(ctx, "system_powerdown", nil)
	return err
}

// Quit ends QEMU at once (turning the machine off: the guest gets no say,
// what it had not flushed is lost) and waits for the process to go.
func (p *Process) Quit(ctx context.Context) error {
	if _, err := p.Execute(ctx, "quit", nil); err != nil && p.Alive() {
		// QMP does not answer: the process goes anyway.
		syscall.Kill(p.Pid, syscall.SIGKILL)
	}
	return p.WaitGone(ctx, qmpTimeout)
}

// WaitGone waits until the process is no longer a running QEMU, or
// timeout passes.
func (p *Process) WaitGone(ctx context.Context, timeout time.Duration) error {
	deadline := time.Now().Add(timeout)
	for p.Alive() {
		if time.Now().After(deadline) {
			return fmt.Errorf("QEMU (pid %d) still runs after %v", p.Pid, timeout)
		}
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(50 * time.Millisecond):
		}
	}
	return nil
}

// Reset resets the machine as its reset button would (QMP system_reset):
// the guest reboots at once, without being asked (an ACPI reboot request
// needs a guest that handles it; this, like Restart-VM -Force, does not).
// What the guest had not written to its disks is lost.
func (p *Process) Reset(ctx context.Context) error {
	_, err := p.Execute(ctx, "system_reset", nil)
	return err
}

// migratePoll is how often a migration's progress is asked for.
const migratePoll = 50 * time.Millisecond

// SaveState writes the machine's memory and device state to file (QEMU's
// migration stream, "exec:cat > FILE": the file: URI needs QEMU 8.2) and
// waits until the stream is complete. The caller pauses the machine
// first, so that the state is of one instant, and ends QEMU after. The
// disks are not in the stream: a machine started from it must find them
// as they were.
func (p *Process) SaveState(ctx context.Context, file string) error {
	// No bandwidth cap (the default is 32 MiB/s): the guest is paused, the
	// sooner the stream is written the better.
	if _, err := p.Execute(ctx, "migrate-set-parameters", map[string]any{"max-bandwidth": int64(1) << 40}); err != nil {
		return err
	}
	// The guest's memory is its owner's only: the file is made 0600
	// before the shell's redirection (which would use its umask) opens it.
	f, err := os.OpenFile(file, os.O_WRONLY|os.O_CREATE|os.O_TRUNC, 0o600)
	if err != nil {
		return err
	}
	f.Close()
	if err := os.Chmod(file, 0o600); err != nil {
		return err
	}
	if _, err := p.Execute(ctx, "migrate", map[string]any{"uri": "exec:cat > " + shellQuote(file)}); err != nil {
		return err
	}
	for {
		out, err := p.Execute(ctx, "query-migrate", nil)
		if err != nil {
			return err
		}
		var st struct {
			Status    string `json:"status"`
			ErrorDesc string `json:"error-desc"`
		}
		if err := json.Unmarshal(out, &st); err != nil {
			return fmt.Errorf("QMP query-migrate: %w", err)
		}
		switch st.Status {
		case "completed":
			return nil
		case "failed", "cancelled":
			return fmt.Errorf("saving the machine's state to %s: migration %s: %s", file, st.Status, st.ErrorDesc)
		}
		select {
		case <-ctx.Done():
			p.Execute(context.WithoutCancel(ctx), "migrate_cancel", nil)
			return ctx.Err()
		case <-time.After(migratePoll):
		}
	}
}

// WaitIncoming waits until a QEMU started with Config.Incoming has loaded
// the saved state ("inmigrate" no longer) and returns the run state it
// reached ("running" once it goes on).
func (p *Process) WaitIncoming(ctx context.Context, timeout time.Duration) (string, error) {
	deadline := time.Now().Add(timeout)
	for {
		st, err := p.Status(ctx)
		if err != nil {
			return "", err
		}
		if st != "inmigrate" {
			return st, nil
		}
		if time.Now().After(deadline) {
			return st, fmt.Errorf("QEMU still loads the saved state after %v", timeout)
		}
		select {
		case <-ctx.Done():
			return st, ctx.Err()
		case <-time.After(migratePoll):
		}
	}
}

// shellQuote quotes s for sh, which runs an exec: migration's command.
func shellQuote(s string) string { return "'" + strings.ReplaceAll(s, "'", `'\''`) + "'" }
