package vhdx

import (
	"bytes"
	"encoding/binary"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"testing"

	"github.com/vhdkit/vhdkit/storage"
)

// Fuzz targets for every parser. Each must return an error or a value that
// passes its own checks — never panic, never allocate from an unchecked
// count. Seeds come from images we make and real samples.

// seedImages returns small images' bytes: dynamic, fixed, and
// differencing children of the same size as their parent, larger and
// smaller (the parent stays on disk for a fuzzed child to find).
func seedImages(f *testing.F) [][]byte {
	dir := f.TempDir()
	base := filepath.Join(dir, "base.vhdx")
	im, err := Create(base, CreateOptions{Size: 4 << 20, BlockSize: 1 << 20})
	if err != nil {
		f.Fatal(err)
	}
	im.WriteAt(bytes.Repeat([]byte{1}, 3000), 1000)
	im.Close()
	var out [][]byte
	for _, c := range []struct {
		opts   CreateOptions
		resize int64
	}{
		{CreateOptions{Size: 4 << 20, BlockSize: 1 << 20, LogicalSectorSize: 4096}, 0},
		{CreateOptions{Type: Fixed, Size: 2 << 20, BlockSize: 1 << 20}, 0},
		{CreateOptions{Parent: base, BlockSize: 1 << 20}, 0},
		// Children larger and smaller than their parent.
		{CreateOptions{Parent: base, BlockSize: 1 << 20}, 6<<20 + 512},
		{CreateOptions{Parent: base, BlockSize: 2 << 20}, 2<<20 + 3*512},
	} {
		mf := storage.NewMemFile(nil)
		im, err := CreateFile(mf, filepath.Join(dir, "child.avhdx"), c.opts)
		if err != nil {
			f.Fatal(err)
		}
		if c.resize > 0 {
			if err := im.Resize(c.resize); err != nil {
				f.Fatal(err)
			}
		}
		im.WriteAt(bytes.Repeat([]byte{7}, 5000), 700)
		im.WriteAt(bytes.Repeat([]byte{8}, 3000), im.Size()-3000)
		im.Flush() // leaves a log entry in the log region
		out = append(out, mf.Bytes())
		im.Close()
	}
	return out
}

func FuzzHeader(f *testing.F) {
	h := header{Seq: 3, FileWriteGUID: newGUID(), DataWriteGUID: newGUID(), LogGUID: newGUID(), Version: 1, LogLength: mib, LogOffset: mib}
	f.Add(h.marshal())
	h.LogGUID, h.Seq = GUID{}, 1<<40
	f.Add(h.marshal())
	f.Fuzz(func(t *testing.T, b []byte) {
		h, err := parseHeader(b, "header", header1Offset)
		if err != nil {
			return
		}
		if err := h.validate("header", header1Offset, 1<<40); err != nil {
			return
		}
		if got, err := parseHeader(h.marshal(), "header", 0); err != nil || got != h {
			t.Fatalf("header does not survive a round trip: %v", err)
		}
	})
}

func FuzzRegionTable(f *testing.F) {
	for _, img := range seedImages(f) {
		f.Add(img[region1Offset : region1Offset+regionTableSize])
	}
	f.Fuzz(func(t *testing.T, b []byte) {
		if len(b) >= 16 {
			// Let the fuzzer reach past the checksum.
			b = bytes.Clone(b)
			if len(b) < regionTableSize {
				b = append(b, make([]byte, regionTableSize-len(b))...)
			}
			binary.LittleEndian.PutUint32(b[4:], checksum(b[:regionTableSize], 4))
		}
		entries, err := parseRegionTable(b, "region table", region1Offset)
		if err != nil {
			return
		}
		r, err := validateRegions(entries, "region table", region1Offset, 64<<20)
		if err != nil {
			return
		}
		if r.BAT.Offset+uint64(r.BAT.Length) > 64<<20 || r.Metadata.Offset < mib {
			t.Fatalf("accepted regions outside the file: %+v", r)
		}
	})
}

func FuzzMetadata(f *testing.F) {
	for _, opts := range []CreateOptions{
		{Size: 4 << 20, BlockSize: 1 << 20, LogicalSectorSize: 4096, PhysicalSectorSize: 4096},
		{Type: Fixed, Size: 1 << 40, BlockSize: 256 << 20, LogicalSectorSize: 512, PhysicalSectorSize: 512},
		{Type: Differencing, Size: 8 << 20, BlockSize: 2 << 20, LogicalSectorSize: 512, PhysicalSectorSize: 4096, Parent: "base.vhdx"},
	} {
		f.Add(marshalMetadata(opts, newGUID(), "child.avhdx"))
	}
	f.Fuzz(func(t *testing.T, b []byte) {
		if len(b) < metaTableSize {
			b = append(bytes.Clone(b), make([]byte, metaTableSize-len(b))...)
		}
		entries, err := parseMetaTable(b, newMetaOffset, uint32(len(b)))
		if err != nil {
			return
		}
		read := func(e metaEntry) ([]byte, error) { return b[e.Offset : e.Offset+e.Length], nil }
		p, err := parseParams(entries, read, newMetaOffset)
		if err != nil {
			return
		}
		if p.BlockSize < minBlockSize || p.VirtualSize == 0 || p.VirtualSize%uint64(p.LogicalSectorSize) != 0 {
			t.Fatalf("accepted bad parameters %+v", p)
		}
		newGeometry(p.BlockSize, p.LogicalSectorSize, p.VirtualSize, p.HasParent)
	})
}

func FuzzParentLocator(f *testing.F) {
	loc := parentLocator{Type: locatorTypeVHDX}
	loc.Set(keyLinkage, "{"+newGUID().String()+"}")
	loc.Set(keyRelativePath, `.\base.vhdx`)
	loc.Set(keyAbsolutePath, `C:\vms\base.vhdx`)
	f.Add(loc.marshal())
	f.Fuzz(func(t *testing.T, b []byte) {
		l, err := parseParentLocator(b, 0)
		if err != nil {
			return
		}
		again, err := parseParentLocator(l.marshal(), 0)
		if err != nil || len(again.Entries) != len(l.Entries) {
			t.Fatalf("locator does not survive a round trip: %v", err)
		}
		for i := range l.Entries {
			if again.Entries[i] != l.Entries[i] {
				// Lone surrogates are replaced on decode; a second round
				// trip must be stable.
				if third, _ := parseParentLocator(again.marshal(), 0); third.Entries[i] != again.Entries[i] {
					t.Fatalf("entry %d unstable: %q", i, l.Entries[i])
				}
			}
		}
	})
}

func FuzzLog(f *testing.F) {
	guid := newGUID()
	pages := []page{{off: 3 * mib, data: bytes.Repeat([]byte{9}, pageSize)}, {off: 3*mib + pageSize, data: make([]byte, pageSize)}}
	f.Add(marshalEntry(pages, 5, 0, guid, 8*mib, 9*mib), uint16(0))
	f.Add(append(marshalEntry(pages[:1], 6, 0, guid, 8*mib, 8*mib), marshalEntry(pages, 7, 0, guid, 8*mib, 8*mib)...), uint16(1))
	// Sixteen one-sector entries: sequences with tails before, at and
	// after their heads, one wrapping.
	var many []byte
	for i, tail := range []int64{0, 0, 1, 3, 2, 5, 5, 9, 8, 8, 10, 12, 15, 13, 14, 15} {
		many = append(many, craftEntry(guid, uint64(10+i%7+i/3), tail*logSectorSize, 0, 0, nil, nil)...)
	}
	f.Add(many, uint16(0))
	f.Add(many, uint16(5))
	f.Fuzz(func(t *testing.T, b []byte, shift uint16) {
		const logLen = 64 * kib
		log := make([]byte, logLen)
		copy(log[int(shift)%16*logSectorSize:], b)
		// Fix up the checksum of every entry, so the fuzzer gets past it
		// to the descriptors and the sequence logic.
		for pos := 0; pos+logEntryHeaderSize <= logLen; pos += logSectorSize {
			n := int(binary.LittleEndian.Uint32(log[pos+8:]))
			if binary.LittleEndian.Uint32(log[pos:]) == sigLogEntry && n >= logEntryHeaderSize && pos+n <= logLen {
				binary.LittleEndian.PutUint32(log[pos+4:], checksum(log[pos:pos+n], 4))
			}
		}
		h := header{LogGUID: guid, LogOffset: mib, LogLength: logLen}
		r := &offsetReader{b: log, base: mib}
		// The linear search finds the sequence a plain one does.
		l := &logReader{r: r, off: mib, length: logLen, guid: guid}
		byPos, err := l.scan()
		if err != nil {
			t.Fatal(err)
		}
		var got [2]int64
		if seq := l.activeSequence(byPos); seq != nil {
			got = [2]int64{seq[0].pos, seq[len(seq)-1].pos + 1}
		}
		if want := naiveSequence(log, guid); got != want {
			t.Fatalf("active sequence [tail, head+1) %v, a plain search finds %v", got, want)
		}
		p, err := readLog(r, &h, 16*mib)
		if err != nil || p == nil {
			return
		}
		for _, w := range p.writes {
			if w.off < region1Offset || w.length <= 0 || (w.data != nil && len(w.data) != logSectorSize) {
				t.Fatalf("bad write accepted: %+v", w)
			}
		}
	})
}

// naiveSequence finds the active sequence of log the plain way: every
// entry checksummed in full, a walk from each head's tail. It returns the
// positions of its tail and its head + 1, zeros for none.
func naiveSequence(log []byte, guid GUID) [2]int64 {
	n := int64(len(log))
	at := func(pos, k int64) []byte {
		b := make([]byte, k)
		for i := range b {
			b[i] = log[(pos+int64(i))%n]
		}
		return b
	}
	type entry struct {
		pos, length, tail int64
		seq               uint64
	}
	valid := map[int64]*entry{}
	for pos := int64(0); pos < n; pos += logSectorSize {
		h := at(pos, logEntryHeaderSize)
		length := int64(binary.LittleEndian.Uint32(h[8:]))
		tail := int64(binary.LittleEndian.Uint32(h[12:]))
		count := int64(binary.LittleEndian.Uint32(h[24:]))
		if binary.LittleEndian.Uint32(h[0:]) != sigLogEntry || GUID(h[32:48]) != guid ||
			length == 0 || length%logSectorSize != 0 || length > n || tail%logSectorSize != 0 || tail >= n ||
			logEntryHeaderSize+count*logDescSize > length ||
			int64(binary.LittleEndian.Uint64(h[48:])) < 0 || int64(binary.LittleEndian.Uint64(h[56:])) < 0 {
			continue
		}
		if b := at(pos, length); binary.LittleEndian.Uint32(b[4:]) == checksum(b, 4) {
			valid[pos] = &entry{pos, length, tail, binary.LittleEndian.Uint64(h[16:])}
		}
	}
	var best, bestTail *entry
	for _, h := range valid {
		var span int64
		for e, steps := valid[h.tail], 0; e != nil && steps <= len(valid); steps++ {
			if span += e.length; span > n {
				break
			}
			if e == h {
				if best == nil || h.seq > best.seq || (h.seq == best.seq && h.pos < best.pos) {
					best, bestTail = h, valid[h.tail]
				}
				break
			}
			next := valid[(e.pos+e.length)%n]
			if next == nil || next.seq != e.seq+1 {
				break
			}
			e = next
		}
	}
	if best == nil {
		return [2]int64{}
	}
	return [2]int64{bestTail.pos, best.pos + 1}
}

// offsetReader serves b as if it lay at file offset base.
type offsetReader struct {
	b    []byte
	base int64
}

func (r *offsetReader) ReadAt(p []byte, off int64) (int, error) {
	off -= r.base
	if off < 0 || off > int64(len(r.b)) {
		return 0, errors.New("out of range")
	}
	n := copy(p, r.b[off:])
	if n < len(p) {
		return n, errors.New("short")
	}
	return n, nil
}

func FuzzBAT(f *testing.F) {
	f.Add(uint64(batEntry(payloadFullyPresent, 4*mib)), int64(0), uint32(1<<20), false)
	f.Add(uint64(batEntry(bitmapPresent, 5*mib)), int64(4096), uint32(2<<20), true)
	f.Fuzz(func(t *testing.T, e uint64, idx int64, bs uint32, parent bool) {
		if bs < minBlockSize || bs > maxBlockSize || bs&(bs-1) != 0 || idx < 0 {
			return
		}
		g := newGeometry(bs, 512, 1<<30, parent)
		const size = 64 << 20
		if err := g.checkEntry(idx, e, size, parent, 3*mib); err != nil {
			return
		}
		if st := batState(e); st == payloadFullyPresent || st == payloadPartiallyPresent {
			if off := batOffset(e); off < mib || off >= size {
				t.Fatalf("accepted block at %#x", off)
			}
		}
	})
}

// openFragments are the pieces of a small image FuzzOpen mutates: the
// structures themselves, not megabytes of padding around them.
var openFragments = []struct{ off, len int64 }{
	{header1Offset, 256}, {header2Offset, 256}, // headers (checksums fixed up)
	{region1Offset, 256},                  // region table 1 (checksum fixed up)
	{newLogOffset, 8 * kib},               // the log's first entry
	{newMetaOffset, 512},                  // metadata table
	{newMetaOffset + metaTableSize, 1024}, // metadata items
	{newBATOffset, 512},                   // BAT
}

// FuzzOpen opens whole images whose structures are mutated, reads, writes
// and checks them.
func FuzzOpen(f *testing.F) {
	imgs := seedImages(f)
	for _, img := range imgs {
		var in []byte
		for _, fr := range openFragments {
			in = append(in, img[fr.off:fr.off+fr.len]...)
		}
		f.Add(in, uint8(0))
	}
	f.Fuzz(func(t *testing.T, in []byte, which uint8) {
		img := bytes.Clone(imgs[int(which)%len(imgs)])
		for _, fr := range openFragments {
			n := copy(img[fr.off:fr.off+fr.len], in)
			in = in[n:]
		}
		for _, off := range []int64{header1Offset, header2Offset} {
			binary.LittleEndian.PutUint32(img[off+4:], checksum(img[off:off+headerSize], 4))
		}
		binary.LittleEndian.PutUint32(img[region1Offset+4:], checksum(img[region1Offset:region1Offset+regionTableSize], 4))
		path := filepath.Join(t.TempDir(), "fuzz.vhdx")
		for _, ro := range []bool{true, false} {
			im, err := OpenFile(storage.NewMemFile(img), path, OpenOptions{ReadOnly: ro})
			if err != nil {
				continue
			}
			buf := make([]byte, 64<<10)
			for off := int64(0); off < min(im.Size(), 8<<20); off += 1 << 20 {
				im.ReadAt(buf[:min(int64(len(buf)), im.Size()-off)], off)
			}
			im.Extents(0, im.Size())
			if !ro {
				im.WriteAt(buf[:1000], 0)
			}
			im.Close()
			CheckFile(storage.NewMemFile(img), path)
		}
	})
}

// FuzzChainSizes links a child to a parent of another size than the one
// it was made over (via parent_linkage2), so that it holds nothing past a
// smaller parent's end, then runs fuzzed writes, reads, Extents and
// Resizes on the child against a model: reads past the parent's end are
// zeros, nothing panics or reads out of range.
func FuzzChainSizes(f *testing.F) {
	dir := f.TempDir()
	type template struct {
		p1    []byte // the parent the children were made over, 16 MiB
		data  []byte // its content
		child map[uint32][]byte
	}
	var templates [2]template
	for i, sector := range []uint32{512, 4096} {
		p1Path := filepath.Join(dir, fmt.Sprintf("p1-%d.vhdx", sector))
		p1, err := Create(p1Path, CreateOptions{Size: 16 << 20, BlockSize: 1 << 20, LogicalSectorSize: sector})
		if err != nil {
			f.Fatal(err)
		}
		data := bytes.Repeat([]byte{0x5a}, 16<<20)
		p1.WriteAt(data, 0)
		p1.Close()
		tpl := template{data: data, child: map[uint32][]byte{}}
		if tpl.p1, err = os.ReadFile(p1Path); err != nil {
			f.Fatal(err)
		}
		for _, bs := range []uint32{1 << 20, 2 << 20, 4 << 20} {
			path := filepath.Join(dir, fmt.Sprintf("c-%d-%d.avhdx", sector, bs))
			c, err := Create(path, CreateOptions{Parent: p1Path, BlockSize: bs})
			if err != nil {
				f.Fatal(err)
			}
			c.Close()
			if tpl.child[bs], err = os.ReadFile(path); err != nil {
				f.Fatal(err)
			}
		}
		templates[i] = tpl
	}
	f.Add(false, uint8(0), uint32(20000), uint32(20000), []byte{0, 1, 2, 3, 4, 5, 6, 7, 8, 9})
	f.Add(true, uint8(1), uint32(3000), uint32(2000), []byte{1, 200, 7, 9, 9, 2, 0, 0, 3, 3, 3, 250, 1, 1, 1})
	f.Add(false, uint8(2), uint32(40000), uint32(10241), []byte{0, 255, 255, 255, 255, 2, 19, 0, 0, 0})
	f.Fuzz(func(t *testing.T, big bool, blockLog uint8, parentSectors, childSectors uint32, ops []byte) {
		tpl, sector := templates[0], int64(512)
		if big {
			tpl, sector = templates[1], 4096
		}
		bs := uint32(1<<20) << (blockLog % 3)
		const maxSize = 24 << 20
		parentSize := (int64(parentSectors)%(maxSize/sector) + 1) * sector
		childSize := (int64(childSectors)%(maxSize/sector) + 1) * sector
		childPath := filepath.Join(dir, "child.avhdx")
		p1, err := OpenFile(storage.NewMemFile(tpl.p1), filepath.Join(dir, "p1.vhdx"), OpenOptions{ReadOnly: true})
		if err != nil {
			t.Fatal(err)
		}
		cf := storage.NewMemFile(tpl.child[bs])
		child, err := OpenFile(keepOpen{cf}, childPath, OpenOptions{ParentImage: p1})
		if err != nil {
			t.Fatal(err)
		}
		model := bytes.Clone(tpl.data)
		held := make([]bool, maxSize/sector) // sectors the child holds
		// The op stream: kind, then offset and length as fractions of
		// the disk (16 bits each).
		next := func(n int) []byte {
			if len(ops) < n {
				return nil
			}
			b := ops[:n]
			ops = ops[n:]
			return b
		}
		span := func(b []byte, size int64) (int64, int64) {
			off := int64(binary.LittleEndian.Uint16(b)) * size >> 16
			n := min(int64(binary.LittleEndian.Uint16(b[2:]))*(size>>4)>>16+1, size-off)
			return off, n
		}
		resize := func(size int64) {
			if err := child.Resize(size); err != nil {
				t.Fatal(err)
			}
			if size < int64(len(model)) {
				model = model[:size]
				clear(held[size/sector:])
			} else {
				for s := int64(len(model)) / sector; s < size/sector; s++ {
					held[s] = true // the child's own zeros
				}
				model = append(model, make([]byte, size-int64(len(model)))...)
			}
		}
		write := func(b []byte) {
			off, n := span(b, child.Size())
			p := bytes.Repeat([]byte{b[0] | 1}, int(n))
			if _, err := child.WriteAt(p, off); err != nil {
				t.Fatal(err)
			}
			copy(model[off:], p)
			for s := off / sector; s*sector < off+n; s++ {
				held[s] = true
			}
		}
		for i := 0; i < 3; i++ {
			if b := next(4); b != nil {
				write(b)
			}
		}
		resize(childSize)
		// Move to a parent of parentSize holding other bytes.
		p2, err := CreateFile(storage.NewMemFile(nil), filepath.Join(dir, "p2.vhdx"),
			CreateOptions{Size: uint64(parentSize), BlockSize: 1 << 20, LogicalSectorSize: uint32(sector)})
		if err != nil {
			t.Fatal(err)
		}
		p2data := bytes.Repeat([]byte{0xc3}, int(parentSize))
		if _, err := p2.WriteAt(p2data, 0); err != nil {
			t.Fatal(err)
		}
		if err := p2.Freeze(); err != nil {
			t.Fatal(err)
		}
		if err := child.SetParentLinkage2(p2.Info().DataWriteGUID); err != nil {
			t.Fatal(err)
		}
		if err := child.Close(); err != nil {
			t.Fatal(err)
		}
		if child, err = OpenFile(keepOpen{cf}, childPath, OpenOptions{ParentImage: p2}); err != nil {
			t.Fatal(err)
		}
		defer child.Close()
		for s := int64(0); s < childSize/sector; s++ {
			if !held[s] {
				lo := s * sector
				if lo < parentSize {
					copy(model[lo:lo+sector], p2data[lo:])
				} else {
					clear(model[lo : lo+sector])
				}
			}
		}
		check := func(what string) {
			if got := readAll(t, child); !bytes.Equal(got, model) {
				t.Fatalf("%s: differs at %d (parent %d, child %d bytes)", what, firstDiff(got, model), parentSize, child.Size())
			}
			checkExtents(t, child, model)
		}
		check("relinked")
		for b := next(5); b != nil; b = next(5) {
			switch b[0] % 4 {
			case 0:
				write(b[1:])
			case 1:
				off, n := span(b[1:], child.Size())
				got := make([]byte, n)
				if _, err := child.ReadAt(got, off); err != nil {
					t.Fatal(err)
				}
				if !bytes.Equal(got, model[off:off+n]) {
					t.Fatalf("read [%d, +%d) differs at %d", off, n, off+int64(firstDiff(got, model[off:off+n])))
				}
			case 2:
				off, n := span(b[1:], child.Size())
				if _, err := child.Extents(off, n); err != nil {
					t.Fatal(err)
				}
			case 3:
				resize((int64(binary.LittleEndian.Uint16(b[1:]))%(maxSize/sector) + 1) * sector)
			}
		}
		check("after the ops")
	})
}
