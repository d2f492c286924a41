package disktest

import (
	"fmt"
	"sort"

	"github.com/vhdkit/vhdkit/disk"
)

// extents gets the allocation map of [off, off+n) and checks it against
// the contract and the model: the extents tile the range in order, are
// merged, are aligned to sectors inside it, Zero and Hole ranges read as
// zeros (so any non-zero byte is in Data), and written non-zero sectors
// are held by the image itself (depth 0).
func (fx *fixture) extents(ext disk.Extenter, off, n int64, what string) []disk.Extent {
	fx.t.Helper()
	list, err := ext.Extents(off, n)
	if err != nil {
		fx.t.Fatalf("%s: Extents(%d, %d): %v", what, off, n, err)
	}
	fail := func(i int, format string, args ...any) {
		fx.t.Helper()
		fx.t.Fatalf("%s: Extents(%d, %d): extent %d %+v: %s\nall: %+v",
			what, off, n, i, list[i], fmt.Sprintf(format, args...), list)
	}
	pos, end := off, off+n
	for i, e := range list {
		switch {
		case e.Offset != pos:
			fail(i, "starts at %d, want %d (a gap or an overlap)", e.Offset, pos)
		case e.Length <= 0 || e.Length > end-pos:
			fail(i, "length outside (0, %d]", end-pos)
		case e.Type > disk.Hole:
			fail(i, "unknown type")
		case e.Depth < 0 || e.Type == disk.Hole && e.Depth < 1 && !fx.h.HoleDepthUnknown:
			fail(i, "bad depth (a hole's depth is the number of layers)")
		case i > 0 && list[i-1].Type == e.Type && list[i-1].Depth == e.Depth:
			fail(i, "not merged with the previous extent of the same type and depth")
		case i > 0 && pos%fx.sector != 0:
			fail(i, "boundary not a multiple of the %d-byte sector", fx.sector)
		}
		if e.Type != disk.Data {
			if j := firstNonZero(fx.model[e.Offset : e.Offset+e.Length]); j >= 0 {
				fail(i, "reports %v but byte %d is %#02x", e.Type, e.Offset+int64(j), fx.model[e.Offset+int64(j)])
			}
		} else if e.Depth != 0 {
			for s := e.Offset / fx.sector; s*fx.sector < e.Offset+e.Length; s++ {
				lo := s * fx.sector
				if fx.touched[s] && firstNonZero(fx.model[lo:min(lo+fx.sector, fx.size)]) >= 0 {
					fail(i, "sector %d was written, so the image itself holds it", s)
				}
			}
		}
		pos += e.Length
	}
	if pos != end {
		fx.t.Fatalf("%s: Extents(%d, %d) ends at %d, want %d\nall: %+v", what, off, n, pos, end, list)
	}
	return list
}

func firstNonZero(p []byte) int {
	if disk.IsZero(p) {
		return -1
	}
	for i, b := range p {
		if b != 0 {
			return i
		}
	}
	return -1
}

// agree checks that a partial map says the same as the full one.
func (fx *fixture) agree(full, part []disk.Extent, what string) {
	fx.t.Helper()
	for _, e := range part {
		i := sort.Search(len(full), func(i int) bool { return full[i].Offset+full[i].Length > e.Offset })
		for ; i < len(full) && full[i].Offset < e.Offset+e.Length; i++ {
			if full[i].Type != e.Type || full[i].Depth != e.Depth {
				fx.t.Fatalf("%s: extent %+v disagrees with %+v from the whole image's map", what, e, full[i])
			}
		}
	}
}

func testExtents(fx *fixture) {
	ext, ok := fx.img.(disk.Extenter)
	if !ok {
		fx.t.Skip("image does not implement disk.Extenter")
	}
	S, size := fx.sector, fx.size
	fx.extents(ext, 0, size, "fresh image")
	// A varied map: data with unaligned edges, written zeros, trimmed and
	// zeroed ranges, the end of the image.
	for _, c := range [][2]int64{{0, S}, {3*S + 5, 2 * S}, {1<<20 - 1, 2}, {2 << 20, 1 << 20}, {size - S - 3, S + 3}} {
		if fx.valid(c[0], c[1]) {
			fx.write(c[0], c[1], fmt.Sprintf("write [%d, +%d)", c[0], c[1]))
		}
	}
	if fx.valid(4<<20, 64<<10) {
		fx.writeBuf(4<<20, make([]byte, 64<<10), "write zeros")
	}
	if tr, ok := fx.img.(disk.Trimmer); ok && fx.valid(2<<20+4096, 64<<10) {
		fx.trim(tr, 2<<20+4096, 64<<10, "trim inside data")
	}
	if z, ok := fx.img.(disk.Zeroer); ok && fx.valid(2<<20+256<<10, 2*8192) {
		fx.zero(z, 2<<20+256<<10, 8192, false, "zero inside data")
		fx.zero(z, 2<<20+256<<10+8192, 8192, true, "zero inside data, unmap")
	}
	fx.checkAll("after writes")
	full := fx.extents(ext, 0, size, "after writes")
	cases := [][2]int64{{0, 1}, {size - 1, 1}, {S - 1, 2}, {1<<20 - 1, 2}, {1, size - 2}}
	for range 40 {
		off, n := fx.randRange()
		cases = append(cases, [2]int64{off, n})
	}
	for _, c := range cases {
		if fx.valid(c[0], c[1]) {
			what := fmt.Sprintf("after writes, part [%d, +%d)", c[0], c[1])
			fx.agree(full, fx.extents(ext, c[0], c[1], what), what)
		}
	}
}
