package guest

import (
	"fmt"
	"os"
	"path/filepath"
	"sort"
)

// DebianDirEnv names the environment variable holding the Debian guest's
// directory, which .ci/debian-guest builds: a bookworm root file system
// made by mmdebstrap (systemd, udev, the QEMU guest agent, a writer
// service) in an ext4 image, rootfs.img, with the kernel and initramfs it
// boots beside it, vmlinuz and initrd.img.
const DebianDirEnv = "VHDKIT_DEBIAN_GUEST_DIR"

// Debian is the real-distribution guest: a root file system to put in a
// disk and the kernel to boot it with (root=/dev/vda).
type Debian struct {
	RootFS  string // raw ext4 image
	Vmlinuz string
	Initrd  string
}

// Append is the kernel command line that boots it with its console on
// the serial port.
func (d *Debian) Append() string { return "root=/dev/vda rw console=ttyS0" }

// FindDebian finds the Debian guest in $VHDKIT_DEBIAN_GUEST_DIR or, when
// that is not set, the newest one in the cache directories .ci/run fills.
func FindDebian() (*Debian, error) {
	dir := os.Getenv(DebianDirEnv)
	if dir == "" {
		var found []string
		for _, c := range cacheDirs() {
			m, _ := filepath.Glob(filepath.Join(c, "debian-bookworm-*", "rootfs.img"))
			found = append(found, m...)
		}
		if len(found) == 0 {
			return nil, fmt.Errorf("guest: no Debian guest: set %s or run .ci/debian-guest %s", DebianDirEnv, cacheDirs()[0])
		}
		sort.Strings(found)
		dir = filepath.Dir(found[len(found)-1])
	}
	d := &Debian{
		RootFS:  filepath.Join(dir, "rootfs.img"),
		Vmlinuz: filepath.Join(dir, "vmlinuz"),
		Initrd:  filepath.Join(dir, "initrd.img"),
	}
	for _, p := range []string{d.RootFS, d.Vmlinuz, d.Initrd} {
		if fi, err := os.Stat(p); err != nil || !fi.Mode().IsRegular() {
			return nil, fmt.Errorf("guest: the Debian guest in %s is incomplete: no %s", dir, filepath.Base(p))
		}
	}
	return d, nil
}

// RequireDebian returns the Debian guest, or skips the test when it is
// missing outside CI; with CI set, a missing guest fails the test.
func RequireDebian(t T) *Debian {
	t.Helper()
	d, err := FindDebian()
	if err != nil {
		if os.Getenv("CI") != "" {
			t.Fatalf("%v (required in CI)", err)
		}
		t.Skip(err)
	}
	return d
}
