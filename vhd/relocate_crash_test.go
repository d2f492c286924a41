package vhd

import (
	"bytes"
	"errors"
	"fmt"
	"math/rand/v2"
	"os"
	"path/filepath"
	"slices"
	"testing"

	"github.com/vhdkit/vhdkit/disk"
	"github.com/vhdkit/vhdkit/storage"
)

// clonesPerFault is how many power cuts are simulated after each injected
// fault, besides the file as the dead process left it.
const clonesPerFault = 6

// sweep runs run on the image held in image (durable bytes of the file at
// path) again and again, failing its i-th file operation for i = 0, 1, …
// — a torn write, and every later operation fails too, as from a disk that
// died — until run completes. After each failure it writes to path the
// file as the process left it and several power cuts of it
// (storage.MemFile.CrashClone), and verify must accept each. It returns
// the number of fault points.
func sweep(t *testing.T, path string, image []byte, opts OpenOptions, run func(*Image) error, verify func(t *testing.T, what string)) int {
	t.Helper()
	for i := int64(0); ; i++ {
		mem := storage.NewMemFile(image)
		ff := &storage.FaultFile{File: mem, FailAt: i, Dead: true, TornWrite: true}
		img, err := OpenFile(ff, path, opts)
		injected := ff.Injected()
		if err == nil {
			err = run(img)
			injected = ff.Injected()
			img.Close() // the file is dead or done: this releases the parent
		}
		if !injected {
			if err != nil {
				t.Fatalf("run without a fault: %v", err)
			}
			return int(i)
		}
		if !errors.Is(err, storage.ErrInjected) {
			t.Fatalf("fault %d: error %v does not wrap the injected one", i, err)
		}
		r := rand.New(rand.NewPCG(uint64(i), 77))
		states := [][]byte{mem.Bytes()}
		for range clonesPerFault {
			states = append(states, mem.CrashClone(r).Bytes())
		}
		for k, b := range states {
			if err := os.WriteFile(path, b, 0o644); err != nil {
				t.Fatal(err)
			}
			what := fmt.Sprintf("fault %d, state %d", i, k)
			if k == 0 {
				what += " (no power cut)"
			}
			verify(t, what)
		}
	}
}

// sectorsFrom checks that every sector of got equals that sector in one
// of the allowed contents.
func sectorsFrom(got []byte, allowed ...[]byte) error {
	for lo := int64(0); lo < int64(len(got)); lo += SectorSize {
		hi := min(lo+SectorSize, int64(len(got)))
		ok := false
		for _, a := range allowed {
			if int64(len(a)) >= hi && bytes.Equal(got[lo:hi], a[lo:hi]) {
				ok = true
				break
			}
		}
		if !ok {
			return fmt.Errorf("sector %d reads none of the allowed contents", lo/SectorSize)
		}
	}
	return nil
}

// afterCrash opens the image at path as a crash left it: read-only first
// (checked by check, which returns which state it found), then Check, then
// writable (which repairs footers) with a write, and read-only again: the
// repair must not change which state the image is in nor what it holds,
// and must leave the footer copy at 0 equal to the end footer.
func afterCrash(t *testing.T, what, path string, check func(img *Image) (string, error)) string {
	t.Helper()
	img, err := Open(path, OpenOptions{ReadOnly: true})
	if err != nil {
		t.Fatalf("%s: open: %v", what, err)
	}
	state, err := check(img)
	img.Close()
	if err != nil {
		t.Fatalf("%s: %v", what, err)
	}
	probs, err := Check(path, false)
	if err != nil {
		t.Fatalf("%s: Check: %v", what, err)
	}
	for _, p := range probs {
		if !p.Warning {
			t.Fatalf("%s: Check: %v", what, p)
		}
	}
	img, err = Open(path, OpenOptions{})
	if err != nil {
		t.Fatalf("%s: writable open: %v", what, err)
	}
	before := readAll(t, img)
	p := bytes.Repeat([]byte{0xE7}, 3000)
	mustWrite(t, img, p, img.Size()-3000)
	copy(before[len(before)-3000:], p)
	if err := img.Close(); err != nil {
		t.Fatalf("%s: close after recovery: %v", what, err)
	}
	b, _ := os.ReadFile(path)
	if ft, _ := peekFooter(path, false); ft.DiskType != Fixed && !bytes.Equal(b[:footerSize], b[len(b)-footerSize:]) {
		t.Fatalf("%s: footer copy at 0 differs from the end footer after a writable open", what)
	}
	img, err = Open(path, OpenOptions{ReadOnly: true})
	if err != nil {
		t.Fatalf("%s: reopen after recovery: %v", what, err)
	}
	defer img.Close()
	if got := readAll(t, img); !bytes.Equal(got, before) {
		t.Fatalf("%s: after recovery: %s", what, diffAt(got, before))
	}
	if s, _ := check(img); s != state {
		t.Fatalf("%s: %s image became %s after recovery", what, state, s)
	}
	return state
}

// buildImage creates an image in memory at path with scattered flushed
// content, then optionally moves its header once (so that the sweep also
// starts from a header that is not at offset 512), and returns the file's
// bytes and the content.
func buildImage(t *testing.T, path string, opts CreateOptions, premove func(*Image) error) ([]byte, []byte) {
	t.Helper()
	mem := storage.NewMemFile(nil)
	img, err := CreateFile(mem, path, opts)
	if err != nil {
		t.Fatal(err)
	}
	r := rand.New(rand.NewPCG(41, uint64(opts.Size)))
	model := readAll(t, img)
	for range 12 {
		off, n := randomRange(r, img.Size(), 4096)
		p := make([]byte, n)
		fill(r, p)
		mustWrite(t, img, p, off)
		copy(model[off:], p)
	}
	if premove != nil {
		if err := premove(img); err != nil {
			t.Fatal(err)
		}
		model = readAll(t, img)
	}
	mustClose(t, img)
	return mem.Bytes(), model
}

// pendingWrites writes into img, when not nil, without flushing (the
// operation swept must flush them first), and returns the content
// afterwards.
func pendingWrites(img *Image, model []byte) ([]byte, error) {
	m := bytes.Clone(model)
	for i, off := range []int64{3000, int64(len(m)) / 3, int64(len(m)) - 9000} {
		p := bytes.Repeat([]byte{byte(0x41 + i)}, 7000)
		if img != nil {
			if _, err := img.WriteAt(p, off); err != nil {
				return nil, err
			}
		}
		copy(m[off:], p)
	}
	return m, nil
}

// SetParent at every crash point: the child opens with its old link or
// its new one — never anything else — and reads its content through
// either parent (both hold the same bytes, under different unique ids).
func TestCrashSetParent(t *testing.T) {
	for _, c := range []struct {
		name    string
		premove bool
	}{{"header-at-512", false}, {"header-moved-before", true}} {
		t.Run(c.name, func(t *testing.T) {
			dir := t.TempDir()
			const size = 256 << 10
			oldParent, content := makeParent(t, rand.New(rand.NewPCG(42, 42)), dir, size, 4096)
			os.Mkdir(filepath.Join(dir, "elsewhere"), 0o755)
			newParent := filepath.Join(dir, "elsewhere", "renamed.vhd")
			np, err := Create(newParent, CreateOptions{Size: size, BlockSize: 16 << 10})
			if err != nil {
				t.Fatal(err)
			}
			mustWrite(t, np, content, 0)
			mustClose(t, np)
			oldID, newID := uniqueID(t, oldParent), uniqueID(t, newParent)

			path := filepath.Join(dir, "child.vhd")
			var premove func(*Image) error
			if c.premove {
				premove = func(img *Image) error { return img.SetParent(oldParent) }
			}
			image, flushed := buildImage(t, path, CreateOptions{Parent: oldParent, BlockSize: 4096}, premove)
			pending, _ := pendingWrites(nil, flushed) // the content once they are written
			run := func(img *Image) error {
				if _, err := pendingWrites(img, flushed); err != nil {
					return err
				}
				return img.SetParent(newParent)
			}
			seen := map[string]int{}
			n := sweep(t, path, image, OpenOptions{}, run, func(t *testing.T, what string) {
				seen[afterCrash(t, what, path, func(img *Image) (string, error) {
					info := img.Info()
					got := readAll(t, img)
					switch {
					case info.ParentUniqueID == oldID && info.ParentPath == oldParent:
						return "old", sectorsFrom(got, flushed, pending)
					case info.ParentUniqueID == newID && info.ParentPath == newParent:
						// SetParent flushes before it moves the header.
						if !bytes.Equal(got, pending) {
							return "new", fmt.Errorf("new link, content %s", diffAt(got, pending))
						}
						if l := info.ParentLocators; len(l) != 2 || l[0].Path != newParent || l[1].Path != `.\elsewhere\renamed.vhd` {
							return "new", fmt.Errorf("new link, locators %+v", l)
						}
						return "new", nil
					}
					return "", fmt.Errorf("link to %s (id %s) is neither the old nor the new one", info.ParentPath, info.ParentUniqueID)
				})]++
			})
			t.Logf("%d fault points, %d states each: %d opened with the old link, %d with the new", n, clonesPerFault+1, seen["old"], seen["new"])
			if seen["old"] == 0 || seen["new"] == 0 {
				t.Error("the sweep never saw one of the links")
			}
		})
	}
}

// resizeSweep sweeps Resize from an image built by opts to size: every
// crash point opens with the old size or the new one and the right
// content.
func resizeSweep(t *testing.T, opts CreateOptions, size int64, premove func(*Image) error) {
	t.Helper()
	dir := t.TempDir()
	var parent []byte
	if opts.Type == Differencing {
		var pp string
		pp, parent = makeParent(t, rand.New(rand.NewPCG(43, 43)), dir, int64(opts.Size), opts.BlockSize)
		opts.Parent, opts.Size = pp, 0
	}
	path := filepath.Join(dir, "d.vhd")
	image, flushed := buildImage(t, path, opts, premove)
	old := int64(len(flushed))
	pending, _ := pendingWrites(nil, flushed)
	resized := resizeModel(bytes.Clone(pending), parent, size)
	run := func(img *Image) error {
		if _, err := pendingWrites(img, flushed); err != nil {
			return err
		}
		return img.Resize(size)
	}
	seen := map[string]int{}
	var torn int
	n := sweep(t, path, image, OpenOptions{}, run, func(t *testing.T, what string) {
		if opts.Type == Fixed && repairTornFixed(t, what, path) {
			torn++
		}
		seen[afterCrash(t, what, path, func(img *Image) (string, error) {
			got := readAll(t, img)
			switch img.Size() {
			case old:
				return "old", sectorsFrom(got, flushed, pending)
			case size:
				if !bytes.Equal(got, resized) {
					return "new", fmt.Errorf("new size, content %s", diffAt(got, resized))
				}
				return "new", nil
			}
			return "", fmt.Errorf("size %d is neither %d nor %d", img.Size(), old, size)
		})]++
	})
	t.Logf("%d fault points, %d states each: %d opened with the old size, %d with the new (%d of them after Check repaired a torn length)",
		n, clonesPerFault+1, seen["old"], seen["new"], torn)
	if seen["old"] == 0 || seen["new"] == 0 {
		t.Error("the sweep never saw one of the sizes")
	}
}

// repairTornFixed handles the states a torn length change leaves a fixed
// image in (see "Resizing" in the package doc): Open refuses it plainly,
// Check reports it, and Check with repair restores an image. It reports
// whether the state was one of those.
func repairTornFixed(t *testing.T, what, path string) bool {
	t.Helper()
	_, err := Open(path, OpenOptions{ReadOnly: true})
	if err == nil {
		return false
	}
	if !errors.Is(err, disk.ErrFormat) {
		t.Fatalf("%s: open: %v", what, err)
	}
	probs, err := Check(path, false)
	if err != nil || !slices.ContainsFunc(probs, func(p Problem) bool { return !p.Warning }) {
		t.Fatalf("%s: Check: %v %v", what, probs, err)
	}
	if probs, err = Check(path, true); err != nil || !hasProblem(probs, true, "cut after") {
		t.Fatalf("%s: Check repair: %v %v", what, probs, err)
	}
	return true
}

func TestCrashResize(t *testing.T) {
	const bs = 4096
	for _, c := range []struct {
		name    string
		opts    CreateOptions
		size    int64
		premove bool
	}{
		// 40 BAT entries become 300: the BAT moves to the end with the
		// header (it always does), and the old last block is partial.
		{"dynamic-grow", CreateOptions{Size: 40*bs - 1536, BlockSize: bs}, 300*bs + 512, false},
		{"dynamic-grow-moved-before", CreateOptions{Size: 40*bs - 1536, BlockSize: bs}, 300*bs + 512, true},
		{"dynamic-shrink", CreateOptions{Size: 60 * bs, BlockSize: bs}, 25*bs + 1024, false},
		{"differencing-grow", CreateOptions{Type: Differencing, Size: 40*bs - 1536, BlockSize: bs}, 200 * bs, false},
		{"differencing-shrink", CreateOptions{Type: Differencing, Size: 60 * bs, BlockSize: bs}, 25*bs + 1024, false},
		{"fixed-grow", CreateOptions{Type: Fixed, Size: 40 * bs}, 97*bs + 512, false},
		{"fixed-shrink", CreateOptions{Type: Fixed, Size: 60 * bs}, 25*bs + 1024, false},
	} {
		t.Run(c.name, func(t *testing.T) {
			var premove func(*Image) error
			if c.premove {
				premove = func(img *Image) error { return img.Resize(img.Size() + 2*bs) }
			}
			resizeSweep(t, c.opts, c.size, premove)
		})
	}
}
