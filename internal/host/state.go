package host

import (
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"time"

	"github.com/vhdkit/vhdkit/internal/api"
	"github.com/vhdkit/vhdkit/internal/lazyregexp"
	"github.com/vhdkit/vhdkit/storage"
)

// state is everything the daemon persists: one JSON document in
// DIR/state.json, replaced whole (temp file, fsync, rename, fsync of the
// directory) after every change, so a crash leaves the old or the new
// version, never a mix. Image files change first and state second, in an
// order that makes either version consistent with the files (see the
// comments at each change); files no version references are removed at
// start.
type state struct {
	Machines []*machineState `json:"machines"`
	Jobs     []*jobState     `json:"jobs"`
	Seq      int64           `json:"seq"`               // last checkpoint ID handed out
	JobSeq   int64           `json:"job_seq,omitempty"` // last job ID handed out
}

type machineState struct {
	Name        string             `json:"name"`
	Created     time.Time          `json:"created"`
	Disks       []*diskState       `json:"disks"`
	Checkpoints []*checkpointState `json:"checkpoints"`
	Current     string             `json:"current,omitempty"`  // checkpoint ID
	Settings    *api.Settings      `json:"settings,omitempty"` // how it runs (run.go)
	Run         *runRecord         `json:"run,omitempty"`      // its QEMU while it runs (run.go)
	Imported    string             `json:"imported,omitempty"` // the folder its files were imported from in place (import.go)
}

type diskState struct {
	Leaf     string `json:"leaf"` // the file the disk runs on
	Size     int64  `json:"size"`
	Attached string `json:"attached,omitempty"` // a file the user attached: never deleted
}

type checkpointState struct {
	ID      string    `json:"id"` // a number; the API shows it as "cp-N" (cpID)
	Name    string    `json:"name"`
	Parent  string    `json:"parent,omitempty"`
	Created time.Time `json:"created"`
	Files   []string  `json:"files"` // per disk

	Kind checkpointKind `json:"kind"` // how it was taken (runcheckpoint.go)
}

// jobState is a job as persisted: what the API shows, what is left to
// delete, and the merge step in progress.
type jobState struct {
	api.Job
	Targets []string   `json:"targets"`          // IDs of the checkpoints still to delete
	Counted []string   `json:"counted"`          // IDs whose merges Total includes
	Cancel  bool       `json:"cancel,omitempty"` // end after the merge under way
	Step    *mergeStep `json:"step,omitempty"`
}

// Step kinds.
const (
	stepLive    = "live"    // the running leaf into the checkpoint's file
	stepOffline = "offline" // a child checkpoint's file into the checkpoint's file
)

// mergeStep is the merge of one disk's file into a checkpoint's file.
type mergeStep struct {
	Kind       string `json:"kind"`
	Checkpoint string `json:"checkpoint"`          // ID of the checkpoint deleted
	Dependent  string `json:"dependent,omitempty"` // offline: ID of the child checkpoint merged
	Disk       int    `json:"disk"`
	Top        string `json:"top"`
	Target     string `json:"target"`
	GUID       string `json:"guid,omitempty"` // live: the target's new DataWriteGuid
	// Offset is where the copy resumes: below it the target holds the
	// copy durably. A live merge trusts it only after a clean shutdown
	// (Clean): after a crash the leaf may hold writes whose mirrored copy
	// in the target was lost, so the copy starts over.
	Offset int64 `json:"offset"`
	Clean  bool  `json:"clean,omitempty"`
	Base   int64 `json:"base"` // the job's Done when the step began
}

const stateName = "state.json"

func loadState(dir string) (*state, error) {
	b, err := os.ReadFile(filepath.Join(dir, stateName))
	if errors.Is(err, os.ErrNotExist) {
		return &state{}, nil
	}
	if err != nil {
		return nil, err
	}
	var st state
	if err := json.Unmarshal(b, &st); err != nil {
		return nil, fmt.Errorf("%s: %w", filepath.Join(dir, stateName), err)
	}
	if err := st.check(dir); err != nil {
		return nil, fmt.Errorf("%s: %w", filepath.Join(dir, stateName), err)
	}
	if st.JobSeq == 0 {
		// A state from before jobs had their own counter: they shared
		// Seq, so no job ID is above it.
		for _, j := range st.Jobs {
			if n, err := strconv.ParseInt(j.ID, 10, 64); err == nil {
				st.JobSeq = max(st.JobSeq, n)
			}
		}
	}
	return &st, nil
}

// check refuses a state whose names would lead out of the data
// directory dir: a machine's name is a folder below DIR/vms (which Open
// sweeps of orphan files), a checkpoint's ID part of file names, and a
// standard checkpoint's state file, which is deleted with it, must be
// the one checkpointStatePath names. The daemon writes only valid
// states; this is for a damaged or planted one.
func (st *state) check(dir string) error {
	names := map[string]bool{}
	for i, m := range st.Machines {
		if m == nil {
			return fmt.Errorf("machine %d is null", i)
		}
		if !nameRE.MatchString(m.Name) {
			return fmt.Errorf("machine %d: %q is not a machine name", i, m.Name)
		}
		if names[m.Name] {
			return fmt.Errorf("two machines named %q", m.Name)
		}
		names[m.Name] = true
		for _, d := range m.Disks {
			if d == nil {
				return fmt.Errorf("machine %s: a disk is null", m.Name)
			}
		}
		for _, c := range m.Checkpoints {
			if c == nil {
				return fmt.Errorf("machine %s: a checkpoint is null", m.Name)
			}
			if n, err := strconv.ParseUint(c.ID, 10, 63); err != nil || n == 0 {
				return fmt.Errorf("machine %s: checkpoint ID %q is not a positive number", m.Name, c.ID)
			}
			if want := filepath.Join(dir, "vms", m.Name, "cp"+c.ID+stateExt); c.Kind.State != "" && c.Kind.State != want {
				return fmt.Errorf("machine %s: checkpoint %s's state file %q is not %s", m.Name, c.ID, c.Kind.State, want)
			}
		}
	}
	for i, j := range st.Jobs {
		if j == nil {
			return fmt.Errorf("job %d is null", i)
		}
	}
	return nil
}

func (st *state) save(fsys storage.FS, dir string) error {
	b, err := json.MarshalIndent(st, "", "\t")
	if err != nil {
		return err
	}
	if err := storage.WriteFileTo(fsys, filepath.Join(dir, stateName), b, 0o600); err != nil {
		return fmt.Errorf("saving state: %w", err)
	}
	return nil
}

func (m *machineState) checkpoint(id string) *checkpointState {
	for _, c := range m.Checkpoints {
		if c.ID == id {
			return c
		}
	}
	return nil
}

// Checkpoint IDs are numbers inside the state and "cp-N" in the API,
// where a checkpoint is addressed by ID or by name: names of that form
// are refused, so a reference is one or the other, never both.
var cpIDRE = lazyregexp.New(`^(?i:cp)-([0-9]+)$`)

// cpID renders a checkpoint ID for the API.
func cpID(id string) string {
	if id == "" {
		return ""
	}
	return "cp-" + id
}

// findCheckpoint looks a checkpoint up by API ID ("cp-N") or name.
func (m *machineState) findCheckpoint(ref string) *checkpointState {
	if sub := cpIDRE.FindStringSubmatch(ref); sub != nil {
		return m.checkpoint(strings.TrimLeft(sub[1], "0"))
	}
	return m.named(ref)
}

func (m *machineState) named(name string) *checkpointState {
	for _, c := range m.Checkpoints {
		if c.Name == name {
			return c
		}
	}
	return nil
}

// children lists the checkpoints whose parent is id.
func (m *machineState) children(id string) []*checkpointState {
	var out []*checkpointState
	for _, c := range m.Checkpoints {
		if c.Parent == id {
			out = append(out, c)
		}
	}
	return out
}

// dependents counts what depends on checkpoint c's files: its child
// checkpoints and, if the machine runs on from c, the running state.
func (m *machineState) dependents(c *checkpointState) (children []*checkpointState, now bool) {
	return m.children(c.ID), m.Current == c.ID
}

// subtree lists c and its descendants.
func (m *machineState) subtree(c *checkpointState) []string {
	ids := []string{c.ID}
	for i := 0; i < len(ids); i++ {
		for _, k := range m.children(ids[i]) {
			ids = append(ids, k.ID)
		}
	}
	return ids
}

func (m *machineState) removeCheckpoint(id string) {
	for i, c := range m.Checkpoints {
		if c.ID == id {
			m.Checkpoints = append(m.Checkpoints[:i], m.Checkpoints[i+1:]...)
			return
		}
	}
}

func (st *state) job(id string) *jobState {
	for _, j := range st.Jobs {
		if j.ID == id {
			return j
		}
	}
	return nil
}

// nextID hands out a checkpoint ID (also naming the files a revert makes).
func (st *state) nextID() string {
	st.Seq++
	return fmt.Sprint(st.Seq)
}

// nextJobID hands out a job ID: a counter of its own, so job 3 and
// checkpoint cp-3 may both exist and are not the same thing.
func (st *state) nextJobID() string {
	st.JobSeq++
	return fmt.Sprint(st.JobSeq)
}
