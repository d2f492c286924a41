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

// DefaultDataDir is the daemon's data directory when neither --data nor
// VHDKIT_DATA names one.
const DefaultDataDir = "vhdkit-data"

// SocketName is the API socket's name inside the data directory.
const SocketName = "vhdkit.sock"

// DataDir returns dir, or $VHDKIT_DATA, or DefaultDataDir.
func DataDir(dir string) string {
	if dir != "" {
		return dir
	}
	if d := os.Getenv("VHDKIT_DATA"); d != "" {
		return d
	}
	return DefaultDataDir
}

// Client talks to a daemon. Its zero value uses the data directory
// DataDir("") names.
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

func (c *Client) socket() string { return filepath.Join(DataDir(c.DataDir), SocketName) }

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
			return fmt.Errorf("%w on %s (start one with \"vhdkit serve --data %s\")", ErrNoDaemon, c.socket(), DataDir(c.DataDir))
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

func (c *Client) DeleteVM(ctx context.Context, name string) error {
	return c.do(ctx, "DELETE", "/v1/vms/"+esc(name), nil, nil)
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
