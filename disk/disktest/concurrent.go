package disktest

import (
	"bytes"
	"encoding/binary"
	"math/rand/v2"
	"sync"

	"github.com/vhdkit/vhdkit/disk"
)

// testConcurrent runs writers on adjacent regions whose boundaries fall
// inside sectors, so a format that read-modify-writes a sector, or
// allocates a block, without the right lock loses one side's bytes; and
// readers on a region nobody writes, which must read stable data
// meanwhile. Writers keep private models, merged once they are done.
func testConcurrent(fx *fixture) {
	const writers, readers, ops = 4, 2, 100
	S, size := fx.sector, fx.size
	shared := size * 3 / 4 // the writers' part; readers check the rest
	if shared < writers*4*S || size-shared < S {
		fx.t.Skip("image too small for the concurrent test")
	}
	fx.write(shared, size-shared, "fill the readers' region")
	bounds := make([]int64, writers+1)
	for i := 1; i < writers; i++ {
		bounds[i] = int64(i)*shared/writers/S*S + S/2 + int64(i)
	}
	bounds[writers] = shared

	tr, _ := fx.img.(disk.Trimmer)
	if fx.h.TrimUnspecified {
		tr = nil // its result would need adopting, which is not concurrent
	}
	z, _ := fx.img.(disk.Zeroer)
	t, img := fx.t, fx.img
	locals := make([][]byte, writers)
	start := make(chan struct{}) // so that the goroutines overlap
	var wg, rwg sync.WaitGroup
	for w := range writers {
		lo, hi := bounds[w], bounds[w+1]
		local := bytes.Clone(fx.model[lo:hi])
		locals[w] = local
		seed := fx.rng.Uint64()
		wg.Go(func() {
			<-start
			rng := rand.New(rand.NewPCG(seed, 1))
			var key [32]byte
			binary.LittleEndian.PutUint64(key[:], seed)
			src := rand.NewChaCha8(key)
			span := hi - lo
			for i := range ops {
				var off, n int64 // relative to lo
				switch rng.IntN(5) {
				case 0, 1: // at the left boundary, within a sector or two
					n = 1 + rng.Int64N(min(S, span))
					off = rng.Int64N(min(S, span-n) + 1)
				case 2, 3: // at the right boundary
					n = 1 + rng.Int64N(min(S, span))
					off = span - n - rng.Int64N(min(S, span-n)+1)
				default:
					n = 1 + rng.Int64N(min(64<<10, span))
					off = rng.Int64N(span - n + 1)
				}
				var err error
				switch op := rng.IntN(10); {
				case op == 0 && z != nil:
					err = z.WriteZeroes(lo+off, n, rng.IntN(2) == 0)
					clear(local[off : off+n])
				case op == 0 && tr != nil:
					err = tr.Trim(lo+off, n)
					clear(local[off : off+n])
				default:
					p := make([]byte, n)
					src.Read(p)
					var got int
					got, err = img.WriteAt(p, lo+off)
					if err == nil && got != len(p) {
						t.Errorf("writer %d op %d: WriteAt(%d bytes at %d) = %d", w, i, n, lo+off, got)
						return
					}
					copy(local[off:], p)
				}
				if err != nil {
					t.Errorf("writer %d op %d at %d: %v", w, i, lo+off, err)
					return
				}
				p := make([]byte, n)
				if got, err := img.ReadAt(p, lo+off); got != len(p) || err != nil {
					t.Errorf("writer %d op %d: ReadAt(%d bytes at %d) = %d, %v", w, i, n, lo+off, got, err)
					return
				}
				if j := firstDiff(p, local[off:off+n]); j >= 0 {
					t.Errorf("writer %d op %d: byte at %d reads %#02x right after writing %#02x", w, i, lo+off+int64(j), p[j], local[off+int64(j)])
					return
				}
				if w == 0 && i%10 == 9 {
					if err := img.Flush(); err != nil {
						t.Errorf("writer 0: Flush: %v", err)
						return
					}
				}
			}
		})
	}
	// fx.model is read-only while the writers run: they keep local models.
	done := make(chan struct{})
	for r := range readers {
		seed := fx.rng.Uint64()
		rwg.Go(func() {
			<-start
			rng := rand.New(rand.NewPCG(seed, 2))
			for i := 0; i < 1000; i++ {
				select {
				case <-done:
					return
				default:
				}
				var off, n int64
				if i%2 == 0 {
					n = 1 + rng.Int64N(min(64<<10, size-shared))
					off = shared + rng.Int64N(size-shared-n+1)
				} else {
					n = 1 + rng.Int64N(min(64<<10, size))
					off = rng.Int64N(size - n + 1)
				}
				p := make([]byte, n)
				if got, err := img.ReadAt(p, off); got != len(p) || err != nil {
					t.Errorf("reader %d: ReadAt(%d bytes at %d) = %d, %v", r, n, off, got, err)
					return
				}
				if off >= shared {
					if j := firstDiff(p, fx.model[off:off+n]); j >= 0 {
						t.Errorf("reader %d: byte at %d, which nobody writes, reads %#02x, want %#02x", r, off+int64(j), p[j], fx.model[off+int64(j)])
						return
					}
				}
			}
		})
	}
	close(start)
	wg.Wait()
	close(done)
	rwg.Wait()
	if t.Failed() {
		t.FailNow()
	}
	for w, local := range locals {
		copy(fx.model[bounds[w]:], local)
	}
	fx.checkAll("after concurrent writers")
}
