package vhd

import (
	"bytes"
	"compress/bzip2"
	"compress/gzip"
	"crypto/md5"
	"encoding/hex"
	"fmt"
	"io"
	"math/rand/v2"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"testing"

	"github.com/vhdkit/vhdkit/disk"
)

// inCI reports CI=true: missing tools and samples are failures there.
func inCI() bool { return os.Getenv("CI") == "true" }

func run(t testing.TB, name string, args ...string) []byte {
	t.Helper()
	cmd := exec.Command(name, args...)
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	out, err := cmd.Output()
	if err != nil {
		t.Fatalf("%s %s: %v\n%s", name, strings.Join(args, " "), err, stderr.Bytes())
	}
	return out
}

// samplesDir finds ../shared/samples relative to the repository root.
func samplesDir(t testing.TB) string {
	t.Helper()
	wd, _ := os.Getwd()
	for d := wd; ; d = filepath.Dir(d) {
		if _, err := os.Stat(filepath.Join(d, "go.mod")); err == nil {
			s := filepath.Join(filepath.Dir(d), "shared", "samples")
			if _, err := os.Stat(s); err != nil {
				if inCI() {
					t.Fatalf("samples folder %s missing (CI=true)", s)
				}
				t.Skipf("samples folder %s missing", s)
			}
			return s
		}
		if filepath.Dir(d) == d {
			t.Fatal("no go.mod above", wd)
		}
	}
}

var (
	samplesMu  sync.Mutex
	samplesTmp string
	samplesOut = map[string]string{}
)

// sample decompresses samples/<rel> (.gz or .bz2) once per test binary
// into a shared folder, writing zero runs as holes, and returns its path.
func sample(t testing.TB, rel string) string {
	t.Helper()
	src := filepath.Join(samplesDir(t), rel)
	samplesMu.Lock()
	defer samplesMu.Unlock()
	if p, ok := samplesOut[rel]; ok {
		return p
	}
	if samplesTmp == "" {
		d, err := os.MkdirTemp("", "vhd-samples-")
		if err != nil {
			t.Fatal(err)
		}
		samplesTmp = d
	}
	in, err := os.Open(src)
	if err != nil {
		t.Fatal(err)
	}
	defer in.Close()
	var r io.Reader
	name := filepath.Base(rel)
	switch {
	case strings.HasSuffix(rel, ".gz"):
		zr, err := gzip.NewReader(in)
		if err != nil {
			t.Fatal(err)
		}
		r, name = zr, strings.TrimSuffix(name, ".gz")
	case strings.HasSuffix(rel, ".bz2"):
		r, name = bzip2.NewReader(in), strings.TrimSuffix(name, ".bz2")
	default:
		r = in
	}
	dst := filepath.Join(samplesTmp, name)
	out, err := os.Create(dst)
	if err != nil {
		t.Fatal(err)
	}
	buf := make([]byte, 1<<20)
	var off int64
	for {
		n, err := io.ReadFull(r, buf)
		if n > 0 {
			if !disk.IsZero(buf[:n]) {
				if _, err := out.WriteAt(buf[:n], off); err != nil {
					t.Fatal(err)
				}
			}
			off += int64(n)
		}
		if err == io.EOF || err == io.ErrUnexpectedEOF {
			break
		}
		if err != nil {
			t.Fatalf("decompressing %s: %v", rel, err)
		}
	}
	if err := out.Truncate(off); err != nil {
		t.Fatal(err)
	}
	if err := out.Close(); err != nil {
		t.Fatal(err)
	}
	os.Chmod(dst, 0o444)
	samplesOut[rel] = dst
	return dst
}

func TestMain(m *testing.M) {
	code := m.Run()
	if samplesTmp != "" {
		os.RemoveAll(samplesTmp)
	}
	os.Exit(code)
}

// hashImage returns the md5 of the whole virtual disk, hashing holes from
// a shared zero buffer instead of reading them.
func hashImage(t testing.TB, img disk.Image) string {
	t.Helper()
	h := md5.New()
	buf := make([]byte, 4<<20)
	size := img.Size()
	exts := []disk.Extent{{Offset: 0, Length: size, Type: disk.Data}}
	if x, ok := img.(disk.Extenter); ok {
		var err error
		if exts, err = x.Extents(0, size); err != nil {
			t.Fatal(err)
		}
	}
	var pos int64
	for _, e := range exts {
		if e.Offset != pos {
			t.Fatalf("extents not contiguous at %d: %+v", pos, e)
		}
		for off := e.Offset; off < e.Offset+e.Length; {
			n := min(int64(len(buf)), e.Offset+e.Length-off)
			if e.Type == disk.Hole {
				h.Write(zeros()[:min(n, int64(len(zeros())))])
				n = min(n, int64(len(zeros())))
			} else if _, err := img.ReadAt(buf[:n], off); err != nil && err != io.EOF {
				t.Fatalf("read %d+%d: %v", off, n, err)
			} else {
				h.Write(buf[:n])
			}
			off += n
		}
		pos = e.Offset + e.Length
	}
	if pos != size {
		t.Fatalf("extents end at %d, size %d", pos, size)
	}
	return hex.EncodeToString(h.Sum(nil))
}

// readAll reads the whole virtual disk.
func readAll(t testing.TB, img disk.Image) []byte {
	t.Helper()
	b := make([]byte, img.Size())
	if n, err := img.ReadAt(b, 0); n != len(b) || (err != nil && err != io.EOF) {
		t.Fatalf("ReadAt whole disk: %d, %v", n, err)
	}
	return b
}

func md5hex(b []byte) string { s := md5.Sum(b); return hex.EncodeToString(s[:]) }

func fileMD5(t testing.TB, path string) string {
	t.Helper()
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	return md5hex(b)
}

// diffAt describes where two byte slices first differ.
func diffAt(a, b []byte) string {
	if len(a) != len(b) {
		return fmt.Sprintf("lengths %d and %d", len(a), len(b))
	}
	for i := range a {
		if a[i] != b[i] {
			return fmt.Sprintf("first difference at byte %d (%#x vs %#x)", i, a[i], b[i])
		}
	}
	return "equal"
}

// fill writes a recognisable pattern into p.
func fill(r *rand.Rand, p []byte) {
	v := byte(r.IntN(255) + 1)
	for i := range p {
		p[i] = v + byte(i/512)
	}
}

func mustWrite(t testing.TB, img disk.Image, p []byte, off int64) {
	t.Helper()
	if n, err := img.WriteAt(p, off); err != nil || n != len(p) {
		t.Fatalf("WriteAt(%d bytes at %d): %d, %v", len(p), off, n, err)
	}
}

func mustClose(t testing.TB, c io.Closer) {
	t.Helper()
	if err := c.Close(); err != nil {
		t.Fatal(err)
	}
}
