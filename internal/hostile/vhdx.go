package hostile

import (
	"bytes"
	"encoding/binary"
	"fmt"
	"os"
	"path/filepath"

	"github.com/vhdkit/vhdkit/storage"
	"github.com/vhdkit/vhdkit/vhdx"
)

// vhdxSeed makes a valid image with vhdx.Create in a scratch folder, writes
// data into it and returns its bytes after Close.
func vhdxSeed(opts vhdx.CreateOptions, writes map[int64]int) ([]byte, error) {
	dir, err := os.MkdirTemp("", "hostile-seed")
	if err != nil {
		return nil, err
	}
	defer os.RemoveAll(dir)
	path := filepath.Join(dir, "seed.vhdx")
	im, err := vhdx.Create(path, opts)
	if err != nil {
		return nil, err
	}
	if err := writePattern(im.WriteAt, writes); err != nil {
		im.Close()
		return nil, err
	}
	if err := im.Close(); err != nil {
		return nil, err
	}
	return os.ReadFile(path)
}

// writePattern writes, at each offset, n bytes of a pattern that is
// never zero.
func writePattern(writeAt func([]byte, int64) (int, error), writes map[int64]int) error {
	for off, n := range writes {
		p := bytes.Repeat([]byte{0xA5, byte(off >> 20), 0x5A, 0x01}, n/4)
		if _, err := writeAt(p, off); err != nil {
			return err
		}
	}
	return nil
}

// dynamicWrites are the seed's data: block 1 (64 KiB) and block 5 (4 KiB)
// of an 8 MiB disk of 1 MiB blocks, so the file holds two payload blocks.
var dynamicWrites = map[int64]int{1 << 20: 64 << 10, 5<<20 + 4096: 4096}

// vhdxSingleFile adds the truncations and mutations of single VHDX files:
// a dynamic and a fixed seed.
func vhdxSingleFile(c *corpus) error {
	dyn, err := vhdxSeed(vhdx.CreateOptions{Size: 8 << 20, BlockSize: 1 << 20}, dynamicWrites)
	if err != nil {
		return err
	}
	l, err := parseVHDX(dyn)
	if err != nil {
		return err
	}
	fixed, err := vhdxSeed(vhdx.CreateOptions{Type: vhdx.Fixed, Size: 4 << 20, BlockSize: 1 << 20, Sparse: true}, map[int64]int{0: 4096})
	if err != nil {
		return err
	}
	fl, err := parseVHDX(fixed)
	if err != nil {
		return err
	}

	// Truncations at each structure's start and end.
	bounds := []int64{8, vhdxHeader1, vhdxHeader1 + vhdxHeaderSize, vhdxHeader2, vhdxHeader2 + vhdxHeaderSize,
		vhdxRegion1, vhdxRegion1 + vhdxRegionSize, vhdxRegion2, vhdxRegion2 + vhdxRegionSize,
		l.logOff, l.logOff + vhdxLogSector, l.logOff + l.logLen, l.metaOff, l.metaOff + vhdxMetaTable,
		l.batOff, l.batOff + 8, l.batOff + l.batLen}
	for _, it := range l.items {
		bounds = append(bounds, it.off+it.len)
	}
	for off := range blockOffsets(dyn, l) {
		bounds = append(bounds, off, off+4096, off+l.blockSize)
	}
	for _, n := range truncations(int64(len(dyn)), bounds, c.opts.Dense) {
		if err := c.single("vhdx-truncate", fmt.Sprintf("dynamic-%d", n), fmt.Sprintf("dynamic image cut to %d bytes", n), "disk.vhdx", dyn[:n]); err != nil {
			return err
		}
	}
	for _, n := range truncations(int64(len(fixed)), []int64{fl.batOff + 8, fl.batOff + fl.batLen, fl.batOff + fl.batLen + fl.blockSize, int64(len(fixed)) - 4096}, false) {
		if err := c.single("vhdx-truncate", fmt.Sprintf("fixed-%d", n), fmt.Sprintf("fixed image cut to %d bytes", n), "disk.vhdx", fixed[:n]); err != nil {
			return err
		}
	}

	le := binary.LittleEndian
	fileLen := int64(len(dyn))
	type mutation struct {
		class, name, note string
		edits             []func([]byte)
	}
	ms := []mutation{
		{"vhdx-header", "ident-signature", "file identifier signature wrong", []func([]byte){func(b []byte) { copy(b[vhdxFileIdent:], "vhdxfilf") }}},
		{"vhdx-header", "version-2", "header version 2", []func([]byte){bothHeaders(func(h []byte) { le.PutUint16(h[hdrVersion:], 2) })}},
		{"vhdx-header", "log-version-1", "log version 1", []func([]byte){bothHeaders(func(h []byte) { le.PutUint16(h[hdrLogVersion:], 1) })}},
		{"vhdx-header", "log-length-0", "log length 0", []func([]byte){bothHeaders(func(h []byte) { le.PutUint32(h[hdrLogLength:], 0) })}},
		{"vhdx-header", "log-length-max", "log length 4 GiB - 1 MiB", []func([]byte){bothHeaders(func(h []byte) { le.PutUint32(h[hdrLogLength:], 0xFFF00000) })}},
		{"vhdx-header", "log-length-4k", "log length not a MiB multiple", []func([]byte){bothHeaders(func(h []byte) { le.PutUint32(h[hdrLogLength:], 4096) })}},
		{"vhdx-header", "log-offset-0", "log in the header area", []func([]byte){bothHeaders(func(h []byte) { le.PutUint64(h[hdrLogOffset:], 0) })}},
		{"vhdx-header", "log-offset-eof", "log starting at the end of the file", []func([]byte){bothHeaders(func(h []byte) { le.PutUint64(h[hdrLogOffset:], uint64(fileLen)) })}},
		{"vhdx-header", "log-offset-huge", "log at 2^62", []func([]byte){bothHeaders(func(h []byte) { le.PutUint64(h[hdrLogOffset:], 1<<62) })}},
		{"vhdx-header", "log-over-metadata", "log overlapping the metadata region", []func([]byte){bothHeaders(func(h []byte) { le.PutUint64(h[hdrLogOffset:], uint64(l.metaOff)) })}},
		{"vhdx-header", "log-over-bat", "log overlapping the BAT, with a LogGuid", []func([]byte){bothHeaders(func(h []byte) {
			le.PutUint64(h[hdrLogOffset:], uint64(l.batOff))
			copy(h[hdrLogGUID:], "hostile-log-guid")
		})}},
		{"vhdx-header", "log-guid-no-entry", "a LogGuid no log entry carries", []func([]byte){bothHeaders(func(h []byte) { copy(h[hdrLogGUID:], "hostile-log-guid") })}},
		{"vhdx-header", "seq-max-one", "header 1 with the highest sequence number and a LogGuid, header 2 valid", []func([]byte){func(b []byte) {
			h := b[vhdxHeader1 : vhdxHeader1+vhdxHeaderSize]
			le.PutUint64(h[hdrSeq:], ^uint64(0))
			copy(h[hdrLogGUID:], "hostile-log-guid")
			sealCRC32C(h)
		}}},
		{"vhdx-header", "both-signatures", "neither header has its signature", []func([]byte){bothHeaders(func(h []byte) { copy(h, "HEAD") })}},

		{"vhdx-region", "count-max", "region entry count 2^32-1", []func([]byte){bothRegionTables(func(rt []byte) { le.PutUint32(rt[rtCount:], ^uint32(0)) })}},
		{"vhdx-region", "count-2048", "region entry count 2048", []func([]byte){bothRegionTables(func(rt []byte) { le.PutUint32(rt[rtCount:], 2048) })}},
		{"vhdx-region", "count-2047", "2047 region entries, all but two zero", []func([]byte){bothRegionTables(func(rt []byte) { le.PutUint32(rt[rtCount:], 2047) })}},
		{"vhdx-region", "count-0", "no region", []func([]byte){bothRegionTables(func(rt []byte) { le.PutUint32(rt[rtCount:], 0) })}},
		{"vhdx-region", "bat-offset-0", "BAT in the header area", []func([]byte){bothRegionTables(func(rt []byte) { le.PutUint64(regionEntry(rt, regionBAT)[16:], 0) })}},
		{"vhdx-region", "bat-offset-huge", "BAT at 2^62", []func([]byte){bothRegionTables(func(rt []byte) { le.PutUint64(regionEntry(rt, regionBAT)[16:], 1<<62) })}},
		{"vhdx-region", "bat-offset-eof", "BAT at the end of the file", []func([]byte){bothRegionTables(func(rt []byte) { le.PutUint64(regionEntry(rt, regionBAT)[16:], uint64(fileLen)) })}},
		{"vhdx-region", "bat-length-max", "BAT length 4 GiB - 1 MiB", []func([]byte){bothRegionTables(func(rt []byte) { le.PutUint32(regionEntry(rt, regionBAT)[24:], 0xFFF00000) })}},
		{"vhdx-region", "bat-length-0", "BAT length 0", []func([]byte){bothRegionTables(func(rt []byte) { le.PutUint32(regionEntry(rt, regionBAT)[24:], 0) })}},
		{"vhdx-region", "bat-over-metadata", "BAT region on the metadata region", []func([]byte){bothRegionTables(func(rt []byte) { le.PutUint64(regionEntry(rt, regionBAT)[16:], uint64(l.metaOff)) })}},
		{"vhdx-region", "metadata-over-log", "metadata region on the log", []func([]byte){bothRegionTables(func(rt []byte) { le.PutUint64(regionEntry(rt, regionMetadata)[16:], uint64(l.logOff)) })}},
		{"vhdx-region", "metadata-length-max", "metadata length 4 GiB - 1 MiB", []func([]byte){bothRegionTables(func(rt []byte) { le.PutUint32(regionEntry(rt, regionMetadata)[24:], 0xFFF00000) })}},
		{"vhdx-region", "bat-twice", "the BAT listed twice", []func([]byte){bothRegionTables(func(rt []byte) {
			copy(rt[rtEntries+2*rtEntrySize:], regionEntry(rt, regionBAT))
			le.PutUint32(rt[rtCount:], 3)
		})}},
		{"vhdx-region", "unknown-required", "an unknown required region", []func([]byte){bothRegionTables(func(rt []byte) {
			e := rt[rtEntries+2*rtEntrySize:]
			copy(e, "hostile-region!!")
			le.PutUint64(e[16:], uint64(fileLen-(1<<20)))
			le.PutUint32(e[24:], 1<<20)
			le.PutUint32(e[28:], 1)
			le.PutUint32(rt[rtCount:], 3)
		})}},
		{"vhdx-region", "unknown-over-blocks", "an unknown optional region over the payload blocks", []func([]byte){bothRegionTables(func(rt []byte) {
			e := rt[rtEntries+2*rtEntrySize:]
			copy(e, "hostile-region!!")
			le.PutUint64(e[16:], uint64(l.batOff+l.batLen))
			le.PutUint32(e[24:], uint32(fileLen-l.batOff-l.batLen))
			le.PutUint32(rt[rtCount:], 3)
		})}},
		{"vhdx-region", "table1-signature", "region table 1 without its signature, table 2 valid", []func([]byte){func(b []byte) { copy(b[vhdxRegion1:], "REGI") }}},
	}

	item := func(id vhdx.GUID) metaItem { return l.items[id] }
	put32 := func(id vhdx.GUID, v uint32) func([]byte) { return func(b []byte) { le.PutUint32(b[item(id).off:], v) } }
	put64 := func(id vhdx.GUID, v uint64) func([]byte) { return func(b []byte) { le.PutUint64(b[item(id).off:], v) } }
	mtEdit := func(edit func(mt []byte)) func([]byte) {
		return func(b []byte) { edit(b[l.metaOff : l.metaOff+vhdxMetaTable]) }
	}
	entryOf := func(id vhdx.GUID) func([]byte) []byte {
		return func(b []byte) []byte { e := item(id).entry; return b[e : e+mtEntrySize] }
	}
	ms = append(ms, []mutation{
		{"vhdx-metadata", "signature", "metadata table signature wrong", []func([]byte){mtEdit(func(mt []byte) { copy(mt, "METADATA") })}},
		{"vhdx-metadata", "count-max", "metadata entry count 65535", []func([]byte){mtEdit(func(mt []byte) { le.PutUint16(mt[mtCount:], 0xFFFF) })}},
		{"vhdx-metadata", "count-2047", "2047 metadata entries, the rest zero", []func([]byte){mtEdit(func(mt []byte) { le.PutUint16(mt[mtCount:], 2047) })}},
		{"vhdx-metadata", "count-0", "no metadata item", []func([]byte){mtEdit(func(mt []byte) { le.PutUint16(mt[mtCount:], 0) })}},
		{"vhdx-metadata", "item-offset-max", "an item at offset 2^32-1", []func([]byte){func(b []byte) { le.PutUint32(entryOf(itemVirtualDiskSize)(b)[16:], ^uint32(0)) }}},
		{"vhdx-metadata", "item-length-max", "an item of 2^32-1 bytes", []func([]byte){func(b []byte) { le.PutUint32(entryOf(itemVirtualDiskSize)(b)[20:], ^uint32(0)) }}},
		{"vhdx-metadata", "item-in-table", "an item inside the metadata table", []func([]byte){func(b []byte) { le.PutUint32(entryOf(itemVirtualDiskSize)(b)[16:], 32) }}},
		{"vhdx-metadata", "item-twice", "the virtual size listed twice", []func([]byte){func(b []byte) {
			mt := b[l.metaOff:]
			n := le.Uint16(mt[mtCount:])
			copy(mt[mtEntries+mtEntrySize*int(n):], entryOf(itemVirtualDiskSize)(b))
			le.PutUint16(mt[mtCount:], n+1)
		}}},
		{"vhdx-metadata", "unknown-required", "an unknown required item", []func([]byte){func(b []byte) {
			mt := b[l.metaOff:]
			n := le.Uint16(mt[mtCount:])
			e := mt[mtEntries+mtEntrySize*int(n):]
			copy(e, entryOf(itemVirtualDiskSize)(b))
			copy(e, "hostile-item!!!!")
			le.PutUint16(mt[mtCount:], n+1)
		}}},
		{"vhdx-metadata", "no-block-size", "the file parameters item missing", []func([]byte){func(b []byte) { copy(entryOf(itemFileParameters)(b), "hostile-item!!!!") }}},
		{"vhdx-metadata", "block-size-0", "block size 0", []func([]byte){put32(itemFileParameters, 0)}},
		{"vhdx-metadata", "block-size-3m", "block size 3 MiB", []func([]byte){put32(itemFileParameters, 3<<20)}},
		{"vhdx-metadata", "block-size-512m", "block size 512 MiB", []func([]byte){put32(itemFileParameters, 512<<20)}},
		{"vhdx-metadata", "block-size-2g", "block size 2 GiB", []func([]byte){put32(itemFileParameters, 1<<31)}},
		{"vhdx-metadata", "block-size-256m", "block size 256 MiB: 1 BAT entry for 8 MiB, blocks placed for 1 MiB", []func([]byte){put32(itemFileParameters, 256<<20)}},
		{"vhdx-metadata", "has-parent-no-locator", "HasParent without a parent locator", []func([]byte){func(b []byte) { le.PutUint32(b[item(itemFileParameters).off+4:], 2) }}},
		{"vhdx-metadata", "size-0", "virtual size 0", []func([]byte){put64(itemVirtualDiskSize, 0)}},
		{"vhdx-metadata", "size-513", "virtual size 513", []func([]byte){put64(itemVirtualDiskSize, 513)}},
		{"vhdx-metadata", "size-64t", "virtual size 64 TiB, the BAT region 1 MiB", []func([]byte){put64(itemVirtualDiskSize, vhdx.MaxVirtualSize)}},
		{"vhdx-metadata", "size-64t-plus", "virtual size 64 TiB + 512", []func([]byte){put64(itemVirtualDiskSize, vhdx.MaxVirtualSize+512)}},
		{"vhdx-metadata", "size-2-63", "virtual size 2^63", []func([]byte){put64(itemVirtualDiskSize, 1<<63)}},
		{"vhdx-metadata", "size-max", "virtual size 2^64 - 512", []func([]byte){put64(itemVirtualDiskSize, ^uint64(511))}},
		{"vhdx-metadata", "size-bat-edge", "virtual size one block more than the BAT region holds", []func([]byte){put64(itemVirtualDiskSize, uint64(sizePastBAT(l)))}},
		{"vhdx-metadata", "logical-sector-1024", "logical sector size 1024", []func([]byte){put32(itemLogicalSectorSize, 1024)}},
		{"vhdx-metadata", "logical-sector-0", "logical sector size 0", []func([]byte){put32(itemLogicalSectorSize, 0)}},
		{"vhdx-metadata", "logical-sector-4096", "logical sector size 4096 under a 512-byte-sector BAT", []func([]byte){put32(itemLogicalSectorSize, 4096)}},
		{"vhdx-metadata", "physical-sector-max", "physical sector size 2^32-1", []func([]byte){put32(itemPhysicalSectorSize, ^uint32(0))}},
	}...)

	bat := func(i int64, v uint64) func([]byte) { return func(b []byte) { le.PutUint64(b[l.batOff+8*i:], v) } }
	entry := func(state uint64, off int64) uint64 { return uint64(off>>20)<<20 | state }
	const fullyPresent, partiallyPresent = 6, 7
	ms = append(ms, []mutation{
		{"vhdx-bat", "beyond-eof", "block 0 at 1 TiB, past the end of the file", []func([]byte){bat(0, entry(fullyPresent, 1<<40))}},
		{"vhdx-bat", "offset-max", "block 0 at the largest offset a BAT entry holds", []func([]byte){bat(0, ^uint64(0)&^0xFFFFF|fullyPresent)}},
		{"vhdx-bat", "in-headers", "block 0 at offset 0", []func([]byte){bat(0, entry(fullyPresent, 0))}},
		{"vhdx-bat", "on-log", "block 0 on the log", []func([]byte){bat(0, entry(fullyPresent, l.logOff))}},
		{"vhdx-bat", "on-metadata", "block 0 on the metadata region", []func([]byte){bat(0, entry(fullyPresent, l.metaOff))}},
		{"vhdx-bat", "on-bat", "block 0 on the BAT", []func([]byte){bat(0, entry(fullyPresent, l.batOff))}},
		{"vhdx-bat", "same-block", "blocks 0 and 1 at the same offset", []func([]byte){func(b []byte) { copy(b[l.batOff:], b[l.batOff+8:l.batOff+16]) }}},
		{"vhdx-bat", "all-same-block", "every block at the same offset", []func([]byte){func(b []byte) {
			for i := range int64(8) {
				copy(b[l.batOff+8*i:], b[l.batOff+8:l.batOff+16])
			}
		}}},
		{"vhdx-bat", "overlap-half", "block 0 over the second half of block 1", []func([]byte){func(b []byte) {
			e1 := le.Uint64(b[l.batOff+8:])
			le.PutUint64(b[l.batOff:], e1+uint64(l.blockSize/2))
		}}},
		{"vhdx-bat", "state-4", "payload state 4", []func([]byte){bat(0, 4)}},
		{"vhdx-bat", "state-5", "payload state 5", []func([]byte){bat(2, entry(5, l.batOff+l.batLen))}},
		{"vhdx-bat", "partial-no-parent", "PARTIALLY_PRESENT without a parent", []func([]byte){func(b []byte) { b[l.batOff+8] = b[l.batOff+8]&^7 | partiallyPresent }}},
		{"vhdx-bat", "reserved-bits", "reserved bits set in every entry", []func([]byte){func(b []byte) {
			for i := range int64(8) {
				le.PutUint64(b[l.batOff+8*i:], le.Uint64(b[l.batOff+8*i:])|0xFFFF8)
			}
		}}},
		{"vhdx-bat", "all-ones", "the whole BAT region 0xFF", []func([]byte){func(b []byte) {
			for i := l.batOff; i < l.batOff+l.batLen; i++ {
				b[i] = 0xFF
			}
		}}},
	}...)

	fixedBAT := func(edit func(b []byte)) []func([]byte) { return []func([]byte){edit} }
	for _, m := range ms {
		if err := c.single(m.class, m.name, m.note, "disk.vhdx", patched(dyn, m.edits...)); err != nil {
			return err
		}
	}
	// The fixed seed: a block moved past the end, and blocks stacked.
	for _, m := range []mutation{
		{"vhdx-bat", "fixed-beyond-eof", "a fixed image's last block at 1 TiB", fixedBAT(func(b []byte) { le.PutUint64(b[fl.batOff+8*3:], entry(fullyPresent, 1<<40)) })},
		{"vhdx-bat", "fixed-stacked", "a fixed image's blocks all at one offset", fixedBAT(func(b []byte) {
			for i := range int64(4) {
				copy(b[fl.batOff+8*i:], b[fl.batOff:fl.batOff+8])
			}
		})},
	} {
		if err := c.single(m.class, m.name, m.note, "disk.vhdx", patched(fixed, m.edits...)); err != nil {
			return err
		}
	}

	// The BAT grown to fit a virtual size of 64 TiB (a 513 MiB region in a
	// sparse file): refused or read for its size alone, in bounded memory.
	// Written piece by piece, so that the generator stays small (a test
	// that measures the max RSS of the processes it starts counts its own
	// resident memory at their start).
	{
		const size = vhdx.MaxVirtualSize
		chunk := int64(1<<23) * 512 / l.blockSize
		blocks := size / l.blockSize
		entries := blocks + (blocks-1)/chunk
		batLen := (entries*8 + 1<<20 - 1) &^ (1<<20 - 1)
		head := patched(dyn[:l.batOff+l.batLen],
			bothRegionTables(func(rt []byte) { le.PutUint32(regionEntry(rt, regionBAT)[24:], uint32(batLen)) }),
			put64(itemVirtualDiskSize, size))
		pieces := map[int64][]byte{0: head}
		// The payload blocks move behind the grown BAT.
		for i := int64(0); i < 8; i++ {
			e := le.Uint64(head[l.batOff+8*i:])
			if e&7 == fullyPresent {
				old := int64(e>>20) << 20
				newOff := l.batOff + batLen + (old - l.batOff - l.batLen)
				pieces[newOff] = dyn[old : old+l.blockSize]
				le.PutUint64(head[l.batOff+8*i:], entry(fullyPresent, newOff))
			}
		}
		rel, err := c.dir("vhdx-metadata", "size-64t-bat-fits")
		if err != nil {
			return err
		}
		if err := writePieces(c.abs(filepath.Join(rel, "disk.vhdx")), l.batOff+batLen+2*l.blockSize, pieces); err != nil {
			return err
		}
		c.cases = append(c.cases, Case{Class: "vhdx-metadata", Name: "size-64t-bat-fits",
			Note: "virtual size 64 TiB with its 513 MiB BAT", Image: filepath.Join(rel, "disk.vhdx")})
	}
	return nil
}

// blockOffsets returns the file offsets of the seed's payload blocks.
func blockOffsets(b []byte, l vhdxLayout) map[int64]bool {
	out := map[int64]bool{}
	for i := int64(0); i < l.batLen/8 && l.batOff+8*i+8 <= int64(len(b)); i++ {
		e := binary.LittleEndian.Uint64(b[l.batOff+8*i:])
		if st := e & 7; st == 6 || st == 7 {
			out[int64(e>>20)<<20] = true
		}
	}
	return out
}

// vhdxPendingSeed returns an image whose log is pending: written and
// flushed, copied before Close (the header names a LogGuid, the log's
// last entry holds the flushed BAT pages).
func vhdxPendingSeed() ([]byte, error) {
	mf := storage.NewMemFile(nil)
	im, err := vhdx.CreateFile(mf, filepath.Join(os.TempDir(), "hostile-pending.vhdx"), vhdx.CreateOptions{Size: 8 << 20, BlockSize: 1 << 20})
	if err != nil {
		return nil, err
	}
	defer im.Close()
	if err := writePattern(im.WriteAt, dynamicWrites); err != nil {
		return nil, err
	}
	if err := im.Flush(); err != nil {
		return nil, err
	}
	return mf.Bytes(), nil
}

// sizePastBAT is the smallest virtual size whose BAT needs one entry more
// than the seed's BAT region holds.
func sizePastBAT(l vhdxLayout) int64 {
	chunk := int64(1<<23) * 512 / l.blockSize
	for blocks := l.batLen / 8 * chunk / (chunk + 1); ; blocks++ {
		if blocks+(blocks-1)/chunk > l.batLen/8 {
			return blocks * l.blockSize
		}
	}
}
