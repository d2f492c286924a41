package api

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/url"
	"os"
	"path/filepath"
	"strconv"
	"syscall"
)

// SocketName is the API socket's name inside the data directory.
const SocketName = "vhdkit.sock"

// LockName is the file in the data directory the daemon holds an
// exclusive flock on while it runs.
const LockName = "lock"

// RootDataDir is the data directory of a daemon run by root when neither
// --data nor VHDKIT_DATA names one.
const RootDataDir = "/var/lib/vhdkit"

// DataDir chooses the daemon's data directory as "vhdkit serve" and every
// client do: flag (--data) if set, then $VHDKIT_DATA, then the system
// default: RootDataDir for root, otherwise $XDG_STATE_HOME/vhdkit
// ($HOME/.local/state/vhdkit when XDG_STATE_HOME is unset). how says
// which rule chose it, for messages.
func DataDir(flag string) (dir, how string) {
	return dataDir(flag, os.Getenv, os.Geteuid())
}

// dataDir is DataDir with the environment and effective user ID given.
func dataDir(flag string, getenv func(string) string, euid int) (dir, how string) {
	switch {
	case flag != "":
		return flag, "from --data"
	case getenv("VHDKIT_DATA") != "":
		return getenv("VHDKIT_DATA"), "from $VHDKIT_DATA"
	case euid == 0:
		return RootDataDir, "the default for root"
	case filepath.IsAbs(getenv("XDG_STATE_HOME")):
		// The XDG spec says to ignore a relative path.
		return filepath.Join(getenv("XDG_STATE_HOME"), "vhdkit"), "the default, $XDG_STATE_HOME/vhdkit"
	case getenv("HOME") != "":
		return filepath.Join(getenv("HOME"), ".local", "state", "vhdkit"), "the default, ~/.local/state/vhdkit"
	}
	// No home: a relative name, which the messages name in full.
	return "vhdkit-data", "the default without $HOME"
}

// Held reports whether a daemon holds the data directory dir (its lock),
// whether or not it answers on its socket.
func Held(dir string) bool {
	f, err := os.Open(filepath.Join(dir, LockName))
	if err != nil {
		return false
	}
	defer f.Close()
	if err := syscall.Flock(int(f.Fd()), syscall.LOCK_SH|syscall.LOCK_NB); err != nil {
		return errors.Is(err, syscall.EWOULDBLOCK)
	}
	syscall.Flock(int(f.Fd()), syscall.LOCK_UN)
	return false
}

// Client talks to a daemon. Its zero value uses the data directory
// DataDir("") chooses.
type Client struct {
	DataDir string
	hc      *http.Client
}

// StatusError is an error response from the daemon.
type StatusError struct {
	Status  int
	Message string
}

func (e *StatusError) Error() string { return e.Message }

// ErrNoDaemon reports that no daemon listens on the data directory.
var ErrNoDaemon = errors.New("no vhdkit daemon is running")

func (c *Client) socket() string {
	dir, _ := DataDir(c.DataDir)
	return filepath.Join(dir, SocketName)
}

// noDaemon explains a failed connection: the directory tried and how it
// was chosen, and how to start a daemon there unless one holds it (a
// second daemon on the same files is never the answer).
func (c *Client) noDaemon() error {
	dir, how := DataDir(c.DataDir)
	abs, err := filepath.Abs(dir)
	if err != nil {
		abs = dir
	}
	if Held(dir) {
		return fmt.Errorf("%w that answers on %s: a daemon holds %s (%s) but its API socket does not accept connections; check its log, or stop and restart it",
			ErrNoDaemon, filepath.Join(abs, SocketName), abs, how)
	}
	return fmt.Errorf("%w on %s (%s); start one with \"vhdkit serve --data %s\", or name another directory with --data or $VHDKIT_DATA",
		ErrNoDaemon, abs, how, abs)
}

func (c *Client) http() *http.Client {
	if c.hc == nil {
		sock := c.socket()
		c.hc = &http.Client{Transport: &http.Transport{
			DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
				var d net.Dialer
				return d.DialContext(ctx, "unix", sock)
			},
		}}
	}
	return c.hc
}

// do sends a request with body in (nil for none) and decodes the reply
// into out (nil to discard it).
func (c *Client) do(ctx context.Context, method, path string, in, out any) error {
	var body io.Reader
	if in != nil {
		b, err := json.Marshal(in)
		if err != nil {
			return err
		}
		body = bytes.NewReader(b)
	}
	req, err := http.NewRequestWithContext(ctx, method, "http://vhdkit"+path, body)
	if err != nil {
		return err
	}
	if in != nil {
		req.Header.Set("Content-Type", "application/json")
	}
	resp, err := c.http().Do(req)
	if err != nil {
		if errors.Is(err, syscall.ENOENT) || errors.Is(err, syscall.ECONNREFUSED) {
			return c.noDaemon()
		}
		return err
	}
	defer resp.Body.Close()
	if resp.StatusCode >= 300 {
		var e Error
		b, _ := io.ReadAll(io.LimitReader(resp.Body, 1<<20))
		if json.Unmarshal(b, &e) != nil || e.Error == "" {
			e.Error = fmt.Sprintf("%s: %s", resp.Status, bytes.TrimSpace(b))
		}
		return &StatusError{Status: resp.StatusCode, Message: e.Error}
	}
	if out == nil {
		return nil
	}
	return json.NewDecoder(resp.Body).Decode(out)
}

func esc(s string) string { return url.PathEscape(s) }

func (c *Client) VMs(ctx context.Context) ([]VM, error) {
	var v []VM
	return v, c.do(ctx, "GET", "/v1/vms", nil, &v)
}

func (c *Client) CreateVM(ctx context.Context, req CreateVM) (*VM, error) {
	var v VM
	return &v, c.do(ctx, "POST", "/v1/vms", req, &v)
}

func (c *Client) VM(ctx context.Context, name string) (*VM, error) {
	var v VM
	return &v, c.do(ctx, "GET", "/v1/vms/"+esc(name), nil, &v)
}

// DeleteVM deletes a machine; see DeleteVM for what opts allow.
func (c *Client) DeleteVM(ctx context.Context, name string, opts DeleteVM) (*DeletedVM, error) {
	q := url.Values{}
	if opts.Force {
		q.Set("force", "1")
	}
	if opts.DeleteDisks {
		q.Set("delete_disks", "1")
	}
	var v DeletedVM
	return &v, c.do(ctx, "DELETE", "/v1/vms/"+esc(name)+"?"+q.Encode(), nil, &v)
}

// OptimizeVM compacts the files of a machine's disks while it runs.
func (c *Client) OptimizeVM(ctx context.Context, name string, req OptimizeVM) (*Optimized, error) {
	var v Optimized
	return &v, c.do(ctx, "POST", "/v1/vms/"+esc(name)+"/optimize", req, &v)
}

// RepairVM retries opening a failed machine, after the change req asks for.
func (c *Client) RepairVM(ctx context.Context, name string, req RepairVM) (*VM, error) {
	var v VM
	return &v, c.do(ctx, "POST", "/v1/vms/"+esc(name)+"/repair", req, &v)
}

func (c *Client) Checkpoints(ctx context.Context, vm string) (*Checkpoints, error) {
	var v Checkpoints
	return &v, c.do(ctx, "GET", "/v1/vms/"+esc(vm)+"/checkpoints", nil, &v)
}

func (c *Client) CreateCheckpoint(ctx context.Context, vm string, req CreateCheckpoint) (*Checkpoint, error) {
	var v Checkpoint
	return &v, c.do(ctx, "POST", "/v1/vms/"+esc(vm)+"/checkpoints", req, &v)
}

func (c *Client) RenameCheckpoint(ctx context.Context, vm, cp, name string) (*Checkpoint, error) {
	var v Checkpoint
	return &v, c.do(ctx, "PATCH", "/v1/vms/"+esc(vm)+"/checkpoints/"+esc(cp), RenameCheckpoint{Name: name}, &v)
}

func (c *Client) ApplyCheckpoint(ctx context.Context, vm, cp string, req ApplyCheckpoint) (*VM, error) {
	var v VM
	return &v, c.do(ctx, "POST", "/v1/vms/"+esc(vm)+"/checkpoints/"+esc(cp)+"/apply", req, &v)
}

func (c *Client) ExportCheckpoint(ctx context.Context, vm, cp, dir string) (*Exported, error) {
	var v Exported
	return &v, c.do(ctx, "POST", "/v1/vms/"+esc(vm)+"/checkpoints/"+esc(cp)+"/export", ExportCheckpoint{Dir: dir}, &v)
}

// DeleteCheckpoint starts the job that deletes a checkpoint (and its
// subtree), merging as the tree rules require; bandwidth 0 is unlimited.
func (c *Client) DeleteCheckpoint(ctx context.Context, vm, cp string, subtree bool, bandwidth int64) (*Job, error) {
	q := url.Values{}
	if subtree {
		q.Set("subtree", "1")
	}
	if bandwidth > 0 {
		q.Set("bandwidth", strconv.FormatInt(bandwidth, 10))
	}
	var v Job
	return &v, c.do(ctx, "DELETE", "/v1/vms/"+esc(vm)+"/checkpoints/"+esc(cp)+"?"+q.Encode(), nil, &v)
}

func (c *Client) Jobs(ctx context.Context) ([]Job, error) {
	var v []Job
	return v, c.do(ctx, "GET", "/v1/jobs", nil, &v)
}

func (c *Client) Job(ctx context.Context, id string) (*Job, error) {
	var v Job
	return &v, c.do(ctx, "GET", "/v1/jobs/"+esc(id), nil, &v)
}

// ControlJob pauses, resumes or cancels a job (action is one of those).
func (c *Client) ControlJob(ctx context.Context, id, action string) (*Job, error) {
	var v Job
	return &v, c.do(ctx, "POST", "/v1/jobs/"+esc(id)+"/"+action, nil, &v)
}

func (c *Client) SetJob(ctx context.Context, id string, req SetJob) (*Job, error) {
	var v Job
	return &v, c.do(ctx, "PATCH", "/v1/jobs/"+esc(id), req, &v)
}
