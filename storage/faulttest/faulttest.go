// Package faulttest is the one fault and crash harness: it runs an
// operation on a storage.MemFS once for every point at which the disk
// could fail it, and has the caller's check judge what each left.
//
// For a mode and i = 0, 1, 2, … the operation runs on fresh files with its
// i-th counted operation failing — across every file and name it touches,
// one schedule (storage.MemFS.SetFaults) — until a run completes without
// reaching a fault. The modes:
//
//   - Crash: the i-th operation fails and so does every later one, as on
//     a disk that died (a failing write is torn: half of it, cut to a
//     sector, lands). The files are checked as the process left them and
//     after Clones power cuts (storage.MemFS.CrashClone: synced data, a
//     random part of the rest, a prefix of the name changes not synced).
//   - IOError: only the i-th operation fails (EIO); the operation goes on
//     or returns the error. The files are checked as left.
//   - NoSpace: from the i-th write, truncate or create on, every one fails
//     with ENOSPC, as on a full file system. The files are checked as
//     left.
//
// Every error the run returns at a point must wrap the injected one
// (storage.ErrInjected): an error that loses its cause is reported. What
// a check should establish after each point is the operation's contract;
// for an image: it opens (logs replayed), the strict check passes, every
// write acknowledged before the last successful flush reads back, nothing
// else changed, and running the operation again completes.
//
// Long mode (VHDKIT_SWEEP=long in the environment) takes more power cuts
// per point and more seeds for sweeps that use Seeds: the forms CI runs
// are the short ones.
package faulttest

import (
	"errors"
	"fmt"
	"math/rand/v2"
	"os"
	"syscall"
	"testing"

	"github.com/vhdkit/vhdkit/storage"
)

// Mode is how the disk fails at a point.
type Mode int

const (
	Crash Mode = iota
	IOError
	NoSpace
)

// Modes are all of them, in the order a sweep runs them.
var Modes = []Mode{Crash, IOError, NoSpace}

func (m Mode) String() string {
	switch m {
	case Crash:
		return "crash"
	case IOError:
		return "io-error"
	case NoSpace:
		return "no-space"
	}
	return fmt.Sprintf("Mode(%d)", int(m))
}

// A Point is where a sweep stopped an operation, handed to the check.
type Point struct {
	Mode  Mode
	Index int64 // the counted operation that failed first
	// PowerCut is which power cut of the point the files are (from 1), or
	// 0: the files as the process left them.
	PowerCut int
	Err      error // what the run returned
}

func (p Point) String() string {
	s := fmt.Sprintf("%s at operation %d", p.Mode, p.Index)
	if p.PowerCut > 0 {
		s += fmt.Sprintf(", power cut %d", p.PowerCut)
	}
	return s
}

// A Sweep is an operation and what must hold after it stops anywhere.
type Sweep struct {
	// Files are the files before the operation, by name; each point
	// starts from a copy of them.
	Files map[string][]byte
	// Start prepares a point without faults (opening an image, say) and
	// returns the operation to run, which the faults then hit. The
	// operation returns nil when it completed.
	Start func(fsys *storage.MemFS) (run func() error, err error)
	// Check judges the files a point left: fsys holds them, without
	// faults. It returns what is wrong, or nil.
	Check func(fsys *storage.MemFS, p Point) error
	// Modes to sweep; nil means all.
	Modes []Mode
	// Kinds are the operations counted and failed; 0 means all.
	// NoSpace fails only writes, truncates and creates among them.
	Kinds storage.OpKind
	// PowerCuts per Crash point; 0 means 3, or 20 in long mode.
	PowerCuts int
	// Seed varies the power cuts.
	Seed uint64
}

// Result counts what a sweep did.
type Result struct {
	Ops    int64        // counted operations of a run without faults
	Points map[Mode]int // points swept per mode
	Checks int          // states the check judged
}

// Long reports whether long forms are asked for (VHDKIT_SWEEP=long).
func Long() bool { return os.Getenv("VHDKIT_SWEEP") == "long" }

// Seeds returns 0, 1, … n-1, or ten times as many in long mode.
func Seeds(n int) []uint64 {
	if Long() {
		n *= 10
	}
	s := make([]uint64, n)
	for i := range s {
		s[i] = uint64(i)
	}
	return s
}

// schedule is the fault schedule of mode at point i.
func (s Sweep) schedule(mode Mode, i int64) *storage.FaultFile {
	ff := &storage.FaultFile{FailAt: i, Kinds: s.Kinds}
	switch mode {
	case Crash:
		ff.Dead, ff.TornWrite = true, true
	case NoSpace:
		kinds := s.Kinds
		if kinds == 0 {
			kinds = storage.OpAll
		}
		ff.Kinds = kinds & (storage.OpWrite | storage.OpTruncate | storage.OpCreate)
		ff.Dead, ff.NoSpace = true, true
	}
	return ff
}

// Run runs s.Run, fails t with its error, and logs the result in one
// line starting "faulttest:" (what docs/RELIABILITY.md's figures collect).
func Run(t testing.TB, s Sweep) Result {
	t.Helper()
	res, err := s.Run()
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("faulttest: %s", res)
	return res
}

// String is the result in one line: operations, points per mode, states
// checked.
func (r Result) String() string {
	return fmt.Sprintf("%d operations; points: crash %d, io-error %d, no-space %d; %d states checked",
		r.Ops, r.Points[Crash], r.Points[IOError], r.Points[NoSpace], r.Checks)
}

// Run sweeps every point of every mode and stops at the first point
// whose check fails (or whose error loses the injected cause), naming
// the point in its error.
func (s Sweep) Run() (Result, error) {
	res := Result{Ops: -1, Points: map[Mode]int{}}
	modes := s.Modes
	if modes == nil {
		modes = Modes
	}
	cuts := s.PowerCuts
	if cuts == 0 {
		cuts = 3
		if Long() {
			cuts = 20
		}
	}
	for _, mode := range modes {
		for i := int64(0); ; i++ {
			fsys := storage.NewMemFS(s.Files)
			run, err := s.Start(fsys)
			if err != nil {
				return res, fmt.Errorf("%s at operation %d: starting: %w", mode, i, err)
			}
			ff := s.schedule(mode, i)
			fsys.SetFaults(ff)
			err = runGuarded(run)
			fsys.SetFaults(nil)
			if !ff.Injected() {
				if err != nil {
					return res, fmt.Errorf("%s: the run without a fault failed: %w", mode, err)
				}
				if mode == Crash || res.Ops < 0 {
					res.Ops = ff.Ops()
				}
				break
			}
			res.Points[mode]++
			p := Point{Mode: mode, Index: i, Err: err}
			if err != nil && !errors.Is(err, storage.ErrInjected) {
				return res, fmt.Errorf("%s: the error does not wrap the injected one: %w", p, err)
			}
			if mode == NoSpace && err != nil && !errors.Is(err, syscall.ENOSPC) {
				return res, fmt.Errorf("%s: the error does not say the disk is full: %w", p, err)
			}
			states := []*storage.MemFS{fsys}
			if mode == Crash {
				rng := rand.New(rand.NewPCG(s.Seed, uint64(i)))
				for range cuts {
					states = append(states, fsys.CrashClone(rng))
				}
			}
			for k, st := range states {
				p.PowerCut = k
				res.Checks++
				if err := s.Check(st, p); err != nil {
					return res, fmt.Errorf("%s (the run returned: %v): %w", p, p.Err, err)
				}
			}
		}
	}
	return res, nil
}

// runGuarded runs f, turning a panic into an error: a hostile state must
// not take the sweep down without naming its point.
func runGuarded(f func() error) (err error) {
	defer func() {
		if r := recover(); r != nil {
			err = fmt.Errorf("panic: %v", r)
		}
	}()
	return f()
}

// ReadFiles returns the content of each real file by its path: a sweep's
// Files, from images made on disk.
func ReadFiles(t testing.TB, paths ...string) map[string][]byte {
	t.Helper()
	out := map[string][]byte{}
	for _, p := range paths {
		b, err := os.ReadFile(p)
		if err != nil {
			t.Fatal(err)
		}
		out[p] = b
	}
	return out
}
