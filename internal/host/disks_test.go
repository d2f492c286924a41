package host

import (
	"context"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/vhdkit/vhdkit/internal/api"
	"github.com/vhdkit/vhdkit/internal/vmm"
)

// TestAddDiskHotplugFails: a hot-plug that QEMU refuses (here: a machine
// whose QMP socket does not answer) undoes everything before it: the
// state has the disks it had, on disk too, the export is gone and the
// file made for the disk removed.
func TestAddDiskHotplugFails(t *testing.T) {
	dir := shortDir(t)
	th := startHost(t, dir, Options{})
	if _, err := th.CreateVM(api.CreateVM{Name: "g", Disks: []int64{16 << 20}}); err != nil {
		t.Fatal(err)
	}
	th.mu.Lock()
	v := th.vms["g"]
	v.run = &vmRun{power: api.PowerRunning, proc: &vmm.Process{Pid: -1, QMP: filepath.Join(dir, "no-qmp.sock")}}
	th.mu.Unlock()
	_, err := th.AddDisk(context.Background(), "g", api.AddDisk{Size: 8 << 20})
	if err == nil || !strings.Contains(err.Error(), "hot-plugging disk 1") {
		t.Fatalf("a hot-plug without QMP: %v", err)
	}
	if n := len(v.st.Disks); n != 1 || len(v.disks) != 1 {
		t.Fatalf("after the failed hot-plug the machine has %d disks (%d open)", n, len(v.disks))
	}
	if th.nbd.Clients("g/1") != 0 || th.nbd.RemoveExport("g/1") {
		t.Fatal("the failed disk's export is still there")
	}
	if _, err := os.Stat(filepath.Join(dir, "vms", "g", "disk1.vhdx")); !os.IsNotExist(err) {
		t.Fatalf("the failed disk's file: %v", err)
	}
	st, err := loadState(dir)
	if err != nil {
		t.Fatal(err)
	}
	if n := len(st.Machines[0].Disks); n != 1 {
		t.Fatalf("the saved state has %d disks after the failed hot-plug", n)
	}
	th.mu.Lock()
	v.run = nil
	th.mu.Unlock()
}
