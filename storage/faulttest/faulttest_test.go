package faulttest

import (
	"bytes"
	"fmt"
	"os"
	"strings"
	"testing"

	"github.com/vhdkit/vhdkit/storage"
)

// replaceSweep sweeps storage.WriteFileTo-like replacement of a file
// done by write: after any point, the file holds the old content or the
// new, whole.
func replaceSweep(write func(fsys storage.FS, path string, data []byte) error) Sweep {
	old := bytes.Repeat([]byte("old sector content "), 100)
	updated := bytes.Repeat([]byte("NEW SECTOR CONTENT "), 120)
	return Sweep{
		Files: map[string][]byte{"/d/state": old},
		Start: func(fsys *storage.MemFS) (func() error, error) {
			return func() error { return write(fsys, "/d/state", updated) }, nil
		},
		Check: func(fsys *storage.MemFS, p Point) error {
			got, ok := fsys.Bytes("/d/state")
			switch {
			case !ok:
				return fmt.Errorf("the file is gone (files: %v)", fsys.Names())
			case p.Err == nil && p.PowerCut == 0 && !bytes.Equal(got, updated):
				return fmt.Errorf("the replacement reported success but the file holds %q…", got[:min(len(got), 20)])
			case !bytes.Equal(got, old) && !bytes.Equal(got, updated):
				return fmt.Errorf("the file holds a mix: %q…", got[:min(len(got), 20)])
			}
			return nil
		},
	}
}

func TestSweepWriteFileTo(t *testing.T) {
	res := Run(t, replaceSweep(func(fsys storage.FS, path string, data []byte) error {
		return storage.WriteFileTo(fsys, path, data, 0o600)
	}))
	// create, write, sync, rename, syncdir: each a crash point, and the
	// no-space points are the create and the write.
	if res.Ops != 5 || res.Points[Crash] != 5 || res.Points[IOError] != 5 || res.Points[NoSpace] != 2 {
		t.Fatalf("%+v", res)
	}
	if res.Checks != 5*4+5+2 {
		t.Fatalf("%d checks", res.Checks)
	}
}

// TestSweepFindsMissingSync shows the sweep failing an operation that
// renames before syncing the data: a power cut after the rename leaves a
// torn or empty file under the name.
func TestSweepFindsMissingSync(t *testing.T) {
	s := replaceSweep(func(fsys storage.FS, path string, data []byte) error {
		f, err := fsys.OpenFile(path+".tmp", os.O_RDWR|os.O_CREATE|os.O_TRUNC, 0o600)
		if err != nil {
			return err
		}
		if _, err := f.WriteAt(data, 0); err != nil {
			return err
		}
		f.Close()
		if err := fsys.Rename(path+".tmp", path); err != nil {
			return err
		}
		return fsys.SyncDir("/d")
	})
	s.PowerCuts = 20
	_, err := s.Run()
	if err == nil || !strings.Contains(err.Error(), "crash at operation") {
		t.Fatalf("the sweep passed an update without a sync: %v", err)
	}
	t.Log(err)
}

// TestSweepFindsLostCause shows the sweep refusing an error that does not
// wrap the injected one.
func TestSweepFindsLostCause(t *testing.T) {
	s := replaceSweep(func(fsys storage.FS, path string, data []byte) error {
		if err := storage.WriteFileTo(fsys, path, data, 0o600); err != nil {
			return fmt.Errorf("saving failed: %v", err) // %v: the cause is lost
		}
		return nil
	})
	if _, err := s.Run(); err == nil || !strings.Contains(err.Error(), "does not wrap the injected one") {
		t.Fatalf("got %v", err)
	}
}

func TestSeeds(t *testing.T) {
	t.Setenv("VHDKIT_SWEEP", "")
	if n := len(Seeds(3)); n != 3 {
		t.Fatal(n)
	}
	t.Setenv("VHDKIT_SWEEP", "long")
	if n := len(Seeds(3)); n != 30 || !Long() {
		t.Fatal(n)
	}
}
