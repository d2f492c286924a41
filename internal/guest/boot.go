package guest

import (
	"bytes"
	"fmt"
	"os"
	"path/filepath"
	"strings"
)

// Boot is a guest's kernel, initramfs and command line as files, for a
// machine the daemon runs under QEMU itself (vm create --kernel --initrd
// --append) rather than one Start runs.
type Boot struct {
	Kernel, Initrd, Append string
}

// WriteBoot builds the initramfs of o (Disks counts the disks /init waits
// for; their sockets are unused) into dir.
func (e *Env) WriteBoot(dir string, o Options) (*Boot, error) {
	var initrd bytes.Buffer
	if err := e.buildInitramfs(&initrd, o); err != nil {
		return nil, err
	}
	p := filepath.Join(dir, "initrd.cpio")
	if err := os.WriteFile(p, initrd.Bytes(), 0o644); err != nil {
		return nil, err
	}
	return &Boot{Kernel: e.Kernel.Vmlinuz, Initrd: p, Append: "console=ttyS0 panic=-1 quiet"}, nil
}

// ModuleFile is the kernel's module name (e.g. "button", "evdev"),
// decompressed for busybox's insmod, to add to Options.Files for a
// script that loads it: the virtio modules /init loads are not all a test
// may need.
func (e *Env) ModuleFile(name string) (File, error) {
	m, err := e.findModule(name)
	if err != nil {
		return File{}, err
	}
	data, err := readModule(m.Path)
	return File{Data: data}, err
}

// findModule finds the kernel's module name in its package's tree.
func (e *Env) findModule(name string) (Module, error) {
	version := strings.TrimPrefix(filepath.Base(e.Kernel.Vmlinuz), "vmlinuz-")
	root := filepath.Dir(filepath.Dir(e.Kernel.Vmlinuz))
	for _, d := range []string{filepath.Join(root, "lib", "modules", version), filepath.Join(root, "usr", "lib", "modules", version)} {
		var found string
		filepath.WalkDir(filepath.Join(d, "kernel"), func(p string, de os.DirEntry, err error) error {
			if err == nil && !de.IsDir() && strings.HasPrefix(de.Name(), name+".ko") {
				found = p
				return filepath.SkipAll
			}
			return nil
		})
		if found != "" {
			return Module{Name: name, Path: found}, nil
		}
	}
	return Module{}, fmt.Errorf("guest: kernel %s has no module %s", version, name)
}

// ext4Modules are the modules the ext4 file system needs, each after
// those it depends on (modinfo's depends, and crc32c for its checksums).
var ext4Modules = []string{"crc16", "mbcache", "jbd2", "crc32c_generic", "ext4"}

// modulesUnlessBuiltin finds the modules of names the kernel does not
// build in, in order.
func (e *Env) modulesUnlessBuiltin(names []string) ([]Module, error) {
	version := strings.TrimPrefix(filepath.Base(e.Kernel.Vmlinuz), "vmlinuz-")
	root := filepath.Dir(filepath.Dir(e.Kernel.Vmlinuz))
	var builtin []byte
	for _, d := range []string{filepath.Join(root, "lib", "modules", version), filepath.Join(root, "usr", "lib", "modules", version)} {
		if b, err := os.ReadFile(filepath.Join(d, "modules.builtin")); err == nil {
			builtin = b
			break
		}
	}
	var out []Module
	for _, n := range names {
		if bytes.Contains(builtin, []byte("/"+n+".ko\n")) {
			continue
		}
		m, err := e.findModule(n)
		if err != nil {
			return nil, err
		}
		out = append(out, m)
	}
	return out, nil
}
