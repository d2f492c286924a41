package host

import (
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"strconv"
	"syscall"

	"github.com/vhdkit/vhdkit/internal/api"
)

// Handler returns the HTTP API of package api.
func (h *Host) Handler() http.Handler {
	mux := http.NewServeMux()
	handle := func(pattern string, f func(r *http.Request) (any, error)) {
		mux.HandleFunc(pattern, func(w http.ResponseWriter, r *http.Request) {
			out, err := f(r)
			h.reply(w, r, out, err)
		})
	}
	handle("GET /v1/vms", func(r *http.Request) (any, error) { return nonNil(h.VMs()), nil })
	handle("POST /v1/vms", func(r *http.Request) (any, error) {
		var req api.CreateVM
		if err := decode(r, &req); err != nil {
			return nil, err
		}
		return h.CreateVM(req)
	})
	handle("GET /v1/vms/{vm}", func(r *http.Request) (any, error) { return h.VM(r.PathValue("vm")) })
	handle("DELETE /v1/vms/{vm}", func(r *http.Request) (any, error) {
		q := r.URL.Query()
		return h.DeleteVM(r.PathValue("vm"), api.DeleteVM{Force: flagSet(q.Get("force")), DeleteDisks: flagSet(q.Get("delete_disks"))})
	})
	handle("POST /v1/vms/import", h.importRoute)
	handle("POST /v1/vms/{vm}/repair", func(r *http.Request) (any, error) {
		var req api.RepairVM
		if err := decode(r, &req); err != nil {
			return nil, err
		}
		return h.RepairVM(r.PathValue("vm"), req)
	})
	handle("POST /v1/vms/{vm}/optimize", func(r *http.Request) (any, error) {
		var req api.OptimizeVM
		if err := decode(r, &req); err != nil {
			return nil, err
		}
		return h.OptimizeVM(r.PathValue("vm"), req)
	})
	h.runRoutes(handle)
	handle("GET /v1/vms/{vm}/checkpoints", func(r *http.Request) (any, error) {
		return h.Checkpoints(r.PathValue("vm"))
	})
	handle("POST /v1/vms/{vm}/checkpoints", func(r *http.Request) (any, error) {
		var req api.CreateCheckpoint
		if err := decode(r, &req); err != nil {
			return nil, err
		}
		return h.CreateCheckpoint(r.PathValue("vm"), req)
	})
	handle("PATCH /v1/vms/{vm}/checkpoints/{cp}", func(r *http.Request) (any, error) {
		var req api.RenameCheckpoint
		if err := decode(r, &req); err != nil {
			return nil, err
		}
		return h.RenameCheckpoint(r.PathValue("vm"), r.PathValue("cp"), req.Name)
	})
	handle("POST /v1/vms/{vm}/checkpoints/{cp}/apply", func(r *http.Request) (any, error) {
		var req api.ApplyCheckpoint
		if err := decode(r, &req); err != nil {
			return nil, err
		}
		return h.ApplyCheckpoint(r.PathValue("vm"), r.PathValue("cp"), req)
	})
	handle("POST /v1/vms/{vm}/checkpoints/{cp}/export", func(r *http.Request) (any, error) {
		var req api.ExportCheckpoint
		if err := decode(r, &req); err != nil {
			return nil, err
		}
		return h.ExportCheckpoint(r.PathValue("vm"), r.PathValue("cp"), req.Dir)
	})
	handle("DELETE /v1/vms/{vm}/checkpoints/{cp}", func(r *http.Request) (any, error) {
		q := r.URL.Query()
		var bw int64
		if s := q.Get("bandwidth"); s != "" {
			var err error
			if bw, err = strconv.ParseInt(s, 10, 64); err != nil {
				return nil, errorf(statusBadRequest, "bandwidth %q is not a number of bytes per second", s)
			}
		}
		subtree := flagSet(q.Get("subtree"))
		return h.DeleteCheckpoint(r.PathValue("vm"), r.PathValue("cp"), subtree, bw)
	})
	handle("GET /v1/jobs", func(r *http.Request) (any, error) { return h.Jobs(), nil })
	handle("GET /v1/jobs/{id}", func(r *http.Request) (any, error) { return h.Job(r.PathValue("id")) })
	handle("POST /v1/jobs/{id}/{action}", func(r *http.Request) (any, error) {
		return h.ControlJob(r.PathValue("id"), r.PathValue("action"))
	})
	handle("PATCH /v1/jobs/{id}", func(r *http.Request) (any, error) {
		var req api.SetJob
		if err := decode(r, &req); err != nil {
			return nil, err
		}
		if req.Bandwidth == nil {
			return h.Job(r.PathValue("id"))
		}
		return h.SetBandwidth(r.PathValue("id"), *req.Bandwidth)
	})
	handle("GET /v1/vms/{vm}/disks/{disk}", func(r *http.Request) (any, error) {
		i, err := strconv.Atoi(r.PathValue("disk"))
		if err != nil {
			return nil, errorf(statusBadRequest, "disk %q is not a disk number", r.PathValue("disk"))
		}
		return h.DiskDetails(r.PathValue("vm"), i, flagSet(r.URL.Query().Get("map")))
	})
	handle("GET /v1/events", func(r *http.Request) (any, error) {
		after, err := h.eventCursor(r)
		if err != nil {
			return nil, err
		}
		return h.Events(after), nil
	})
	mux.HandleFunc("GET /v1/events/stream", h.streamEvents)
	mux.HandleFunc("/", func(w http.ResponseWriter, r *http.Request) {
		h.reply(w, r, nil, errorf(http.StatusNotFound, "no API route %s %s", r.Method, r.URL.Path))
	})
	return mux
}

// flagSet reads a boolean query parameter.
func flagSet(v string) bool { return v == "1" || v == "true" }

func nonNil(v []api.VM) []api.VM {
	if v == nil {
		return []api.VM{}
	}
	return v
}

// maxBody bounds a request body: the largest the API takes is a few
// hundred bytes.
const maxBody = 1 << 20

// decode reads a JSON body, one object and nothing after it; an empty
// body leaves v as it is.
func decode(r *http.Request, v any) error {
	body := &io.LimitedReader{R: r.Body, N: maxBody + 1}
	dec := json.NewDecoder(body)
	dec.DisallowUnknownFields()
	err := dec.Decode(v)
	if err == nil {
		if _, after := dec.Token(); !errors.Is(after, io.EOF) {
			err = errors.New("data after the JSON object")
		}
	}
	switch {
	case body.N <= 0:
		return errorf(http.StatusRequestEntityTooLarge, "request body over %d bytes", maxBody)
	case err != nil && !errors.Is(err, io.EOF):
		return errorf(statusBadRequest, "request body: %v", err)
	}
	return nil
}

func (h *Host) reply(w http.ResponseWriter, r *http.Request, out any, err error) {
	w.Header().Set("Content-Type", "application/json")
	if err != nil {
		status := http.StatusInternalServerError
		var he *Error
		if errors.As(err, &he) {
			status = he.Status
		}
		level := slog.LevelInfo
		if status >= 500 {
			level = slog.LevelError
		}
		h.log.Log(r.Context(), level, "api error", "method", r.Method, "path", r.URL.Path, "status", status, "err", err)
		w.WriteHeader(status)
		json.NewEncoder(w).Encode(api.Error{Error: err.Error()})
		return
	}
	if out == nil {
		w.WriteHeader(http.StatusNoContent)
		return
	}
	json.NewEncoder(w).Encode(out)
}

// ListenAPI listens on DIR/vhdkit.sock, mode 0600, replacing a stale
// socket file (the directory lock held by Open proves no daemon owns it).
func (h *Host) ListenAPI() (net.Listener, error) {
	path := filepath.Join(h.dir, api.SocketName)
	if err := os.Remove(path); err != nil && !errors.Is(err, os.ErrNotExist) {
		return nil, err
	}
	// The umask keeps the socket private even before the chmod.
	old := syscall.Umask(0o177)
	l, err := net.Listen("unix", path)
	syscall.Umask(old)
	if err != nil {
		return nil, fmt.Errorf("API socket: %w", err)
	}
	if err := os.Chmod(path, 0o600); err != nil {
		l.Close()
		return nil, err
	}
	return l, nil
}
