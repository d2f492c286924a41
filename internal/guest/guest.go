// Package guest boots a throwaway Linux guest under QEMU whose disks are
// NBD exports, for tests that need a real operating system doing I/O on a
// served disk.
//
// The guest is Debian's cloud kernel (unpacked, not installed: .ci/run
// downloads the package the linux-image-cloud-amd64 metapackage depends
// on and extracts it with dpkg-deb -x into a cache directory, named by
// $VHDKIT_GUEST_KERNEL_DIR) and an initramfs built on the fly from static
// busybox, the kernel's virtio modules and a shell script of the test's.
// /init loads virtio_ring, virtio, virtio_pci_modern_dev,
// virtio_pci_legacy_dev, virtio_pci and virtio_blk, waits for /dev/vda,
// /dev/vdb, ... (one per Disk, in order), runs the script and powers off.
// QEMU runs with TCG (no KVM needed), 256 MiB, the serial console on its
// stdout, which the test reads.
package guest

import (
	"bytes"
	"context"
	"debug/elf"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"sort"
	"strings"
	"sync"
	"time"
)

// KernelDirEnv names the environment variable holding the directory the
// kernel package was extracted into (it has boot/vmlinuz-* and
// lib/modules/VERSION or usr/lib/modules/VERSION).
const KernelDirEnv = "VHDKIT_GUEST_KERNEL_DIR"

// cacheDirs are where .ci/run extracts kernel packages, one directory per
// package, when KernelDirEnv is not set.
func cacheDirs() []string {
	dirs := []string{"/var/cache/vhdkit-guest"}
	if home, err := os.UserHomeDir(); err == nil {
		dirs = append(dirs, filepath.Join(home, ".cache", "vhdkit-guest"))
	}
	return dirs
}

// moduleOrder is the virtio modules a guest needs for virtio-blk disks,
// each after those it depends on.
var moduleOrder = []string{"virtio_ring", "virtio", "virtio_pci_modern_dev", "virtio_pci_legacy_dev", "virtio_pci", "virtio_blk"}

// Module is a kernel module file.
type Module struct {
	Name string // e.g. "virtio_blk"
	Path string // .ko, .ko.xz, .ko.zst or .ko.gz
}

// Kernel is an unpacked kernel package.
type Kernel struct {
	Vmlinuz string
	// Modules are the virtio modules in load order; those built into the
	// kernel are left out.
	Modules []Module
}

// FindKernel finds the kernel in $VHDKIT_GUEST_KERNEL_DIR or, when that is
// not set, the newest one in the cache directories .ci/run fills.
func FindKernel() (*Kernel, error) {
	if dir := os.Getenv(KernelDirEnv); dir != "" {
		return kernelIn(dir)
	}
	var candidates []string
	for _, c := range cacheDirs() {
		m, _ := filepath.Glob(filepath.Join(c, "*", "boot", "vmlinuz-*"))
		candidates = append(candidates, m...)
	}
	if len(candidates) == 0 {
		return nil, fmt.Errorf("guest: no kernel: set %s or run .ci/run (it unpacks one into %s)", KernelDirEnv, strings.Join(cacheDirs(), " or "))
	}
	sort.Strings(candidates)
	return kernelIn(filepath.Dir(filepath.Dir(candidates[len(candidates)-1])))
}

func kernelIn(dir string) (*Kernel, error) {
	vmlinuz, _ := filepath.Glob(filepath.Join(dir, "boot", "vmlinuz-*"))
	if len(vmlinuz) != 1 {
		return nil, fmt.Errorf("guest: want one boot/vmlinuz-* in %s, found %d", dir, len(vmlinuz))
	}
	version := strings.TrimPrefix(filepath.Base(vmlinuz[0]), "vmlinuz-")
	k := &Kernel{Vmlinuz: vmlinuz[0]}
	var modDir string
	for _, d := range []string{filepath.Join(dir, "lib", "modules", version), filepath.Join(dir, "usr", "lib", "modules", version)} {
		if _, err := os.Stat(d); err == nil {
			modDir = d
			break
		}
	}
	if modDir == "" {
		return nil, fmt.Errorf("guest: no modules for kernel %s in %s", version, dir)
	}
	found := map[string]string{}
	err := filepath.WalkDir(filepath.Join(modDir, "kernel"), func(p string, d os.DirEntry, err error) error {
		if err != nil || d.IsDir() {
			return err
		}
		name, _, ok := strings.Cut(d.Name(), ".ko")
		if ok {
			found[name] = p
		}
		return nil
	})
	if err != nil {
		return nil, fmt.Errorf("guest: %w", err)
	}
	builtin, _ := os.ReadFile(filepath.Join(modDir, "modules.builtin"))
	for _, m := range moduleOrder {
		switch p, ok := found[m]; {
		case ok:
			k.Modules = append(k.Modules, Module{Name: m, Path: p})
		case bytes.Contains(builtin, []byte("/"+m+".ko\n")):
			// Built into the kernel: nothing to load.
		default:
			return nil, fmt.Errorf("guest: kernel %s has no module %s", version, m)
		}
	}
	return k, nil
}

// Env is what booting a guest needs.
type Env struct {
	Kernel  *Kernel
	QEMU    string // qemu-system-x86_64
	Busybox string // a statically linked busybox
	Agent   string // qemu-ga (agent.go); found when a boot asks for it
}

// Find looks for the kernel, QEMU and a static busybox.
func Find() (*Env, error) {
	k, err := FindKernel()
	if err != nil {
		return nil, err
	}
	e := &Env{Kernel: k}
	if e.QEMU, err = exec.LookPath("qemu-system-x86_64"); err != nil {
		return nil, fmt.Errorf("guest: %w (Debian: qemu-system-x86)", err)
	}
	if e.Busybox, err = exec.LookPath("busybox"); err != nil {
		return nil, fmt.Errorf("guest: %w (Debian: busybox-static)", err)
	}
	if err := checkStatic(e.Busybox); err != nil {
		return nil, err
	}
	return e, nil
}

// checkStatic refuses a dynamically linked program: the initramfs has no
// C library.
func checkStatic(p string) error {
	f, err := elf.Open(p)
	if err != nil {
		return fmt.Errorf("guest: %s: %w", p, err)
	}
	defer f.Close()
	for _, prog := range f.Progs {
		if prog.Type == elf.PT_INTERP {
			return fmt.Errorf("guest: %s is dynamically linked (install busybox-static)", p)
		}
	}
	return nil
}

// T is what the package's test helpers need of a test; testing.TB has
// it. The package does not import testing itself: vhdkit demo boots its
// guest with it.
type T interface {
	Helper()
	Fatal(args ...any)
	Fatalf(format string, args ...any)
	Skip(args ...any)
	TempDir() string
	Cleanup(func())
}

// Require returns the Env, or skips the test when something is missing
// outside CI; with CI set, a missing piece fails the test.
func Require(t T) *Env {
	t.Helper()
	e, err := Find()
	if err != nil {
		if os.Getenv("CI") != "" {
			t.Fatalf("%v (required in CI)", err)
		}
		t.Skip(err)
	}
	return e
}

// Disk is an NBD export the guest sees as a virtio-blk disk.
type Disk struct {
	Socket string // unix socket of the server
	Export string // export name; "" for the default export
}

// Options describe one boot.
type Options struct {
	// Disks become /dev/vda, /dev/vdb, ... in order.
	Disks []Disk
	// Script is run by busybox sh once the disks are there; the guest
	// powers off when it ends. Its output goes to the console.
	Script string
	// Files are added to the initramfs, by absolute path.
	Files map[string]File
	// MemoryMiB is the guest's memory; 0 means 256.
	MemoryMiB int
	// Agent runs the QEMU guest agent (agent.go) on the virtio-serial
	// port org.qemu.guest_agent.0, started before the script. The
	// machine needs the port: vmm's machines have it; Start does not
	// make one.
	Agent bool
	// Ext4 loads what the ext4 file system needs, where the kernel has
	// it as modules (Debian's cloud kernel builds it in), for a script
	// that mounts one.
	Ext4 bool
}

// Guest is a running QEMU.
type Guest struct {
	cmd     *exec.Cmd
	console *syncBuffer
	done    chan struct{}
	err     error // QEMU's exit, once done is closed
}

// Start builds the initramfs in a temporary directory of t and starts
// QEMU. The process is killed, by its pid, when the test ends if it is
// still running.
func (e *Env) Start(t T, o Options) *Guest {
	t.Helper()
	dir := t.TempDir()
	var initrd bytes.Buffer
	if err := e.buildInitramfs(&initrd, o); err != nil {
		t.Fatal(err)
	}
	initrdPath := filepath.Join(dir, "initrd.cpio")
	if err := os.WriteFile(initrdPath, initrd.Bytes(), 0o644); err != nil {
		t.Fatal(err)
	}
	mem := o.MemoryMiB
	if mem == 0 {
		mem = 256
	}
	args := []string{
		"-accel", "tcg", "-m", fmt.Sprint(mem), "-nographic", "-no-reboot", "-nic", "none",
		"-kernel", e.Kernel.Vmlinuz, "-initrd", initrdPath,
		"-append", "console=ttyS0 panic=-1 quiet",
	}
	for i, d := range o.Disks {
		bd := "driver=nbd,server.type=unix,server.path=" + qemuEscape(d.Socket)
		if d.Export != "" {
			bd += ",export=" + qemuEscape(d.Export)
		}
		node := fmt.Sprintf("d%d", i)
		args = append(args, "-blockdev", bd+",node-name="+node, "-device", "virtio-blk-pci,drive="+node)
	}
	g := &Guest{console: &syncBuffer{}, done: make(chan struct{})}
	g.cmd = exec.Command(e.QEMU, args...)
	g.cmd.Stdout, g.cmd.Stderr = g.console, g.console
	if err := g.cmd.Start(); err != nil {
		t.Fatal(err)
	}
	go func() {
		g.err = g.cmd.Wait()
		close(g.done)
	}()
	t.Cleanup(func() {
		select {
		case <-g.done:
		default:
			g.cmd.Process.Kill()
			<-g.done
		}
	})
	return g
}

// qemuEscape doubles commas, QEMU's option separator.
func qemuEscape(s string) string { return strings.ReplaceAll(s, ",", ",,") }

// Wait waits for QEMU to exit and returns the console output. It returns
// an error, with the console so far, when QEMU fails or ctx ends first
// (then QEMU is killed).
func (g *Guest) Wait(ctx context.Context) (string, error) {
	select {
	case <-g.done:
	case <-ctx.Done():
		g.cmd.Process.Kill()
		<-g.done
		return g.console.String(), fmt.Errorf("guest: killed QEMU: %w", ctx.Err())
	}
	if g.err != nil {
		return g.console.String(), fmt.Errorf("guest: QEMU: %w", g.err)
	}
	return g.console.String(), nil
}

// WaitTimeout is Wait with a time limit.
func (g *Guest) WaitTimeout(d time.Duration) (string, error) {
	ctx, cancel := context.WithTimeout(context.Background(), d)
	defer cancel()
	return g.Wait(ctx)
}

// Console returns what the guest has printed so far.
func (g *Guest) Console() string { return g.console.String() }

// syncBuffer is a bytes.Buffer safe for one writer and other readers.
type syncBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (b *syncBuffer) Write(p []byte) (int, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.b.Write(p)
}

func (b *syncBuffer) String() string {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.b.String()
}
