package host

import (
	"bytes"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/vhdkit/vhdkit/internal/api"
	"github.com/vhdkit/vhdkit/nbd"
	"github.com/vhdkit/vhdkit/vhdx"
)

// TestApplyDeleteUnderClients: apply and vm delete are refused while NBD
// clients are connected, naming how many on which export, and change
// nothing; with Force the clients are disconnected (their acknowledged
// writes kept) and the change is made. vm delete removes the files it
// made only with DeleteDisks, and never an attached file.
func TestApplyDeleteUnderClients(t *testing.T) {
	dir := shortDir(t)
	th := startHost(t, dir, Options{})
	defer th.stop(t)
	if _, err := th.api.CreateVM(ctx, api.CreateVM{Name: "m", Disks: []int64{16 << 20, 8 << 20}}); err != nil {
		t.Fatal(err)
	}
	w := newWorkload(th.dial(t, "m"), 21)
	w.fill(t, 50)
	cp := checkpoint(t, th, "m", "one")
	w.fill(t, 50)
	other := th.dial(t, "m/1")
	_, err := th.api.ApplyCheckpoint(ctx, "m", "one", api.ApplyCheckpoint{})
	if statusOf(err) != http.StatusConflict || !strings.Contains(err.Error(), `1 on export "m", 1 on export "m/1"`) || !strings.Contains(err.Error(), "--force") {
		t.Fatalf("apply under clients: %v", err)
	}
	w.verify(t, w.c, "after a refused apply")
	v, err := th.api.ApplyCheckpoint(ctx, "m", cp.ID, api.ApplyCheckpoint{Force: true})
	if err != nil || v.Disconnected != 2 {
		t.Fatalf("apply --force: %+v %v", v, err)
	}
	if _, err := w.c.ReadAt(make([]byte, 512), 0); err == nil {
		t.Fatal("a client read across a forced apply")
	}
	if _, err := other.ReadAt(make([]byte, 512), 0); err == nil {
		t.Fatal("the second disk's client read across a forced apply")
	}

	// Delete: the files it would remove are named, and the flag.
	c := th.dial(t, "m")
	var b [4096]byte
	if _, err := c.WriteAt(bytes.Repeat([]byte{7}, 4096), 0); err != nil || c.Flush() != nil {
		t.Fatal(err)
	}
	_, err = th.api.DeleteVM(ctx, "m", api.DeleteVM{})
	if statusOf(err) != http.StatusConflict || !strings.Contains(err.Error(), "--delete-disks") || !strings.Contains(err.Error(), "disk0.vhdx") {
		t.Fatalf("delete without --delete-disks: %v", err)
	}
	_, err = th.api.DeleteVM(ctx, "m", api.DeleteVM{DeleteDisks: true})
	if statusOf(err) != http.StatusConflict || !strings.Contains(err.Error(), `1 NBD client connected (1 on export "m")`) {
		t.Fatalf("delete under a client: %v", err)
	}
	if _, err := c.ReadAt(b[:], 0); err != nil || b[0] != 7 {
		t.Fatalf("the client after refused deletes: %v", err)
	}
	files, _ := filepath.Glob(filepath.Join(dir, "vms", "m", "*hdx"))
	if len(files) != 4 {
		t.Fatalf("files after refused deletes: %v", files)
	}
	del, err := th.api.DeleteVM(ctx, "m", api.DeleteVM{DeleteDisks: true, Force: true})
	if err != nil || del.Disconnected != 1 || len(del.Removed) != 4 {
		t.Fatalf("delete --force --delete-disks: %+v %v", del, err)
	}
	if _, err := os.Stat(filepath.Join(dir, "vms", "m")); !os.IsNotExist(err) {
		t.Fatalf("the machine's folder is still there: %v", err)
	}

	// Only attached files: nothing to remove, no flag needed; the file stays.
	att := filepath.Join(dir, "att.vhdx")
	if _, err := th.api.CreateVM(ctx, api.CreateVM{Name: "tmp", Disks: []int64{4 << 20}}); err != nil {
		t.Fatal(err)
	}
	if _, err := th.api.DeleteVM(ctx, "tmp", api.DeleteVM{DeleteDisks: true}); err != nil {
		t.Fatal(err)
	}
	makeVHDX(t, att, 4<<20)
	if _, err := th.api.CreateVM(ctx, api.CreateVM{Name: "a", Attach: []string{att}}); err != nil {
		t.Fatal(err)
	}
	del, err = th.api.DeleteVM(ctx, "a", api.DeleteVM{})
	if err != nil || len(del.Removed) != 0 || len(del.Kept) != 1 {
		t.Fatalf("delete of an attached-only machine: %+v %v", del, err)
	}
	if _, err := os.Stat(att); err != nil {
		t.Fatalf("the attached file: %v", err)
	}
}

// TestFailedMachine: a machine whose running file is missing comes up
// failed with the reason while the other machine serves; its job (a live
// merge interrupted by the stop) waits and does not run; changes are
// refused; a retry fails again; a wrong file is refused; re-attaching the
// moved file brings it back, its job completes and every write is there.
func TestFailedMachine(t *testing.T) {
	dir := shortDir(t)
	th := startHost(t, dir, Options{})
	wa := newVM(t, th, "a", 32<<20, 31)
	wb := newVM(t, th, "b", 16<<20, 32)
	checkpoint(t, th, "a", "one")
	wa.fill(t, 300)
	j := deleteCheckpoint(t, th, "a", "one", false, 2<<20)
	th.waitProgress(t, j.ID)
	wa.fill(t, 20)
	v, _ := th.Host.VM("a")
	leaf := v.Disks[0].Path
	th.stop(t)
	modelA, modelB := wa.snapshot(), wb.snapshot()
	moved := filepath.Join(dir, "moved.avhdx")
	if err := os.Rename(leaf, moved); err != nil {
		t.Fatal(err)
	}

	th = startHost(t, dir, Options{})
	defer th.stop(t)
	va, err := th.api.VM(ctx, "a")
	if err != nil || va.State != api.VMFailed || !strings.Contains(va.Error, leaf) || va.Disks[0].Export != "" {
		t.Fatalf("vm a after its file moved: %+v %v", va, err)
	}
	if vb, _ := th.api.VM(ctx, "b"); vb.State != api.VMServing {
		t.Fatalf("vm b: %+v", vb)
	}
	wb.c = th.dial(t, "b")
	wb.model = modelB
	wb.verify(t, wb.c, "the other machine")
	if _, err := nbd.Dial(ctx, "unix", th.nbdSock, &nbd.ClientOptions{Export: "a"}); err == nil {
		t.Fatal("a failed machine's disk is exported")
	}
	js, _ := th.api.Job(ctx, j.ID)
	if js.State != api.JobPaused || !strings.Contains(js.Reason, "machine a is failed") {
		t.Fatalf("the failed machine's job: %+v", js)
	}
	// Resuming it does not run it.
	if _, err := th.api.ControlJob(ctx, j.ID, "resume"); err != nil {
		t.Fatal(err)
	}
	time.Sleep(200 * time.Millisecond)
	if js, _ := th.api.Job(ctx, j.ID); js.State != api.JobPaused || js.Done > js.Total {
		t.Fatalf("the failed machine's job after resume: %+v", js)
	}
	_, err = th.api.CreateCheckpoint(ctx, "a", api.CreateCheckpoint{})
	if statusOf(err) != http.StatusConflict || !strings.Contains(err.Error(), "vhdkit vm repair a") {
		t.Fatalf("checkpoint of a failed machine: %v", err)
	}
	if _, err := th.api.RepairVM(ctx, "a", api.RepairVM{}); statusOf(err) != http.StatusConflict || !strings.Contains(err.Error(), "still failed") {
		t.Fatalf("retry with the file still missing: %v", err)
	}
	zero := 0
	wrong := filepath.Join(dir, "wrong.vhdx")
	makeVHDX(t, wrong, 32<<20)
	if _, err := th.api.RepairVM(ctx, "a", api.RepairVM{Disk: &zero, Path: wrong}); statusOf(err) != http.StatusBadRequest || !strings.Contains(err.Error(), "not disk 0") {
		t.Fatalf("re-attaching a file that is not the disk: %v", err)
	}
	vb, _ := th.api.VM(ctx, "b")
	if _, err := th.api.RepairVM(ctx, "a", api.RepairVM{Disk: &zero, Path: vb.Disks[0].Path}); statusOf(err) != http.StatusConflict {
		t.Fatalf("re-attaching another machine's disk: %v", err)
	}
	va, err = th.api.RepairVM(ctx, "a", api.RepairVM{Disk: &zero, Path: moved})
	if err != nil || va.State != api.VMServing || va.Disks[0].Path != moved {
		t.Fatalf("repair: %+v %v", va, err)
	}
	wa.c = th.dial(t, "a")
	wa.model = modelA
	wa.verify(t, wa.c, "after the repair")
	wa.fill(t, 20)
	zero64 := int64(0)
	th.api.SetJob(ctx, j.ID, api.SetJob{Bandwidth: &zero64})
	if js := th.waitJob(t, j.ID); js.State != api.JobDone {
		t.Fatalf("the job after the repair: %+v", js)
	}
	wa.verify(t, wa.c, "after the merge")
}

// TestDropLostCheckpoint: a machine whose running chain lost a
// checkpoint's file fails; dropping that checkpoint (an explicit repair)
// brings it back on the parent checkpoint's state.
func TestDropLostCheckpoint(t *testing.T) {
	dir := shortDir(t)
	th := startHost(t, dir, Options{})
	w := newVM(t, th, "d", 16<<20, 41)
	checkpoint(t, th, "d", "one")
	atOne := w.snapshot()
	w.fill(t, 50)
	two := checkpoint(t, th, "d", "two")
	w.fill(t, 50)
	th.stop(t)
	if err := os.Remove(two.Files[0]); err != nil {
		t.Fatal(err)
	}
	th = startHost(t, dir, Options{})
	defer th.stop(t)
	if v, _ := th.api.VM(ctx, "d"); v.State != api.VMFailed {
		t.Fatalf("vm after losing a checkpoint's file: %+v", v)
	}
	if _, err := th.api.RepairVM(ctx, "d", api.RepairVM{DropCheckpoint: "one"}); statusOf(err) != http.StatusConflict || !strings.Contains(err.Error(), "not lost") {
		t.Fatalf("dropping a checkpoint that is not lost: %v", err)
	}
	v, err := th.api.RepairVM(ctx, "d", api.RepairVM{DropCheckpoint: "two"})
	if err != nil || v.State != api.VMServing || v.CurrentName != "one" || v.Checkpoints != 1 {
		t.Fatalf("drop: %+v %v", v, err)
	}
	w.model = atOne
	w.verify(t, th.dial(t, "d"), "after dropping the lost checkpoint")
}

// TestCheckpointIDs: a checkpoint is addressed by name or by its cp-N ID;
// a numeric name is a name, whatever IDs exist; names of the ID form are
// refused; vm show and checkpoint list name the current checkpoint alike;
// job IDs count on their own.
func TestCheckpointIDs(t *testing.T) {
	dir := shortDir(t)
	th := startHost(t, dir, Options{})
	defer th.stop(t)
	w := newVM(t, th, "n", 16<<20, 51)
	a := checkpoint(t, th, "n", "a")
	atA := w.snapshot()
	w.fill(t, 30)
	one := checkpoint(t, th, "n", "1") // named like a's number
	atOne := w.snapshot()
	w.fill(t, 30)
	if a.ID != "cp-1" || one.ID != "cp-2" || one.Parent != a.ID {
		t.Fatalf("ids: a %+v, 1 %+v", a, one)
	}
	for _, name := range []string{"cp-9", "CP-1"} {
		if _, err := th.api.CreateCheckpoint(ctx, "n", api.CreateCheckpoint{Name: name}); statusOf(err) != http.StatusBadRequest || !strings.Contains(err.Error(), "form of a checkpoint ID") {
			t.Fatalf("a checkpoint named %q: %v", name, err)
		}
		if _, err := th.api.RenameCheckpoint(ctx, "n", "a", name); statusOf(err) != http.StatusBadRequest {
			t.Fatalf("renaming to %q: %v", name, err)
		}
	}
	v, err := th.api.ApplyCheckpoint(ctx, "n", "1", api.ApplyCheckpoint{Force: true})
	if err != nil || v.Current != one.ID || v.CurrentName != "1" {
		t.Fatalf("apply \"1\": %+v %v", v, err)
	}
	w.c = th.dial(t, "n")
	w.model = bytes.Clone(atOne)
	w.verify(t, w.c, `after applying the checkpoint named "1"`)
	tree, _ := th.api.Checkpoints(ctx, "n")
	if tree.Current != v.Current {
		t.Fatalf("checkpoint list says current %q, vm show %q", tree.Current, v.Current)
	}
	if v, err = th.api.ApplyCheckpoint(ctx, "n", "cp-1", api.ApplyCheckpoint{Force: true}); err != nil || v.Current != a.ID || v.CurrentName != "a" {
		t.Fatalf("apply cp-1: %+v %v", v, err)
	}
	w.c = th.dial(t, "n")
	w.model = bytes.Clone(atA)
	w.verify(t, w.c, "after applying cp-1")
	j := deleteCheckpoint(t, th, "n", "1", false, 0)
	if j.ID != "1" || j.CheckpointID != one.ID {
		t.Fatalf("the first job: %+v", j)
	}
	th.waitJob(t, j.ID)
}

// TestCancelMergeBegun: a cancel that comes once the merge has begun
// cannot undo it: the reply says it completes first, and the job then
// ends done (it deleted what it was asked to), not canceled.
func TestCancelMergeBegun(t *testing.T) {
	dir := shortDir(t)
	th := startHost(t, dir, Options{})
	defer th.stop(t)
	w := newVM(t, th, "c", 32<<20, 61)
	checkpoint(t, th, "c", "one")
	w.fill(t, 300)
	j := deleteCheckpoint(t, th, "c", "one", false, 4<<20)
	th.waitProgress(t, j.ID)
	r, err := th.api.ControlJob(ctx, j.ID, "cancel")
	if err != nil || r.Finished() || !strings.Contains(r.Reason, "completes first") {
		t.Fatalf("cancel: %+v %v", r, err)
	}
	zero := int64(0)
	th.api.SetJob(ctx, j.ID, api.SetJob{Bandwidth: &zero})
	if e := th.waitJob(t, j.ID); e.State != api.JobDone || !strings.Contains(e.Reason, "merge completed") {
		t.Fatalf("the job after a late cancel: %+v", e)
	}
	if tree, _ := th.api.Checkpoints(ctx, "c"); len(tree.Checkpoints) != 0 {
		t.Fatalf("tree: %+v", tree)
	}
	w.verify(t, w.c, "after the canceled merge")
}

// TestETAFollowsRate: the time left comes from the rate of the last few
// seconds, so it follows a bandwidth change instead of averaging over
// the whole copy.
func TestETAFollowsRate(t *testing.T) {
	dir := shortDir(t)
	th := startHost(t, dir, Options{})
	defer th.stop(t)
	w := newVM(t, th, "e", 64<<20, 71)
	checkpoint(t, th, "e", "one")
	buf := make([]byte, 1<<20)
	for off := int64(0); off < 56<<20; off += 1 << 20 {
		buf[0] = byte(off >> 20)
		if _, err := w.c.WriteAt(buf, off); err != nil {
			t.Fatal(err)
		}
	}
	j := deleteCheckpoint(t, th, "e", "one", false, 1<<20)
	time.Sleep(3 * time.Second)
	fast := int64(8 << 20)
	if _, err := th.api.SetJob(ctx, j.ID, api.SetJob{Bandwidth: &fast}); err != nil {
		t.Fatal(err)
	}
	time.Sleep(3500 * time.Millisecond)
	j1, _ := th.api.Job(ctx, j.ID)
	time.Sleep(time.Second)
	j2, _ := th.api.Job(ctx, j.ID)
	rate := float64(j2.Done - j1.Done)
	if j2.Finished() || rate <= 0 {
		t.Fatalf("job not copying: %+v then %+v", j1, j2)
	}
	want := float64(j2.Total-j2.Done) / rate
	if j2.ETA <= 0 || j2.ETA > 1.5*want || j2.ETA < want/1.5 {
		t.Fatalf("ETA %.1fs; at the rate measured (%.1f MiB/s) %.1f MiB take %.1fs", j2.ETA, rate/(1<<20), float64(j2.Total-j2.Done)/(1<<20), want)
	}
	zero := int64(0)
	th.api.SetJob(ctx, j.ID, api.SetJob{Bandwidth: &zero})
	th.waitJob(t, j.ID)
}

// TestPrivateFolders: the folders the host creates are the owner's only,
// and so is its state.
func TestPrivateFolders(t *testing.T) {
	dir := filepath.Join(shortDir(t), "data")
	th := startHost(t, dir, Options{})
	defer th.stop(t)
	newVM(t, th, "p", 4<<20, 81)
	for _, c := range []struct {
		path string
		mode os.FileMode
	}{
		{dir, 0o700},
		{filepath.Join(dir, "vms"), 0o700},
		{filepath.Join(dir, "vms", "p"), 0o700},
		{filepath.Join(dir, "state.json"), 0o600},
		{filepath.Join(dir, "lock"), 0o600},
	} {
		fi, err := os.Stat(c.path)
		if err != nil || fi.Mode().Perm() != c.mode {
			t.Errorf("%s: mode %v (%v), want %v", c.path, fi.Mode().Perm(), err, c.mode)
		}
	}
}

// makeVHDX creates an empty dynamic VHDX.
func makeVHDX(t testing.TB, path string, size uint64) {
	t.Helper()
	im, err := vhdxCreate(path, size)
	if err != nil {
		t.Fatal(err)
	}
	im.Close()
}

func vhdxCreate(path string, size uint64) (*vhdx.Image, error) {
	return vhdx.Create(path, vhdx.CreateOptions{Size: size})
}
