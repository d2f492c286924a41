package disktest

import (
	"errors"
	"fmt"
	"math"

	"github.com/vhdkit/vhdkit/disk"
)

// noPanic runs f, turning a panic into a test failure that names what.
func (fx *fixture) noPanic(what string, f func()) {
	fx.t.Helper()
	defer func() {
		if r := recover(); r != nil {
			fx.t.Fatalf("%s panicked: %v", what, r)
		}
	}()
	f()
}

func (fx *fixture) wantOutOfRange(what string, err error) {
	fx.t.Helper()
	if !errors.Is(err, disk.ErrOutOfRange) {
		fx.t.Errorf("%s = %v, want an error wrapping disk.ErrOutOfRange", what, err)
	}
}

func testBounds(fx *fixture) {
	S, size := fx.sector, fx.size
	// Data at both ends, so that a stray write shows.
	edge := min(4*S, size)
	fx.write(0, edge, "fill the start")
	fx.write(size-edge, edge, "fill the end")

	// The last bytes are in range.
	fx.check(size-1, 1, "read the last byte")
	fx.check(size-edge, edge, "read up to the end")
	fx.write(size-1, 1, "write the last byte")

	tr, _ := fx.img.(disk.Trimmer)
	z, _ := fx.img.(disk.Zeroer)
	ext, _ := fx.img.(disk.Extenter)
	bad := [][2]int64{
		{size, 1}, {size - 1, 2}, {size - S, 2 * S}, {size + 1, 0}, {size + S, S},
		{-1, 1}, {-1, 0}, {-S, 2 * S}, {math.MinInt64, 1},
		{math.MaxInt64, 1}, {math.MaxInt64 - 1, 3}, {1 << 62, S}, {0, size + 1},
	}
	for _, c := range bad {
		off, n := c[0], c[1]
		if n > 64<<20 {
			continue // the buffer would be too large; covered below
		}
		p := fx.fill(n)
		fx.noPanic(fmt.Sprintf("ReadAt(%d bytes at %d)", n, off), func() {
			got, err := fx.img.ReadAt(p, off)
			fx.wantOutOfRange(fmt.Sprintf("ReadAt(%d bytes at %d)", n, off), err)
			if got < 0 || got > len(p) {
				fx.t.Errorf("ReadAt(%d bytes at %d) returned n = %d", n, off, got)
			}
		})
		fx.noPanic(fmt.Sprintf("WriteAt(%d bytes at %d)", n, off), func() {
			got, err := fx.img.WriteAt(p, off)
			fx.wantOutOfRange(fmt.Sprintf("WriteAt(%d bytes at %d)", n, off), err)
			if got != 0 {
				fx.t.Errorf("WriteAt(%d bytes at %d) returned n = %d, want 0: it must write nothing", n, off, got)
			}
		})
	}
	// Trim, WriteZeroes and Extents take lengths, so test huge and
	// negative ones too.
	bad = append(bad, [2]int64{0, -1}, [2]int64{S, -S}, [2]int64{S, math.MaxInt64}, [2]int64{0, math.MinInt64})
	for _, c := range bad {
		off, n := c[0], c[1]
		if tr != nil {
			fx.noPanic(fmt.Sprintf("Trim(%d, %d)", off, n), func() {
				fx.wantOutOfRange(fmt.Sprintf("Trim(%d, %d)", off, n), tr.Trim(off, n))
			})
		}
		if z != nil {
			for _, unmap := range []bool{false, true} {
				what := fmt.Sprintf("WriteZeroes(%d, %d, %v)", off, n, unmap)
				fx.noPanic(what, func() { fx.wantOutOfRange(what, z.WriteZeroes(off, n, unmap)) })
			}
		}
		if ext != nil {
			what := fmt.Sprintf("Extents(%d, %d)", off, n)
			fx.noPanic(what, func() {
				list, err := ext.Extents(off, n)
				fx.wantOutOfRange(what, err)
				if len(list) != 0 {
					fx.t.Errorf("%s returned %d extents with its error", what, len(list))
				}
			})
		}
	}
	if fx.t.Failed() {
		return
	}
	fx.checkAll("after out-of-range operations")
}

func testZeroLength(fx *fixture) {
	S, size := fx.sector, fx.size
	tr, _ := fx.img.(disk.Trimmer)
	z, _ := fx.img.(disk.Zeroer)
	ext, _ := fx.img.(disk.Extenter)
	for _, off := range []int64{0, 1, S, size/2 + 1, size - 1, size} {
		if off < 0 || off > size {
			continue
		}
		for _, p := range [][]byte{nil, {}} {
			if n, err := fx.img.ReadAt(p, off); n != 0 || err != nil {
				fx.t.Errorf("ReadAt(0 bytes at %d) = %d, %v; want 0, nil", off, n, err)
			}
			if n, err := fx.img.WriteAt(p, off); n != 0 || err != nil {
				fx.t.Errorf("WriteAt(0 bytes at %d) = %d, %v; want 0, nil", off, n, err)
			}
		}
		if tr != nil {
			if err := tr.Trim(off, 0); err != nil {
				fx.t.Errorf("Trim(%d, 0) = %v", off, err)
			}
		}
		if z != nil {
			for _, unmap := range []bool{false, true} {
				if err := z.WriteZeroes(off, 0, unmap); err != nil {
					fx.t.Errorf("WriteZeroes(%d, 0, %v) = %v", off, unmap, err)
				}
			}
		}
		if ext != nil {
			if list, err := ext.Extents(off, 0); len(list) != 0 || err != nil {
				fx.t.Errorf("Extents(%d, 0) = %v, %v; want none, nil", off, list, err)
			}
		}
	}
	if fx.t.Failed() {
		return
	}
	fx.checkAll("after zero-length operations")
}
