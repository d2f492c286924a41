package faulttest_test

import (
	"bytes"
	"fmt"

	"github.com/vhdkit/vhdkit/storage"
	"github.com/vhdkit/vhdkit/storage/faulttest"
)

// Sweeps an atomic replacement of a small state file (storage.WriteFileTo:
// a temporary file written, synced, renamed over the old one, the folder
// synced) through every crash, I/O error and full-disk point: the file
// must hold the old content or the new, whole, wherever it stopped.
func Example() {
	old, updated := []byte("version 1"), []byte("version 2, longer")
	sweep := faulttest.Sweep{
		Files: map[string][]byte{"/vm/state.json": old},
		Start: func(fsys *storage.MemFS) (func() error, error) {
			return func() error { return storage.WriteFileTo(fsys, "/vm/state.json", updated, 0o600) }, nil
		},
		Check: func(fsys *storage.MemFS, p faulttest.Point) error {
			got, _ := fsys.Bytes("/vm/state.json")
			if !bytes.Equal(got, old) && !bytes.Equal(got, updated) {
				return fmt.Errorf("state.json holds %q", got)
			}
			return nil
		},
	}
	res, err := sweep.Run()
	if err != nil {
		fmt.Println(err)
		return
	}
	fmt.Println("operations:", res.Ops)
	for _, m := range faulttest.Modes {
		fmt.Printf("%s points: %d\n", m, res.Points[m])
	}
	fmt.Println("states checked:", res.Checks)
	// Output:
	// operations: 5
	// crash points: 5
	// io-error points: 5
	// no-space points: 2
	// states checked: 27
}
