package storage

import (
	"errors"
	"fmt"
	"strings"
	"sync/atomic"
	"syscall"
)

// ErrInjected is the error FaultFile injects. Errors from FaultFile wrap it
// (and syscall.ENOSPC too with NoSpace), so use errors.Is.
var ErrInjected = errors.New("storage: injected fault")

// OpKind is a set of File operation kinds, for FaultFile.Kinds.
type OpKind uint16

// The operation kinds FaultFile counts; OpAll is all of them.
const (
	OpRead OpKind = 1 << iota
	OpWrite
	OpSync
	OpTruncate
	// The name operations of a file system seam (MemFS), counted with
	// FaultFile.Fault: no File method makes them.
	OpRemove
	OpOpen   // opening an existing file
	OpCreate // creating a file
	OpRename
	OpLink
	OpSyncDir

	OpAll = OpRead | OpWrite | OpSync | OpTruncate | OpRemove | OpOpen | OpCreate | OpRename | OpLink | OpSyncDir
)

func (k OpKind) String() string {
	var names []string
	for _, n := range []struct {
		k    OpKind
		name string
	}{{OpRead, "read"}, {OpWrite, "write"}, {OpSync, "sync"}, {OpTruncate, "truncate"}, {OpRemove, "remove"},
		{OpOpen, "open"}, {OpCreate, "create"}, {OpRename, "rename"}, {OpLink, "link"}, {OpSyncDir, "syncdir"}} {
		if k&n.k != 0 {
			names = append(names, n.name)
		}
	}
	if len(names) == 0 {
		return "none"
	}
	return strings.Join(names, "|")
}

// FaultFile wraps a File and fails the operation whose index is FailAt.
//
// Every ReadAt, WriteAt, Sync and Truncate of a kind in Kinds is one
// operation, numbered from 0 (Size and Close are not counted and never
// fail). The failing operation returns an error wrapping ErrInjected
// without reaching File (except a torn write's prefix). To find every
// failure point of a run:
//
//	for i := int64(0); ; i++ {
//		ff := &storage.FaultFile{File: storage.NewMemFile(img), FailAt: i, Dead: true}
//		run(ff) // then reopen the image and check it
//		if !ff.Injected() { // the run needed no more than i operations
//			break
//		}
//	}
//
// Set the fields before the first operation; the methods are then safe
// for concurrent use. A FaultFile must not be copied after first use.
type FaultFile struct {
	File File
	// FailAt is the index of the operation that fails; negative never
	// fails, which counts a run's operations.
	FailAt int64
	// Kinds are the operations that count and can fail; 0 means OpAll.
	Kinds OpKind
	// Dead makes every counted operation after the failing one fail too,
	// like a disk that stopped; otherwise only the one fails.
	Dead bool
	// TornWrite makes a failing WriteAt write a prefix first, as a power
	// cut mid-request does: the first half of p cut down to a 512-byte
	// boundary of the file, so a write within one sector writes nothing.
	TornWrite bool
	// NoSpace makes the injected errors also wrap syscall.ENOSPC, as from
	// a full file system (typically with Kinds OpWrite|OpTruncate).
	NoSpace bool
	// Shared, when set, numbers this file's operations together with
	// those of every FaultFile sharing it and decides their faults by its
	// fields (FailAt, Kinds, Dead, TornWrite, NoSpace; this file's own
	// are unused, and so is Shared's File): the files of one operation (a
	// merge's chain and its journal) fail its i-th I/O wherever it falls.
	Shared *FaultFile

	ops      atomic.Int64
	injected atomic.Bool
}

// Ops returns how many counted operations were attempted, failed ones
// included (across the files sharing its schedule).
func (f *FaultFile) Ops() int64 { return f.schedule().ops.Load() }

// Injected reports whether an operation has failed by injection (in any
// file sharing its schedule).
func (f *FaultFile) Injected() bool { return f.schedule().injected.Load() }

// Fault counts one operation of kind k that is not a method of File (a
// removal by a file system seam) and returns the error to inject, if any.
func (f *FaultFile) Fault(k OpKind) error { return f.fault(k) }

// schedule is the FaultFile whose fields and counter decide f's faults.
func (f *FaultFile) schedule() *FaultFile {
	if f.Shared != nil {
		return f.Shared
	}
	return f
}

// fault counts an operation of kind k and returns the error to inject, if
// any.
func (f *FaultFile) fault(k OpKind) error {
	f = f.schedule()
	kinds := f.Kinds
	if kinds == 0 {
		kinds = OpAll
	}
	if kinds&k == 0 {
		return nil
	}
	i := f.ops.Add(1) - 1
	switch {
	case f.FailAt >= 0 && i == f.FailAt:
		f.injected.Store(true)
	case f.Dead && f.FailAt >= 0 && i > f.FailAt:
		// The failing operation may still be in flight on another
		// goroutine; later ones fail regardless.
		f.injected.Store(true)
	default:
		return nil
	}
	if f.NoSpace {
		return fmt.Errorf("%s op %d: %w: %w", k, i, ErrInjected, syscall.ENOSPC)
	}
	return fmt.Errorf("%s op %d: %w", k, i, ErrInjected)
}

// ReadAt counts an OpRead.
func (f *FaultFile) ReadAt(p []byte, off int64) (int, error) {
	if err := f.fault(OpRead); err != nil {
		return 0, err
	}
	return f.File.ReadAt(p, off)
}

// WriteAt counts an OpWrite; a failing one may be torn (see TornWrite).
func (f *FaultFile) WriteAt(p []byte, off int64) (int, error) {
	err := f.fault(OpWrite)
	if err == nil {
		return f.File.WriteAt(p, off)
	}
	if !f.schedule().TornWrite || off < 0 {
		return 0, err
	}
	end := off + int64(len(p)/2)
	end -= end % SectorSize
	if end <= off {
		return 0, err
	}
	n, _ := f.File.WriteAt(p[:end-off], off)
	return n, err
}

// Sync counts an OpSync.
func (f *FaultFile) Sync() error {
	if err := f.fault(OpSync); err != nil {
		return err
	}
	return f.File.Sync()
}

// Truncate counts an OpTruncate.
func (f *FaultFile) Truncate(size int64) error {
	if err := f.fault(OpTruncate); err != nil {
		return err
	}
	return f.File.Truncate(size)
}

// Size is not counted and never fails by injection.
func (f *FaultFile) Size() (int64, error) { return f.File.Size() }

// Close is not counted and never fails by injection.
func (f *FaultFile) Close() error { return f.File.Close() }
