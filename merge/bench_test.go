package merge

import (
	"context"
	"math/rand"
	"path/filepath"
	"testing"

	"github.com/vhdkit/vhdkit/vhdx"
)

// BenchmarkMerge merges a child holding 256 MiB of data (whole blocks and
// scattered 4 KiB pieces) into an empty dynamic base. Compare with cp and
// qemu-img commit in bench/merge.sh.
func BenchmarkMerge(b *testing.B) {
	const size = 256 << 20
	buf := make([]byte, 1<<20)
	rand.New(rand.NewSource(1)).Read(buf)
	b.SetBytes(size)
	for i := 0; i < b.N; i++ {
		b.StopTimer()
		dir := b.TempDir()
		base := filepath.Join(dir, "base.vhdx")
		im, err := vhdx.Create(base, vhdx.CreateOptions{Size: size, BlockSize: 2 << 20})
		if err != nil {
			b.Fatal(err)
		}
		im.Close()
		top := filepath.Join(dir, "top.avhdx")
		if im, err = vhdx.Create(top, vhdx.CreateOptions{Parent: base}); err != nil {
			b.Fatal(err)
		}
		for off := int64(0); off < size; off += 1 << 20 {
			if off%(8<<20) == 0 {
				for k := int64(0); k < 1<<20; k += 8 << 10 {
					im.WriteAt(buf[:4096], off+k)
				}
				continue
			}
			im.WriteAt(buf, off)
		}
		im.Close()
		b.StartTimer()
		if _, err := Merge(context.Background(), top, Options{}); err != nil {
			b.Fatal(err)
		}
	}
}
