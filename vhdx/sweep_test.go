package vhdx

import (
	"bytes"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"testing"

	"github.com/vhdkit/vhdkit/storage"
	"github.com/vhdkit/vhdkit/storage/faulttest"
)

// strictFS checks the VHDX file at path in fsys with the strict checker:
// no rule a reader enforces may be broken.
func strictFS(fsys *storage.MemFS, path string) error {
	b, ok := fsys.Bytes(path)
	if !ok {
		return fmt.Errorf("%s is gone", filepath.Base(path))
	}
	probs, err := CheckStructure(storage.NewMemFile(b))
	if err != nil {
		return err
	}
	for _, p := range probs {
		if p.Violation() {
			return fmt.Errorf("strict check: %v", probs)
		}
	}
	return nil
}

// TestSweepWriteFlushClose sweeps the life of a session on an existing
// image: open, an allocating write, Flush, Close. After every point the
// file passes the strict check, reads the old or (once the Flush
// succeeded) the new data, and opens read-write and closes cleanly.
//
// It found that a Flush whose header update (naming the session's new
// LogGuid) failed was retried by Close, which wrote a new entry over the
// one the header on the disk may name: torn, the file had a LogGuid
// naming no entry, which readers refuse.
func TestSweepWriteFlushClose(t *testing.T) {
	path := filepath.Join(t.TempDir(), "s.vhdx")
	im, err := Create(path, CreateOptions{Size: 8 << 20, BlockSize: 1 << 20})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := im.WriteAt(bytes.Repeat([]byte{7}, 4096), 0); err != nil {
		t.Fatal(err)
	}
	if err := im.Close(); err != nil {
		t.Fatal(err)
	}
	initial, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	data := bytes.Repeat([]byte("new data"), 512)
	const at = 3 << 20
	faulttest.Run(t, faulttest.Sweep{
		Files: map[string][]byte{path: initial},
		Start: func(fsys *storage.MemFS) (func() error, error) {
			return func() error {
				im, err := Open(path, OpenOptions{FS: fsys})
				if err != nil {
					return err
				}
				_, err = im.WriteAt(data, at)
				if err == nil {
					err = im.Flush()
				}
				return errors.Join(err, im.Close())
			}, nil
		},
		Check: func(fsys *storage.MemFS, p faulttest.Point) error {
			if err := strictFS(fsys, path); err != nil {
				return fmt.Errorf("as found: %w", err)
			}
			im, err := Open(path, OpenOptions{FS: fsys, ReadOnly: true})
			if err != nil {
				return err
			}
			got := make([]byte, len(data))
			_, err = im.ReadAt(got, at)
			im.Close()
			if err != nil {
				return err
			}
			switch {
			case p.Err == nil && !bytes.Equal(got, data):
				return errors.New("the run succeeded but the data is not there")
			case !bytes.Equal(got, data) && !bytes.Equal(got, make([]byte, len(data))):
				return errors.New("the written range holds neither the old nor the new data")
			}
			rw, err := Open(path, OpenOptions{FS: fsys})
			if err != nil {
				return fmt.Errorf("read-write open: %w", err)
			}
			if err := rw.Close(); err != nil {
				return fmt.Errorf("closing after the read-write open: %w", err)
			}
			return strictFS(fsys, path)
		},
	})
}
