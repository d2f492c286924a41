package disktest

import (
	"fmt"

	"github.com/vhdkit/vhdkit/disk"
)

// zeroCases are the ranges Trim and WriteZeroes are tried on: partial
// sectors, whole sectors, whole 4 KiB and 1 MiB units, ranges over a unit
// edge, a never-written range and the end of the image.
func (fx *fixture) zeroCases() [][2]int64 {
	S, size := fx.sector, fx.size
	return [][2]int64{
		{0, S}, {2 * S, 3 * S}, {1, 1}, {S - 1, 2}, {100, 3 * S},
		{4096, 4096}, {8192 + 1, 8192}, {1 << 20, 1 << 20}, {1<<20 - S - 1, 2*S + 2},
		{5 << 20, 64 << 10}, {size - S - 1, S + 1},
	}
}

// prepareZeroing writes data where zeroCases will act, except the
// never-written range.
func (fx *fixture) prepareZeroing() {
	fx.write(0, min(fx.size, 3<<20), "fill the start")
	tail := min(fx.size, 64<<10)
	fx.write(fx.size-tail, tail, "fill the end")
}

// afterZeroing writes into zeroed ranges again and checks everything.
func (fx *fixture) afterZeroing(what string) {
	for _, c := range [][2]int64{{fx.sector / 2, fx.sector}, {1<<20 + 3, 5000}, {fx.size - 7, 7}} {
		if fx.valid(c[0], c[1]) {
			w := fmt.Sprintf("write [%d, +%d) after %s", c[0], c[1], what)
			fx.write(c[0], c[1], w)
			fx.checkAround(c[0], c[1], w)
		}
	}
	fx.checkAll("after " + what)
}

func testTrim(fx *fixture) {
	tr, ok := fx.img.(disk.Trimmer)
	if !ok {
		fx.t.Skip("image does not implement disk.Trimmer")
	}
	fx.prepareZeroing()
	for _, c := range fx.zeroCases() {
		if fx.valid(c[0], c[1]) {
			fx.trim(tr, c[0], c[1], fmt.Sprintf("Trim(%d, %d)", c[0], c[1]))
		}
	}
	fx.afterZeroing("trims")
	fx.trim(tr, 0, fx.size, "trim everything")
	fx.checkAll("after trimming everything")
}

func testWriteZeroes(fx *fixture) {
	z, ok := fx.img.(disk.Zeroer)
	if !ok {
		fx.t.Skip("image does not implement disk.Zeroer")
	}
	fx.prepareZeroing()
	for i, c := range fx.zeroCases() {
		unmap := i%2 == 1
		if fx.valid(c[0], c[1]) {
			fx.zero(z, c[0], c[1], unmap, fmt.Sprintf("WriteZeroes(%d, %d, %v)", c[0], c[1], unmap))
		}
	}
	fx.afterZeroing("write zeroes")
	for _, unmap := range []bool{false, true} {
		fx.write(0, min(fx.size, 1<<20), "refill")
		fx.zero(z, 0, fx.size, unmap, fmt.Sprintf("zero everything, unmap %v", unmap))
		fx.checkAll(fmt.Sprintf("after zeroing everything, unmap %v", unmap))
	}
}
