package guest

import (
	"bytes"
	"os"
	"path/filepath"
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
	if err := e.buildInitramfs(&initrd, o.Script, len(o.Disks), o.Files); err != nil {
		return nil, err
	}
	p := filepath.Join(dir, "initrd.cpio")
	if err := os.WriteFile(p, initrd.Bytes(), 0o644); err != nil {
		return nil, err
	}
	return &Boot{Kernel: e.Kernel.Vmlinuz, Initrd: p, Append: "console=ttyS0 panic=-1 quiet"}, nil
}
