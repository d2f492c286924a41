// Package hostile generates a corpus of malformed disk images: the inputs
// every read-only verb of vhdkit (info, check, map, convert, nbd
// --read-only) must reject with a clear error or read, in bounded time and
// memory, without modifying them and without following a parent link out
// of the folders it is allowed.
//
// Every image starts as a valid one that vhdkit itself makes (vhdx.Create,
// vhd.Create, their differencing chains, a VHDX whose log is pending) and
// is then damaged in one way:
//
//   - truncated at a structure boundary (and a byte either side): VHDX file
//     identifier, headers, region tables, log, metadata region, BAT,
//     payload blocks; VHD footer copy, dynamic header, BAT, blocks, footer;
//   - one field changed with the structure's checksum recomputed (VHDX
//     CRC-32C of headers, region tables and log entries; VHD one's
//     complement sums of footer and header), so that only a semantic
//     check catches it;
//   - counts and lengths at and past their limits: region and metadata
//     entry counts, log and entry lengths, descriptor counts, BAT sizes,
//     block sizes, virtual sizes (64 TiB, 2040 GiB and beyond);
//   - BAT entries overlapping each other or the metadata, or outside the
//     file;
//   - parent chains that loop (A->B->A, a file its own parent), 1000 files
//     deep, with a logical sector size that changes along the chain, with
//     a parent that is a FIFO or a directory;
//   - parent locators leading out of the image's folder (a relative
//     "..\" path, an absolute path, a symbolic link) to a decoy that is a
//     valid parent: followed, it would be read.
//
// Generate writes the corpus into a folder, one folder per image (its
// parents beside it), and returns what it wrote; cmd/hostile-corpus is
// the command that does the same from a shell.
package hostile

import (
	"bytes"
	"fmt"
	"os"
	"path/filepath"
	"sort"
)

// Case is one hostile image of the corpus.
type Case struct {
	Class string // what kind of damage: "vhdx-truncate", "vhd-footer", "chain-loop", ...
	Name  string // unique within its class
	Note  string // what is wrong with it, in a few words
	// Image is the path, relative to the corpus root, of the file the verbs
	// are run on; its folder holds the files of its chain.
	Image string
	// Outside is the folder, relative to the corpus root, that the image's
	// parent locators lead to out of its own folder ("" when none): no verb
	// may open a file in it unless --allow-parent-dir names it.
	Outside string
}

// ID is the case's class and name, as in the corpus's folder names.
func (c Case) ID() string { return c.Class + "/" + c.Name }

// Options tune the corpus's size.
type Options struct {
	// Dense adds truncations every 4 KiB through every structure of the
	// seed images (several hundred more images), not only at their
	// boundaries.
	Dense bool
}

// Generate writes the corpus into root, which must be empty or not
// exist, and returns its cases in a stable order.
func Generate(root string, opts Options) ([]Case, error) {
	if err := os.MkdirAll(root, 0o755); err != nil {
		return nil, err
	}
	if ents, err := os.ReadDir(root); err != nil {
		return nil, err
	} else if len(ents) > 0 {
		return nil, fmt.Errorf("hostile: %s is not empty", root)
	}
	c := &corpus{root: root, opts: opts, names: map[string]bool{}}
	for _, gen := range []func(*corpus) error{
		vhdxSingleFile, vhdxLog, vhdxLocators, vhdxChains,
		vhdSingleFile, vhdChains, escapes,
	} {
		if err := gen(c); err != nil {
			return nil, err
		}
	}
	return c.cases, nil
}

// corpus collects cases as they are written.
type corpus struct {
	root  string
	opts  Options
	cases []Case
	names map[string]bool
}

// dir makes and returns the folder of a new case, relative to the root.
func (c *corpus) dir(class, name string) (string, error) {
	id := class + "/" + name
	if c.names[id] {
		return "", fmt.Errorf("hostile: case %s generated twice", id)
	}
	c.names[id] = true
	rel := filepath.Join(class, name)
	return rel, os.MkdirAll(filepath.Join(c.root, rel), 0o755)
}

// single adds a case made of one file, named file in its folder.
func (c *corpus) single(class, name, note, file string, b []byte) error {
	rel, err := c.dir(class, name)
	if err != nil {
		return err
	}
	if err := writeSparse(filepath.Join(c.root, rel, file), b); err != nil {
		return err
	}
	c.cases = append(c.cases, Case{Class: class, Name: name, Note: note, Image: filepath.Join(rel, file)})
	return nil
}

// abs returns the absolute path of rel under the root.
func (c *corpus) abs(rel string) string { return filepath.Join(c.root, rel) }

// writeSparse writes b to a new file at path, leaving its all-zero 4 KiB
// pages as holes: the seeds are mostly zeros, and the corpus holds
// hundreds of them.
func writeSparse(path string, b []byte) error {
	f, err := os.OpenFile(path, os.O_RDWR|os.O_CREATE|os.O_EXCL, 0o600)
	if err != nil {
		return err
	}
	err = f.Truncate(int64(len(b)))
	var zero [4096]byte
	for off := 0; off < len(b) && err == nil; off += len(zero) {
		p := b[off:min(off+len(zero), len(b))]
		if !bytes.Equal(p, zero[:len(p)]) {
			_, err = f.WriteAt(p, int64(off))
		}
	}
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	return err
}

// writePieces writes a sparse file of size bytes holding pieces at their
// offsets.
func writePieces(path string, size int64, pieces map[int64][]byte) error {
	f, err := os.OpenFile(path, os.O_RDWR|os.O_CREATE|os.O_EXCL, 0o600)
	if err != nil {
		return err
	}
	err = f.Truncate(size)
	for off, p := range pieces {
		if err == nil {
			_, err = f.WriteAt(p, off)
		}
	}
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	return err
}

// truncations lists the lengths to cut a seed of size n at: each
// boundary, a byte before and after it, and with dense every 4 KiB; sorted,
// without duplicates, each in (0, n).
func truncations(n int64, boundaries []int64, dense bool) []int64 {
	set := map[int64]bool{}
	for _, b := range boundaries {
		for _, d := range []int64{-1, 0, 1} {
			if x := b + d; x >= 0 && x < n {
				set[x] = true
			}
		}
	}
	if dense {
		for x := int64(4096); x < n; x += 4096 {
			set[x] = true
		}
	}
	out := make([]int64, 0, len(set))
	for x := range set {
		out = append(out, x)
	}
	sort.Slice(out, func(i, j int) bool { return out[i] < out[j] })
	return out
}

// patched returns a copy of b with each of edits applied.
func patched(b []byte, edits ...func([]byte)) []byte {
	b = bytes.Clone(b)
	for _, e := range edits {
		e(b)
	}
	return b
}
