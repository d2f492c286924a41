package nbd

import (
	"bytes"
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/vhdkit/vhdkit/internal/testenv"
)

// These tests drive the server with real NBD clients: libnbd's nbdinfo,
// nbdcopy and nbdsh, QEMU's qemu-img and qemu-io, and fio's nbd engine.

// nbdsh runs a Python script in nbdsh (h is the handle). Debian's
// python3-libnbd lives in /usr/bin's python, which a pyenv or venv
// earlier in PATH would hide.
func nbdsh(t testing.TB, script string) string {
	t.Helper()
	testenv.Tool(t, "nbdsh")
	return run(t, 30*time.Second, []string{"PATH=/usr/bin:" + os.Getenv("PATH")}, "nbdsh", "-c", script)
}

// chainImage is a two-layer image: the parent holds chunk 3, the child
// data in chunk 0, an allocated zero chunk 1; everything else is a hole.
func chainImage(size int64) *memImage {
	parent := newMemImage(size, 512, nil)
	d := make([]byte, memChunk)
	pattern(d, 3*memChunk, 1)
	parent.WriteAt(d, 3*memChunk)
	img := newMemImage(size, 512, parent)
	pattern(d, 0, 2)
	img.WriteAt(d, 0)
	img.WriteZeroes(memChunk, memChunk, false)
	return img
}

func TestNbdinfoJSON(t *testing.T) {
	testenv.Tool(t, "nbdinfo")
	rw := newMemImage(8<<20, 512, nil)
	ro := newMemImage(4<<20, 4096, nil)
	ts := startServer(t, nil,
		Export{Name: "rw", Image: rw, Description: "writable disk"},
		Export{Name: "ro", Image: ro, ReadOnly: true})

	type info struct {
		Protocol   string `json:"protocol"`
		Structured bool   `json:"structured"`
		Exports    []struct {
			Name        string   `json:"export-name"`
			Description string   `json:"description"`
			Size        int64    `json:"export-size"`
			Contexts    []string `json:"contexts"`
			ReadOnly    bool     `json:"is_read_only"`
			Rotational  bool     `json:"is_rotational"`
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
		} `json:"exports"`
	}
	get := func(args ...string) info {
		out := run(t, 20*time.Second, nil, "nbdinfo", append([]string{"--json"}, args...)...)
		var i info
		if err := json.Unmarshal([]byte(out), &i); err != nil {
			t.Fatalf("nbdinfo json: %v\n%s", err, out)
		}
		return i
	}

	i := get(ts.uri("rw"))
	if i.Protocol != "newstyle-fixed" || !i.Structured || len(i.Exports) != 1 {
		t.Fatalf("%+v", i)
	}
	e := i.Exports[0]
	if e.Name != "rw" || e.Description != "writable disk" || e.Size != 8<<20 || e.ReadOnly || e.Rotational ||
		!e.Cache || !e.DF || !e.FastZero || !e.Flush || !e.FUA || !e.MultiConn || !e.Trim || !e.Zero ||
		e.MinBlock != 512 || e.PrefBlock != 4096 || e.MaxBlock != 32<<20 ||
		strings.Join(e.Contexts, ",") != "base:allocation,qemu:allocation-depth" {
		t.Fatalf("rw export: %+v", e)
	}

	i = get(ts.uri("ro"))
	e = i.Exports[0]
	if e.Size != 4<<20 || !e.ReadOnly || e.Trim || e.Zero || e.FastZero || !e.MultiConn ||
		e.MinBlock != 4096 || e.PrefBlock != 4096 {
		t.Fatalf("ro export: %+v", e)
	}

	i = get("--list", ts.uri(""))
	var names []string
	for _, e := range i.Exports {
		names = append(names, e.Name)
	}
	if strings.Join(names, ",") != "ro,rw" {
		t.Fatalf("list: %v", names)
	}

	// Unknown export: nbdinfo fails.
	if _, err := runErr(10*time.Second, nil, "nbdinfo", "--json", ts.uri("nope")); err == nil {
		t.Fatal("nbdinfo succeeded on an unknown export")
	}
}

func TestNbdinfoMap(t *testing.T) {
	testenv.Tool(t, "nbdinfo")
	ts := startServer(t, nil, Export{Name: "d", Image: chainImage(1 << 20)})
	check := func(got, want string) {
		t.Helper()
		if strings.Join(strings.Fields(got), " ") != strings.Join(strings.Fields(want), " ") {
			t.Fatalf("map\n got:\n%s\nwant:\n%s", got, want)
		}
	}
	check(run(t, 20*time.Second, nil, "nbdinfo", "--map", ts.uri("d")), `
		0   65536 0 data
		65536   65536 2 zero
		131072  65536 3 hole,zero
		196608  65536 0 data
		262144 786432 3 hole,zero`)
	check(run(t, 20*time.Second, nil, "nbdinfo", "--map=qemu:allocation-depth", ts.uri("d")), `
		0      131072 1 local
		131072  65536 0 absent
		196608  65536 2 backing depth 2
		262144 786432 0 absent`)
	check(run(t, 20*time.Second, nil, "nbdinfo", "--map", "--totals", ts.uri("d")), `
		131072 12.5% 0 data
		65536   6.2% 2 zero
		851968 81.2% 3 hole,zero`)
}

// TestNbdcopy copies a sparse file into an export and back out over
// several connections at once.
func TestNbdcopy(t *testing.T) {
	testenv.Tool(t, "nbdcopy")
	const size = 24 << 20
	src := make([]byte, size)
	for off := 0; off < size; off += 1 << 20 {
		if (off>>20)%3 != 1 { // every third MiB stays zero
			pattern(src[off:off+1<<20], int64(off), byte(off>>20))
		}
	}
	dir := t.TempDir()
	srcPath := filepath.Join(dir, "src.raw")
	if err := os.WriteFile(srcPath, src, 0o600); err != nil {
		t.Fatal(err)
	}
	img := newMemImage(size, 512, nil)
	ts := startServer(t, nil, Export{Name: "d", Image: img})

	run(t, 60*time.Second, nil, "nbdcopy", "--connections=4", "--requests=16", "--flush", srcPath, ts.uri("d"))
	if !bytes.Equal(img.snapshot(), src) {
		t.Fatal("export differs from source after nbdcopy in")
	}
	if img.flushes.Load() == 0 {
		t.Fatal("nbdcopy --flush did not flush")
	}
	// Zero ranges were sent as zeroing, not data: chunks stay unallocated.
	exts, _ := img.Extents(0, size)
	holes := int64(0)
	for _, e := range exts {
		if e.Type != 0 {
			holes += e.Length
		}
	}
	if holes < 7<<20 {
		t.Errorf("only %d bytes of zero ranges stayed unallocated", holes)
	}

	dstPath := filepath.Join(dir, "dst.raw")
	run(t, 60*time.Second, nil, "nbdcopy", "--connections=4", ts.uri("d"), dstPath)
	dst, err := os.ReadFile(dstPath)
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(dst, src) {
		t.Fatal("copy out differs from source")
	}
}

// TestNbdsh drives every command through libnbd, including error cases
// with libnbd's client-side checks turned off.
func TestNbdsh(t *testing.T) {
	testenv.Tool(t, "nbdsh")
	img := chainImage(1 << 20)
	ro := newMemImage(1<<20, 512, nil)
	ts := startServer(t, nil, Export{Name: "d", Image: img}, Export{Name: "ro", Image: ro, ReadOnly: true})
	want := img.snapshot()
	script := fmt.Sprintf(`
import errno
sock = %s

h.add_meta_context("base:allocation")
h.add_meta_context("qemu:allocation-depth")
h.set_export_name("d")
h.connect_unix(sock)
assert h.get_size() == 1048576
assert h.can_meta_context("base:allocation")
assert h.can_meta_context("qemu:allocation-depth")
assert h.get_block_size(nbd.SIZE_MINIMUM) == 512
assert h.is_read_only() == 0

h.pwrite(b"\xab" * 8192, 524288)
assert h.pread(8192, 524288) == b"\xab" * 8192
h.pwrite(b"\xcd" * 4096, 532480, nbd.CMD_FLAG_FUA)
h.flush()
h.trim(65536, 196608)
h.zero(8192, 524288, nbd.CMD_FLAG_NO_HOLE)
assert h.pread(8192, 524288) == bytes(8192)
h.zero(65536, 655360, nbd.CMD_FLAG_FAST_ZERO)
h.cache(65536, 0)

# A DF read of data and holes comes back as one chunk.
chunks = []
def chunk(buf, offset, status, err):
    chunks.append((offset, len(buf), status))
    return 0
buf = h.pread_structured(131072, 0, chunk, nbd.CMD_FLAG_DF)
assert len(chunks) == 1, chunks
# Without DF the hole comes as a hole chunk.
chunks = []
buf = h.pread_structured(131072, 655360, chunk)
assert chunks == [(655360, 65536, nbd.READ_HOLE), (720896, 65536, nbd.READ_HOLE)] or \
       chunks == [(655360, 131072, nbd.READ_HOLE)], chunks

seen = {}
def status(metacontext, offset, entries, err):
    seen[metacontext] = entries
    return 0
h.block_status(1048576, 0, status)
assert seen["base:allocation"][:2] == [65536, 0], seen
assert seen["qemu:allocation-depth"][:2] == [131072, 1], seen
seen = {}
h.block_status(4096, 131072, status, nbd.CMD_FLAG_REQ_ONE)
assert seen["base:allocation"] == [4096, 3], seen
assert seen["qemu:allocation-depth"] == [4096, 0], seen

# Error cases: let requests through to the server.
h.set_strict_mode(0)
def expect(fn, code):
    try:
        fn()
    except nbd.Error as e:
        assert e.errnum == code, (e.string, e.errnum, code)
        return
    raise AssertionError("no error, wanted %%d" %% code)
expect(lambda: h.pread(4096, 1048576), errno.EINVAL)
expect(lambda: h.pwrite(b"x" * 4096, 1046528), errno.ENOSPC)
expect(lambda: h.trim(4096, 1048576), errno.EINVAL)
expect(lambda: h.zero(4096, 1048576), errno.ENOSPC)
expect(lambda: h.pread(512, 100), errno.EINVAL)          # misaligned
expect(lambda: h.pread(33554432 + 512, 0), errno.EOVERFLOW)
expect(lambda: h.block_status(512, 1048576, status), errno.EINVAL)
expect(lambda: h.pread(512, 0, nbd.CMD_FLAG_REQ_ONE), errno.EINVAL)   # flag not for READ
expect(lambda: h.flush(nbd.CMD_FLAG_NO_HOLE), errno.EINVAL)
assert h.pread(512, 131072) == bytes(512)    # still in step
h.shutdown()

r = nbd.NBD()
r.set_export_name("ro")
r.connect_unix(sock)
assert r.is_read_only() == 1
r.set_strict_mode(0)
expect(lambda: r.pwrite(b"y" * 4096, 0), errno.EPERM)
expect(lambda: r.trim(4096, 0), errno.EPERM)
expect(lambda: r.zero(4096, 0), errno.EPERM)
assert r.pread(4096, 0) == bytes(4096)
r.shutdown()
print("ok")
`, pyStr(ts.sock))
	if out := nbdsh(t, script); strings.TrimSpace(out) != "ok" {
		t.Fatalf("nbdsh: %q", out)
	}
	// Net effect of the script: the FUA write; the 0xab write was zeroed
	// again, and trimming revealed nothing new (chunk 3 was the parent's).
	for i := 532480; i < 532480+4096; i++ {
		want[i] = 0xcd
	}
	got := img.snapshot()
	for i := range want {
		if got[i] != want[i] {
			t.Fatalf("byte %d = %#x, want %#x", i, got[i], want[i])
		}
	}
	if ro.writes.Load() != 0 {
		t.Fatal("read-only export written")
	}
}

func TestQemuImg(t *testing.T) {
	testenv.Tool(t, "qemu-img")
	const size = 8 << 20
	img := chainImage(size)
	ts := startServer(t, nil, Export{Name: "d", Image: img})
	dir := t.TempDir()
	out := filepath.Join(dir, "out.raw")
	run(t, 60*time.Second, nil, "qemu-img", "convert", "-f", "raw", "-O", "raw", ts.uri("d"), out)
	b, err := os.ReadFile(out)
	if err != nil || !bytes.Equal(b, img.snapshot()) {
		t.Fatalf("qemu-img convert out differs (%v)", err)
	}
	run(t, 30*time.Second, nil, "qemu-img", "compare", "-f", "raw", "-F", "raw", ts.uri("d"), out)

	// Change the file and convert it into the export.
	pattern(b[2<<20:3<<20], 2<<20, 7)
	if err := os.WriteFile(out, b, 0o600); err != nil {
		t.Fatal(err)
	}
	if _, err := runErr(30*time.Second, nil, "qemu-img", "compare", "-f", "raw", "-F", "raw", ts.uri("d"), out); err == nil {
		t.Fatal("qemu-img compare missed a difference")
	}
	run(t, 60*time.Second, nil, "qemu-img", "convert", "-n", "-f", "raw", "-O", "raw", out, ts.uri("d"))
	run(t, 30*time.Second, nil, "qemu-img", "compare", "-f", "raw", "-F", "raw", ts.uri("d"), out)
	if !bytes.Equal(img.snapshot(), b) {
		t.Fatal("export differs after qemu-img convert in")
	}

	// qemu-img map sees data and zeros where the image has them.
	type ext struct {
		Start  int64 `json:"start"`
		Length int64 `json:"length"`
		Zero   bool  `json:"zero"`
		Data   bool  `json:"data"`
	}
	var m []ext
	js := run(t, 30*time.Second, nil, "qemu-img", "map", "-f", "raw", "--output=json", ts.uri("d"))
	if err := json.Unmarshal([]byte(js), &m); err != nil {
		t.Fatalf("%v\n%s", err, js)
	}
	exts, _ := img.Extents(0, size)
	var want []ext
	for _, e := range exts {
		w := ext{e.Offset, e.Length, e.Type != 0, e.Type != 2}
		if n := len(want); n > 0 && want[n-1].Zero == w.Zero && want[n-1].Data == w.Data {
			want[n-1].Length += w.Length
			continue
		}
		want = append(want, w)
	}
	if fmt.Sprint(m) != fmt.Sprint(want) {
		t.Fatalf("qemu-img map\n got %v\nwant %v", m, want)
	}
}

func TestQemuIo(t *testing.T) {
	testenv.Tool(t, "qemu-io")
	img := newMemImage(8<<20, 512, nil)
	ts := startServer(t, nil, Export{Name: "d", Image: img})
	out := run(t, 60*time.Second, nil, "qemu-io", "-f", "raw",
		"-c", "write -P 0xa5 0 1M",
		"-c", "write -P 0x5a 1M 64k",
		"-c", "write -z 4M 1M",
		"-c", "discard 6M 1M",
		"-c", "aio_write -P 0x11 7M 64k",
		"-c", "aio_write -P 0x22 7232k 64k",
		"-c", "aio_flush",
		"-c", "flush",
		"-c", "read -P 0xa5 0 1M",
		"-c", "read -P 0x5a 1M 64k",
		"-c", "read -P 0 4M 1M",
		"-c", "read -P 0x11 7M 64k",
		"-c", "read -P 0x22 7232k 64k",
		ts.uri("d"))
	if strings.Contains(out, "Pattern verification failed") || strings.Contains(out, "error") {
		t.Fatalf("qemu-io:\n%s", out)
	}
	snap := img.snapshot()
	for i, want := range map[int]byte{0: 0xa5, 1<<20 - 1: 0xa5, 1 << 20: 0x5a, 4 << 20: 0, 7 << 20: 0x11, 7232 << 10: 0x22} {
		if snap[i] != want {
			t.Fatalf("byte %d = %#x, want %#x", i, snap[i], want)
		}
	}
	// qemu-io refuses to open a read-only export for writing; with -r it
	// reads it.
	ts2 := startServer(t, nil, Export{Name: "ro", Image: img, ReadOnly: true})
	if _, err := runErr(30*time.Second, nil, "qemu-io", "-f", "raw", "-c", "write -P 1 0 4k", ts2.uri("ro")); err == nil ||
		!strings.Contains(err.Error(), "Permission denied") {
		t.Fatalf("write to read-only export: %v", err)
	}
	run(t, 30*time.Second, nil, "qemu-io", "-r", "-f", "raw", "-c", "read -P 0xa5 0 1M", ts2.uri("ro"))
}

// TestFio is a short smoke run of fio's nbd engine (libnbd), with
// verification of what it wrote.
func TestFio(t *testing.T) {
	testenv.Tool(t, "fio")
	img := newMemImage(32<<20, 512, nil)
	ts := startServer(t, nil, Export{Name: "d", Image: img})
	common := []string{"--ioengine=nbd", "--uri=" + ts.uri("d"), "--size=8m", "--iodepth=16", "--output-format=terse"}
	run(t, 60*time.Second, nil, "fio", append([]string{"--name=verify", "--rw=randwrite", "--bs=4k",
		"--verify=crc32c", "--do_verify=1", "--verify_state_save=0"}, common...)...)
	run(t, 60*time.Second, nil, "fio", append([]string{"--name=mixed", "--rw=randrw", "--bs=4k", "--numjobs=2",
		"--time_based", "--runtime=2"}, common...)...)
	run(t, 60*time.Second, nil, "fio", append([]string{"--name=seq", "--rw=read", "--bs=1m"}, common...)...)
}
