package guest

import (
	"bytes"
	"compress/gzip"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
)

// cpioMember is one entry read back from a newc archive.
type cpioMember struct {
	mode uint32
	rdev [2]uint32
	data []byte
}

// readNewc parses a newc archive strictly: magic, hex fields, NUL after
// the name, 4-byte alignment, and the trailer at the end.
func readNewc(t *testing.T, b []byte) map[string]cpioMember {
	t.Helper()
	out := map[string]cpioMember{}
	off := 0
	field := func(i int) uint32 {
		v, err := strconv.ParseUint(string(b[off+6+8*i:off+14+8*i]), 16, 32)
		if err != nil {
			t.Fatalf("at %d: field %d: %v", off, i, err)
		}
		return uint32(v)
	}
	for {
		if off%4 != 0 || off+110 > len(b) || string(b[off:off+6]) != "070701" {
			t.Fatalf("bad header at %d", off)
		}
		mode, size, nameSize := field(1), int(field(6)), int(field(11))
		rdev := [2]uint32{field(9), field(10)}
		nameAt := off + 110
		if b[nameAt+nameSize-1] != 0 {
			t.Fatalf("name at %d not NUL-terminated", nameAt)
		}
		name := string(b[nameAt : nameAt+nameSize-1])
		dataAt := (nameAt + nameSize + 3) &^ 3
		if name == "TRAILER!!!" {
			if end := (dataAt + 3) &^ 3; end != len(b) {
				t.Fatalf("trailer ends at %d of %d", end, len(b))
			}
			return out
		}
		if _, dup := out[name]; dup {
			t.Fatalf("%s twice", name)
		}
		out[name] = cpioMember{mode, rdev, b[dataAt : dataAt+size]}
		off = (dataAt + size + 3) &^ 3
	}
}

func TestInitramfs(t *testing.T) {
	dir := t.TempDir()
	write := func(name string, data []byte) string {
		p := filepath.Join(dir, name)
		if err := os.WriteFile(p, data, 0o644); err != nil {
			t.Fatal(err)
		}
		return p
	}
	var gz bytes.Buffer
	zw := gzip.NewWriter(&gz)
	zw.Write([]byte("compressed module"))
	zw.Close()
	e := &Env{
		Busybox: write("busybox", []byte("not really busybox")),
		Kernel: &Kernel{Modules: []Module{
			{Name: "virtio", Path: write("virtio.ko", []byte("plain module"))},
			{Name: "virtio_blk", Path: write("virtio_blk.ko.gz", gz.Bytes())},
		}},
	}
	var b bytes.Buffer
	err := e.buildInitramfs(&b, Options{Script: "echo hi\n", Disks: make([]Disk, 2), Files: map[string]File{
		"/data/p1": {Data: []byte("abc")},
		"x":        {Data: []byte("12345"), Mode: 0o600},
	}})
	if err != nil {
		t.Fatal(err)
	}
	m := readNewc(t, b.Bytes())
	for name, want := range map[string]string{
		"bin/busybox":               "not really busybox",
		"lib/modules/virtio.ko":     "plain module",
		"lib/modules/virtio_blk.ko": "compressed module",
		"script":                    "echo hi\n",
		"data/p1":                   "abc",
		"x":                         "12345",
		"bin/sh":                    "busybox",
	} {
		if got := string(m[name].data); got != want {
			t.Errorf("%s: %q, want %q", name, got, want)
		}
	}
	for name, mode := range map[string]uint32{
		"bin": modeDir | 0o755, "data": modeDir | 0o755, "bin/busybox": modeFile | 0o755, "init": modeFile | 0o755,
		"x": modeFile | 0o600, "data/p1": modeFile | 0o644, "bin/sh": modeSymlink | 0o777, "dev/console": modeCharDev | 0o600,
	} {
		if m[name].mode != mode {
			t.Errorf("%s: mode %o, want %o", name, m[name].mode, mode)
		}
	}
	if m["dev/console"].rdev != [2]uint32{5, 1} {
		t.Errorf("dev/console: device %v", m["dev/console"].rdev)
	}
	initText := string(m["init"].data)
	if !strings.Contains(initText, "for m in virtio virtio_blk; do") || !strings.Contains(initText, "for d in vda vdb; do") {
		t.Errorf("init:\n%s", initText)
	}
	if err := e.buildInitramfs(&b, Options{Files: map[string]File{"/init": {}}}); err == nil {
		t.Error("a file named /init was accepted")
	}
}

// TestFindKernel builds a fake unpacked kernel package: modules found in
// the tree or listed as built in, and a missing one refused.
func TestFindKernel(t *testing.T) {
	dir := t.TempDir()
	mod := filepath.Join(dir, "lib", "modules", "6.1.0-9-cloud-amd64")
	for _, p := range []string{
		"boot/vmlinuz-6.1.0-9-cloud-amd64",
		"lib/modules/6.1.0-9-cloud-amd64/kernel/drivers/virtio/virtio_pci.ko.xz",
		"lib/modules/6.1.0-9-cloud-amd64/kernel/drivers/virtio/virtio_pci_modern_dev.ko",
		"lib/modules/6.1.0-9-cloud-amd64/kernel/drivers/virtio/virtio_pci_legacy_dev.ko",
		"lib/modules/6.1.0-9-cloud-amd64/kernel/drivers/block/virtio_blk.ko.zst",
	} {
		p = filepath.Join(dir, p)
		if err := os.MkdirAll(filepath.Dir(p), 0o755); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(p, nil, 0o644); err != nil {
			t.Fatal(err)
		}
	}
	if _, err := kernelIn(dir); err == nil || !strings.Contains(err.Error(), "no module virtio_ring") {
		t.Fatalf("missing modules: %v", err)
	}
	builtin := "kernel/drivers/virtio/virtio_ring.ko\nkernel/drivers/virtio/virtio.ko\n"
	if err := os.WriteFile(filepath.Join(mod, "modules.builtin"), []byte(builtin), 0o644); err != nil {
		t.Fatal(err)
	}
	t.Setenv(KernelDirEnv, dir)
	k, err := FindKernel()
	if err != nil {
		t.Fatal(err)
	}
	var names []string
	for _, m := range k.Modules {
		names = append(names, m.Name+filepath.Ext(m.Path))
	}
	if got := strings.Join(names, " "); got != "virtio_pci_modern_dev.ko virtio_pci_legacy_dev.ko virtio_pci.xz virtio_blk.zst" {
		t.Errorf("modules: %s", got)
	}
	if k.Vmlinuz != filepath.Join(dir, "boot", "vmlinuz-6.1.0-9-cloud-amd64") {
		t.Errorf("vmlinuz: %s", k.Vmlinuz)
	}
}

// TestExt4Modules: with Options.Ext4 the initramfs carries and /init
// loads the ext4 modules the kernel does not build in, in dependency
// order; the built-in ones are left out.
func TestExt4Modules(t *testing.T) {
	dir := t.TempDir()
	mod := filepath.Join(dir, "lib", "modules", "6.1.0-9-cloud-amd64")
	for _, p := range []string{
		"boot/vmlinuz-6.1.0-9-cloud-amd64",
		"lib/modules/6.1.0-9-cloud-amd64/kernel/lib/crc16.ko",
		"lib/modules/6.1.0-9-cloud-amd64/kernel/fs/jbd2/jbd2.ko",
		"lib/modules/6.1.0-9-cloud-amd64/kernel/fs/ext4/ext4.ko",
		"busybox",
	} {
		p = filepath.Join(dir, p)
		if err := os.MkdirAll(filepath.Dir(p), 0o755); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(p, []byte(filepath.Base(p)), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	builtin := "kernel/fs/mbcache.ko\nkernel/crypto/crc32c_generic.ko\n"
	if err := os.WriteFile(filepath.Join(mod, "modules.builtin"), []byte(builtin), 0o644); err != nil {
		t.Fatal(err)
	}
	e := &Env{Busybox: filepath.Join(dir, "busybox"), Kernel: &Kernel{Vmlinuz: filepath.Join(dir, "boot", "vmlinuz-6.1.0-9-cloud-amd64")}}
	var b bytes.Buffer
	if err := e.buildInitramfs(&b, Options{Ext4: true}); err != nil {
		t.Fatal(err)
	}
	m := readNewc(t, b.Bytes())
	for _, n := range []string{"crc16", "jbd2", "ext4"} {
		if string(m["lib/modules/"+n+".ko"].data) != n+".ko" {
			t.Errorf("%s.ko: %q", n, m["lib/modules/"+n+".ko"].data)
		}
	}
	if _, ok := m["lib/modules/mbcache.ko"]; ok {
		t.Error("a built-in module was added")
	}
	if init := string(m["init"].data); !strings.Contains(init, "for m in crc16 jbd2 ext4; do") {
		t.Errorf("init:\n%s", init)
	}
	os.Remove(filepath.Join(dir, "lib/modules/6.1.0-9-cloud-amd64/kernel/fs/jbd2/jbd2.ko"))
	if err := e.buildInitramfs(&b, Options{Ext4: true}); err == nil || !strings.Contains(err.Error(), "no module jbd2") {
		t.Errorf("a missing module: %v", err)
	}
}
