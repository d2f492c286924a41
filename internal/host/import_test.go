package host

import (
	"bytes"
	"compress/gzip"
	"context"
	"crypto/md5"
	"encoding/hex"
	"io"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/vhdkit/vhdkit/internal/api"
	"github.com/vhdkit/vhdkit/merge"
	"github.com/vhdkit/vhdkit/vhdx"
)

// hyperVFolder builds what Hyper-V leaves after checkpoints and an apply:
// base <- a <- b, and base <- c, the machine running on c (modified
// last). Each layer writes 64 KiB of its own letter at its own MiB.
func hyperVFolder(t *testing.T) (dir string, files map[string]string) {
	dir = filepath.Join(t.TempDir(), "Web Server")
	vhds := filepath.Join(dir, "Virtual Hard Disks")
	if err := os.MkdirAll(vhds, 0o700); err != nil {
		t.Fatal(err)
	}
	files = map[string]string{}
	t0 := time.Date(2026, 1, 2, 3, 4, 5, 0, time.UTC)
	layers := []struct{ name, parent, file string }{
		{"base", "", "base.vhdx"},
		{"a", "base", "base_6A1F7C2E-0D3B-4E55-9F21-7A8B9C0D1E2F.avhdx"},
		{"b", "a", "base_0B2C3D4E-5F60-4718-8293-A4B5C6D7E8F9.avhdx"},
		{"c", "base", "base_C1D2E3F4-A5B6-4C7D-8E9F-0A1B2C3D4E5F.avhdx"},
	}
	for i, l := range layers {
		p := filepath.Join(vhds, l.file)
		opts := vhdx.CreateOptions{Size: 8 << 20}
		if l.parent != "" {
			opts = vhdx.CreateOptions{Parent: files[l.parent]}
		}
		im, err := vhdx.Create(p, opts)
		if err != nil {
			t.Fatal(err)
		}
		if _, err := im.WriteAt(bytes.Repeat([]byte(l.name[:1]), 64<<10), int64(i)<<20); err != nil {
			t.Fatal(err)
		}
		if err := im.Close(); err != nil {
			t.Fatal(err)
		}
		files[l.name] = p
		when := t0.Add(time.Duration(i) * time.Hour)
		os.Chtimes(p, when, when)
	}
	return dir, files
}

// expectRunning is what disk c reads: base's and c's writes.
func expectRunning() []byte {
	want := make([]byte, 8<<20)
	copy(want[0:], bytes.Repeat([]byte("b"), 64<<10))
	copy(want[3<<20:], bytes.Repeat([]byte("c"), 64<<10))
	return want
}

func readExport(t *testing.T, th *testHost, export string, size int) []byte {
	t.Helper()
	c := th.dial(t, export)
	got := make([]byte, size)
	if _, err := c.ReadAt(got, 0); err != nil {
		t.Fatal(err)
	}
	return got
}

func TestImportHyperVFolder(t *testing.T) {
	dir, files := hyperVFolder(t)
	th := startHost(t, shortDir(t), Options{})
	ctx := context.Background()
	v, err := th.api.ImportVM(ctx, api.ImportVM{Name: "web", Dir: dir})
	if err != nil {
		t.Fatal(err)
	}
	if v.Disks[0].Path != files["c"] || len(v.Disks[0].Chain) != 2 || v.Disks[0].Chain[1] != files["base"] {
		t.Fatalf("disk 0 runs on %s, chain %v; want %s over %s", v.Disks[0].Path, v.Disks[0].Chain, files["c"], files["base"])
	}
	cps, err := th.api.Checkpoints(ctx, "web")
	if err != nil {
		t.Fatal(err)
	}
	byName := map[string]api.Checkpoint{}
	for _, c := range cps.Checkpoints {
		byName[c.Name] = c
	}
	base, a, b := byName["base"], byName["base_6A1F7C2E-0D3B-4E55-9F21-7A8B9C0D1E2F"], byName["base_0B2C3D4E-5F60-4718-8293-A4B5C6D7E8F9"]
	if len(cps.Checkpoints) != 3 || base.ID == "" || a.Parent != base.ID || b.Parent != a.ID || base.Parent != "" || cps.Current != base.ID {
		t.Fatalf("checkpoint tree %+v, want base <- a <- b, current base", cps)
	}
	if got := readExport(t, th, "web", 8<<20); !bytes.Equal(got, expectRunning()) {
		t.Fatalf("running disk differs at %d", firstDiff(got, expectRunning()))
	}
	// The machine checkpoints and merges like any other: its new child
	// lives in the daemon's folder, its parents in the imported one.
	checkpoint(t, th, "web", "x")
	c := th.dial(t, "web")
	if _, err := c.WriteAt(bytes.Repeat([]byte("x"), 4096), 5<<20); err != nil {
		t.Fatal(err)
	}
	c.Close()
	// Restarted, the daemon reopens the new child over its parents in
	// the imported folder.
	th.stop(t)
	th = startHost(t, th.dir, Options{})
	defer th.stop(t)
	want := expectRunning()
	copy(want[5<<20:], bytes.Repeat([]byte("x"), 4096))
	if got := readExport(t, th, "web", 8<<20); !bytes.Equal(got, want) {
		t.Fatalf("after a restart the disk differs at %d", firstDiff(got, want))
	}
	th.waitJob(t, deleteCheckpoint(t, th, "web", "x", false, 0).ID)
	th.waitJob(t, deleteCheckpoint(t, th, "web", b.Name, false, 0).ID)
	if got := readExport(t, th, "web", 8<<20); !bytes.Equal(got, want) {
		t.Fatalf("after the merges the disk differs at %d", firstDiff(got, want))
	}
	if _, err := os.Stat(files["b"]); !os.IsNotExist(err) {
		t.Errorf("deleting checkpoint b left its file: %v", err)
	}
	if v, _ := th.api.VM(ctx, "web"); v.State != api.VMServing || v.Disks[0].Path != files["c"] {
		t.Fatalf("after the restart: %+v", v)
	}
}

func fileMD5(t *testing.T, p string) string {
	b, err := os.ReadFile(p)
	if err != nil {
		t.Fatal(err)
	}
	sum := md5.Sum(b)
	return hex.EncodeToString(sum[:])
}

func TestImportCopyLeavesOriginals(t *testing.T) {
	dir, files := hyperVFolder(t)
	before := map[string]string{}
	for _, p := range files {
		before[p] = fileMD5(t, p)
	}
	th := startHost(t, shortDir(t), Options{})
	defer th.stop(t)
	v, err := th.api.ImportVM(context.Background(), api.ImportVM{Name: "copy", Dir: dir, Copy: true})
	if err != nil {
		t.Fatal(err)
	}
	for _, p := range v.Disks[0].Chain {
		if filepath.Dir(p) != th.machineDir("copy") {
			t.Errorf("chain file %s is not in the machine's folder", p)
		}
	}
	if got := readExport(t, th, "copy", 8<<20); !bytes.Equal(got, expectRunning()) {
		t.Fatalf("copied disk differs at %d", firstDiff(got, expectRunning()))
	}
	checkpoint(t, th, "copy", "y")
	th.waitJob(t, deleteCheckpoint(t, th, "copy", "y", false, 0).ID)
	for p, sum := range before {
		if got := fileMD5(t, p); got != sum {
			t.Errorf("%s changed by an import with --copy", p)
		}
	}
}

func TestImportRefusals(t *testing.T) {
	th := startHost(t, shortDir(t), Options{})
	defer th.stop(t)
	try := func(what, dir, want string) {
		t.Helper()
		_, err := th.api.ImportVM(context.Background(), api.ImportVM{Name: "bad", Dir: dir})
		if err == nil || !strings.Contains(err.Error(), want) {
			t.Fatalf("%s: got %v, want an error saying %q", what, err, want)
		}
		if vms := th.VMs(); len(vms) != 0 {
			t.Fatalf("%s: a machine was left: %+v", what, vms)
		}
		if _, err := os.Stat(th.machineDir("bad")); !os.IsNotExist(err) {
			t.Fatalf("%s: the machine's folder was left behind", what)
		}
		t.Logf("%s: %v", what, err)
	}
	dir, files := hyperVFolder(t)
	os.Remove(files["base"])
	try("missing parent", dir, "parent is missing")

	dir, files = hyperVFolder(t)
	if err := merge.SetParent(files["a"], files["b"], true, merge.Options{}); err != nil {
		t.Fatal(err)
	}
	try("loop", dir, "loop")

	// Two leaves of one time: which one the machine ran on is unknown.
	dir, files = hyperVFolder(t)
	fi, _ := os.Stat(files["c"])
	os.Chtimes(files["b"], fi.ModTime(), fi.ModTime())
	try("equal times", dir, "cannot tell which one the machine runs on")

	dir = t.TempDir()
	os.WriteFile(filepath.Join(dir, "notes.txt"), []byte("hello"), 0o600)
	os.WriteFile(filepath.Join(dir, "old.vhd"), make([]byte, 1024), 0o600)
	try("no VHDX", dir, "no .vhdx or .avhdx files")
}

// TestImportHyperVSample imports a checkpoint Hyper-V made (the real
// differencing file over the synthetic parent, named as Hyper-V names it).
func TestImportHyperVSample(t *testing.T) {
	samples := filepath.Join("..", "..", "..", "shared", "samples")
	child := filepath.Join(samples, "hyperv", "differencing.avhdx.gz")
	parent := filepath.Join(samples, "synthetic-parents", "Generation 1_49C4BAF3-4B25-4406-8C4B-D39E65C32385.avhdx.gz")
	if _, err := os.Stat(child); err != nil {
		t.Skip("no samples folder")
	}
	if testing.Short() {
		t.Skip("reads 8 GiB over NBD")
	}
	dir := filepath.Join(t.TempDir(), "Generation 1")
	vhds := filepath.Join(dir, "Virtual Hard Disks")
	os.MkdirAll(vhds, 0o700)
	gunzip(t, child, filepath.Join(vhds, "differencing.avhdx"))
	gunzip(t, parent, filepath.Join(vhds, "Generation 1_49C4BAF3-4B25-4406-8C4B-D39E65C32385.avhdx"))
	th := startHost(t, shortDir(t), Options{})
	defer th.stop(t)
	// The parent is an .avhdx with no parent of its own here: a root.
	v, err := th.api.ImportVM(context.Background(), api.ImportVM{Name: "gen1", Dir: dir})
	if err != nil {
		t.Fatal(err)
	}
	if filepath.Base(v.Disks[0].Path) != "differencing.avhdx" || len(v.Disks[0].Chain) != 2 {
		t.Fatalf("disk runs on %s (chain %v)", v.Disks[0].Path, v.Disks[0].Chain)
	}
	c := th.dial(t, "gen1")
	h := md5.New()
	buf := make([]byte, 4<<20)
	for off := int64(0); off < v.Disks[0].Size; off += int64(len(buf)) {
		if _, err := c.ReadAt(buf, off); err != nil {
			t.Fatal(err)
		}
		h.Write(buf)
	}
	if got := hex.EncodeToString(h.Sum(nil)); got != "4009949f5153a6966e582087d7708ad8" {
		t.Fatalf("md5 %s, want the README's 4009949f5153a6966e582087d7708ad8", got)
	}
}

func gunzip(t *testing.T, src, dst string) {
	t.Helper()
	in, err := os.Open(src)
	if err != nil {
		t.Fatal(err)
	}
	defer in.Close()
	zr, err := gzip.NewReader(in)
	if err != nil {
		t.Fatal(err)
	}
	out, err := os.Create(dst)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := io.Copy(out, zr); err != nil {
		t.Fatal(err)
	}
	out.Close()
}

// TestImportTwoDisks: two disks with the same tree make one checkpoint
// tree whose checkpoints hold a file of each; trees that differ, two
// copies of one file, and a renamed parent in place are refused (the
// last imports with --copy, which links the copies by identity).
func TestImportTwoDisks(t *testing.T) {
	th := startHost(t, shortDir(t), Options{})
	defer th.stop(t)
	ctx := context.Background()
	build := func(disks map[string][]string) string {
		dir := filepath.Join(t.TempDir(), "vm")
		os.MkdirAll(dir, 0o700)
		t0 := time.Date(2026, 1, 2, 3, 4, 5, 0, time.UTC)
		for disk, chain := range disks {
			parent := ""
			for i, name := range chain {
				p := filepath.Join(dir, name)
				opts := vhdx.CreateOptions{Size: 4 << 20}
				if parent != "" {
					opts = vhdx.CreateOptions{Parent: parent}
				}
				im, err := vhdx.Create(p, opts)
				if err != nil {
					t.Fatal(err)
				}
				im.WriteAt([]byte(disk+name), int64(i)<<20)
				if err := im.Close(); err != nil {
					t.Fatal(err)
				}
				when := t0.Add(time.Duration(i) * time.Minute)
				os.Chtimes(p, when, when)
				parent = p
			}
		}
		return dir
	}
	dir := build(map[string][]string{"A": {"sys.vhdx", "sys_1.avhdx", "sys_2.avhdx"}, "B": {"data.vhdx", "data_1.avhdx", "data_2.avhdx"}})
	v, err := th.api.ImportVM(ctx, api.ImportVM{Name: "two", Dir: dir})
	if err != nil {
		t.Fatal(err)
	}
	// Disks by name: data.vhdx is disk 0.
	if len(v.Disks) != 2 || filepath.Base(v.Disks[0].Path) != "data_2.avhdx" || filepath.Base(v.Disks[1].Path) != "sys_2.avhdx" {
		t.Fatalf("disks %+v", v.Disks)
	}
	cps, _ := th.api.Checkpoints(ctx, "two")
	if len(cps.Checkpoints) != 2 || cps.Checkpoints[1].Name != "data_1" || len(cps.Checkpoints[1].Files) != 2 ||
		filepath.Base(cps.Checkpoints[1].Files[1]) != "sys_1.avhdx" || cps.Current != cps.Checkpoints[1].ID {
		t.Fatalf("checkpoints %+v", cps)
	}
	got := make([]byte, 10)
	th.dial(t, "two/1").ReadAt(got, 2<<20)
	if string(got) != "Asys_2.avh" {
		t.Fatalf("disk 1 reads %q at 2 MiB", got)
	}

	refuse := func(what string, req api.ImportVM, want string) {
		t.Helper()
		_, err := th.api.ImportVM(ctx, req)
		if err == nil || !strings.Contains(err.Error(), want) {
			t.Fatalf("%s: got %v, want %q", what, err, want)
		}
		t.Logf("%s: %v", what, err)
	}
	dir = build(map[string][]string{"A": {"sys.vhdx", "sys_1.avhdx", "sys_2.avhdx"}, "B": {"data.vhdx", "data_1.avhdx"}})
	refuse("trees differ", api.ImportVM{Name: "bad", Dir: dir}, "disagree on the checkpoints")

	dir = build(map[string][]string{"A": {"sys.vhdx", "sys_1.avhdx"}})
	b, _ := os.ReadFile(filepath.Join(dir, "sys_1.avhdx"))
	os.WriteFile(filepath.Join(dir, "sys copy.avhdx"), b, 0o600)
	refuse("a copy of a file", api.ImportVM{Name: "bad", Dir: dir}, "the same image")

	dir = build(map[string][]string{"A": {"sys.vhdx", "sys_1.avhdx", "sys_2.avhdx"}})
	os.Rename(filepath.Join(dir, "sys.vhdx"), filepath.Join(dir, "renamed.vhdx"))
	refuse("a renamed parent", api.ImportVM{Name: "bad", Dir: dir}, "set-parent")
	if vms := th.VMs(); len(vms) != 1 {
		t.Fatalf("refusals left machines: %+v", vms)
	}
	v, err = th.api.ImportVM(ctx, api.ImportVM{Name: "renamed", Dir: dir, Copy: true})
	if err != nil {
		t.Fatal(err)
	}
	if want := []string{"sys_2.avhdx", "sys_1.avhdx", "renamed.vhdx"}; len(v.Disks[0].Chain) != 3 || filepath.Base(v.Disks[0].Chain[2]) != want[2] {
		t.Fatalf("copied chain %v, want %v", v.Disks[0].Chain, want)
	}
	th.dial(t, "renamed").ReadAt(got, 0)
	if string(got) != "Asys.vhdx\x00" {
		t.Fatalf("renamed base reads %q", got)
	}
}
