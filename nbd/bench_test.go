package nbd

import (
	"math/rand/v2"
	"sync"
	"sync/atomic"
	"testing"
)

// flatImage is a preallocated in-memory disk, so benchmarks measure the
// protocol path rather than the test image's chunk map.
type flatImage struct {
	mu sync.RWMutex
	b  []byte
}

func (f *flatImage) ReadAt(p []byte, off int64) (int, error) {
	f.mu.RLock()
	defer f.mu.RUnlock()
	return copy(p, f.b[off:]), nil
}

func (f *flatImage) WriteAt(p []byte, off int64) (int, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	return copy(f.b[off:], p), nil
}

func (f *flatImage) Size() int64  { return int64(len(f.b)) }
func (f *flatImage) Flush() error { return nil }
func (f *flatImage) Close() error { return nil }

const (
	benchSize     = 256 << 20
	benchInFlight = 16
)

// benchIO runs b.N requests of bs bytes, benchInFlight at a time, over
// one unix-socket connection to an in-process server.
func benchIO(b *testing.B, bs int, write, random bool) {
	img := &flatImage{b: make([]byte, benchSize)}
	ts := startServer(b, nil, Export{Image: img})
	c := ts.dial(b, nil)
	blocks := int64(benchSize / bs)
	var next atomic.Int64
	b.SetBytes(int64(bs))
	b.ReportAllocs()
	b.ResetTimer()
	var wg sync.WaitGroup
	for w := range benchInFlight {
		wg.Add(1)
		go func() {
			defer wg.Done()
			buf := make([]byte, bs)
			rng := rand.New(rand.NewPCG(uint64(w), 2))
			for {
				i := next.Add(1) - 1
				if i >= int64(b.N) {
					return
				}
				blk := i % blocks
				if random {
					blk = rng.Int64N(blocks)
				}
				var err error
				if write {
					_, err = c.WriteAt(buf, blk*int64(bs))
				} else {
					_, err = c.ReadAt(buf, blk*int64(bs))
				}
				if err != nil {
					b.Error(err)
					return
				}
			}
		}()
	}
	wg.Wait()
}

func BenchmarkSeqRead1M(b *testing.B)   { benchIO(b, 1<<20, false, false) }
func BenchmarkSeqWrite1M(b *testing.B)  { benchIO(b, 1<<20, true, false) }
func BenchmarkRandRead4K(b *testing.B)  { benchIO(b, 4096, false, true) }
func BenchmarkRandWrite4K(b *testing.B) { benchIO(b, 4096, true, true) }
