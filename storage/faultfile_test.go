package storage

import (
	"bytes"
	"errors"
	"sync"
	"syscall"
	"testing"
)

// run does a fixed sequence of 6 counted operations (2 reads, 2 writes,
// a sync and a truncate) plus uncounted Size calls, stopping at the first
// error.
func run(f File) error {
	buf := make([]byte, 1024)
	steps := []func() error{
		func() error { _, err := f.WriteAt(bytes.Repeat([]byte{1}, 1024), 0); return err },
		func() error { _, err := f.Size(); return err },
		func() error { _, err := f.ReadAt(buf, 0); return err },
		func() error { return f.Sync() },
		func() error { return f.Truncate(4096) },
		func() error { _, err := f.WriteAt([]byte{2}, 4000); return err },
		func() error { _, err := f.Size(); return err },
		func() error { _, err := f.ReadAt(buf, 3000); return err },
	}
	for _, s := range steps {
		if err := s(); err != nil {
			return err
		}
	}
	return nil
}

func TestFaultFileCountsAndStops(t *testing.T) {
	ff := &FaultFile{File: NewMemFile(nil), FailAt: -1}
	if err := run(ff); err != nil {
		t.Fatal(err)
	}
	if ff.Ops() != 6 || ff.Injected() {
		t.Fatalf("Ops = %d, Injected = %v; want 6, false", ff.Ops(), ff.Injected())
	}
	// The documented loop: fail op i until a run needs no more than i.
	i := int64(0)
	for ; ; i++ {
		ff := &FaultFile{File: NewMemFile(nil), FailAt: i}
		err := run(ff)
		if !ff.Injected() {
			if err != nil {
				t.Fatal(err)
			}
			break
		}
		if !errors.Is(err, ErrInjected) {
			t.Fatalf("FailAt %d: run returned %v, want ErrInjected", i, err)
		}
		if ff.Ops() != i+1 {
			t.Fatalf("FailAt %d: run stopped after %d ops", i, ff.Ops())
		}
	}
	if i != 6 {
		t.Fatalf("loop ended at %d, want 6", i)
	}
}

func TestFaultFileFailedOpNotPerformed(t *testing.T) {
	mf := NewMemFile(make([]byte, 1024))
	ff := &FaultFile{File: mf, FailAt: 1}
	ff.WriteAt([]byte{1}, 0)
	if n, err := ff.WriteAt([]byte{2, 2}, 10); n != 0 || !errors.Is(err, ErrInjected) {
		t.Fatalf("failing WriteAt = %d, %v", n, err)
	}
	if b := mf.Bytes(); b[0] != 1 || b[10] != 0 {
		t.Fatal("failed write reached the file")
	}
	if err := ff.Truncate(2048); err != nil {
		t.Fatalf("op after a single failure: %v", err)
	}
	if ff.Ops() != 3 {
		t.Fatalf("Ops = %d, want 3", ff.Ops())
	}
	ff = &FaultFile{File: NewMemFile(make([]byte, 1024)), FailAt: 0}
	if err := ff.Truncate(10); !errors.Is(err, ErrInjected) {
		t.Fatal(err)
	}
	if size, _ := ff.Size(); size != 1024 {
		t.Fatalf("failed Truncate changed the size to %d", size)
	}
}

func TestFaultFileDead(t *testing.T) {
	ff := &FaultFile{File: NewMemFile(nil), FailAt: 1, Dead: true}
	if err := ff.Sync(); err != nil {
		t.Fatal(err)
	}
	for range 3 {
		if err := ff.Sync(); !errors.Is(err, ErrInjected) {
			t.Fatalf("dead disk Sync = %v", err)
		}
	}
	if _, err := ff.Size(); err != nil {
		t.Fatalf("Size on dead disk: %v", err)
	}
	if err := ff.Close(); err != nil {
		t.Fatalf("Close on dead disk: %v", err)
	}
}

func TestFaultFileKinds(t *testing.T) {
	ff := &FaultFile{File: NewMemFile(nil), FailAt: 2, Kinds: OpWrite | OpSync}
	buf := make([]byte, 8)
	ff.WriteAt(buf, 0) // op 0
	ff.ReadAt(buf, 0)  // not counted
	ff.Truncate(100)   // not counted
	ff.Sync()          // op 1
	if _, err := ff.ReadAt(buf, 0); err != nil {
		t.Fatalf("uncounted read failed: %v", err)
	}
	if _, err := ff.WriteAt(buf, 0); !errors.Is(err, ErrInjected) { // op 2
		t.Fatalf("write op 2 = %v", err)
	}
	if ff.Ops() != 3 {
		t.Fatalf("Ops = %d, want 3", ff.Ops())
	}
	if got := (OpWrite | OpSync).String(); got != "write|sync" {
		t.Errorf("String = %q", got)
	}
}

func TestFaultFileTornWrite(t *testing.T) {
	mf := NewMemFile(nil)
	ff := &FaultFile{File: mf, FailAt: 0, TornWrite: true}
	p := bytes.Repeat([]byte{7}, 4*SectorSize)
	n, err := ff.WriteAt(p, 100)
	if !errors.Is(err, ErrInjected) {
		t.Fatal(err)
	}
	// Half of p ends at 100+1024; cut down to the sector boundary 1024.
	if n != 1024-100 {
		t.Fatalf("torn write wrote %d bytes, want %d", n, 1024-100)
	}
	if b := mf.Bytes(); len(b) != 1024 || b[99] != 0 || b[100] != 7 {
		t.Fatalf("torn write left %d bytes", len(b))
	}
	// Within one sector a torn write writes nothing.
	ff = &FaultFile{File: mf, FailAt: 0, TornWrite: true}
	if n, err := ff.WriteAt([]byte{9, 9}, 2000); n != 0 || err == nil {
		t.Fatalf("small torn write = %d, %v", n, err)
	}
	if size, _ := mf.Size(); size != 1024 {
		t.Fatalf("small torn write changed size to %d", size)
	}
}

func TestFaultFileNoSpace(t *testing.T) {
	ff := &FaultFile{File: NewMemFile(nil), FailAt: 0, NoSpace: true}
	_, err := ff.WriteAt([]byte{1}, 0)
	if !errors.Is(err, syscall.ENOSPC) || !errors.Is(err, ErrInjected) {
		t.Fatalf("error %v does not wrap ENOSPC and ErrInjected", err)
	}
	ff = &FaultFile{File: NewMemFile(nil), FailAt: 0}
	if _, err := ff.WriteAt([]byte{1}, 0); errors.Is(err, syscall.ENOSPC) {
		t.Fatal("plain injected error wraps ENOSPC")
	}
}

func TestFaultFileConcurrent(t *testing.T) {
	ff := &FaultFile{File: NewMemFile(nil), FailAt: 50, Dead: true}
	var wg sync.WaitGroup
	var mu sync.Mutex
	failed := 0
	for g := range 4 {
		wg.Go(func() {
			for i := range 25 {
				_, err := ff.WriteAt([]byte{byte(i)}, int64(g*100+i))
				if err != nil {
					mu.Lock()
					failed++
					mu.Unlock()
				}
			}
		})
	}
	wg.Wait()
	if ff.Ops() != 100 || failed != 50 || !ff.Injected() {
		t.Fatalf("Ops %d, failed %d, want 100 and 50", ff.Ops(), failed)
	}
}

// TestFaultFileShared: files sharing a schedule number their operations
// together, so the sweep's i-th operation fails in whichever file it
// falls; a removal counted with Fault takes its turn; Dead stops them all.
func TestFaultFileShared(t *testing.T) {
	for failAt := int64(0); failAt < 5; failAt++ {
		sched := &FaultFile{FailAt: failAt, Dead: true}
		a := &FaultFile{File: NewMemFile(make([]byte, 1024)), Shared: sched}
		b := &FaultFile{File: NewMemFile(make([]byte, 1024)), Shared: sched}
		ops := []func() error{
			func() error { _, err := a.WriteAt([]byte{1}, 0); return err },
			func() error { _, err := b.WriteAt([]byte{2}, 0); return err },
			func() error { return a.Sync() },
			func() error { return b.Fault(OpRemove) },
			func() error { _, err := b.ReadAt(make([]byte, 1), 0); return err },
		}
		for i, op := range ops {
			err := op()
			if (int64(i) >= failAt) != errors.Is(err, ErrInjected) {
				t.Fatalf("FailAt %d: operation %d: %v", failAt, i, err)
			}
		}
		if !a.Injected() || !b.Injected() || a.Ops() != int64(len(ops)) {
			t.Fatalf("FailAt %d: injected %v %v, %d ops counted", failAt, a.Injected(), b.Injected(), a.Ops())
		}
	}
}
