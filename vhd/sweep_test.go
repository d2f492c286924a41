package vhd

import (
	"bytes"
	"errors"
	"fmt"
	"io"
	"math/rand/v2"
	"os"
	"path/filepath"
	"slices"
	"testing"

	"github.com/vhdkit/vhdkit/disk"
	"github.com/vhdkit/vhdkit/storage"
	"github.com/vhdkit/vhdkit/storage/faulttest"
)

// The crash and fault sweeps of this package run on a storage.MemFS
// holding the image and its parents, one fault schedule across all of
// their files (storage/faulttest): every point of each operation is
// checked by checkPoint against a diskModel. Parent lookups stat the real
// file system, so each parent also stands there with the same bytes (no
// operation swept changes a parent).

// diskModel is what a disk may read after a point: per sector, what it
// held at the last successful Flush or any state written to it since.
type diskModel struct {
	content []byte             // what the disk reads now
	flushed []byte             // what it read at the last successful Flush
	since   map[int64][][]byte // by sector: each state written since
}

func newDiskModel(content []byte) *diskModel {
	return &diskModel{content: bytes.Clone(content), flushed: bytes.Clone(content), since: map[int64][][]byte{}}
}

// write records b written at off (before the image is asked: a write that
// fails may still land, whole or in part).
func (m *diskModel) write(off int64, b []byte) {
	copy(m.content[off:], b)
	for sec := off / SectorSize; sec*SectorSize < off+int64(len(b)); sec++ {
		lo := sec * SectorSize
		hi := min(lo+SectorSize, int64(len(m.content)))
		m.since[sec] = append(m.since[sec], bytes.Clone(m.content[lo:hi]))
	}
}

// flush records a successful Flush: everything written is durable.
func (m *diskModel) flush() {
	m.flushed = bytes.Clone(m.content)
	clear(m.since)
}

// verify checks what a disk reads against the model.
func (m *diskModel) verify(got []byte) error {
	if len(got) != len(m.flushed) {
		return fmt.Errorf("the disk reads %d bytes, the model holds %d", len(got), len(m.flushed))
	}
	for sec := int64(0); sec*SectorSize < int64(len(got)); sec++ {
		lo := sec * SectorSize
		hi := min(lo+SectorSize, int64(len(got)))
		if !bytes.Equal(got[lo:hi], m.flushed[lo:hi]) && !slices.ContainsFunc(m.since[sec], func(s []byte) bool { return bytes.Equal(got[lo:hi], s) }) {
			return fmt.Errorf("sector %d reads neither its flushed content nor a state written since", sec)
		}
	}
	return nil
}

// crashWarnings are the strict check's warnings a point may leave: space
// leaked by writes a crash cut short; the footer copy at 0 stale (between
// the commit of a header move and its rewrite: QEMU reads the same disk
// from it); the end without its footer (torn, or a cut of the file not
// yet synced coming back at the old length with the cut sectors zeroed,
// as storage.MemFile lets it: shrinking a file cannot avoid that state,
// and Open reads the copy at 0) — a writable open rewrites both; a parent
// warning (a shrunk child now smaller than its parent).
var crashWarnings = []string{"file.leak", "footer.copy-stale", "footer.end-damaged", "parent"}

// strictCheck runs the strict Check on the image at path in fsys (its
// parents opened there too): no error, and no warning but crashWarnings.
func strictCheck(fsys *storage.MemFS, path string) error {
	f, err := fsys.OpenFile(path, os.O_RDONLY, 0)
	if err != nil {
		return err
	}
	defer f.Close()
	probs, err := checkFile(f, path, OpenOptions{ReadOnly: true, FS: fsys})
	if err != nil {
		return fmt.Errorf("strict check: %w", err)
	}
	for _, p := range probs {
		if !p.Warning || !slices.Contains(crashWarnings, p.Rule) {
			return fmt.Errorf("strict check: %v", p)
		}
	}
	return nil
}

// readImage reads the whole virtual disk.
func readImage(img *Image) ([]byte, error) {
	b := make([]byte, img.Size())
	if _, err := img.ReadAt(b, 0); err != nil && err != io.EOF {
		return nil, fmt.Errorf("reading the disk: %w", err)
	}
	return b, nil
}

// An afterPoint says what the image of one operation may be after any
// point of its sweep.
type afterPoint struct {
	// state names the state img is in, reading got, or says why got is
	// wrong for it.
	state func(img *Image, got []byte) (string, error)
	// rerun, when set, runs the operation again on the recovered image,
	// open for writing, and returns what the disk must then read, in the
	// state done.
	rerun func(img *Image, before []byte) ([]byte, error)
	done  string
}

// checkPoint is what must hold of the image at path in fsys after any
// point of a sweep, in order:
//
//  1. the strict check passes;
//  2. opened read-only, it reads as one of the operation's states;
//  3. opened for writing (which repairs footers), it takes a write at its
//     end and closes; it then passes the strict check, a dynamic image's
//     footer copy at 0 equals its end footer, and, reopened, it reads as
//     before with that write, in the same state;
//  4. re-running the operation completes, and the image then passes the
//     strict check and reads as the completed operation leaves it.
//
// It returns the state of step 2.
func checkPoint(fsys *storage.MemFS, path string, a afterPoint) (string, error) {
	// 1.
	if err := strictCheck(fsys, path); err != nil {
		return "", fmt.Errorf("as found: %w", err)
	}
	// 2.
	img, err := Open(path, OpenOptions{ReadOnly: true, FS: fsys})
	if err != nil {
		return "", fmt.Errorf("open: %w", err)
	}
	got, err := readImage(img)
	var state string
	if err == nil {
		state, err = a.state(img, got)
	}
	img.Close()
	if err != nil {
		return "", err
	}
	// 3.
	img, err = Open(path, OpenOptions{FS: fsys})
	if err != nil {
		return state, fmt.Errorf("writable open: %w", err)
	}
	tail := bytes.Repeat([]byte{0xE7}, 3000)
	_, err = img.WriteAt(tail, img.Size()-int64(len(tail)))
	if err = errors.Join(err, img.Close()); err != nil {
		return state, fmt.Errorf("writing after recovery: %w", err)
	}
	copy(got[len(got)-len(tail):], tail)
	if err := strictCheck(fsys, path); err != nil {
		return state, fmt.Errorf("after recovery: %w", err)
	}
	b, _ := fsys.Bytes(path)
	if img.ft.DiskType != Fixed && !bytes.Equal(b[:footerSize], b[len(b)-footerSize:]) {
		return state, errors.New("the footer copy at 0 differs from the end footer after a writable open")
	}
	if err := reopened(fsys, path, got, state, a.state); err != nil {
		return state, fmt.Errorf("after recovery: %w", err)
	}
	// 4.
	if a.rerun == nil {
		return state, nil
	}
	img, err = Open(path, OpenOptions{FS: fsys})
	if err != nil {
		return state, fmt.Errorf("re-run: open: %w", err)
	}
	want, err := a.rerun(img, got)
	if err = errors.Join(err, img.Close()); err != nil {
		return state, fmt.Errorf("re-run: %w", err)
	}
	if err := strictCheck(fsys, path); err != nil {
		return state, fmt.Errorf("after a re-run: %w", err)
	}
	if err := reopened(fsys, path, want, a.done, a.state); err != nil {
		return state, fmt.Errorf("after a re-run: %w", err)
	}
	return state, nil
}

// reopened checks that the image at path reads want, in state state.
func reopened(fsys *storage.MemFS, path string, want []byte, state string, states func(*Image, []byte) (string, error)) error {
	img, err := Open(path, OpenOptions{ReadOnly: true, FS: fsys})
	if err != nil {
		return fmt.Errorf("reopen: %w", err)
	}
	defer img.Close()
	got, err := readImage(img)
	if err != nil {
		return err
	}
	if !bytes.Equal(got, want) {
		return fmt.Errorf("the disk reads %s", diffAt(got, want))
	}
	// The content checks of states are for the content before this write.
	if s, _ := states(img, got); s != state {
		return fmt.Errorf("a %s image became %s", state, s)
	}
	return nil
}

// judged is a Sweep.Check's verdict on a point whose image checkPoint
// found in state (err: what is wrong), counted in seen when right. Every
// operation an image does at these points is needed, so a run that lost
// one must report it, whatever the mode.
func judged(p faulttest.Point, state string, err error, seen map[string]int) error {
	if err == nil && p.Err == nil {
		err = errors.New("the operation reported success although one of its file operations failed")
	}
	if err != nil {
		return err
	}
	seen[state]++
	return nil
}

// TestCrashAndFaults sweeps a script of writes, trims, zeroing and
// flushes, then Close, on an image of each type (a differencing one's
// parent in the MemFS too): every point leaves an image whose sectors
// each read as at the last successful Flush or as a state written since.
// The short form runs one script per type; long mode ten, each from its
// own seed.
func TestCrashAndFaults(t *testing.T) {
	for _, seed := range faulttest.Seeds(1) {
		t.Run(fmt.Sprintf("script-%d", seed), func(t *testing.T) { crashAndFaults(t, seed) })
	}
}

func crashAndFaults(t *testing.T, seed uint64) {
	for _, c := range []modelCase{
		{"fixed", Fixed, 64 << 10, 0},
		{"dynamic-4K", Dynamic, 96<<10 + 512, 4 << 10},
		{"differencing-4K", Differencing, 96<<10 + 512, 4 << 10},
	} {
		t.Run(c.name, func(t *testing.T) {
			dir := t.TempDir()
			path := filepath.Join(dir, "child.vhd")
			var parent []byte
			paths := []string{path}
			opts := CreateOptions{Type: c.typ, Size: uint64(c.size), BlockSize: c.blockSize}
			if c.typ == Differencing {
				var ppath string
				ppath, parent = makeParent(t, rand.New(rand.NewPCG(5, 5)), dir, c.size, c.blockSize)
				opts = CreateOptions{Parent: ppath, BlockSize: c.blockSize}
				paths = append(paths, ppath)
			}
			img, err := Create(path, opts)
			if err != nil {
				t.Fatal(err)
			}
			mustClose(t, img)
			var model *diskModel
			seen := map[string]int{}
			faulttest.Run(t, faulttest.Sweep{
				Files: faulttest.ReadFiles(t, paths...),
				Seed:  6 + seed,
				Start: func(fsys *storage.MemFS) (func() error, error) {
					model = newDiskModel(make([]byte, c.size))
					copy(model.content, parent)
					model.flush()
					img, err := Open(path, OpenOptions{FS: fsys})
					if err != nil {
						return nil, err
					}
					return func() error {
						err := runScript(img, model, parent, int64(c.blockSize), seed)
						return errors.Join(err, img.Close())
					}, nil
				},
				Check: func(fsys *storage.MemFS, p faulttest.Point) error {
					state, err := checkPoint(fsys, path, afterPoint{state: func(_ *Image, got []byte) (string, error) {
						return "ok", model.verify(got)
					}})
					return judged(p, state, err, seen)
				},
			})
		})
	}
}

// runScript runs the sequence of writes, trims, zeroing and flushes seed
// chooses on img, recording them in model; it stops at the first error.
func runScript(img *Image, model *diskModel, parent []byte, bs int64, seed uint64) error {
	r := rand.New(rand.NewPCG(7, 7+seed))
	size := img.Size()
	if bs == 0 {
		bs = 4096
	}
	for range 60 {
		off, n := randomRange(r, size, bs)
		var err error
		switch op := r.IntN(10); {
		case op < 6:
			p := make([]byte, n)
			fill(r, p)
			model.write(off, p)
			_, err = img.WriteAt(p, off)
		case op < 7:
			model.write(off, below(parent, off, n))
			err = img.Trim(off, n)
		case op < 8:
			model.write(off, make([]byte, n))
			err = img.WriteZeroes(off, n, r.IntN(2) == 0)
		default:
			if err = img.Flush(); err == nil {
				model.flush()
			}
		}
		if err != nil {
			return err
		}
	}
	if err := img.Flush(); err != nil {
		return err
	}
	model.flush()
	return nil
}

// buildImage creates an image at path with scattered flushed content,
// then optionally moves its header once (so that a sweep also starts from
// a header that is not at offset 512), and returns the content.
func buildImage(t *testing.T, path string, opts CreateOptions, premove func(*Image) error) []byte {
	t.Helper()
	img, err := Create(path, opts)
	if err != nil {
		t.Fatal(err)
	}
	r := rand.New(rand.NewPCG(41, uint64(opts.Size)))
	content := readAll(t, img)
	for range 12 {
		off, n := randomRange(r, img.Size(), 4096)
		p := make([]byte, n)
		fill(r, p)
		mustWrite(t, img, p, off)
		copy(content[off:], p)
	}
	if premove != nil {
		if err := premove(img); err != nil {
			t.Fatal(err)
		}
		content = readAll(t, img)
	}
	mustClose(t, img)
	return content
}

// startAfterWrites is a sweep's Start for op on the image at path, run
// after the writes a fresh model of flushed has pending; it sets *model.
func startAfterWrites(path string, flushed []byte, model **diskModel, op func(*Image) error) func(*storage.MemFS) (func() error, error) {
	return func(fsys *storage.MemFS) (func() error, error) {
		*model = newDiskModel(flushed)
		img, err := Open(path, OpenOptions{FS: fsys})
		if err != nil {
			return nil, err
		}
		return func() error {
			err := writePending(img, *model)
			if err == nil {
				err = op(img)
			}
			return errors.Join(err, img.Close())
		}, nil
	}
}

// writePending makes three writes into img that the operation swept must
// flush first, recording them in model.
func writePending(img *Image, model *diskModel) error {
	size := img.Size()
	for i, off := range []int64{3000, size / 3, size - 9000} {
		p := bytes.Repeat([]byte{byte(0x41 + i)}, 7000)
		model.write(off, p)
		if _, err := img.WriteAt(p, off); err != nil {
			return err
		}
	}
	return nil
}

// TestCrashSetParent sweeps SetParent (after writes it must flush
// first): the child opens with its old link or its new one — never
// anything else — and reads its content through either parent (both
// hold the same bytes, under different unique ids); re-running SetParent
// then links it to the new one.
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
			flushed := buildImage(t, path, CreateOptions{Parent: oldParent, BlockSize: 4096}, premove)
			var model *diskModel
			after := afterPoint{
				state: func(img *Image, got []byte) (string, error) {
					info := img.Info()
					switch {
					case info.ParentUniqueID == oldID && info.ParentPath == oldParent:
						return "old", model.verify(got)
					case info.ParentUniqueID == newID && info.ParentPath == newParent:
						// SetParent flushes before it moves the header.
						if !bytes.Equal(got, model.content) {
							return "new", fmt.Errorf("new link, content %s", diffAt(got, model.content))
						}
						if l := info.ParentLocators; len(l) != 2 || l[0].Path != newParent || l[1].Path != `.\elsewhere\renamed.vhd` {
							return "new", fmt.Errorf("new link, locators %+v", l)
						}
						return "new", nil
					}
					return "", fmt.Errorf("link to %s (id %s) is neither the old nor the new one", info.ParentPath, info.ParentUniqueID)
				},
				rerun: func(img *Image, before []byte) ([]byte, error) { return before, img.SetParent(newParent) },
				done:  "new",
			}
			seen := map[string]int{}
			faulttest.Run(t, faulttest.Sweep{
				Files:     faulttest.ReadFiles(t, path, oldParent, newParent),
				Seed:      77,
				PowerCuts: headerMoveCuts(),
				Start:     startAfterWrites(path, flushed, &model, func(i *Image) error { return i.SetParent(newParent) }),
				Check: func(fsys *storage.MemFS, p faulttest.Point) error {
					state, err := checkPoint(fsys, path, after)
					return judged(p, state, err, seen)
				},
			})
			t.Logf("opened with the old link %d times, with the new %d", seen["old"], seen["new"])
			if seen["old"] == 0 || seen["new"] == 0 {
				t.Error("the sweep never saw one of the links")
			}
		})
	}
}

// headerMoveCuts is how many power cuts a crash point of SetParent,
// Resize or Optimize gets: their header moves commit by one footer sector
// after structures that must be durable first, and 3 cuts per point
// missed a sync removed from the first step (6 cuts or more caught it).
func headerMoveCuts() int { return map[bool]int{false: 8, true: 40}[faulttest.Long()] }

// resizeSweep sweeps Resize, after writes it must flush first, from an
// image built by opts to size: every point opens with the old size or
// the new one and the right content, and re-running Resize completes.
func resizeSweep(t *testing.T, opts CreateOptions, size int64, premove func(*Image) error) {
	t.Helper()
	dir := t.TempDir()
	var parent []byte
	var paths []string
	if opts.Type == Differencing {
		var pp string
		pp, parent = makeParent(t, rand.New(rand.NewPCG(43, 43)), dir, int64(opts.Size), opts.BlockSize)
		opts.Parent, opts.Size = pp, 0
		paths = append(paths, pp)
	}
	path := filepath.Join(dir, "d.vhd")
	flushed := buildImage(t, path, opts, premove)
	old := int64(len(flushed))
	var model *diskModel
	after := afterPoint{
		state: func(img *Image, got []byte) (string, error) {
			switch img.Size() {
			case old:
				return "old", model.verify(got)
			case size:
				// Resize flushes before it changes the size.
				if resized := resizeModel(bytes.Clone(model.content), parent, size); !bytes.Equal(got, resized) {
					return "new", fmt.Errorf("new size, content %s", diffAt(got, resized))
				}
				return "new", nil
			}
			return "", fmt.Errorf("size %d is neither %d nor %d", img.Size(), old, size)
		},
		rerun: func(img *Image, before []byte) ([]byte, error) {
			return resizeModel(before, parent, size), img.Resize(size)
		},
		done: "new",
	}
	seen := map[string]int{}
	var torn int
	faulttest.Run(t, faulttest.Sweep{
		Files:     faulttest.ReadFiles(t, append(paths, path)...),
		Seed:      78,
		PowerCuts: headerMoveCuts(),
		Start:     startAfterWrites(path, flushed, &model, func(i *Image) error { return i.Resize(size) }),
		Check: func(fsys *storage.MemFS, p faulttest.Point) error {
			if opts.Type == Fixed {
				repaired, err := repairTornFixed(t, fsys, path)
				if err != nil {
					return err
				}
				if repaired {
					torn++
				}
			}
			state, err := checkPoint(fsys, path, after)
			return judged(p, state, err, seen)
		},
	})
	t.Logf("opened with the old size %d times, with the new %d (%d after Check repaired a torn length)", seen["old"], seen["new"], torn)
	if seen["old"] == 0 || seen["new"] == 0 {
		t.Error("the sweep never saw one of the sizes")
	}
}

// repairTornFixed handles the states a torn length change leaves a fixed
// image in (see "Resizing" in the package doc): Open refuses it plainly,
// Check reports it, and Check with repair restores an image. It reports
// whether the state was one of those. Check's repair works on a real
// file, so the image makes a round trip through one.
func repairTornFixed(t *testing.T, fsys *storage.MemFS, path string) (bool, error) {
	_, err := Open(path, OpenOptions{ReadOnly: true, FS: fsys})
	if err == nil {
		return false, nil
	}
	if !errors.Is(err, disk.ErrFormat) {
		return false, fmt.Errorf("open: %w", err)
	}
	if err := strictCheck(fsys, path); err == nil {
		return false, errors.New("the strict check finds nothing in an image Open refuses")
	}
	real := filepath.Join(t.TempDir(), "torn.vhd")
	b, _ := fsys.Bytes(path)
	if err := os.WriteFile(real, b, 0o644); err != nil {
		return false, err
	}
	if probs, err := Check(real, true); err != nil || !hasProblem(probs, true, "cut after") {
		return false, fmt.Errorf("Check repair: %v %v", probs, err)
	}
	if b, err = os.ReadFile(real); err != nil {
		return false, err
	}
	f, err := fsys.OpenFile(path, os.O_RDWR|os.O_TRUNC, 0)
	if err != nil {
		return false, err
	}
	_, err = f.WriteAt(b, 0)
	return true, errors.Join(err, f.Close())
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

// TestCrashOptimize sweeps Optimize (full) of images with blocks to
// release and move: a dynamic one, one whose header a resize moved to the
// end, and a differencing child (its parent in the MemFS, read to find
// the blocks that hold its bytes). Every point reads the content, and
// re-running Optimize completes.
func TestCrashOptimize(t *testing.T) {
	dynamic := func(build func(*testing.T, string) (string, []byte)) func(*testing.T, string) ([]string, []byte) {
		return func(t *testing.T, dir string) ([]string, []byte) {
			path, content := build(t, dir)
			return []string{path}, content
		}
	}
	for _, c := range []struct {
		name  string
		build func(*testing.T, string) ([]string, []byte) // the image first, then its parent
	}{
		{"blocks", dynamic(wasteful)},
		{"header-at-end", dynamic(headerAtEnd)},
		{"differencing", func(t *testing.T, dir string) ([]string, []byte) {
			child, parent, content := releasableChild(t, dir)
			return []string{child, parent}, content
		}},
	} {
		t.Run(c.name, func(t *testing.T) {
			paths, content := c.build(t, t.TempDir())
			path := paths[0]
			after := afterPoint{
				state: func(_ *Image, got []byte) (string, error) {
					if !bytes.Equal(got, content) {
						return "ok", fmt.Errorf("content %s", diffAt(got, content))
					}
					return "ok", nil
				},
				rerun: func(img *Image, before []byte) ([]byte, error) {
					_, err := img.Optimize(OptimizeOptions{Full: true})
					return before, err
				},
				done: "ok",
			}
			seen := map[string]int{}
			faulttest.Run(t, faulttest.Sweep{
				Files:     faulttest.ReadFiles(t, paths...),
				Seed:      79,
				PowerCuts: headerMoveCuts(),
				Start: func(fsys *storage.MemFS) (func() error, error) {
					return func() error {
						_, err := Optimize(path, OptimizeOptions{Full: true, FS: fsys})
						return err
					}, nil
				},
				Check: func(fsys *storage.MemFS, p faulttest.Point) error {
					state, err := checkPoint(fsys, path, after)
					return judged(p, state, err, seen)
				},
			})
		})
	}
}

// TestCrashCreate sweeps making an image as Create does (the file
// created, the image written into it, synced, closed) of each type, a
// differencing one over a parent in the MemFS. A point may leave no file,
// or a file Open refuses as not a VHD or damaged (nothing was
// acknowledged; the strict check must agree), or an image: then it
// passes every check of checkPoint, reading zeros or its parent.
func TestCrashCreate(t *testing.T) {
	for _, c := range []struct {
		name string
		opts CreateOptions
	}{
		{"fixed", CreateOptions{Type: Fixed, Size: 64 << 10}},
		{"dynamic", CreateOptions{Size: 96<<10 + 512, BlockSize: 4096}},
		{"differencing", CreateOptions{Type: Differencing, Size: 96<<10 + 512, BlockSize: 4096}},
	} {
		t.Run(c.name, func(t *testing.T) {
			dir := t.TempDir()
			path := filepath.Join(dir, "new.vhd")
			opts := c.opts
			content := make([]byte, opts.Size)
			var files map[string][]byte
			if opts.Type == Differencing {
				var pp string
				pp, content = makeParent(t, rand.New(rand.NewPCG(44, 44)), dir, int64(opts.Size), opts.BlockSize)
				opts.Parent, opts.Size = pp, 0
				files = faulttest.ReadFiles(t, pp)
			}
			after := afterPoint{state: func(_ *Image, got []byte) (string, error) {
				if !bytes.Equal(got, content) {
					return "made", fmt.Errorf("a new image reads %s", diffAt(got, content))
				}
				return "made", nil
			}}
			seen := map[string]int{}
			faulttest.Run(t, faulttest.Sweep{
				Files: files,
				Seed:  80,
				// The sweep is short and which sectors a power cut keeps
				// decides everything here: more cuts per point.
				PowerCuts: map[bool]int{false: 100, true: 1000}[faulttest.Long()],
				Start: func(fsys *storage.MemFS) (func() error, error) {
					return func() error {
						f, err := fsys.OpenFile(path, os.O_RDWR|os.O_CREATE|os.O_EXCL, 0o600)
						if err != nil {
							return err
						}
						img, err := CreateFile(f, path, opts)
						if err != nil {
							return errors.Join(err, f.Close())
						}
						return img.Close()
					}, nil
				},
				Check: func(fsys *storage.MemFS, p faulttest.Point) error {
					if _, err := fsys.Stat(path); err != nil {
						return judged(p, "absent", nil, seen)
					}
					if _, err := Open(path, OpenOptions{ReadOnly: true, FS: fsys}); err != nil {
						if !errors.Is(err, disk.ErrFormat) && !errors.Is(err, disk.ErrChecksum) {
							return fmt.Errorf("open refuses a partial image for no format reason: %w", err)
						}
						if strictCheck(fsys, path) == nil {
							return fmt.Errorf("the strict check passes an image Open refuses (%v)", err)
						}
						return judged(p, "refused", nil, seen)
					}
					state, err := checkPoint(fsys, path, after)
					return judged(p, state, err, seen)
				},
			})
			t.Logf("states: %v", seen)
		})
	}
}

// TestCrashRecoveryOpen sweeps the repair a writable open makes of what
// a crash left: an end footer lost (the file opens from the copy at 0,
// and the open puts the footer back at the end, cutting the tail no
// structure refers to), and a copy at 0 left stale by a header move (it
// names the header's old place, still intact; the open rewrites it from
// the end footer). Every point reads the content, and a writable open
// then repairs the image.
func TestCrashRecoveryOpen(t *testing.T) {
	for _, c := range []struct {
		name   string
		rule   string // the warning the damage is reported as
		damage func(t *testing.T, path string)
	}{
		{"end-footer-lost", "footer.end-damaged", func(t *testing.T, path string) {
			b, err := os.ReadFile(path)
			if err != nil {
				t.Fatal(err)
			}
			clear(b[len(b)-footerSize:])
			if err := os.WriteFile(path, b, 0o600); err != nil {
				t.Fatal(err)
			}
		}},
		{"copy-stale", "footer.copy-stale", func(t *testing.T, path string) {
			b, err := os.ReadFile(path)
			if err != nil {
				t.Fatal(err)
			}
			img, err := Open(path, OpenOptions{})
			if err != nil {
				t.Fatal(err)
			}
			if err := img.Resize(img.Size() + 8192); err != nil { // moves the header
				t.Fatal(err)
			}
			mustClose(t, img)
			moved, err := os.ReadFile(path)
			if err != nil {
				t.Fatal(err)
			}
			copy(moved, b[:footerSize])
			if err := os.WriteFile(path, moved, 0o600); err != nil {
				t.Fatal(err)
			}
		}},
	} {
		t.Run(c.name, func(t *testing.T) {
			path := filepath.Join(t.TempDir(), "d.vhd")
			buildImage(t, path, CreateOptions{Size: 96<<10 + 512, BlockSize: 4096}, nil)
			c.damage(t, path)
			img, err := Open(path, OpenOptions{ReadOnly: true})
			if err != nil {
				t.Fatal(err)
			}
			content := readAll(t, img)
			mustClose(t, img)
			if err := strictCheck(storage.NewMemFS(faulttest.ReadFiles(t, path)), path); err != nil {
				t.Fatalf("the damage is not one a crash may leave: %v", err)
			}
			if probs, err := Check(path, false); err != nil || !slices.ContainsFunc(probs, func(p Problem) bool { return p.Rule == c.rule }) {
				t.Fatalf("the damage is not %s: %v %v", c.rule, probs, err)
			}
			after := afterPoint{state: func(_ *Image, got []byte) (string, error) {
				if !bytes.Equal(got, content) {
					return "ok", fmt.Errorf("content %s", diffAt(got, content))
				}
				return "ok", nil
			}}
			seen := map[string]int{}
			faulttest.Run(t, faulttest.Sweep{
				Files: faulttest.ReadFiles(t, path),
				Seed:  81,
				// Few operations: more power cuts per point.
				PowerCuts: map[bool]int{false: 30, true: 300}[faulttest.Long()],
				Start: func(fsys *storage.MemFS) (func() error, error) {
					return func() error {
						img, err := Open(path, OpenOptions{FS: fsys})
						if err != nil {
							return err
						}
						return img.Close()
					}, nil
				},
				Check: func(fsys *storage.MemFS, p faulttest.Point) error {
					state, err := checkPoint(fsys, path, after)
					return judged(p, state, err, seen)
				},
			})
		})
	}
}
