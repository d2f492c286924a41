package host

import (
	"testing"

	"github.com/vhdkit/vhdkit/internal/api"
)

// TestJobCountsMovedData: a job's merges, live (the running disk's leaf
// into the checkpoint's file) and offline (a checkpoint's file into its
// parent's), say how their data went; on this file system it went file
// to file (copy_file_range or clones), not through memory.
func TestJobCountsMovedData(t *testing.T) {
	dir := shortDir(t)
	th := startHost(t, dir, Options{})
	v, err := th.api.CreateVM(ctx, api.CreateVM{Name: "web", Disks: []int64{32 << 20}})
	if err != nil {
		t.Fatal(err)
	}
	w := newWorkload(th.dial(t, v.Disks[0].Export), 1)
	w.fill(t, 100)
	for _, name := range []string{"one", "two"} {
		if _, err := th.api.CreateCheckpoint(ctx, "web", api.CreateCheckpoint{Name: name}); err != nil {
			t.Fatal(err)
		}
		w.fill(t, 100)
	}
	for _, name := range []string{"one", "two"} { // offline, then live
		j, err := th.api.DeleteCheckpoint(ctx, "web", name, false, 0)
		if err != nil {
			t.Fatal(err)
		}
		j = th.waitJob(t, j.ID)
		if j.State != api.JobDone {
			t.Fatalf("job %+v", j)
		}
		if j.Cloned+j.KernelCopied == 0 || j.Copied > j.Cloned+j.KernelCopied {
			t.Fatalf("deleting %s: data moved %d cloned, %d copied in the kernel, %d copied", name, j.Cloned, j.KernelCopied, j.Copied)
		}
	}
	w.verify(t, th.dial(t, v.Disks[0].Export), "after the merges")
}
