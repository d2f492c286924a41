package storage_test

import (
	"errors"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/vhdkit/vhdkit/internal/testenv"
	"github.com/vhdkit/vhdkit/storage"
)

func newFile(t *testing.T) string {
	t.Helper()
	path := filepath.Join(t.TempDir(), "disk.img")
	if err := os.WriteFile(path, make([]byte, 1<<20), 0o600); err != nil {
		t.Fatal(err)
	}
	return path
}

func mustOpen(t *testing.T, path string, flag int) storage.File {
	t.Helper()
	f, err := storage.OpenFile(path, flag, 0)
	if err != nil {
		t.Fatal(err)
	}
	return f
}

func wantInUse(t *testing.T, err error, what string) *storage.LockError {
	t.Helper()
	var le *storage.LockError
	if !errors.Is(err, storage.ErrInUse) || !errors.As(err, &le) {
		t.Fatalf("%s: got %v, want a LockError", what, err)
	}
	return le
}

func TestLockWithinProcess(t *testing.T) {
	path := newFile(t)
	w := mustOpen(t, path, os.O_RDWR)
	// A second writer is refused, even in the same process.
	_, err := storage.OpenFile(path, os.O_RDWR, 0)
	le := wantInUse(t, err, "second writer")
	if len(le.Holders) != 1 || le.Holders[0].PID != os.Getpid() {
		t.Errorf("holders %v, want this process", le.Holders)
	}
	// Readers in the writer's own process are its to coordinate.
	r := mustOpen(t, path, os.O_RDONLY)
	r.Close()
	// Another name for the same file is the same file.
	link := filepath.Join(filepath.Dir(path), "other-name.img")
	if err := os.Link(path, link); err != nil {
		t.Fatal(err)
	}
	_, err = storage.OpenFile(link, os.O_RDWR, 0)
	wantInUse(t, err, "writer through a hard link")
	w.Close()
	// Closing releases the lock.
	w = mustOpen(t, link, os.O_RDWR)
	w.Close()
}

// newVHDX makes a VHDX with qemu-img: QEMU's readers of a format with
// metadata refuse to share writes (of a raw file they share them).
func newVHDX(t *testing.T) string {
	t.Helper()
	testenv.Tool(t, "qemu-img")
	path := filepath.Join(t.TempDir(), "disk.vhdx")
	if out, err := exec.Command("qemu-img", "create", "-f", "vhdx", path, "64M").CombinedOutput(); err != nil {
		t.Fatalf("qemu-img create: %v\n%s", err, out)
	}
	return path
}

// qemuIO starts qemu-io on path, waiting for commands on its standard
// input, and returns once it holds the file; closing stdin ends it.
func qemuIO(t *testing.T, path string, args ...string) (stdin io.WriteCloser) {
	t.Helper()
	testenv.Tool(t, "qemu-io")
	cmd := exec.Command("qemu-io", append(args, "-f", "vhdx", path)...)
	stdin, err := cmd.StdinPipe()
	if err != nil {
		t.Fatal(err)
	}
	var out strings.Builder
	cmd.Stdout, cmd.Stderr = &out, &out
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		stdin.Close()
		cmd.Process.Kill()
		cmd.Wait()
	})
	// qemu-io holds the file once its lock bytes appear; poll for them
	// through a reader that refuses nothing.
	deadline := time.Now().Add(10 * time.Second)
	for {
		if holds(cmd.Process.Pid) {
			return stdin
		}
		if time.Now().After(deadline) {
			t.Fatalf("qemu-io did not open %s: %s", path, out.String())
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// holds reports whether process pid holds OFD locks.
func holds(pid int) bool {
	dir := filepath.Join("/proc", strconv.Itoa(pid), "fdinfo")
	fds, _ := os.ReadDir(dir)
	for _, fd := range fds {
		b, _ := os.ReadFile(filepath.Join(dir, fd.Name()))
		if strings.Contains(string(b), "OFDLCK") {
			return true
		}
	}
	return false
}

func TestLockRefusesQemuWriter(t *testing.T) {
	path := newVHDX(t)
	qemuIO(t, path) // read-write
	_, err := storage.OpenFile(path, os.O_RDWR, 0)
	le := wantInUse(t, err, "write while qemu-io writes")
	if len(le.Holders) != 1 || le.Holders[0].Command != "qemu-io" || !le.Holders[0].Writing {
		t.Errorf("holders %+v, want qemu-io writing", le.Holders)
	}
	if !strings.Contains(err.Error(), "qemu-io") || !strings.Contains(err.Error(), "is writing it") {
		t.Errorf("error %q does not name the writer", err)
	}
	_, err = storage.OpenFile(path, os.O_RDONLY, 0)
	wantInUse(t, err, "read while qemu-io writes")
	f, err := storage.OpenForceShare(path)
	if err != nil {
		t.Fatalf("force-share read while qemu-io writes: %v", err)
	}
	f.Close()
	if w, err := storage.HasWriter(path); err != nil || !w {
		t.Errorf("HasWriter = %v, %v; want true", w, err)
	}
}

func TestLockSharesWithQemuReader(t *testing.T) {
	path := newVHDX(t)
	qemuIO(t, path, "-r")
	r := mustOpen(t, path, os.O_RDONLY)
	defer r.Close()
	_, err := storage.OpenFile(path, os.O_RDWR, 0)
	le := wantInUse(t, err, "write while qemu-io reads")
	if len(le.Holders) != 1 || le.Holders[0].Writing {
		t.Errorf("holders %+v, want qemu-io reading", le.Holders)
	}
	if w, err := storage.HasWriter(path); err != nil || w {
		t.Errorf("HasWriter = %v, %v; want false", w, err)
	}
}

func TestQemuRefusesOurWriter(t *testing.T) {
	testenv.Tool(t, "qemu-io")
	path := newVHDX(t)
	w := mustOpen(t, path, os.O_RDWR)
	for _, args := range [][]string{
		{"qemu-io", "-f", "vhdx", "-c", "read 0 512", path},
		{"qemu-io", "-r", "-f", "vhdx", "-c", "read 0 512", path},
		{"qemu-img", "info", "-f", "vhdx", path},
	} {
		out, err := exec.Command(args[0], args[1:]...).CombinedOutput()
		if err == nil || !strings.Contains(string(out), "lock") {
			t.Errorf("%s while we write: %v\n%s", strings.Join(args, " "), err, out)
		}
	}
	if out, err := exec.Command("qemu-img", "info", "-U", "-f", "vhdx", path).CombinedOutput(); err != nil {
		t.Errorf("qemu-img info -U while we write: %v\n%s", err, out)
	}
	w.Close()
	r := mustOpen(t, path, os.O_RDONLY)
	if out, err := exec.Command("qemu-io", "-r", "-f", "vhdx", "-c", "read 0 512", path).CombinedOutput(); err != nil {
		t.Errorf("qemu-io -r while we read: %v\n%s", err, out)
	}
	if out, err := exec.Command("qemu-io", "-f", "vhdx", "-c", "write 0 512", path).CombinedOutput(); err == nil {
		t.Errorf("qemu-io write while we read succeeded:\n%s", out)
	}
	r.Close()
	if out, err := exec.Command("qemu-io", "-f", "vhdx", "-c", "write 0 512", path).CombinedOutput(); err != nil {
		t.Errorf("qemu-io write after we closed: %v\n%s", err, out)
	}
}

func TestStopWriting(t *testing.T) {
	path := newVHDX(t)
	w := mustOpen(t, path, os.O_RDWR)
	defer w.Close()
	storage.StopWriting(w) // frozen as a checkpoint's parent
	// Readers in other processes are welcome now...
	if out, err := exec.Command("qemu-io", "-r", "-f", "vhdx", "-c", "read 0 512", path).CombinedOutput(); err != nil {
		t.Errorf("qemu-io -r after StopWriting: %v\n%s", err, out)
	}
	// ...writers elsewhere still are not, since w still reads...
	if out, err := exec.Command("qemu-io", "-f", "vhdx", "-c", "write 0 512", path).CombinedOutput(); err == nil {
		t.Errorf("qemu-io write while we read succeeded:\n%s", out)
	}
	// ...and this process may take the file for writing again (a merge
	// into the frozen parent).
	w2 := mustOpen(t, path, os.O_RDWR)
	w2.Close()
}

// A child forked while this process has a file open holds the file's open
// description, and its locks, until it execs. A reopen in that window
// must not take the child for another user: a daemon or a test that runs
// programs while it opens images would see phantom conflicts.
func TestLockReopenWhileForking(t *testing.T) {
	path := newFile(t)
	stop := make(chan struct{})
	forked := make(chan int)
	go func() {
		n := 0
		defer func() { forked <- n }()
		for {
			select {
			case <-stop:
				return
			default:
			}
			if err := exec.Command("true").Run(); err != nil {
				t.Error(err)
				return
			}
			n++
		}
	}()
	deadline := time.Now().Add(time.Second)
	opens := 0
	for time.Now().Before(deadline) {
		f, err := storage.OpenFile(path, os.O_RDWR, 0)
		if err != nil {
			close(stop)
			<-forked
			t.Fatalf("open %d: %v", opens, err)
		}
		f.Close()
		opens++
	}
	close(stop)
	t.Logf("%d opens beside %d forks", opens, <-forked)
}
