package merge_test

import (
	"context"
	"errors"
	"fmt"
	"log"
	"os"
	"path/filepath"

	"github.com/vhdkit/vhdkit/merge"
	"github.com/vhdkit/vhdkit/vhdx"
)

// makeChain makes base.vhdx (16 MiB, "base" at 0 and at 1 MiB) and a
// child base_1.avhdx over it, and returns the child, open.
func makeChain(dir string) *vhdx.Image {
	base, err := vhdx.Create(filepath.Join(dir, "base.vhdx"), vhdx.CreateOptions{Size: 16 << 20, BlockSize: 1 << 20})
	if err != nil {
		log.Fatal(err)
	}
	for _, off := range []int64{0, 1 << 20} {
		if _, err := base.WriteAt([]byte("base"), off); err != nil {
			log.Fatal(err)
		}
	}
	child, err := base.CreateChild(filepath.Join(dir, "base_1.avhdx"), vhdx.CreateOptions{})
	if err != nil {
		log.Fatal(err)
	}
	return child
}

// read4 prints the 4 bytes at each offset of img.
func read4(img interface {
	ReadAt([]byte, int64) (int, error)
}, offs ...int64) {
	for _, off := range offs {
		p := make([]byte, 4)
		if _, err := img.ReadAt(p, off); err != nil {
			log.Fatal(err)
		}
		fmt.Printf("  at %d: %q\n", off, p)
	}
}

// Deleting a checkpoint offline (Hyper-V's Merge-VHD): the child's data
// is folded into its parent, which becomes the leaf, and the child is
// removed. A crash at any point leaves a chain that reads the newest
// data; running Merge again finishes the job.
func ExampleMerge() {
	dir, err := os.MkdirTemp("", "merge-example-")
	if err != nil {
		log.Fatal(err)
	}
	defer os.RemoveAll(dir)
	child := makeChain(dir)
	if _, err := child.WriteAt([]byte("kid!"), 1<<20); err != nil {
		log.Fatal(err)
	}
	oldGUID := child.Parent().Info().DataWriteGUID
	// Merge opens the chain's files itself: no one else may hold them.
	if err := child.Close(); err != nil {
		log.Fatal(err)
	}

	res, err := merge.Merge(context.Background(), filepath.Join(dir, "base_1.avhdx"), merge.Options{})
	if err != nil {
		log.Fatal(err)
	}
	fmt.Println("target:", filepath.Base(res.Target))
	for _, p := range res.Removed {
		_, err := os.Stat(p)
		fmt.Println("removed:", filepath.Base(p), errors.Is(err, os.ErrNotExist))
	}
	// The child held one sector of its own: the one written.
	fmt.Println("data bytes carried:", res.Copied)

	base, err := vhdx.Open(res.Target, vhdx.OpenOptions{ReadOnly: true})
	if err != nil {
		log.Fatal(err)
	}
	defer base.Close()
	fmt.Println("base.vhdx now reads:")
	read4(base, 0, 1<<20)
	// The base changed: children made before the merge no longer match it.
	fmt.Println("new DataWriteGuid:", base.Info().DataWriteGUID != oldGUID)
	// Output:
	// target: base.vhdx
	// removed: base_1.avhdx true
	// data bytes carried: 512
	// base.vhdx now reads:
	//   at 0: "base"
	//   at 1048576: "kid!"
	// new DataWriteGuid: true
}

// Deleting a checkpoint while the machine runs: the disk keeps serving
// reads and writes while the child's data is copied into its parent
// (writes meanwhile go to both), then switches to the parent in a short
// pause.
func ExampleDisk_StartMerge() {
	dir, err := os.MkdirTemp("", "merge-example-")
	if err != nil {
		log.Fatal(err)
	}
	defer os.RemoveAll(dir)
	if err := makeChain(dir).Close(); err != nil {
		log.Fatal(err)
	}

	// The running disk, as a host serves it.
	d, err := merge.OpenDisk(filepath.Join(dir, "base_1.avhdx"), vhdx.OpenOptions{})
	if err != nil {
		log.Fatal(err)
	}
	if _, err := d.WriteAt([]byte("kid!"), 1<<20); err != nil {
		log.Fatal(err)
	}
	fmt.Println("running on:", filepath.Base(d.Leaf()))

	m, err := d.StartMerge(vhdx.NewGUID())
	if err != nil {
		log.Fatal(err)
	}
	// A guest write during the merge: mirrored into the target.
	if _, err := d.WriteAt([]byte("new!"), 5<<20); err != nil {
		log.Fatal(err)
	}
	if _, err := m.Run(context.Background(), merge.Options{}); err != nil {
		log.Fatal(err)
	}
	top := m.Top()
	// Complete switches the disk under a pause; commit (nil here) is
	// where a host records that the disk's leaf is now the target.
	if err := m.Complete(nil); err != nil {
		log.Fatal(err)
	}
	// The merged file is closed; removing it is the caller's part.
	if err := os.Remove(top); err != nil {
		log.Fatal(err)
	}
	fmt.Println("running on:", filepath.Base(d.Leaf()))
	for _, p := range d.Chain() {
		fmt.Println("chain:", filepath.Base(p))
	}
	fmt.Println("the disk reads:")
	read4(d, 0, 1<<20, 5<<20)
	if err := d.Close(); err != nil {
		log.Fatal(err)
	}

	// The merged parent stands alone.
	base, err := vhdx.Open(filepath.Join(dir, "base.vhdx"), vhdx.OpenOptions{ReadOnly: true})
	if err != nil {
		log.Fatal(err)
	}
	defer base.Close()
	fmt.Println("base.vhdx, a", base.Info().Type, "disk, reads:")
	read4(base, 0, 1<<20, 5<<20)
	// Output:
	// running on: base_1.avhdx
	// running on: base.vhdx
	// chain: base.vhdx
	// the disk reads:
	//   at 0: "base"
	//   at 1048576: "kid!"
	//   at 5242880: "new!"
	// base.vhdx, a dynamic disk, reads:
	//   at 0: "base"
	//   at 1048576: "kid!"
	//   at 5242880: "new!"
}
