// Package host is the vhdkit daemon: machines and their disks, each disk
// a VHDX chain served over NBD; a checkpoint tree per machine; jobs that
// delete checkpoints by merging, live, under the running disks; the state
// that survives restarts; and the HTTP API of package api.
//
// Files live under the data directory:
//
//	DIR/state.json              the persisted state (see state)
//	DIR/vhdkit.sock             the API socket (mode 0600)
//	DIR/vms/NAME/diskI.vhdx     a machine's disks
//	DIR/vms/NAME/diskI_ID.avhdx differencing children made by checkpoints
package host

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/vhdkit/vhdkit/internal/api"
	"github.com/vhdkit/vhdkit/internal/lazyregexp"
	"github.com/vhdkit/vhdkit/merge"
	"github.com/vhdkit/vhdkit/nbd"
	"github.com/vhdkit/vhdkit/storage"
	"github.com/vhdkit/vhdkit/vhdx"
)

// Options configure a Host.
type Options struct {
	Logger *slog.Logger
	// NBD serves the machines' disks; Open adds and removes its exports.
	NBD *nbd.Server
	// FreeSpace reports the bytes available to files in dir; nil uses
	// statfs. (Tests replace it to simulate a small filesystem.)
	FreeSpace func(dir string) (int64, error)
	// FS is the file system image files are opened in; nil uses the
	// operating system's. (Tests inject faults through it.)
	FS storage.FS
	// NBDSocket is the unix socket NBD serves on: machines run under QEMU
	// reach their disks through it (run.go). "" when NBD is on TCP.
	NBDSocket string
}

// Host is a running daemon's machines and jobs.
type Host struct {
	dir  string
	opts Options
	log  *slog.Logger
	lock *os.File // flock on DIR/lock: one daemon per directory

	mu   sync.Mutex // guards st, vms, jobs
	st   *state
	vms  map[string]*vm
	jobs map[string]*job

	imported importDirs // folders machines were imported from in place (import.go)
	events   eventLog   // what the host did, from its log (events.go)

	ctx    context.Context // ends at Close: job runners stop
	cancel context.CancelFunc
	wg     sync.WaitGroup
}

// vm is a machine's open disks.
type vm struct {
	st    *machineState
	disks []*merge.Disk // nil while failed
	// failed says why the disks could not be opened; "" when they are
	// open and exported. A failed machine keeps its state and files
	// untouched until it is repaired or deleted.
	failed string
	job    *job // the job running on it, if any
	// optimizing is set while OptimizeVM compacts its disks: their
	// layers must not change meanwhile.
	optimizing bool
	run        *vmRun // its QEMU (run.go); nil while off
}

// Error is a failure with an HTTP status: what the API reports.
type Error struct {
	Status int
	Msg    string
}

func (e *Error) Error() string { return e.Msg }

func errorf(status int, format string, args ...any) error {
	return &Error{Status: status, Msg: fmt.Sprintf(format, args...)}
}

const (
	statusBadRequest   = 400
	statusNotFound     = 404
	statusConflict     = 409
	statusInsufficient = 507
)

// Open starts a host on the data directory dir, creating it if needed:
// it loads the state, removes files a crash left unreferenced, reopens
// every machine's disks, re-establishes interrupted merges and exports
// the disks; jobs resume in the background.
func Open(dir string, opts Options) (*Host, error) {
	if opts.Logger == nil {
		opts.Logger = slog.New(slog.NewTextHandler(io.Discard, nil))
	}
	if opts.NBD == nil {
		opts.NBD = &nbd.Server{}
	}
	if opts.FreeSpace == nil {
		opts.FreeSpace = freeSpace
	}
	// The state names files by absolute path: the daemon's working
	// directory must not matter.
	dir, err := filepath.Abs(dir)
	if err != nil {
		return nil, err
	}
	// The folders hold every guest's disks: only their owner may enter.
	// DIR may be the user's own; vms and what is below it are ours.
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return nil, err
	}
	if err := mkdirPrivate(filepath.Join(dir, "vms")); err != nil {
		return nil, err
	}
	lock, err := os.OpenFile(filepath.Join(dir, api.LockName), os.O_RDWR|os.O_CREATE, 0o600)
	if err != nil {
		return nil, err
	}
	if err := syscall.Flock(int(lock.Fd()), syscall.LOCK_EX|syscall.LOCK_NB); err != nil {
		lock.Close()
		return nil, fmt.Errorf("%s is in use by another vhdkit daemon", dir)
	}
	st, err := loadState(dir)
	if err != nil {
		lock.Close()
		return nil, err
	}
	h := &Host{dir: dir, opts: opts, lock: lock, st: st, vms: map[string]*vm{}, jobs: map[string]*job{}}
	h.log = withEvents(opts.Logger, &h.events)
	h.ctx, h.cancel = context.WithCancel(context.Background())
	h.imported.load(st)
	h.removeOrphans()
	// One machine whose files are missing, damaged or locked fails
	// alone: the others serve.
	for _, ms := range st.Machines {
		v := &vm{st: ms}
		h.vms[ms.Name] = v
		if err := h.openDisks(v); err != nil {
			v.failed = err.Error()
			h.log.Error("machine failed", "vm", ms.Name, "err", err)
		}
		if err := mkdirPrivate(h.machineDir(ms.Name)); err != nil && !errors.Is(err, os.ErrNotExist) {
			h.log.Warn("making a machine's folder private", "vm", ms.Name, "err", err)
		}
	}
	// Merges that were under way mirror writes again before any client
	// can write: the copy behind them relies on it. A failed machine's
	// job waits for its repair.
	for _, js := range st.Jobs {
		if js.Finished() {
			continue
		}
		j := h.newJob(js)
		if v := h.vms[js.VM]; v != nil {
			v.job = j
			if v.failed != "" {
				j.hold(v)
			} else if err := j.restart(h, v); err != nil {
				h.log.Error("resuming a merge", "job", js.ID, "err", err)
			}
		}
	}
	// Restarted steps no longer count as cleanly stopped: save that
	// before any client writes.
	if err := h.save(); err != nil {
		h.Close()
		return nil, err
	}
	for _, v := range h.vms {
		if v.failed == "" {
			h.export(v)
		}
		h.adopt(v)
	}
	for _, j := range h.jobs {
		h.startJob(j)
	}
	h.log.Info("host open", "dir", dir, "machines", len(st.Machines), "jobs", len(h.jobs))
	return h, nil
}

// mkdirPrivate makes a folder of the daemon's own, mode 0700 whatever
// an older version left.
func mkdirPrivate(dir string) error {
	if err := os.Mkdir(dir, 0o700); err != nil && !errors.Is(err, os.ErrExist) {
		return err
	}
	return os.Chmod(dir, 0o700)
}

// openDisks opens a machine's disks, all or none.
func (h *Host) openDisks(v *vm) error {
	var disks []*merge.Disk
	for i, ds := range v.st.Disks {
		d, err := merge.OpenDisk(ds.Leaf, h.openOptions(ds.Leaf))
		if err != nil {
			for _, d := range disks {
				d.Close()
			}
			return fmt.Errorf("disk %d: %w", i, err)
		}
		disks = append(disks, d)
	}
	v.disks = disks
	return nil
}

// save persists the state; the progress of every job is then as durable
// as what was reported of it. The caller holds mu (or owns h).
func (h *Host) save() error {
	if err := h.st.save(storage.OrOS(h.opts.FS), h.dir); err != nil {
		return err
	}
	for _, j := range h.jobs {
		j.savedDone = j.st.Done
	}
	return nil
}

// openOptions are the options every chain whose leaf is leaf opens with.
// Parents are followed only into the leaf's folder and the data
// directory: a locator in a file (an attached disk is anyone's file) must
// not make the host serve, or merge into, some other file of the host.
func (h *Host) openOptions(leaf string) vhdx.OpenOptions {
	return vhdx.OpenOptions{FS: h.opts.FS, ParentDirs: h.parentDirs(leaf)}
}

// parentDirs are the folders the parents of leaf's chain may lie in.
func (h *Host) parentDirs(leaf string) []string {
	return append([]string{filepath.Dir(leaf), h.dir}, h.imported.list()...)
}

// Close stops the jobs at a safe point (they resume at the next Open),
// closes every disk and saves the state.
func (h *Host) Close() error {
	h.cancel()
	h.wg.Wait()
	h.mu.Lock()
	defer h.mu.Unlock()
	var errs []error
	for _, v := range h.vms {
		var verrs []error
		for i, d := range v.disks {
			h.opts.NBD.RemoveExport(exportName(v.st.Name, i))
			verrs = append(verrs, d.Close())
		}
		// A live merge's target was flushed with its disk: the copy may
		// resume where it stopped. (A failed machine's merge did not run.)
		if j := v.job; j != nil && v.failed == "" && j.st.Step != nil && j.st.Step.Kind == stepLive && errors.Join(verrs...) == nil {
			j.st.Step.Clean = true
		}
		errs = append(errs, verrs...)
	}
	h.vms = map[string]*vm{}
	errs = append(errs, h.save())
	h.lock.Close()
	return errors.Join(errs...)
}

// Dir returns the data directory.
func (h *Host) Dir() string { return h.dir }

func exportName(vm string, disk int) string {
	if disk == 0 {
		return vm
	}
	return fmt.Sprintf("%s/%d", vm, disk)
}

func (h *Host) export(v *vm) {
	for i, d := range v.disks {
		err := h.opts.NBD.AddExport(nbd.Export{Name: exportName(v.st.Name, i), Image: d,
			Description: fmt.Sprintf("vhdkit machine %s disk %d", v.st.Name, i)})
		if err != nil {
			h.log.Error("exporting a disk", "vm", v.st.Name, "disk", i, "err", err)
		}
	}
}

// removeOrphans deletes image files in the machines' folders that no
// state references: a checkpoint or revert interrupted before its state
// was saved, or a merged file whose deletion was.
func (h *Host) removeOrphans() {
	used := map[string]bool{}
	for _, m := range h.st.Machines {
		for _, d := range m.Disks {
			used[d.Leaf] = true
		}
		for _, c := range m.Checkpoints {
			for _, f := range c.Files {
				used[f] = true
			}
		}
	}
	for _, j := range h.st.Jobs {
		if s := j.Step; s != nil && !j.Finished() {
			used[s.Top], used[s.Target] = true, true
		}
	}
	for _, m := range h.st.Machines {
		files, _ := filepath.Glob(filepath.Join(h.machineDir(m.Name), "*.avhdx"))
		for _, f := range files {
			if !used[f] {
				h.log.Warn("removing a file no state references", "file", f)
				os.Remove(f)
			}
		}
		h.removeStaleStates(m)
	}
}

func (h *Host) machineDir(name string) string { return filepath.Join(h.dir, "vms", name) }

var nameRE = lazyregexp.New(`^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$`)

func (h *Host) lookup(name string) (*vm, error) {
	v := h.vms[name]
	if v == nil {
		return nil, errorf(statusNotFound, "no machine named %q", name)
	}
	return v, nil
}

// working returns a machine whose disks are open: what every change to
// its disks or checkpoints needs. The caller holds mu.
func (h *Host) working(name string) (*vm, error) {
	v, err := h.lookup(name)
	if err != nil {
		return nil, err
	}
	if v.failed != "" {
		return nil, errorf(statusConflict, "machine %s is failed (%s); repair it first (vhdkit vm repair %s), or delete it", name, v.failed, name)
	}
	return v, nil
}

// view renders a machine for the API; the caller holds mu.
func (h *Host) view(v *vm) api.VM {
	out := api.VM{Name: v.st.Name, Created: v.st.Created, State: api.VMServing, Checkpoints: len(v.st.Checkpoints)}
	if c := v.st.checkpoint(v.st.Current); c != nil {
		out.Current, out.CurrentName = cpID(c.ID), c.Name
	}
	v.viewRun(&out)
	if v.failed != "" {
		out.State, out.Error = api.VMFailed, v.failed
		for i, ds := range v.st.Disks {
			out.Disks = append(out.Disks, api.Disk{Index: i, Size: ds.Size, Path: ds.Leaf, Attached: ds.Attached != ""})
		}
		return out
	}
	for i, d := range v.disks {
		ds := v.st.Disks[i]
		out.Disks = append(out.Disks, api.Disk{Index: i, Export: exportName(v.st.Name, i), Size: d.Size(),
			Path: d.Leaf(), Chain: d.Chain(), Attached: ds.Attached != ""})
	}
	return out
}

// clients counts the NBD clients connected to each of a machine's
// exports; the caller holds mu.
func (h *Host) clients(v *vm) (total int, per string) {
	var parts []string
	for i := range v.disks {
		name := exportName(v.st.Name, i)
		if n := h.opts.NBD.Clients(name); n > 0 {
			total += n
			parts = append(parts, fmt.Sprintf("%d on export %q", n, name))
		}
	}
	return total, strings.Join(parts, ", ")
}

// refuseClients refuses a change to a machine's disks while NBD clients
// are connected to them (they would see the disk change under them),
// or with force disconnects them first; it returns how many it
// disconnected. The caller holds mu.
func (h *Host) refuseClients(v *vm, what string, force bool) (int, error) {
	n, per := h.clients(v)
	if n == 0 {
		return 0, nil
	}
	if !force {
		return 0, errorf(statusConflict, "machine %s has %d NBD %s connected (%s): %s would change the disks under them; disconnect them, or use --force to disconnect them first",
			v.st.Name, n, plural(n, "client", "clients"), per, what)
	}
	ctx, cancel := context.WithTimeout(context.Background(), disconnectTimeout)
	defer cancel()
	n = 0
	for i := range v.disks {
		n += h.opts.NBD.Disconnect(ctx, exportName(v.st.Name, i))
	}
	h.log.Warn("disconnected NBD clients", "vm", v.st.Name, "clients", n, "for", what)
	return n, nil
}

// disconnectTimeout bounds the wait for a forcibly disconnected client's
// requests in flight; those still running then are cut off.
const disconnectTimeout = 10 * time.Second

func plural(n int, one, many string) string {
	if n == 1 {
		return one
	}
	return many
}

// VMs lists the machines by name.
func (h *Host) VMs() []api.VM {
	h.mu.Lock()
	defer h.mu.Unlock()
	var out []api.VM
	for _, v := range h.vms {
		out = append(out, h.view(v))
	}
	slices.SortFunc(out, func(a, b api.VM) int { return strings.Compare(a.Name, b.Name) })
	return out
}

// VM describes one machine.
func (h *Host) VM(name string) (*api.VM, error) {
	h.mu.Lock()
	defer h.mu.Unlock()
	v, err := h.lookup(name)
	if err != nil {
		return nil, err
	}
	out := h.view(v)
	return &out, nil
}

// CreateVM makes a machine with new dynamic disks or attached files and
// exports its disks.
func (h *Host) CreateVM(req api.CreateVM) (*api.VM, error) {
	if !nameRE.MatchString(req.Name) {
		return nil, errorf(statusBadRequest, "machine name %q: use 1 to 64 letters, digits, '.', '_' or '-', starting with a letter or digit", req.Name)
	}
	if len(req.Disks)+len(req.Attach) == 0 {
		return nil, errorf(statusBadRequest, "a machine needs at least one disk (--disk SIZE or --attach FILE)")
	}
	for _, s := range req.Disks {
		if s < 1<<20 || s%(1<<20) != 0 || s > 64<<40 {
			return nil, errorf(statusBadRequest, "disk size %d: use a whole number of MiB between 1 MiB and 64 TiB", s)
		}
	}
	settings, err := h.settingsOf(req.Settings)
	if err != nil {
		return nil, err
	}
	h.mu.Lock()
	defer h.mu.Unlock()
	if h.vms[req.Name] != nil {
		return nil, errorf(statusConflict, "a machine named %q exists", req.Name)
	}
	dir := h.machineDir(req.Name)
	if err := mkdirPrivate(dir); err != nil {
		return nil, err
	}
	ms := &machineState{Name: req.Name, Created: time.Now().UTC(), Settings: settings}
	v := &vm{st: ms}
	fail := func(err error) (*api.VM, error) {
		for _, d := range v.disks {
			d.Close()
		}
		os.RemoveAll(dir)
		return nil, err
	}
	for _, size := range req.Disks {
		path := filepath.Join(dir, fmt.Sprintf("disk%d.vhdx", len(ms.Disks)))
		im, err := vhdx.Create(path, vhdx.CreateOptions{Size: uint64(size)})
		if err != nil {
			return fail(err)
		}
		if err := im.Close(); err != nil {
			return fail(err)
		}
		ms.Disks = append(ms.Disks, &diskState{Leaf: path, Size: size})
	}
	for _, f := range req.Attach {
		abs, err := filepath.Abs(f)
		if err != nil {
			return fail(err)
		}
		if !strings.HasSuffix(strings.ToLower(abs), ".vhdx") && !strings.HasSuffix(strings.ToLower(abs), ".avhdx") {
			return fail(errorf(statusBadRequest, "%s: only VHDX files can be attached", f))
		}
		if h.inUse(abs) {
			return fail(errorf(statusConflict, "%s is already a disk of a machine", f))
		}
		ms.Disks = append(ms.Disks, &diskState{Leaf: abs, Attached: abs})
	}
	for i, ds := range ms.Disks {
		d, err := merge.OpenDisk(ds.Leaf, h.openOptions(ds.Leaf))
		if err != nil {
			return fail(errorf(statusBadRequest, "disk %d: %v", i, err))
		}
		ds.Size = d.Size()
		v.disks = append(v.disks, d)
	}
	h.st.Machines = append(h.st.Machines, ms)
	if err := h.save(); err != nil {
		h.st.Machines = h.st.Machines[:len(h.st.Machines)-1]
		return fail(err)
	}
	h.vms[req.Name] = v
	h.export(v)
	h.log.Info("machine created", "vm", req.Name, "disks", len(ms.Disks))
	out := h.view(v)
	return &out, nil
}

// inUse reports whether any machine's chain holds path; the caller holds mu.
func (h *Host) inUse(path string) bool {
	for _, v := range h.vms {
		for _, d := range v.disks {
			if slices.Contains(d.Chain(), path) {
				return true
			}
		}
	}
	return false
}

// DeleteVM removes a machine: its exports, and the files the host made
// for it (with opts.DeleteDisks only); attached files stay. A machine
// with NBD clients connected is kept unless opts.Force disconnects them.
// A failed machine can be deleted too (its job, waiting for a repair,
// ends failed).
func (h *Host) DeleteVM(name string, opts api.DeleteVM) (*api.DeletedVM, error) {
	h.mu.Lock()
	defer h.mu.Unlock()
	v, err := h.lookup(name)
	if err != nil {
		return nil, err
	}
	if v.job != nil && v.failed == "" {
		return nil, errorf(statusConflict, "machine %s has a running job (%s); wait for it or cancel it first", name, v.job.st.ID)
	}
	if v.optimizing {
		return nil, errorf(statusConflict, "machine %s: its disks are being optimized; wait for it to finish", name)
	}
	if err := h.refuseDelete(v, opts.Force); err != nil {
		return nil, err
	}
	out := &api.DeletedVM{Name: name, Removed: []string{}, Kept: []string{}}
	for _, ds := range v.st.Disks {
		if ds.Attached != "" && len(v.st.Checkpoints) > 0 {
			return nil, errorf(statusConflict, "machine %s has checkpoints over the attached file %s: delete them first, so that the file holds the current state", name, ds.Attached)
		}
		if ds.Attached != "" {
			out.Kept = append(out.Kept, ds.Attached)
		}
	}
	created := h.createdFiles(v)
	if len(created) > 0 && !opts.DeleteDisks {
		return nil, errorf(statusConflict, "deleting machine %s would remove the disk files vhdkit created for it: %s; add --delete-disks to remove them (attached files are kept)",
			name, strings.Join(created, ", "))
	}
	if out.Disconnected, err = h.refuseClients(v, "deleting the machine", opts.Force); err != nil {
		return nil, err
	}
	for i, d := range v.disks {
		h.opts.NBD.RemoveExport(exportName(name, i))
		if err := d.Close(); err != nil {
			h.log.Warn("closing a disk", "vm", name, "disk", i, "err", err)
		}
	}
	if j := v.job; j != nil {
		h.finishLocked(j, api.JobFailed, fmt.Sprintf("machine %s was deleted", name))
	}
	delete(h.vms, name)
	h.removeRunFiles(name)
	h.st.Machines = slices.DeleteFunc(h.st.Machines, func(m *machineState) bool { return m.Name == name })
	if err := h.save(); err != nil {
		return nil, err
	}
	h.log.Info("machine deleted", "vm", name, "removed", len(created), "kept", len(out.Kept))
	var errs []error
	for _, f := range created {
		if err := os.Remove(f); err != nil && !errors.Is(err, os.ErrNotExist) {
			errs = append(errs, err)
			continue
		}
		out.Removed = append(out.Removed, f)
	}
	// The folder goes once empty; files of someone else's in it stay.
	if err := os.Remove(h.machineDir(name)); err != nil && !errors.Is(err, os.ErrNotExist) {
		h.log.Warn("machine folder not removed", "dir", h.machineDir(name), "err", err)
	}
	if len(errs) > 0 {
		return out, fmt.Errorf("machine %s deleted, but not all its files: %w", name, errors.Join(errs...))
	}
	return out, nil
}

// createdFiles lists the files in a machine's folder that are not
// attached: its disks and checkpoints, which deleting it removes. The
// caller holds mu.
func (h *Host) createdFiles(v *vm) []string {
	entries, _ := os.ReadDir(h.machineDir(v.st.Name))
	var out []string
	for _, e := range entries {
		f := filepath.Join(h.machineDir(v.st.Name), e.Name())
		if !e.Type().IsRegular() || slices.ContainsFunc(v.st.Disks, func(ds *diskState) bool { return ds.Attached == f }) {
			continue
		}
		out = append(out, f)
	}
	return out
}

func freeSpace(dir string) (int64, error) {
	var s syscall.Statfs_t
	if err := syscall.Statfs(dir, &s); err != nil {
		return 0, err
	}
	return int64(s.Bavail) * int64(s.Bsize), nil
}
