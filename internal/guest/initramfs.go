package guest

import (
	"bytes"
	"fmt"
	"io"
	"maps"
	"os"
	"os/exec"
	"path"
	"slices"
	"sort"
	"strings"
)

// The initramfs is a cpio archive in the "newc" format the kernel unpacks
// into its root file system. Each entry is a header of ASCII hex fields,
// the name, then the data, both padded to 4 bytes:
//
//	"070701" ino mode uid gid nlink mtime filesize
//	         devmajor devminor rdevmajor rdevminor namesize check
//	         (13 fields of 8 hex digits; namesize counts the NUL)
//	name NUL [pad to 4]  data [pad to 4]
//
// and the archive ends with an entry named "TRAILER!!!".

// cpio mode bits.
const (
	modeDir     = 0o040000
	modeFile    = 0o100000
	modeSymlink = 0o120000
	modeCharDev = 0o020000
)

// cpioWriter writes a newc archive.
type cpioWriter struct {
	w   io.Writer
	n   int64
	ino uint32
	err error
}

func (c *cpioWriter) write(b []byte) {
	if c.err != nil {
		return
	}
	var n int
	n, c.err = c.w.Write(b)
	c.n += int64(n)
}

func (c *cpioWriter) pad() {
	if r := c.n % 4; r != 0 {
		c.write(make([]byte, 4-r))
	}
}

// entry writes one member; rdev is major, minor for device nodes.
func (c *cpioWriter) entry(name string, mode uint32, data []byte, rdev [2]uint32) {
	c.ino++
	nlink := uint32(1)
	if mode&0o170000 == modeDir {
		nlink = 2
	}
	hdr := fmt.Sprintf("070701%08X%08X%08X%08X%08X%08X%08X%08X%08X%08X%08X%08X%08X",
		c.ino, mode, 0, 0, nlink, 0, len(data), 0, 0, rdev[0], rdev[1], len(name)+1, 0)
	c.write([]byte(hdr))
	c.write(append([]byte(name), 0))
	c.pad()
	c.write(data)
	c.pad()
}

func (c *cpioWriter) close() error {
	c.entry("TRAILER!!!", 0, nil, [2]uint32{})
	return c.err
}

// File is a regular file to put into the guest's initramfs.
type File struct {
	Data []byte
	Mode os.FileMode // permission bits; 0 means 0644
}

// initScript is /init: it sets up /proc, /sys and /dev, loads the virtio
// modules in dependency order, waits for the disks, starts the guest
// agent if asked (agentStart), runs the test's script and powers off. If the power-off fails, init exits, the kernel
// panics (panic=-1 reboots at once) and QEMU, run with -no-reboot, exits.
const initScript = `#!/bin/busybox sh
/bin/busybox --install -s /bin
export PATH=/bin
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
for m in %s; do
	insmod /lib/modules/$m.ko || echo "guest: insmod $m failed"
done
for d in %s; do
	i=0
	while [ ! -b /dev/$d ] && [ $i -lt 600 ]; do sleep 0.1; i=$((i+1)); done
	[ -b /dev/$d ] || echo "guest: no /dev/$d"
done
%ssh /script
echo "guest: script exited with status $?"
sync
poweroff -f
`

// buildInitramfs writes the initramfs of o: busybox as /bin/busybox,
// the kernel's virtio modules under /lib/modules, /init, the test's
// script as /script and its extra files; with o.Agent, qemu-ga, its
// libraries and the virtio_console module too.
func (e *Env) buildInitramfs(w io.Writer, o Options) error {
	script, disks, files := o.Script, len(o.Disks), o.Files
	busybox, err := os.ReadFile(e.Busybox)
	if err != nil {
		return err
	}
	modules := slices.Clone(e.Kernel.Modules)
	if o.Ext4 {
		extra, err := e.modulesUnlessBuiltin(ext4Modules)
		if err != nil {
			return err
		}
		modules = append(modules, extra...)
	}
	var agentStep string
	if o.Agent {
		if e.Agent == "" {
			if e.Agent, err = FindAgent(); err != nil {
				return err
			}
		}
		af, err := agentFiles(e.Agent)
		if err != nil {
			return err
		}
		merged := maps.Clone(files)
		if merged == nil {
			merged = map[string]File{}
		}
		for k, f := range af {
			if _, ok := merged[k]; !ok {
				merged[k] = f
			}
		}
		files = merged
		console, err := e.findModule("virtio_console")
		if err != nil {
			return err
		}
		modules = append(modules, console)
		agentStep = agentStart
	}
	c := &cpioWriter{w: w}
	dirs := map[string]bool{}
	var mkdirs func(dir string)
	mkdirs = func(dir string) {
		if dir == "." || dir == "/" || dir == "" || dirs[dir] {
			return
		}
		mkdirs(path.Dir(dir))
		dirs[dir] = true
		c.entry(dir, modeDir|0o755, nil, [2]uint32{})
	}
	for _, d := range []string{"bin", "dev", "proc", "sys", "tmp", "lib/modules"} {
		mkdirs(d)
	}
	// The kernel opens /dev/console for init before devtmpfs is mounted.
	c.entry("dev/console", modeCharDev|0o600, nil, [2]uint32{5, 1})
	c.entry("bin/busybox", modeFile|0o755, busybox, [2]uint32{})
	c.entry("bin/sh", modeSymlink|0o777, []byte("busybox"), [2]uint32{})

	var names []string
	for _, m := range modules {
		data, err := readModule(m.Path)
		if err != nil {
			return err
		}
		c.entry("lib/modules/"+m.Name+".ko", modeFile|0o644, data, [2]uint32{})
		names = append(names, m.Name)
	}
	var devs []string
	for i := range disks {
		devs = append(devs, "vd"+string(rune('a'+i)))
	}
	initText := fmt.Sprintf(initScript, strings.Join(names, " "), strings.Join(devs, " "), agentStep)
	c.entry("init", modeFile|0o755, []byte(initText), [2]uint32{})
	c.entry("script", modeFile|0o755, []byte(script), [2]uint32{})

	keys := make([]string, 0, len(files))
	for k := range files {
		keys = append(keys, k)
	}
	sort.Strings(keys)
	for _, k := range keys {
		name := strings.TrimPrefix(path.Clean("/"+k), "/")
		if name == "" || name == "init" || name == "script" {
			return fmt.Errorf("guest: cannot add a file named %q", k)
		}
		mkdirs(path.Dir(name))
		mode := files[k].Mode.Perm()
		if mode == 0 {
			mode = 0o644
		}
		c.entry(name, modeFile|uint32(mode), files[k].Data, [2]uint32{})
	}
	return c.close()
}

// readModule reads a kernel module, decompressing .ko.xz and .ko.zst
// (busybox's insmod takes plain modules only).
func readModule(p string) ([]byte, error) {
	var tool []string
	switch {
	case strings.HasSuffix(p, ".ko"):
		return os.ReadFile(p)
	case strings.HasSuffix(p, ".ko.xz"):
		tool = []string{"xz", "-dc"}
	case strings.HasSuffix(p, ".ko.zst"):
		tool = []string{"zstd", "-dc"}
	case strings.HasSuffix(p, ".ko.gz"):
		tool = []string{"gzip", "-dc"}
	default:
		return nil, fmt.Errorf("guest: %s: unknown module compression", p)
	}
	var out, stderr bytes.Buffer
	cmd := exec.Command(tool[0], append(tool[1:], p)...)
	cmd.Stdout, cmd.Stderr = &out, &stderr
	if err := cmd.Run(); err != nil {
		return nil, fmt.Errorf("guest: decompress %s with %s: %v: %s", p, tool[0], err, strings.TrimSpace(stderr.String()))
	}
	return out.Bytes(), nil
}
