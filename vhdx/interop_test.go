package vhdx

import (
	"bytes"
	"fmt"
	"math/rand"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
	"testing"

	randv2 "math/rand/v2"

	"github.com/vhdkit/vhdkit/internal/testenv"
	"github.com/vhdkit/vhdkit/storage"
)

// These tests judge our images with other implementations: qemu-img and
// qemu-io (QEMU's VHDX driver, 512-byte sectors, no differencing), 7-Zip
// and libvhdi (differencing chains).

func run(t testing.TB, name string, args ...string) string {
	t.Helper()
	out, err := exec.Command(name, args...).CombinedOutput()
	if err != nil {
		t.Fatalf("%s %s: %v\n%s", name, strings.Join(args, " "), err, out)
	}
	return string(out)
}

// fillRandom writes n random-length, random-offset chunks (some all-zero,
// some crossing blocks) into im and the model.
func fillRandom(t testing.TB, im *Image, model []byte, seed int64, n int, maxLen int64) {
	t.Helper()
	r := rand.New(rand.NewSource(seed))
	size := int64(len(model))
	for i := 0; i < n; i++ {
		off := r.Int63n(size)
		if r.Intn(3) == 0 {
			off = off / 512 * 512
		}
		l := min(r.Int63n(maxLen)+1, size-off)
		buf := make([]byte, l)
		if r.Intn(5) != 0 {
			r.Read(buf)
		}
		if _, err := im.WriteAt(buf, off); err != nil {
			t.Fatal(err)
		}
		copy(model[off:], buf)
	}
}

func readAll(t testing.TB, im *Image) []byte {
	t.Helper()
	b := make([]byte, im.Size())
	if _, err := im.ReadAt(b, 0); err != nil {
		t.Fatal(err)
	}
	return b
}

func firstDiff(a, b []byte) int {
	for i := range a {
		if a[i] != b[i] {
			return i
		}
	}
	return -1
}

// TestQemuReadsOurImages: qemu-img check passes and qemu-img compare finds
// each of our fixed and dynamic images identical to the raw data written.
func TestQemuReadsOurImages(t *testing.T) {
	testenv.Tool(t, "qemu-img")
	dir := t.TempDir()
	for _, c := range []struct {
		typ   Type
		block uint32
		size  uint64
	}{
		{Dynamic, 0, 100 << 20},
		{Dynamic, 1 << 20, 33<<20 + 512*7},
		{Dynamic, 8 << 20, 64 << 20},
		{Fixed, 1 << 20, 20 << 20},
		{Fixed, 0, 40<<20 + 4096},
	} {
		name := fmt.Sprintf("%v-%d-%d", c.typ, c.block, c.size)
		t.Run(name, func(t *testing.T) {
			path := filepath.Join(dir, name+".vhdx")
			im, err := Create(path, CreateOptions{Type: c.typ, Size: c.size, BlockSize: c.block})
			if err != nil {
				t.Fatal(err)
			}
			model := make([]byte, c.size)
			fillRandom(t, im, model, 1, 60, 3<<20)
			if err := im.Close(); err != nil {
				t.Fatal(err)
			}
			raw := filepath.Join(dir, name+".raw")
			if err := os.WriteFile(raw, model, 0o644); err != nil {
				t.Fatal(err)
			}
			run(t, "qemu-img", "check", "-f", "vhdx", path)
			run(t, "qemu-img", "compare", "-f", "vhdx", "-F", "raw", path, raw)
		})
	}
}

// TestWeReadQemuImages: images qemu-img makes (both subformats, several
// block sizes, block_state_zero on and off), written by qemu-io, read back
// byte for byte.
func TestWeReadQemuImages(t *testing.T) {
	testenv.Tool(t, "qemu-img")
	testenv.Tool(t, "qemu-io")
	dir := t.TempDir()
	for _, c := range []struct {
		subformat, block, zero string
	}{
		{"dynamic", "1M", "off"},
		{"dynamic", "8M", "on"},
		{"dynamic", "32M", "off"},
		{"fixed", "1M", "off"},
		{"fixed", "16M", "on"},
	} {
		name := c.subformat + "-" + c.block + "-" + c.zero
		t.Run(name, func(t *testing.T) {
			path := filepath.Join(dir, name+".vhdx")
			size := int64(72 << 20)
			run(t, "qemu-img", "create", "-q", "-f", "vhdx", "-o",
				"subformat="+c.subformat+",block_size="+c.block+",block_state_zero="+c.zero, path, fmt.Sprint(size))
			model := make([]byte, size)
			r := rand.New(rand.NewSource(7))
			var cmds []string
			for i := 0; i < 24; i++ {
				off := r.Int63n(size-(2<<20)) / 512 * 512
				l := (r.Int63n(4<<20)/512 + 1) * 512
				l = min(l, size-off)
				pat := byte(r.Intn(255) + 1)
				if i%6 == 5 {
					cmds = append(cmds, "-c", fmt.Sprintf("write -z %d %d", off, l))
					clear(model[off : off+l])
				} else {
					cmds = append(cmds, "-c", fmt.Sprintf("write -P %d %d %d", pat, off, l))
					for j := off; j < off+l; j++ {
						model[j] = pat
					}
				}
			}
			run(t, "qemu-io", append(append([]string{"-f", "vhdx"}, cmds...), path)...)
			im, err := Open(path, OpenOptions{ReadOnly: true})
			if err != nil {
				t.Fatal(err)
			}
			defer im.Close()
			if got := readAll(t, im); !bytes.Equal(got, model) {
				t.Fatalf("content differs from what qemu-io wrote, first at %d", firstDiff(got, model))
			}
			// Our writes on top of QEMU's image read back, and qemu still
			// checks it clean and reads what we wrote.
			rw, err := Open(path, OpenOptions{})
			if err != nil {
				t.Fatal(err)
			}
			fillRandom(t, rw, model, 8, 20, 1<<20)
			if err := rw.Close(); err != nil {
				t.Fatal(err)
			}
			raw := filepath.Join(dir, name+".raw")
			os.WriteFile(raw, model, 0o644)
			run(t, "qemu-img", "check", "-f", "vhdx", path)
			run(t, "qemu-img", "compare", "-f", "vhdx", "-F", "raw", path, raw)
		})
	}
}

// TestQemuConvertedImages: qemu-img convert -O vhdx of a raw file reads
// back identically.
func TestQemuConvertedImages(t *testing.T) {
	testenv.Tool(t, "qemu-img")
	dir := t.TempDir()
	size := int64(50<<20 + 4096)
	model := make([]byte, size)
	r := rand.New(rand.NewSource(3))
	for i := 0; i < 30; i++ {
		off := r.Int63n(size - 1<<20)
		r.Read(model[off : off+r.Int63n(1<<20)])
	}
	raw := filepath.Join(dir, "src.raw")
	os.WriteFile(raw, model, 0o644)
	for _, sub := range []string{"dynamic", "fixed"} {
		path := filepath.Join(dir, sub+".vhdx")
		run(t, "qemu-img", "convert", "-f", "raw", "-O", "vhdx", "-o", "subformat="+sub, raw, path)
		im, err := Open(path, OpenOptions{ReadOnly: true})
		if err != nil {
			t.Fatal(err)
		}
		if got := readAll(t, im); !bytes.Equal(got[:size], model) {
			t.Errorf("%s: differs at %d", sub, firstDiff(got, model))
		}
		im.Close()
	}
}

// makeChain builds base.vhdx (dynamic) and n differencing layers above it,
// each written randomly, and returns the leaf path and the expected data.
func makeChain(t testing.TB, dir string, size uint64, levels int, sector uint32) (string, []byte) {
	t.Helper()
	model := make([]byte, size)
	path := filepath.Join(dir, "base.vhdx")
	im, err := Create(path, CreateOptions{Size: size, BlockSize: 1 << 20, LogicalSectorSize: sector})
	if err != nil {
		t.Fatal(err)
	}
	fillRandom(t, im, model, 100, 30, 2<<20)
	if err := im.Close(); err != nil {
		t.Fatal(err)
	}
	for i := 1; i <= levels; i++ {
		child := filepath.Join(dir, fmt.Sprintf("level%d.avhdx", i))
		im, err := Create(child, CreateOptions{Parent: path})
		if err != nil {
			t.Fatal(err)
		}
		// Small writes leave blocks partially present.
		fillRandom(t, im, model, int64(100+i), 40, 20<<10)
		fillRandom(t, im, model, int64(200+i), 3, 3<<20)
		if err := im.Close(); err != nil {
			t.Fatal(err)
		}
		path = child
	}
	return path, model
}

// TestChainsWith7zip: 7-Zip extracts our differencing chains (1 to 3
// levels, partially present blocks) byte-identically and names the parent.
func TestChainsWith7zip(t *testing.T) {
	testenv.Tool(t, "7zz")
	for levels := 1; levels <= 3; levels++ {
		t.Run(fmt.Sprint(levels), func(t *testing.T) {
			dir := t.TempDir()
			leaf, model := makeChain(t, dir, 48<<20, levels, 512)
			out := filepath.Join(dir, "x")
			run(t, "7zz", "x", "-y", "-o"+out, leaf)
			got, err := os.ReadFile(filepath.Join(out, strings.TrimSuffix(filepath.Base(leaf), ".avhdx")+".img"))
			if err != nil {
				t.Fatal(err)
			}
			if !bytes.Equal(got, model) {
				t.Fatalf("7zz x differs, first at %d", firstDiff(got, model))
			}
			list := run(t, "7zz", "l", "-slt", leaf)
			parent := "base.vhdx"
			if levels > 1 {
				parent = fmt.Sprintf("level%d.avhdx", levels-1)
			}
			if !strings.Contains(list, "Parent = "+parent) || !strings.Contains(list, fmt.Sprintf("Volumes = %d", levels+1)) {
				t.Errorf("7zz l -slt does not show the chain:\n%s", list)
			}
			if strings.Contains(list, "ERRORS") || strings.Contains(list, "WARNINGS") {
				t.Errorf("7zz reports problems:\n%s", list)
			}
		})
	}
}

// TestChainsWithLibvhdi: vhdimount exposes our chain's top layer
// byte-identically; vhdiinfo shows the parent identifier we linked to.
func TestChainsWithLibvhdi(t *testing.T) {
	testenv.Tool(t, "vhdiinfo")
	testenv.Tool(t, "vhdimount")
	if _, err := os.Stat("/dev/fuse"); err != nil {
		if os.Getenv("CI") != "" {
			t.Fatalf("vhdimount needs /dev/fuse: %v", err)
		}
		t.Skip("no /dev/fuse")
	}
	dir := t.TempDir()
	leaf, model := makeChain(t, dir, 40<<20, 2, 512)
	im, err := Open(leaf, OpenOptions{ReadOnly: true})
	if err != nil {
		t.Fatal(err)
	}
	linkage := im.Info().ParentLinkage
	im.Close()
	info := run(t, "vhdiinfo", leaf)
	if m := regexp.MustCompile(`Parent identifier\s*:\s*(\S+)`).FindStringSubmatch(info); m == nil || m[1] != linkage.String() {
		t.Errorf("vhdiinfo parent identifier %v, want %s\n%s", m, linkage, info)
	}
	mnt := filepath.Join(dir, "mnt")
	os.Mkdir(mnt, 0o755)
	cmd := exec.Command("vhdimount", "-X", "allow_root", leaf, mnt)
	if out, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("vhdimount: %v\n%s", err, out)
	}
	t.Cleanup(func() { exec.Command("umount", mnt).Run() }) // before TempDir's cleanup
	// vhdimount exposes each layer, base first: vhdi3 is the top of 3.
	got, err := os.ReadFile(filepath.Join(mnt, "vhdi3"))
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(got, model) {
		t.Fatalf("vhdimount content differs, first at %d", firstDiff(got, model))
	}
}

// TestLogReplayMatchesQemu: a pending log — from Hyper-V, from QEMU, and
// from our own writer cut off between its log write and its apply —
// replays to the same content as qemu-img check -r all gives.
func TestLogReplayMatchesQemu(t *testing.T) {
	testenv.Tool(t, "qemu-img")
	dir := t.TempDir()
	var pending []string
	for _, s := range []string{"hyperv/discutils-vhdx-log-replay.vhdx.gz", "qemu-made/iotest-dirtylog-10G-4M.vhdx.bz2"} {
		pending = append(pending, sample(t, s, dir, ""))
	}
	pending = append(pending, ourPendingLog(t, dir))
	for _, path := range pending {
		t.Run(filepath.Base(path), func(t *testing.T) {
			orig, err := os.ReadFile(path)
			if err != nil {
				t.Fatal(err)
			}
			theirs, ours := path+".qemu.vhdx", path+".ours.vhdx"
			os.WriteFile(theirs, orig, 0o644)
			os.WriteFile(ours, orig, 0o644)
			run(t, "qemu-img", "check", "-r", "all", "-f", "vhdx", theirs)
			probs, err := Check(ours, true)
			if err != nil || len(probs) > 0 {
				t.Fatalf("check --repair: %v %v", probs, err)
			}
			run(t, "qemu-img", "compare", "-f", "vhdx", "-F", "vhdx", theirs, ours)
			run(t, "qemu-img", "check", "-f", "vhdx", ours)
		})
	}
}

// ourPendingLog writes an image whose last flush reached the log but not
// the BAT: a crash clone taken after the log entry's sync.
func ourPendingLog(t *testing.T, dir string) string {
	path := filepath.Join(dir, "ours-pending.vhdx")
	for i := int64(0); i < 1000; i++ {
		base := storage.NewMemFile(nil)
		ff := &storage.FaultFile{File: base, FailAt: -1}
		im, err := CreateFile(ff, path, CreateOptions{Size: 64 << 20, BlockSize: 1 << 20})
		if err != nil {
			t.Fatal(err)
		}
		ff.FailAt, ff.Dead = ff.Ops()+i, true
		r := rand.New(rand.NewSource(9))
		for k := 0; k < 30; k++ {
			b := make([]byte, r.Intn(1<<20)+1)
			r.Read(b)
			im.WriteAt(b, r.Int63n(im.Size()-int64(len(b)))) // fails once the disk stops
		}
		im.Flush()
		// Only synced data survives this clone: no unsynced sector kept.
		clone := base.CrashClone(randv2.New(randv2.NewPCG(0, 0)))
		ro, err := OpenFile(clone, path, OpenOptions{ReadOnly: true})
		if err != nil {
			t.Fatal(err)
		}
		replayed := ro.Info().LogReplayed
		ro.Close()
		if replayed {
			if err := os.WriteFile(path, clone.Bytes(), 0o644); err != nil {
				t.Fatal(err)
			}
			return path
		}
	}
	t.Fatal("no crash point left a pending log")
	return ""
}
