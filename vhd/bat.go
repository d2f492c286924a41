package vhd

import (
	"encoding/binary"
	"fmt"
	"slices"

	"github.com/vhdkit/vhdkit/storage"
)

// bat is the block allocation table in memory: the entries that cover the
// virtual disk, kept in their on-disk encoding so that a changed sector can
// be written back as it is.
type bat struct {
	off int64  // file offset
	raw []byte // whole sectors from off (clipped to the data end)
	n   int64  // entries in use: the blocks covering the virtual size
}

func (t *bat) entry(i int64) uint32 { return binary.BigEndian.Uint32(t.raw[4*i:]) }

func (t *bat) set(i int64, v uint32) { binary.BigEndian.PutUint32(t.raw[4*i:], v) }

// sector returns BAT sector k as it must be written.
func (t *bat) sector(k int64) []byte {
	return t.raw[k*SectorSize : min((k+1)*SectorSize, int64(len(t.raw)))]
}

// readBAT reads the n entries at off. The header's Validate has checked
// that maxEntries ≥ n entries fit before limit, so the allocation is
// bounded by the file.
func readBAT(f storage.File, off, n, limit int64) (*bat, error) {
	size := min(alignUp(4*n, SectorSize), limit-off)
	t := &bat{off: off, raw: make([]byte, size), n: n}
	if err := readFull(f, t.raw, off); err != nil {
		return nil, err
	}
	return t, nil
}

// span is a byte range [off, end) of the file holding a structure.
type span struct {
	off, end int64
	what     string
}

// validateBlocks checks every allocated entry: its block (bitmap and data,
// blockSpan bytes) lies between the footer copy and limit, and overlaps no
// other block and none of the reserved structures (header, BAT, locator
// data). Overlaps would let a write to one block corrupt another.
func (t *bat) validateBlocks(blockSpan, limit int64, reserved []span) error {
	for i := range reserved {
		for j := range i {
			if a, b := reserved[i], reserved[j]; a.off < b.end && b.off < a.end {
				return formatErr(a.what, a.off, "[%#x, %#x) overlaps the %s at [%#x, %#x)", a.off, a.end, b.what, b.off, b.end)
			}
		}
	}
	var used []uint32
	for i := range t.n {
		e := t.entry(i)
		if e == batUnused {
			continue
		}
		off := int64(e) * SectorSize
		if off < footerSize || off > limit-blockSpan {
			return formatErr("BAT", t.off+4*i, "block %d at %#x..%#x lies outside the %d data bytes of the file (truncated?)",
				i, off, off+blockSpan, limit)
		}
		used = append(used, uint32(i))
	}
	slices.SortFunc(used, func(a, b uint32) int {
		ea, eb := t.entry(int64(a)), t.entry(int64(b))
		switch {
		case ea < eb:
			return -1
		case ea > eb:
			return 1
		}
		return 0
	})
	for k := 1; k < len(used); k++ {
		prev, cur := int64(t.entry(int64(used[k-1]))), int64(t.entry(int64(used[k])))
		if cur*SectorSize < prev*SectorSize+blockSpan {
			return formatErr("BAT", t.off+4*int64(used[k]), "block %d at %#x overlaps block %d at %#x",
				used[k], cur*SectorSize, used[k-1], prev*SectorSize)
		}
	}
	for _, r := range reserved {
		// The first block ending after r starts must start at or after
		// r's end.
		k, _ := slices.BinarySearchFunc(used, r.off, func(i uint32, off int64) int {
			if int64(t.entry(int64(i)))*SectorSize+blockSpan <= off {
				return -1
			}
			return 1
		})
		if k < len(used) {
			if off := int64(t.entry(int64(used[k]))) * SectorSize; off < r.end {
				return formatErr("BAT", t.off+4*int64(used[k]), "block %d at %#x overlaps the %s at [%#x, %#x)",
					used[k], off, r.what, r.off, r.end)
			}
		}
	}
	return nil
}

// allocated counts the allocated entries.
func (t *bat) allocated() int64 {
	var c int64
	for i := range t.n {
		if t.entry(i) != batUnused {
			c++
		}
	}
	return c
}

// dataEnd is the end of the last allocated block, or 0.
func (t *bat) dataEnd(blockSpan int64) int64 {
	var end int64
	for i := range t.n {
		if e := t.entry(i); e != batUnused {
			end = max(end, int64(e)*SectorSize+blockSpan)
		}
	}
	return end
}

func (s span) String() string { return fmt.Sprintf("%s [%#x, %#x)", s.what, s.off, s.end) }
