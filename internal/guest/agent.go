package guest

import (
	"debug/elf"
	"fmt"
	"os"
	"path/filepath"
	"sort"
	"strings"
)

// The QEMU guest agent (qemu-ga) comes from Debian's qemu-guest-agent
// package, unpacked like the kernel (.ci/run: apt-get download, dpkg-deb
// -x into the cache directory qemu-guest-agent, or the directory named by
// $VHDKIT_GUEST_AGENT_DIR). It is a dynamically linked program: the
// initramfs gets it with the shared libraries it needs, found the way the
// dynamic loader finds them (the ELF's DT_NEEDED entries, searched in the
// host's library folders, recursively) and the loader its PT_INTERP
// names, each at the path the loader looks for it. The host's libraries
// are Debian's, the package's dependencies (.ci/run installs them).

// AgentDirEnv names the environment variable holding the directory the
// qemu-guest-agent package was extracted into.
const AgentDirEnv = "VHDKIT_GUEST_AGENT_DIR"

// agentBinary is where the package puts qemu-ga, below its root.
const agentBinary = "usr/sbin/qemu-ga"

// agentPort is the virtio-serial port name qemu-ga serves; QEMU's side is
// vmm.AgentPortName.
const agentPort = "org.qemu.guest_agent.0"

// libDirs are where the loader looks for libraries on Debian amd64.
var libDirs = []string{"/lib/x86_64-linux-gnu", "/usr/lib/x86_64-linux-gnu", "/lib", "/usr/lib"}

// FindAgent finds qemu-ga in $VHDKIT_GUEST_AGENT_DIR or the cache
// directories .ci/run fills.
func FindAgent() (string, error) {
	var roots []string
	if dir := os.Getenv(AgentDirEnv); dir != "" {
		roots = []string{dir}
	} else {
		for _, c := range cacheDirs() {
			roots = append(roots, filepath.Join(c, "qemu-guest-agent"))
		}
	}
	for _, r := range roots {
		p := filepath.Join(r, agentBinary)
		if fi, err := os.Stat(p); err == nil && fi.Mode().IsRegular() {
			return p, nil
		}
	}
	return "", fmt.Errorf("guest: no QEMU guest agent (%s) in %s: set %s or run .ci/run (it unpacks Debian's qemu-guest-agent there)",
		agentBinary, strings.Join(roots, " or "), AgentDirEnv)
}

// RequireAgent returns the path of qemu-ga, or skips the test when it is
// missing outside CI; with CI set, a missing agent fails the test.
func RequireAgent(t T) string {
	t.Helper()
	p, err := FindAgent()
	if err != nil {
		if os.Getenv("CI") != "" {
			t.Fatalf("%v (required in CI)", err)
		}
		t.Skip(err)
	}
	return p
}

// agentFiles are the files the initramfs needs to run the agent: qemu-ga
// at /usr/sbin/qemu-ga, its libraries and the loader, by guest path.
func agentFiles(binary string) (map[string]File, error) {
	files := map[string]File{}
	data, err := os.ReadFile(binary)
	if err != nil {
		return nil, fmt.Errorf("guest: %w", err)
	}
	files["/"+agentBinary] = File{Data: data, Mode: 0o755}
	interp, libs, err := neededLibraries(binary)
	if err != nil {
		return nil, err
	}
	for _, l := range append(libs, interp) {
		// The library's content at the path the loader asks for (a
		// symlink on the host, such as libc.so.6, becomes a file).
		data, err := os.ReadFile(l)
		if err != nil {
			return nil, fmt.Errorf("guest: the agent's library: %w", err)
		}
		files[l] = File{Data: data, Mode: 0o755}
	}
	return files, nil
}

// neededLibraries resolves a program's shared libraries, recursively,
// as the loader would: the program's interpreter and every DT_NEEDED
// library found in libDirs.
func neededLibraries(binary string) (interp string, libs []string, err error) {
	f, err := elf.Open(binary)
	if err != nil {
		return "", nil, fmt.Errorf("guest: %s: %w", binary, err)
	}
	for _, p := range f.Progs {
		if p.Type == elf.PT_INTERP {
			b := make([]byte, p.Filesz)
			if _, err := p.ReadAt(b, 0); err != nil {
				f.Close()
				return "", nil, fmt.Errorf("guest: %s: interpreter: %w", binary, err)
			}
			interp = strings.TrimRight(string(b), "\x00")
		}
	}
	f.Close()
	if interp == "" || !filepath.IsAbs(interp) {
		return "", nil, fmt.Errorf("guest: %s: no dynamic loader named (PT_INTERP %q)", binary, interp)
	}
	found := map[string]string{}
	queue := []string{binary}
	for len(queue) > 0 {
		p := queue[0]
		queue = queue[1:]
		f, err := elf.Open(p)
		if err != nil {
			return "", nil, fmt.Errorf("guest: %s: %w", p, err)
		}
		needed, err := f.ImportedLibraries()
		f.Close()
		if err != nil {
			return "", nil, fmt.Errorf("guest: %s: %w", p, err)
		}
		for _, n := range needed {
			if _, ok := found[n]; ok || strings.Contains(n, "/") {
				continue
			}
			var at string
			for _, d := range libDirs {
				if fi, err := os.Stat(filepath.Join(d, n)); err == nil && fi.Mode().IsRegular() {
					at = filepath.Join(d, n)
					break
				}
			}
			if at == "" {
				return "", nil, fmt.Errorf("guest: %s needs %s, which is in none of %s (install the package that has it)", p, n, strings.Join(libDirs, ", "))
			}
			found[n] = at
			queue = append(queue, at)
		}
	}
	for _, at := range found {
		libs = append(libs, at)
	}
	sort.Strings(libs)
	return interp, libs, nil
}

// agentStart is /init's part that starts the agent once its port is
// there: the virtio_console module makes /dev/vportNpM, whose name is in
// sysfs (udev would link /dev/virtio-ports/NAME; busybox's /init does).
const agentStart = `i=0
port=
while [ -z "$port" ] && [ $i -lt 600 ]; do
	for p in /sys/class/virtio-ports/*; do
		[ "$(cat $p/name 2>/dev/null)" = ` + agentPort + ` ] && port=/dev/${p##*/}
	done
	[ -n "$port" ] || sleep 0.1
	i=$((i+1))
done
if [ -n "$port" ]; then
	mkdir -p /dev/virtio-ports
	ln -sf $port /dev/virtio-ports/` + agentPort + `
	/usr/sbin/qemu-ga -m virtio-serial -p /dev/virtio-ports/` + agentPort + ` -t /tmp -f /tmp/qemu-ga.pid &
	echo "guest: agent started on $port"
else
	echo "guest: no virtio-serial port ` + agentPort + `"
fi
`
