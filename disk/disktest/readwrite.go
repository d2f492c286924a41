package disktest

import (
	"fmt"

	"github.com/vhdkit/vhdkit/disk"
)

func testFresh(fx *fixture) {
	fx.checkAll("fresh image")
}

// valid reports whether [off, off+n) is a non-empty range of the image; the
// fixed cases below skip those that do not fit a small image.
func (fx *fixture) valid(off, n int64) bool {
	return n > 0 && off >= 0 && off <= fx.size-n
}

func testAligned(fx *fixture) {
	S, size := fx.sector, fx.size
	cases := [][2]int64{
		{0, S}, {S, S}, {3 * S, 5 * S}, {8 * S, 8 * S}, {4096, 4096}, {64 << 10, 64 << 10},
		{1<<20 - S, 2 * S}, {1 << 20, 1 << 20}, {2<<20 - 4*S, 2<<20 + 8*S},
		{size/S*S - S, S}, {size / 2 / S * S, size / 4 / S * S},
	}
	for _, c := range cases {
		off, n := c[0], c[1]
		if !fx.valid(off, n) || off%S != 0 || n%S != 0 {
			continue
		}
		what := fmt.Sprintf("aligned write [%d, +%d)", off, n)
		fx.write(off, n, what)
		fx.checkAround(off, n, what)
	}
	for i := range 16 {
		n := S * (1 + fx.rng.Int64N(64))
		if n > size {
			continue
		}
		off := fx.rng.Int64N((size-n)/S+1) * S
		fx.check(off, n, fmt.Sprintf("aligned read %d", i))
	}
	fx.checkAll("after aligned writes")
}

func testUnaligned(fx *fixture) {
	S, size := fx.sector, fx.size
	cases := [][2]int64{
		{1, 1}, {S - 1, 1}, {S - 1, 2}, {S + 1, S - 2}, {3, S}, {S / 2, 3 * S},
		{4095, 2}, {4097, 4094}, {4095, 4098}, {5000, 100001}, {64<<10 - 7, 13},
		{size - 1, 1}, {size - 5, 5}, {size - S - 3, S + 2},
	}
	// Power-of-two boundaries are where block and table-page maths go
	// wrong: cross each one the image has.
	for k := 9; k <= 25; k++ {
		b := int64(1) << k
		cases = append(cases, [2]int64{b - 1, 2}, [2]int64{b - 3*S/2 - 1, 3*S + 3})
	}
	// Longer than two blocks of any common block size up to 2 MiB, and
	// nearly the whole image.
	cases = append(cases, [2]int64{S + 3, min(5<<20+777, size-2*S-6)}, [2]int64{1, size - 2})
	for _, c := range cases {
		off, n := c[0], c[1]
		if !fx.valid(off, n) {
			continue
		}
		what := fmt.Sprintf("unaligned write [%d, +%d)", off, n)
		fx.write(off, n, what)
		fx.checkAround(off, n, what)
	}
	for i := range 32 {
		off, n := fx.randRange()
		fx.check(off, n, fmt.Sprintf("unaligned read %d", i))
	}
	fx.checkAll("after unaligned writes")
}

// randRange picks a range of the image: mostly short, sometimes over
// several blocks; anywhere, across a power-of-two boundary, or aligned.
func (fx *fixture) randRange() (off, n int64) {
	S, size, rng := fx.sector, fx.size, fx.rng
	switch r := rng.IntN(100); {
	case r < 60:
		n = 1 + rng.Int64N(2*S)
	case r < 95:
		n = 1 + rng.Int64N(64<<10)
	default:
		n = 1 + rng.Int64N(3<<20)
	}
	n = min(n, size)
	switch rng.IntN(10) {
	case 0, 1, 2, 3:
		off = rng.Int64N(size - n + 1)
	case 4, 5, 6:
		b := int64(1) << (9 + rng.IntN(17))
		off = b - 1 - rng.Int64N(n)
	default:
		off = rng.Int64N((size-n)/S+1) * S
		if rng.IntN(2) == 0 {
			n = (n + S - 1) / S * S
		}
	}
	n = min(n, size)
	off = min(max(off, 0), size-n)
	return off, n
}

func testRandom(fx *fixture) {
	tr, _ := fx.img.(disk.Trimmer)
	z, _ := fx.img.(disk.Zeroer)
	const ops = 300
	for i := range ops {
		off, n := fx.randRange()
		switch r := fx.rng.IntN(100); {
		case r < 55:
			fx.write(off, n, fmt.Sprintf("random op %d: write [%d, +%d)", i, off, n))
			fx.check(off, n, fmt.Sprintf("random op %d: read back [%d, +%d)", i, off, n))
		case r < 85:
			fx.check(off, n, fmt.Sprintf("random op %d: read [%d, +%d)", i, off, n))
		case r < 90 && tr != nil:
			fx.trim(tr, off, n, fmt.Sprintf("random op %d: trim [%d, +%d)", i, off, n))
		case r < 95 && z != nil:
			unmap := fx.rng.IntN(2) == 0
			fx.zero(z, off, n, unmap, fmt.Sprintf("random op %d: write zeroes [%d, +%d) unmap %v", i, off, n, unmap))
		default:
			fx.flush(fmt.Sprintf("random op %d", i))
		}
	}
	fx.checkAll(fmt.Sprintf("after %d random ops", ops))
	if ext, ok := fx.img.(disk.Extenter); ok {
		fx.extents(ext, 0, fx.size, fmt.Sprintf("after %d random ops", ops))
	}
}
