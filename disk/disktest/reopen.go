package disktest

import (
	"fmt"

	"github.com/vhdkit/vhdkit/disk"
)

func (fx *fixture) reopen(what string) {
	fx.t.Helper()
	img := fx.h.Reopen(fx.t, fx.img)
	if img == nil {
		fx.t.Fatalf("%s: Harness.Reopen returned a nil image", what)
	}
	fx.img = img
	if got := img.Size(); got != fx.size {
		fx.t.Fatalf("%s: Size() = %d, want %d", what, got, fx.size)
	}
}

func testReopen(fx *fixture) {
	if fx.h.Reopen == nil {
		fx.t.Skip("Harness.Reopen is nil")
	}
	S, size := fx.sector, fx.size
	for _, c := range [][2]int64{{0, S}, {S + 1, 3 * S}, {1<<20 - 3, 2<<20 + 7}, {size - 2*S - 1, 2*S + 1}} {
		if fx.valid(c[0], c[1]) {
			fx.write(c[0], c[1], fmt.Sprintf("write [%d, +%d)", c[0], c[1]))
		}
	}
	for i := range 20 {
		off, n := fx.randRange()
		fx.write(off, n, fmt.Sprintf("random write %d [%d, +%d)", i, off, n))
	}
	if tr, ok := fx.img.(disk.Trimmer); ok && fx.valid(1<<20+5, 4096+S) {
		fx.trim(tr, 1<<20+5, 4096+S, "trim")
	}
	if z, ok := fx.img.(disk.Zeroer); ok && fx.valid(2<<20+7, 8192) {
		fx.zero(z, 2<<20+7, 8192, true, "write zeroes")
	}
	fx.flush("before reopening")
	fx.reopen("first reopen")
	fx.checkAll("after reopening")
	ext, hasExt := fx.img.(disk.Extenter)
	if hasExt {
		fx.extents(ext, 0, size, "after reopening")
	}

	// Change the reopened image and rely on Reopen's own flush.
	for i := range 20 {
		off, n := fx.randRange()
		fx.write(off, n, fmt.Sprintf("random write %d after reopening [%d, +%d)", i, off, n))
	}
	fx.reopen("second reopen")
	fx.checkAll("after reopening twice")
	if hasExt {
		ext = fx.img.(disk.Extenter)
		fx.extents(ext, 0, size, "after reopening twice")
	}
}
