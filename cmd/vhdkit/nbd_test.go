package main

import (
	"bufio"
	"bytes"
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/sha256"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/json"
	"encoding/pem"
	"errors"
	"io"
	"math/big"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/vhdkit/vhdkit/internal/testenv"
	"github.com/vhdkit/vhdkit/nbd"
)

// These tests run "vhdkit nbd" as a real process (built once per test
// run), because what they test is process-level: signals, socket
// activation by libnbd's [ CMD ] syntax, the listening socket. Real clients
// are the oracle: nbdinfo, nbdcopy, qemu-io, qemu-img, and the package nbd
// client where a test needs to count acknowledged writes.

var vhdkitBuild struct {
	once sync.Once
	path string
	err  error
}

// vhdkitBinary builds the vhdkit command with "go build -o" the first time
// a test asks for it and returns its path. The binary goes into the
// temporary directory that TestMain (testscript.Main) creates and removes
// at the end of the run; were that directory not found, into a new one.
func vhdkitBinary(t testing.TB) string {
	t.Helper()
	vhdkitBuild.once.Do(func() {
		dir := ""
		if first, _, _ := strings.Cut(os.Getenv("PATH"), string(os.PathListSeparator)); filepath.Base(first) == "bin" &&
			strings.HasPrefix(filepath.Base(filepath.Dir(first)), "testscript-main") {
			dir = filepath.Join(filepath.Dir(first), "vhdkit-build")
			vhdkitBuild.err = os.MkdirAll(dir, 0o755)
		} else {
			dir, vhdkitBuild.err = os.MkdirTemp("", "vhdkit-build")
		}
		if vhdkitBuild.err != nil {
			return
		}
		gobin, err := exec.LookPath("go")
		if err != nil {
			vhdkitBuild.err = err
			return
		}
		out := filepath.Join(dir, "vhdkit")
		cmd := exec.Command(gobin, "build", "-o", out, ".")
		if b, err := cmd.CombinedOutput(); err != nil {
			vhdkitBuild.err = errors.New("go build: " + err.Error() + "\n" + string(b))
			return
		}
		vhdkitBuild.path = out
	})
	if vhdkitBuild.err != nil {
		t.Fatal(vhdkitBuild.err)
	}
	return vhdkitBuild.path
}

// shortTempDir is a temporary directory whose paths fit a unix socket
// address (108 bytes).
func shortTempDir(t testing.TB) string {
	dir := t.TempDir()
	if len(dir) > 80 {
		d, err := os.MkdirTemp("", "nbd")
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { os.RemoveAll(d) })
		dir = d
	}
	return dir
}

// lockedBuffer collects a process's output while it runs.
type lockedBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (b *lockedBuffer) Write(p []byte) (int, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.b.Write(p)
}

func (b *lockedBuffer) String() string {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.b.String()
}

// runTool runs a program in a process group of its own, so that on a
// timeout the servers it started through socket activation are killed
// with it, and returns its stdout. It fails the test when the program
// fails.
func runTool(t testing.TB, timeout time.Duration, name string, args ...string) string {
	t.Helper()
	out, err := runToolErr(timeout, name, args...)
	if err != nil {
		t.Fatalf("%s %s: %v", name, strings.Join(args, " "), err)
	}
	return out
}

func runToolErr(timeout time.Duration, name string, args ...string) (string, error) {
	ctx, cancel := context.WithTimeout(context.Background(), timeout)
	defer cancel()
	cmd := exec.CommandContext(ctx, name, args...)
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	cmd.Cancel = func() error { return syscall.Kill(-cmd.Process.Pid, syscall.SIGKILL) }
	cmd.WaitDelay = 5 * time.Second
	var stdout, stderr bytes.Buffer
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	if err := cmd.Run(); err != nil {
		if cmd.Process != nil {
			// A server the failed program started and did not stop
			// goes with it. ESRCH: nothing was left.
			syscall.Kill(-cmd.Process.Pid, syscall.SIGKILL)
		}
		return stdout.String(), errors.New(err.Error() + "\nstderr: " + stderr.String() + "\nstdout: " + stdout.String())
	}
	return stdout.String(), nil
}

// nbdServer is a running "vhdkit nbd" process.
type nbdServer struct {
	cmd    *exec.Cmd
	uri    string // the URI it printed
	stderr *lockedBuffer
	done   chan struct{} // closed when it has exited
	err    error         // its exit, once done is closed
}

// startNBD runs the built vhdkit with "nbd" and args, waits for the URI
// line that says it is listening, and makes sure the process is gone
// when the test ends.
func startNBD(t testing.TB, args ...string) *nbdServer {
	t.Helper()
	cmd := exec.Command(vhdkitBinary(t), append([]string{"nbd"}, args...)...)
	s := &nbdServer{cmd: cmd, stderr: &lockedBuffer{}, done: make(chan struct{})}
	cmd.Stderr = s.stderr
	stdout, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	lines := make(chan string, 1)
	go func() {
		r := bufio.NewReader(stdout)
		line, _ := r.ReadString('\n')
		lines <- strings.TrimSpace(line)
		io.Copy(io.Discard, r)
		s.err = cmd.Wait()
		close(s.done)
	}()
	t.Cleanup(func() {
		select {
		case <-s.done:
		default:
			cmd.Process.Kill()
			<-s.done
		}
	})
	select {
	case s.uri = <-lines:
	case <-time.After(time.Minute):
		t.Fatalf("vhdkit nbd %s: no URI line within a minute; stderr: %s", strings.Join(args, " "), s.stderr)
	}
	if s.uri == "" {
		<-s.done
		t.Fatalf("vhdkit nbd %s: %v; stderr: %s", strings.Join(args, " "), s.err, s.stderr)
	}
	return s
}

// stop sends sig and checks that the server exits with status 0 and
// nothing on stderr.
func (s *nbdServer) stop(t testing.TB, sig syscall.Signal) {
	t.Helper()
	if err := s.cmd.Process.Signal(sig); err != nil {
		t.Fatal(err)
	}
	select {
	case <-s.done:
	case <-time.After(2 * time.Minute):
		t.Fatalf("vhdkit nbd did not exit after %v; stderr: %s", sig, s.stderr)
	}
	if s.err != nil || s.stderr.String() != "" {
		t.Fatalf("vhdkit nbd after %v: %v; stderr: %s", sig, s.err, s.stderr)
	}
}

// createImage creates an image with vhdkit create (in process).
func createImage(t testing.TB, path string, args ...string) {
	t.Helper()
	var stdout, stderr strings.Builder
	if code := run(context.Background(), append([]string{"create", path}, args...), &stdout, &stderr); code != 0 {
		t.Fatalf("create %s: exit %d: %s", path, code, stderr.String())
	}
}

// checkClean runs vhdkit check (in process) and, for a VHDX with 512-byte
// logical sectors (the only kind QEMU opens), qemu-img check on path.
func checkClean(t testing.TB, path string) {
	t.Helper()
	var stdout, stderr strings.Builder
	if code := run(context.Background(), []string{"check", path}, &stdout, &stderr); code != 0 || !strings.HasSuffix(stdout.String(), "no problems found\n") {
		t.Errorf("vhdkit check %s: exit %d\n%s%s", path, code, stdout.String(), stderr.String())
	}
	im, err := openImage(path, true)
	if err != nil {
		t.Fatal(err)
	}
	logical, _ := sectorSizes(im)
	im.Close()
	if strings.HasSuffix(path, ".vhdx") && logical == 512 {
		testenv.Tool(t, "qemu-img")
		runTool(t, time.Minute, "qemu-img", "check", "-f", "vhdx", path)
	}
}

// readImage reads [off, off+n) of the image at path through vhdkit's own
// reader.
func readImage(t testing.TB, path string, off, n int64) []byte {
	t.Helper()
	im, err := openImage(path, true)
	if err != nil {
		t.Fatal(err)
	}
	defer im.Close()
	b := make([]byte, n)
	if _, err := im.ReadAt(b, off); err != nil {
		t.Fatal(err)
	}
	return b
}

// fillPattern fills b with bytes that depend on their disk offset and seed.
func fillPattern(b []byte, off int64, seed byte) {
	for i := range b {
		x := uint64(off) + uint64(i)
		b[i] = byte(x>>9) ^ byte(x>>17) ^ byte(x) ^ seed
	}
}

func fileHash(t testing.TB, path string) [32]byte {
	t.Helper()
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	return sha256.Sum256(b)
}

// nbdinfoExport is the part of nbdinfo --json about one export.
type nbdinfoExport struct {
	Name        string   `json:"export-name"`
	Description string   `json:"description"`
	Size        int64    `json:"export-size"`
	Contexts    []string `json:"contexts"`
	ReadOnly    bool     `json:"is_read_only"`
	Cache       bool     `json:"can_cache"`
	DF          bool     `json:"can_df"`
	FastZero    bool     `json:"can_fast_zero"`
	Flush       bool     `json:"can_flush"`
	FUA         bool     `json:"can_fua"`
	MultiConn   bool     `json:"can_multi_conn"`
	Trim        bool     `json:"can_trim"`
	Zero        bool     `json:"can_zero"`
	MinBlock    int      `json:"block_size_minimum"`
	PrefBlock   int      `json:"block_size_preferred"`
	MaxBlock    int      `json:"block_size_maximum"`
}

type nbdinfoOutput struct {
	Protocol   string          `json:"protocol"`
	TLS        bool            `json:"TLS"`
	Structured bool            `json:"structured"`
	Exports    []nbdinfoExport `json:"exports"`
}

func nbdinfoJSON(t testing.TB, args ...string) nbdinfoOutput {
	t.Helper()
	testenv.Tool(t, "nbdinfo")
	out := runTool(t, 2*time.Minute, "nbdinfo", append([]string{"--json"}, args...)...)
	var info nbdinfoOutput
	if err := json.Unmarshal([]byte(out), &info); err != nil {
		t.Fatalf("nbdinfo --json: %v\n%s", err, out)
	}
	return info
}

// TestNBDInfoActivated has nbdinfo start "vhdkit nbd" itself through
// socket activation ([ CMD ]) and checks what the export says of itself.
func TestNBDInfoActivated(t *testing.T) {
	bin := vhdkitBinary(t)
	dir := t.TempDir()
	img := filepath.Join(dir, "d.vhdx")
	createImage(t, img, "--size", "48M", "--logical-sector", "4096", "--physical-sector", "4096")

	info := nbdinfoJSON(t, "--", "[", bin, "nbd", img, "]")
	if info.Protocol != "newstyle-fixed" || !info.Structured || info.TLS || len(info.Exports) != 1 {
		t.Fatalf("nbdinfo: %+v", info)
	}
	e := info.Exports[0]
	if e.Name != "" || e.Description != "d.vhdx" || e.Size != 48<<20 || e.ReadOnly ||
		!e.Cache || !e.DF || !e.FastZero || !e.Flush || !e.FUA || !e.MultiConn || !e.Trim || !e.Zero ||
		e.MinBlock != 4096 || e.PrefBlock != 4096 || e.MaxBlock != 32<<20 ||
		strings.Join(e.Contexts, ",") != "base:allocation,qemu:allocation-depth" {
		t.Errorf("read-write export: %+v", e)
	}

	before := fileHash(t, img)
	info = nbdinfoJSON(t, "--", "[", bin, "nbd", "--read-only", img, "]")
	e = info.Exports[0]
	if !e.ReadOnly || e.Trim || e.Zero || e.FastZero || !e.Flush || !e.MultiConn || e.Size != 48<<20 {
		t.Errorf("read-only export: %+v", e)
	}
	if fileHash(t, img) != before {
		t.Errorf("serving %s read-only changed it", img)
	}

	// A named export is the default export too.
	info = nbdinfoJSON(t, "--list", "--", "[", bin, "nbd", "--export", "disk", img, "]")
	var names []string
	for _, e := range info.Exports {
		names = append(names, e.Name)
	}
	if strings.Join(names, ",") != ",disk" {
		t.Errorf("exports listed: %q, want the default and \"disk\"", names)
	}
	checkClean(t, img)
}

// TestNBDCopyActivated copies a disk into a dynamic VHDX and back out
// with nbdcopy, which starts "vhdkit nbd" itself each time.
func TestNBDCopyActivated(t *testing.T) {
	bin := vhdkitBinary(t)
	testenv.Tool(t, "nbdcopy")
	dir := t.TempDir()
	img := filepath.Join(dir, "d.vhdx")
	createImage(t, img, "--size", "64M", "--block-size", "1M")

	// Data in some places, zeros elsewhere; 1 MiB blocks, so some stay
	// unallocated.
	src := make([]byte, 64<<20)
	for _, r := range [][2]int64{{0, 3 << 20}, {(5 << 20) + 4096, 700 << 10}, {40 << 20, 9 << 20}, {(64 << 20) - 8192, 8192}} {
		fillPattern(src[r[0]:r[0]+r[1]], r[0], 0x5a)
	}
	srcPath := filepath.Join(dir, "src.raw")
	if err := os.WriteFile(srcPath, src, 0o644); err != nil {
		t.Fatal(err)
	}
	runTool(t, 2*time.Minute, "nbdcopy", "--", srcPath, "[", bin, "nbd", img, "]")
	checkClean(t, img)
	if got := readImage(t, img, 0, 64<<20); !bytes.Equal(got, src) {
		t.Fatal("the image does not hold what nbdcopy wrote")
	}

	out := filepath.Join(dir, "out.raw")
	runTool(t, 2*time.Minute, "nbdcopy", "--", "[", bin, "nbd", "--read-only", img, "]", out)
	got, err := os.ReadFile(out)
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(got, src) {
		t.Fatal("nbdcopy read back other data")
	}
}

// TestNBDSocketQemuIO serves a VHDX on a unix socket under an export
// name, writes and reads it with qemu-io through both names, stops the
// server with SIGTERM and checks the image.
func TestNBDSocketQemuIO(t *testing.T) {
	testenv.Tool(t, "qemu-io")
	dir := shortTempDir(t)
	img := filepath.Join(dir, "d.vhdx")
	createImage(t, img, "--size", "64M")
	sock := filepath.Join(dir, "s.sock")
	s := startNBD(t, "--socket", sock, "--export", "disk", img)
	if want := "nbd+unix:///disk?socket=" + sock; s.uri != want {
		t.Errorf("printed %q, want %q", s.uri, want)
	}
	def := "nbd+unix:///?socket=" + sock
	out := runTool(t, 2*time.Minute, "qemu-io", "-f", "raw", s.uri,
		"-c", "write -P 0xab 31M 2M",
		"-c", "write -z 32M 64k",
		"-c", "flush",
		"-c", "read -P 0xab 31M 1M",
		"-c", "read -P 0 32M 64k")
	if strings.Contains(out, "Pattern verification failed") || strings.Count(out, "wrote ") != 2 {
		t.Fatalf("qemu-io:\n%s", out)
	}
	out = runTool(t, 2*time.Minute, "qemu-io", "-r", "-f", "raw", def,
		"-c", "read -P 0xab 32704k 64k", "-c", "read -P 0xab 32832k 960k", "-c", "read -P 0 0 31M")
	if strings.Contains(out, "Pattern verification failed") || strings.Count(out, "read ") != 3 {
		t.Fatalf("qemu-io -r:\n%s", out)
	}
	if _, err := os.Stat(sock); err != nil {
		t.Fatal(err)
	}
	s.stop(t, syscall.SIGTERM)
	if _, err := os.Stat(sock); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("the socket is still there after the server stopped: %v", err)
	}
	checkClean(t, img)
	want := bytes.Repeat([]byte{0xab}, 2<<20)
	clear(want[1<<20 : 1<<20+64<<10])
	if got := readImage(t, img, 31<<20, 2<<20); !bytes.Equal(got, want) {
		t.Fatal("the image does not hold what qemu-io wrote")
	}
}

// TestNBDReadOnly checks that --read-only refuses writes with EPERM, for
// qemu-io and for a raw client, and leaves the file untouched.
func TestNBDReadOnly(t *testing.T) {
	testenv.Tool(t, "qemu-io")
	dir := shortTempDir(t)
	img := filepath.Join(dir, "d.vhdx")
	createImage(t, img, "--size", "16M")
	before := fileHash(t, img)
	sock := filepath.Join(dir, "s.sock")
	s := startNBD(t, "--read-only", "--socket", sock, img)

	// qemu-io asked to open the export read-write fails; told it is
	// read-only, it reads but cannot write.
	if out, err := runToolErr(time.Minute, "qemu-io", "-f", "raw", s.uri, "-c", "write -P 1 0 4k"); err == nil {
		t.Fatalf("qemu-io opened a read-only export read-write:\n%s", out)
	}
	out, _ := runToolErr(time.Minute, "qemu-io", "-r", "-f", "raw", s.uri, "-c", "read -P 0 0 64k", "-c", "write -P 1 0 4k")
	if !strings.Contains(out, "read 65536/65536") || strings.Contains(out, "wrote ") {
		t.Fatalf("qemu-io -r:\n%s", out)
	}

	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	c, err := nbd.Dial(ctx, "unix", sock, nil)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	if c.Flags()&nbd.FlagReadOnly == 0 {
		t.Error("the export does not say it is read-only")
	}
	if _, err := c.WriteAt(make([]byte, 4096), 0); !errors.Is(err, nbd.EPERM) {
		t.Errorf("write: %v, want EPERM", err)
	}
	if err := c.Trim(0, 1<<20); !errors.Is(err, nbd.EPERM) {
		t.Errorf("trim: %v, want EPERM", err)
	}
	if err := c.WriteZeroes(0, 1<<20, true); !errors.Is(err, nbd.EPERM) {
		t.Errorf("write zeroes: %v, want EPERM", err)
	}
	if err := c.Flush(); err != nil {
		t.Errorf("flush: %v", err)
	}
	c.Close()
	s.stop(t, syscall.SIGINT)
	if fileHash(t, img) != before {
		t.Error("a read-only export changed the file")
	}
	checkClean(t, img)
}

// TestNBDSigtermDuringWrites sends SIGTERM while two connections have
// many writes in flight, all allocating new blocks of a dynamic VHDX. The
// server must finish what it has read, flush and exit 0, leaving an image
// that checks clean and holds every write it acknowledged.
func TestNBDSigtermDuringWrites(t *testing.T) {
	dir := shortTempDir(t)
	img := filepath.Join(dir, "d.vhdx")
	const size, chunk = 256 << 20, 256 << 10
	createImage(t, img, "--size", "256M", "--block-size", "1M")
	sock := filepath.Join(dir, "s.sock")
	s := startNBD(t, "--socket", sock, img)

	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	var clients [2]*nbd.Client
	for i := range clients {
		c, err := nbd.Dial(ctx, "unix", sock, nil)
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close()
		clients[i] = c
	}

	// Eight writers per connection take chunks in turn (interleaved over
	// the disk, so blocks are allocated out of order) until the server
	// goes away.
	var next, acked atomic.Int64
	done := make([]atomic.Bool, size/chunk)
	signalled := make(chan struct{})
	var once sync.Once
	var wg sync.WaitGroup
	for w := range 16 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			c := clients[w%2]
			buf := make([]byte, chunk)
			for {
				i := next.Add(1) - 1
				if i >= size/chunk {
					return
				}
				k := (i * 97) % (size / chunk) // 97 is prime to the chunk count
				fillPattern(buf, k*chunk, byte(k))
				if _, err := c.WriteAt(buf, k*chunk); err != nil {
					return
				}
				done[k].Store(true)
				if acked.Add(1) == 64 {
					once.Do(func() { close(signalled) })
				}
			}
		}()
	}
	select {
	case <-signalled:
	case <-ctx.Done():
		t.Fatalf("64 writes were not acknowledged within a minute; stderr: %s", s.stderr)
	}
	s.stop(t, syscall.SIGTERM)
	wg.Wait()
	t.Logf("%d of %d writes acknowledged before the server stopped", acked.Load(), size/chunk)

	checkClean(t, img)
	data := readImage(t, img, 0, size)
	want := make([]byte, chunk)
	for k := range int64(size / chunk) {
		if !done[k].Load() {
			continue
		}
		fillPattern(want, k*chunk, byte(k))
		if !bytes.Equal(data[k*chunk:(k+1)*chunk], want) {
			t.Fatalf("acknowledged write at %d is not in the image", k*chunk)
		}
	}
}

// TestNBDListenTCP serves on a kernel-chosen loopback port and stops on
// SIGINT.
func TestNBDListenTCP(t *testing.T) {
	dir := t.TempDir()
	img := filepath.Join(dir, "d.vhdx")
	createImage(t, img, "--size", "8M")
	s := startNBD(t, "--listen", "127.0.0.1:0", "--export", "x", img)
	if !strings.HasPrefix(s.uri, "nbd://127.0.0.1:") || !strings.HasSuffix(s.uri, "/x") {
		t.Fatalf("printed %q", s.uri)
	}
	info := nbdinfoJSON(t, s.uri)
	if len(info.Exports) != 1 || info.Exports[0].Name != "x" || info.Exports[0].Size != 8<<20 {
		t.Fatalf("nbdinfo: %+v", info)
	}
	s.stop(t, syscall.SIGINT)
	checkClean(t, img)
}

// TestNBDTLS serves with a certificate and --tls-required: nbdinfo gets
// in over TLS, and a plaintext nbdinfo is refused.
func TestNBDTLS(t *testing.T) {
	dir := shortTempDir(t)
	certDir := filepath.Join(dir, "pki")
	cert, key := writeTestCert(t, certDir)
	img := filepath.Join(dir, "d.vhdx")
	createImage(t, img, "--size", "8M")
	sock := filepath.Join(dir, "s.sock")
	s := startNBD(t, "--socket", sock, "--tls-cert", cert, "--tls-key", key, "--tls-required", img)
	if want := "nbds+unix:///?socket=" + sock; s.uri != want {
		t.Errorf("printed %q, want %q", s.uri, want)
	}
	info := nbdinfoJSON(t, s.uri+"&tls-certificates="+certDir)
	if !info.TLS || len(info.Exports) != 1 || info.Exports[0].Size != 8<<20 {
		t.Fatalf("nbdinfo over TLS: %+v", info)
	}
	if out, err := runToolErr(time.Minute, "nbdinfo", "--json", "nbd+unix:///?socket="+sock); err == nil {
		t.Fatalf("a plaintext client was served:\n%s", out)
	}
	s.stop(t, syscall.SIGTERM)
}

// writeTestCert writes a self-signed certificate for localhost to
// dir/cert.pem and its key to dir/key.pem, and, for libnbd, the same
// certificate as the trusted CA (dir/ca-cert.pem).
func writeTestCert(t testing.TB, dir string) (cert, key string) {
	t.Helper()
	if err := os.MkdirAll(dir, 0o700); err != nil {
		t.Fatal(err)
	}
	k, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	tmpl := &x509.Certificate{
		SerialNumber:          big.NewInt(1),
		Subject:               pkix.Name{CommonName: "localhost"},
		DNSNames:              []string{"localhost"},
		IPAddresses:           []net.IP{net.IPv4(127, 0, 0, 1)},
		NotBefore:             time.Now().Add(-time.Hour),
		NotAfter:              time.Now().Add(24 * time.Hour),
		KeyUsage:              x509.KeyUsageDigitalSignature | x509.KeyUsageCertSign,
		ExtKeyUsage:           []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth},
		BasicConstraintsValid: true,
		IsCA:                  true,
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &k.PublicKey, k)
	if err != nil {
		t.Fatal(err)
	}
	kder, err := x509.MarshalPKCS8PrivateKey(k)
	if err != nil {
		t.Fatal(err)
	}
	certPEM := pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der})
	cert, key = filepath.Join(dir, "cert.pem"), filepath.Join(dir, "key.pem")
	for name, b := range map[string][]byte{
		cert:                              certPEM,
		filepath.Join(dir, "ca-cert.pem"): certPEM,
		key:                               pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: kder}),
	} {
		if err := os.WriteFile(name, b, 0o600); err != nil {
			t.Fatal(err)
		}
	}
	return cert, key
}

// TestNBDInProcess runs the verb through run, as main does, and stops it
// by cancelling its context; it also replaces a stale socket.
func TestNBDInProcess(t *testing.T) {
	dir := shortTempDir(t)
	img := filepath.Join(dir, "d.vhdx")
	createImage(t, img, "--size", "8M")

	// A socket left by a killed server: nobody listens on it.
	sock := filepath.Join(dir, "s.sock")
	l, err := net.Listen("unix", sock)
	if err != nil {
		t.Fatal(err)
	}
	l.(*net.UnixListener).SetUnlinkOnClose(false)
	l.Close()

	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	stdoutR, stdoutW := io.Pipe()
	var stderr lockedBuffer
	code := make(chan int, 1)
	go func() {
		code <- run(ctx, []string{"nbd", img, "--socket", sock}, stdoutW, &stderr)
		stdoutW.Close()
	}()
	line, err := bufio.NewReader(stdoutR).ReadString('\n')
	if err != nil {
		t.Fatalf("no URI line: %v; stderr: %s", err, stderr.String())
	}
	go io.Copy(io.Discard, stdoutR)
	if want := "nbd+unix:///?socket=" + sock + "\n"; line != want {
		t.Errorf("printed %q, want %q", line, want)
	}

	c, err := nbd.Dial(ctx, "unix", sock, nil)
	if err != nil {
		t.Fatal(err)
	}
	data := make([]byte, 1<<20)
	fillPattern(data, 3<<20, 7)
	if _, err := c.WriteAt(data, 3<<20); err != nil {
		t.Fatal(err)
	}
	// A second server on the same socket is refused while this one runs
	// (of another image: this one's is locked by the first server).
	img2 := filepath.Join(dir, "d2.vhdx")
	createImage(t, img2, "--size", "8M")
	var stdout2, stderr2 strings.Builder
	if got := run(ctx, []string{"nbd", "--socket", sock, img2}, &stdout2, &stderr2); got != 1 || !strings.Contains(stderr2.String(), "another server is listening") {
		t.Errorf("second server: exit %d, stderr %q", got, stderr2.String())
	}
	c.Close()
	cancel()
	if got := <-code; got != 0 || stderr.String() != "" {
		t.Fatalf("exit %d, stderr %q", got, stderr.String())
	}
	checkClean(t, img)
	if !bytes.Equal(readImage(t, img, 3<<20, 1<<20), data) {
		t.Fatal("the write is not in the image")
	}
}

// TestNBDErrors checks the verb's usage errors (exit 2) and failures
// (exit 1), each one line on stderr.
func TestNBDErrors(t *testing.T) {
	dir := shortTempDir(t)
	img := filepath.Join(dir, "d.vhdx")
	createImage(t, img, "--size", "8M")
	notSock := filepath.Join(dir, "file")
	if err := os.WriteFile(notSock, nil, 0o644); err != nil {
		t.Fatal(err)
	}
	// A QCOW2 header: the format comes from the content, not the name.
	qcow := filepath.Join(dir, "d.qcow2")
	if err := os.WriteFile(qcow, append([]byte("QFI\xfb\x00\x00\x00\x03"), make([]byte, 504)...), 0o644); err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct {
		args []string
		code int
		msg  string
	}{
		{[]string{"nbd"}, 2, "want exactly one FILE"},
		{[]string{"nbd", img, img}, 2, "want exactly one FILE"},
		{[]string{"nbd", "--socket", "x", "--listen", "127.0.0.1:0", img}, 2, "exclude each other"},
		{[]string{"nbd", "--tls-cert", "c.pem", img}, 2, "go together"},
		{[]string{"nbd", "--tls-required", img}, 2, "needs --tls-cert"},
		{[]string{"nbd", "--listen", "127.0.0.1:0", filepath.Join(dir, "missing.vhdx")}, 1, "missing.vhdx"},
		{[]string{"nbd", "--listen", "127.0.0.1:0", qcow}, 1, "holds a QCOW2 image"},
		{[]string{"nbd", "--socket", notSock, img}, 1, "is not a socket"},
		{[]string{"nbd", "--listen", "no-port", img}, 1, "no-port"},
		{[]string{"nbd", "--tls-cert", notSock, "--tls-key", notSock, img}, 1, "TLS certificate"},
	} {
		var stdout, stderr strings.Builder
		code := run(context.Background(), tc.args, &stdout, &stderr)
		if code != tc.code || !strings.HasPrefix(stderr.String(), "vhdkit: nbd: ") ||
			strings.Count(stderr.String(), "\n") != 1 || !strings.Contains(stderr.String(), tc.msg) {
			t.Errorf("%q: exit %d, stderr %q; want %d and %q", tc.args, code, stderr.String(), tc.code, tc.msg)
		}
	}
}
