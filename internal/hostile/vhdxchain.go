package hostile

import (
	"encoding/binary"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"syscall"

	"github.com/vhdkit/vhdkit/vhdx"
)

// vhdxPair is a parent and a differencing child vhdkit made, as bytes: the
// parent p.vhdx and the child c.avhdx, meant to lie side by side.
type vhdxPair struct {
	parent, child []byte
	pl, cl        vhdxLayout
}

// makeVHDXPair creates the pair (logical sector size sector) and writes
// into both. The child's locator is reset to its linkage and the relative
// path ".\p.vhdx" alone: the absolute path vhdx.Create stored names the
// scratch folder.
func makeVHDXPair(sector uint32) (vhdxPair, error) {
	var pr vhdxPair
	dir, err := os.MkdirTemp("", "hostile-seed")
	if err != nil {
		return pr, err
	}
	defer os.RemoveAll(dir)
	p, c := filepath.Join(dir, "p.vhdx"), filepath.Join(dir, "c.avhdx")
	pim, err := vhdx.Create(p, vhdx.CreateOptions{Size: 8 << 20, BlockSize: 1 << 20, LogicalSectorSize: sector})
	if err != nil {
		return pr, err
	}
	if err := writePattern(pim.WriteAt, dynamicWrites); err != nil {
		pim.Close()
		return pr, err
	}
	cim, err := pim.CreateChild(c, vhdx.CreateOptions{BlockSize: 1 << 20})
	if err != nil {
		pim.Close()
		return pr, err
	}
	if err := writePattern(cim.WriteAt, map[int64]int{2 << 20: 4096, 5 << 20: 8192}); err != nil {
		cim.Close()
		return pr, err
	}
	if err := cim.Close(); err != nil {
		return pr, err
	}
	if pr.parent, err = os.ReadFile(p); err != nil {
		return pr, err
	}
	if pr.child, err = os.ReadFile(c); err != nil {
		return pr, err
	}
	if pr.pl, err = parseVHDX(pr.parent); err != nil {
		return pr, err
	}
	if pr.cl, err = parseVHDX(pr.child); err != nil {
		return pr, err
	}
	pr.child = pr.withLocator(vhdxLocator{{"parent_linkage", guidString(pr.pl.dataWriteGUID)}, {"relative_path", `.\p.vhdx`}}.marshal())
	return pr, nil
}

// withLocator returns the child's bytes with the parent locator item loc.
func (pr vhdxPair) withLocator(loc []byte) []byte { return patched(pr.child, setLocator(pr.cl, loc)) }

// withDataWriteGUID returns b with both headers' DataWriteGuid set to g.
func withDataWriteGUID(b []byte, g vhdx.GUID) []byte {
	return patched(b, bothHeaders(func(h []byte) { copy(h[hdrDataWriteGUID:], g[:]) }))
}

// files is a case's files by name; a nil value makes a FIFO, a name ending
// in "/" a folder.
type files map[string][]byte

// multi adds a case of several files; image names the one the verbs open.
func (c *corpus) multi(class, name, note, image string, fs files, extra func(dir string) error) error {
	rel, err := c.dir(class, name)
	if err != nil {
		return err
	}
	dir := c.abs(rel)
	for n, b := range fs {
		p := filepath.Join(dir, n)
		switch {
		case strings.HasSuffix(n, "/"):
			err = os.Mkdir(p, 0o755)
		case b == nil:
			err = syscall.Mkfifo(p, 0o600)
		default:
			err = writeSparse(p, b)
		}
		if err != nil {
			return err
		}
	}
	if extra != nil {
		if err := extra(dir); err != nil {
			return err
		}
	}
	c.cases = append(c.cases, Case{Class: class, Name: name, Note: note, Image: filepath.Join(rel, image)})
	return nil
}

// rawLocator builds a parent locator item by hand: count entries, of which
// the first len(kv) are given by (keyOff, valueOff, keyLen, valueLen).
func rawLocator(count uint16, kv [][4]uint32, tail []byte) []byte {
	b := make([]byte, 20+12*len(kv))
	copy(b, locatorTypeVHDX[:])
	binary.LittleEndian.PutUint16(b[18:], count)
	for i, e := range kv {
		h := b[20+12*i:]
		binary.LittleEndian.PutUint32(h[0:], e[0])
		binary.LittleEndian.PutUint32(h[4:], e[1])
		binary.LittleEndian.PutUint16(h[8:], uint16(e[2]))
		binary.LittleEndian.PutUint16(h[10:], uint16(e[3]))
	}
	return append(b, tail...)
}

// vhdxLocators adds children whose parent locator item is malformed, or
// leads to something that is not their parent, beside a valid parent.
func vhdxLocators(c *corpus) error {
	pr, err := makeVHDXPair(512)
	if err != nil {
		return err
	}
	link := guidString(pr.pl.dataWriteGUID)
	own := guidString(pr.cl.dataWriteGUID)
	vhdBytes, err := vhdSeed("", "seed.vhd", vhdCreate8M, vhdWrites)
	if err != nil {
		return err
	}
	loc := func(kv ...string) []byte {
		var l vhdxLocator
		for i := 0; i+1 < len(kv); i += 2 {
			l = append(l, [2]string{kv[i], kv[i+1]})
		}
		return l.marshal()
	}
	many := vhdxLocator{{"parent_linkage", link}, {"relative_path", `.\p.vhdx`}}
	for i := range 4000 {
		many = append(many, [2]string{fmt.Sprintf("k%04d", i), "v"})
	}
	valid := loc("parent_linkage", link, "relative_path", `.\p.vhdx`)
	otherType := patched(valid, func(b []byte) { copy(b, "hostile-locator!") })
	ms := []struct {
		name, note string
		loc        []byte
		fs         files
	}{
		{"count-max", "65535 key/value entries in a short item", rawLocator(0xFFFF, nil, nil), nil},
		{"key-beyond-item", "a key at offset 2^32 - 16", rawLocator(1, [][4]uint32{{0xFFFFFFF0, 32, 8, 8}}, make([]byte, 64)), nil},
		{"value-length-max", "a value of 65535 bytes", rawLocator(1, [][4]uint32{{32, 40, 8, 0xFFFF}}, make([]byte, 64)), nil},
		{"value-odd", "a UTF-16 value of odd length", rawLocator(1, [][4]uint32{{32, 40, 8, 7}}, make([]byte, 64)), nil},
		{"empty", "an item of 0 entries", rawLocator(0, nil, nil), nil},
		{"short", "an item shorter than its header", locatorTypeVHDX[:10], nil},
		{"type-other", "another locator type", otherType, nil},
		{"duplicate-key", "relative_path twice", loc("parent_linkage", link, "relative_path", `.\p.vhdx`, "relative_path", `.\x.vhdx`), nil},
		{"no-linkage", "no parent_linkage", loc("relative_path", `.\p.vhdx`), nil},
		{"linkage-not-guid", "parent_linkage not a GUID", loc("parent_linkage", "{not-a-guid}", "relative_path", `.\p.vhdx`), nil},
		{"linkage-other", "parent_linkage of another image", loc("parent_linkage", "{01234567-89ab-cdef-0123-456789abcdef}", "relative_path", `.\p.vhdx`), nil},
		{"no-path", "a linkage and no path", loc("parent_linkage", link), nil},
		{"path-long", "a relative path of 32000 characters", loc("parent_linkage", link, "relative_path", strings.Repeat(`a\`, 16000)+"p.vhdx"), nil},
		{"many-keys", "4002 key/value pairs", many.marshal(), nil},
		{"self", "its own parent", loc("parent_linkage", own, "relative_path", `.\c.avhdx`), nil},
		{"fifo", "a FIFO where the parent should be", loc("parent_linkage", link, "relative_path", `.\fifo.vhdx`), files{"fifo.vhdx": nil}},
		{"directory", "a folder where the parent should be", loc("parent_linkage", link, "relative_path", `.\dir.vhdx`), files{"dir.vhdx/": nil}},
		{"dev-zero", "/dev/zero as the parent", loc("parent_linkage", link, "absolute_win32_path", `/dev/zero`), nil},
		{"vhd-parent", "a VHD where the parent should be", loc("parent_linkage", link, "relative_path", `.\v.vhdx`), files{"v.vhdx": vhdBytes}},
		{"raw-parent", "a raw file with the parent's name", loc("parent_linkage", link, "relative_path", `.\raw.img`), files{"raw.img": make([]byte, 8<<20)}},
	}
	for _, m := range ms {
		fs := files{"p.vhdx": pr.parent, "c.avhdx": pr.withLocator(m.loc)}
		for n, b := range m.fs {
			fs[n] = b
		}
		if err := c.multi("vhdx-locator", m.name, m.note, "c.avhdx", fs, nil); err != nil {
			return err
		}
	}
	// The child's sector bitmap block past the end of the file, on a
	// payload block, on the metadata.
	le := binary.LittleEndian
	chunk := int64(1<<23) * 512 / pr.cl.blockSize
	bitmapEntry := pr.cl.batOff + 8*chunk
	payload := le.Uint64(pr.child[pr.cl.batOff+8*2:]) // block 2, written
	for _, m := range []struct {
		name, note string
		entry      uint64
	}{
		{"bitmap-beyond-eof", "the sector bitmap block at 1 TiB", 1<<40 | 6},
		{"bitmap-on-block", "the sector bitmap block on a payload block", payload&^7 | 6},
		{"bitmap-on-metadata", "the sector bitmap block on the metadata region", uint64(pr.cl.metaOff) | 6},
		{"bitmap-absent", "no sector bitmap block under partially present blocks", 0},
	} {
		b := patched(pr.child, func(b []byte) { le.PutUint64(b[bitmapEntry:], m.entry) })
		if err := c.multi("vhdx-bat", "child-"+m.name, m.note, "c.avhdx", files{"p.vhdx": pr.parent, "c.avhdx": b}, nil); err != nil {
			return err
		}
	}

	// Truncations of a child: through its metadata and its sector bitmap.
	var bitmaps []int64
	for i := int64(0); i < pr.cl.batLen/8 && i < 4097; i++ {
		e := binary.LittleEndian.Uint64(pr.child[pr.cl.batOff+8*i:])
		if e&7 == 6 || e&7 == 7 {
			bitmaps = append(bitmaps, int64(e>>20)<<20)
		}
	}
	it := pr.cl.items[itemParentLocator]
	for _, n := range truncations(int64(len(pr.child)), append(bitmaps, it.off, it.off+it.len, pr.cl.batOff+pr.cl.batLen), false) {
		if err := c.multi("vhdx-truncate", fmt.Sprintf("child-%d", n), fmt.Sprintf("differencing child cut to %d bytes", n), "c.avhdx",
			files{"p.vhdx": pr.parent, "c.avhdx": pr.child[:n]}, nil); err != nil {
			return err
		}
	}
	return nil
}

// vhdxChains adds chains that loop, run 1000 deep, or change their
// logical sector size.
func vhdxChains(c *corpus) error {
	pr, err := makeVHDXPair(512)
	if err != nil {
		return err
	}
	link := func(g vhdx.GUID, path string) []byte {
		return vhdxLocator{{"parent_linkage", guidString(g)}, {"relative_path", path}}.marshal()
	}
	// A->B->A: a and b are the same child with their own DataWriteGuid,
	// each naming the other.
	ga, gb := guidN("loop-a", 0), guidN("loop-b", 0)
	a := withDataWriteGUID(pr.withLocator(link(gb, `.\b.avhdx`)), ga)
	b := withDataWriteGUID(pr.withLocator(link(ga, `.\a.avhdx`)), gb)
	if err := c.multi("chain-loop", "vhdx-a-b-a", "a.avhdx's parent is b.avhdx, whose parent is a.avhdx", "a.avhdx",
		files{"p.vhdx": pr.parent, "a.avhdx": a, "b.avhdx": b}, nil); err != nil {
		return err
	}
	// A->B->C->B.
	gc := guidN("loop-c", 0)
	a2 := withDataWriteGUID(pr.withLocator(link(gb, `.\b.avhdx`)), ga)
	b2 := withDataWriteGUID(pr.withLocator(link(gc, `.\c.avhdx`)), gb)
	c2 := withDataWriteGUID(pr.withLocator(link(gb, `.\b.avhdx`)), gc)
	if err := c.multi("chain-loop", "vhdx-a-b-c-b", "a loop below the top: a, b, c, b", "a.avhdx",
		files{"p.vhdx": pr.parent, "a.avhdx": a2, "b.avhdx": b2, "c.avhdx": c2}, nil); err != nil {
		return err
	}

	// 1000 deep, refused; and 250 deep, within vhdkit's limit of 256
	// images, read through every layer. d0000's parent is p.vhdx.
	for _, depth := range []int{1000, 250} {
		err = c.multi("chain-deep", fmt.Sprintf("vhdx-%d", depth), fmt.Sprintf("a chain of %d differencing images", depth), fmt.Sprintf("d%04d.avhdx", depth-1),
			files{"p.vhdx": pr.parent}, func(dir string) error {
				parent, path := pr.pl.dataWriteGUID, `.\p.vhdx`
				for i := range depth {
					g := guidN("deep", i)
					b := withDataWriteGUID(pr.withLocator(link(parent, path)), g)
					name := fmt.Sprintf("d%04d.avhdx", i)
					if err := writeSparse(filepath.Join(dir, name), b); err != nil {
						return err
					}
					parent, path = g, `.\`+name
				}
				return nil
			})
		if err != nil {
			return err
		}
	}

	// Sector sizes that change along the chain: the parent says 4096, the
	// child 512; and a grandparent of 4096 under two 512 images.
	p4k := patched(pr.parent, func(b []byte) {
		binary.LittleEndian.PutUint32(b[pr.pl.items[itemLogicalSectorSize].off:], 4096)
	})
	if err := c.multi("chain-sector", "vhdx-parent-4096", "a 512-byte-sector child of a 4096-byte-sector parent", "c.avhdx",
		files{"p.vhdx": p4k, "c.avhdx": pr.child}, nil); err != nil {
		return err
	}
	gm := guidN("mid", 0)
	mid := withDataWriteGUID(pr.child, gm)
	top := pr.withLocator(link(gm, `.\m.avhdx`))
	if err := c.multi("chain-sector", "vhdx-grandparent-4096", "two 512-byte-sector images over a 4096-byte-sector one", "c.avhdx",
		files{"p.vhdx": p4k, "m.avhdx": mid, "c.avhdx": top}, nil); err != nil {
		return err
	}
	c4k := patched(pr.child, func(b []byte) {
		binary.LittleEndian.PutUint32(b[pr.cl.items[itemLogicalSectorSize].off:], 4096)
	})
	return c.multi("chain-sector", "vhdx-child-4096", "a 4096-byte-sector child of a 512-byte-sector parent", "c.avhdx",
		files{"p.vhdx": pr.parent, "c.avhdx": c4k}, nil)
}

// guidN is a GUID made from a name and a number, distinct for each.
func guidN(name string, n int) vhdx.GUID {
	var g vhdx.GUID
	copy(g[:], name)
	binary.BigEndian.PutUint32(g[12:], uint32(n))
	g[7] = 0x40
	return g
}
