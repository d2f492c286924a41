package merge

import (
	"bytes"
	"context"
	"errors"
	"math/rand/v2"
	"os"
	"path/filepath"
	"sync"
	"testing"

	"github.com/vhdkit/vhdkit/internal/testenv"
	"github.com/vhdkit/vhdkit/vhdx"
)

// liveChain makes base.vhdx holding data and a checkpoint of it, and
// returns the Disk running on the child, with the expected content.
func liveChain(t *testing.T, size int64) (*Disk, []byte, string) {
	t.Helper()
	return liveChainIn(t, t.TempDir(), size)
}

// liveChainIn is liveChain in dir.
func liveChainIn(t *testing.T, dir string, size int64) (*Disk, []byte, string) {
	t.Helper()
	base := filepath.Join(dir, "base.vhdx")
	im, err := vhdx.Create(base, vhdx.CreateOptions{Size: uint64(size), BlockSize: 1 << 20})
	if err != nil {
		t.Fatal(err)
	}
	want := make([]byte, size)
	rng := rand.New(rand.NewPCG(1, 2))
	for i := 0; i < 40; i++ {
		off := rng.Int64N(size/512-64) * 512
		p := want[off : off+int64(rng.IntN(64)+1)*512]
		fillRand(rng, p)
		if _, err := im.WriteAt(p, off); err != nil {
			t.Fatal(err)
		}
	}
	child, err := im.CreateChild(filepath.Join(dir, "base_1.avhdx"), vhdx.CreateOptions{})
	if err != nil {
		t.Fatal(err)
	}
	if err := child.Close(); err != nil {
		t.Fatal(err)
	}
	d, err := OpenDisk(filepath.Join(dir, "base_1.avhdx"), vhdx.OpenOptions{})
	if err != nil {
		t.Fatal(err)
	}
	return d, want, base
}

func fillRand(rng *rand.Rand, p []byte) {
	for i := range p {
		p[i] = byte(rng.Uint32())
	}
}

// TestLiveMerge merges a running leaf into its parent while writers keep
// writing (each to its own region, so the expected content is known), and
// checks that the disk, before and after the switch, and the merged file
// reopened, all read the newest data.
func TestLiveMerge(t *testing.T) {
	const size = 32 << 20
	d, want, base := liveChain(t, size)
	top := d.Leaf()
	// Writes before the merge: the child's own data.
	rng := rand.New(rand.NewPCG(3, 4))
	for i := 0; i < 30; i++ {
		off := rng.Int64N(size/512-300) * 512
		p := want[off : off+int64(rng.IntN(300)+1)*512]
		fillRand(rng, p)
		if _, err := d.WriteAt(p, off); err != nil {
			t.Fatal(err)
		}
	}
	if err := d.WriteZeroes(4<<20, 2<<20, true); err != nil {
		t.Fatal(err)
	}
	clear(want[4<<20 : 6<<20])

	g := vhdx.NewGUID()
	m, err := d.StartMerge(g)
	if err != nil {
		t.Fatal(err)
	}
	stop := make(chan struct{})
	var wg sync.WaitGroup
	var mu sync.Mutex
	const writers = 4
	for w := 0; w < writers; w++ {
		wg.Add(1)
		go func(w int) {
			defer wg.Done()
			rng := rand.New(rand.NewPCG(uint64(w), 9))
			region := int64(size / writers)
			buf := make([]byte, 64<<10)
			for i := 0; ; i++ {
				select {
				case <-stop:
					return
				default:
				}
				n := int64(rng.IntN(128)+1) * 512
				off := int64(w)*region + rng.Int64N((region-n)/512)*512
				fillRand(rng, buf[:n])
				var err error
				switch i % 7 {
				case 5:
					err = d.WriteZeroes(off, n, true)
					clear(buf[:n])
				case 6:
					err = d.Trim(off, n)
					clear(buf[:n])
				default:
					_, err = d.WriteAt(buf[:n], off)
				}
				if err != nil {
					t.Error(err)
					return
				}
				mu.Lock()
				copy(want[off:off+n], buf[:n])
				mu.Unlock()
				if i%50 == 0 {
					if err := d.Flush(); err != nil {
						t.Error(err)
						return
					}
				}
			}
		}(w)
	}
	var copied int64
	for off := int64(0); off >= 0; {
		next, n, err := m.CopyStep(off)
		if err != nil {
			t.Fatal(err)
		}
		off, copied = next, copied+n
	}
	if copied != m.Total() {
		t.Errorf("copied %d bytes, want %d", copied, m.Total())
	}
	if err := m.Complete(nil); err != nil {
		t.Fatal(err)
	}
	if d.Leaf() != base {
		t.Errorf("leaf after merge = %s, want %s", d.Leaf(), base)
	}
	// Writers keep going on the target for a moment after the switch.
	for i := 0; i < 20; i++ {
		if _, err := d.Extents(0, size); err != nil {
			t.Fatal(err)
		}
	}
	close(stop)
	wg.Wait()
	got := make([]byte, size)
	if _, err := d.ReadAt(got, 0); err != nil {
		t.Fatal(err)
	}
	if i := firstDiff(got, want); i >= 0 {
		t.Fatalf("disk after merge differs at %d", i)
	}
	if err := d.Close(); err != nil {
		t.Fatal(err)
	}
	if err := os.Remove(top); err != nil {
		t.Fatal(err)
	}
	im, err := vhdx.Open(base, vhdx.OpenOptions{ReadOnly: true})
	if err != nil {
		t.Fatal(err)
	}
	defer im.Close()
	if im.Info().DataWriteGUID != g {
		t.Errorf("target DataWriteGuid %s, want %s", im.Info().DataWriteGUID, g)
	}
	if _, err := im.ReadAt(got, 0); err != nil {
		t.Fatal(err)
	}
	if i := firstDiff(got, want); i >= 0 {
		t.Fatalf("merged file differs at %d", i)
	}
}

// TestLiveMergeResume stops a live merge halfway (as a daemon restart
// does), reopens the leaf, which must read the newest data over the
// changed target, and resumes with the same GUID.
func TestLiveMergeResume(t *testing.T) {
	const size = 16 << 20
	d, want, base := liveChain(t, size)
	top := d.Leaf()
	rng := rand.New(rand.NewPCG(5, 6))
	p := want[1<<20 : 9<<20]
	fillRand(rng, p)
	if _, err := d.WriteAt(p, 1<<20); err != nil {
		t.Fatal(err)
	}
	g := vhdx.NewGUID()
	m, err := d.StartMerge(g)
	if err != nil {
		t.Fatal(err)
	}
	off := int64(0)
	for i := 0; i < 3; i++ {
		if off, _, err = m.CopyStep(off); err != nil {
			t.Fatal(err)
		}
	}
	if err := m.Stop(); err != nil {
		t.Fatal(err)
	}
	if err := d.Close(); err != nil {
		t.Fatal(err)
	}
	if d, err = OpenDisk(top, vhdx.OpenOptions{}); err != nil {
		t.Fatal(err)
	}
	got := make([]byte, size)
	if _, err := d.ReadAt(got, 0); err != nil {
		t.Fatal(err)
	}
	if i := firstDiff(got, want); i >= 0 {
		t.Fatalf("leaf reopened mid-merge differs at %d", i)
	}
	if m, err = d.StartMerge(g); err != nil {
		t.Fatal(err)
	}
	for ; off >= 0; off, _, err = m.CopyStep(off) {
		if err != nil {
			t.Fatal(err)
		}
	}
	if err := m.Complete(nil); err != nil {
		t.Fatal(err)
	}
	if d.Leaf() != base {
		t.Fatalf("leaf %s, want %s", d.Leaf(), base)
	}
	if _, err := d.ReadAt(got, 0); err != nil {
		t.Fatal(err)
	}
	if i := firstDiff(got, want); i >= 0 {
		t.Fatalf("after resumed merge differs at %d", i)
	}
	d.Close()
}

func firstDiff(a, b []byte) int {
	if bytes.Equal(a, b) {
		return -1
	}
	for i := range a {
		if a[i] != b[i] {
			return i
		}
	}
	return len(a)
}

// TestLiveMergeMirrorsBehindCopier: a client write in a data range the
// copier has yet to reach goes to the leaf only (the copier carries it
// over later); one behind the copier, or outside what the leaf held when
// the merge began, is mirrored into the target at once.
func TestLiveMergeMirrorsBehindCopier(t *testing.T) {
	const size = 16 << 20
	d, want, _ := liveChain(t, size)
	defer d.Close()
	rng := rand.New(rand.NewPCG(7, 8))
	fillRand(rng, want[0:8<<20])
	if _, err := d.WriteAt(want[0:8<<20], 0); err != nil {
		t.Fatal(err)
	}
	m, err := d.StartMerge(vhdx.NewGUID())
	if err != nil {
		t.Fatal(err)
	}
	off, _, err := m.CopyStep(0) // the first 1 MiB is copied
	if err != nil {
		t.Fatal(err)
	}
	write := func(at int64) []byte {
		p := make([]byte, 4096)
		fillRand(rng, p)
		if _, err := d.WriteAt(p, at); err != nil {
			t.Fatal(err)
		}
		copy(want[at:], p)
		return p
	}
	inTarget := func(at int64, p []byte) bool {
		got := make([]byte, len(p))
		if _, err := m.target.ReadAt(got, at); err != nil {
			t.Fatal(err)
		}
		return bytes.Equal(got, p)
	}
	behind, ahead, outside := int64(4096), int64(6<<20), int64(12<<20)
	if p := write(behind); !inTarget(behind, p) {
		t.Error("a write behind the copier was not mirrored")
	}
	if p := write(ahead); inTarget(ahead, p) {
		t.Error("a write ahead of the copier was mirrored (the copier carries it)")
	}
	if p := write(outside); !inTarget(outside, p) {
		t.Error("a write outside the leaf's ranges at the start was not mirrored")
	}
	finishLive(t, d, m, off, want)
}

// TestLiveMergeWriteIntoZeroRange: a range the leaf declared zero when the
// merge began, written by a client before the copier gets there, holds
// the client's data after the merge (the copier must not zero it in the
// target afterwards).
func TestLiveMergeWriteIntoZeroRange(t *testing.T) {
	const size = 16 << 20
	d, want, _ := liveChain(t, size)
	defer d.Close()
	if err := d.WriteZeroes(8<<20, 2<<20, true); err != nil {
		t.Fatal(err)
	}
	clear(want[8<<20 : 10<<20])
	rng := rand.New(rand.NewPCG(9, 10))
	fillRand(rng, want[0:2<<20])
	if _, err := d.WriteAt(want[0:2<<20], 0); err != nil {
		t.Fatal(err)
	}
	m, err := d.StartMerge(vhdx.NewGUID())
	if err != nil {
		t.Fatal(err)
	}
	off, _, err := m.CopyStep(0)
	if err != nil {
		t.Fatal(err)
	}
	p := want[9<<20 : 9<<20+8192]
	fillRand(rng, p)
	if _, err := d.WriteAt(p, 9<<20); err != nil {
		t.Fatal(err)
	}
	finishLive(t, d, m, off, want)
}

// finishLive runs a live merge's copy on from off, completes it and
// checks that the disk reads want.
func finishLive(t *testing.T, d *Disk, m *LiveMerge, off int64, want []byte) {
	t.Helper()
	var err error
	for ; off >= 0; off, _, err = m.CopyStep(off) {
		if err != nil {
			t.Fatal(err)
		}
	}
	if err := m.Complete(nil); err != nil {
		t.Fatal(err)
	}
	got := make([]byte, len(want))
	if _, err := d.ReadAt(got, 0); err != nil {
		t.Fatal(err)
	}
	if i := firstDiff(got, want); i >= 0 {
		t.Fatalf("after the merge the disk differs at %d", i)
	}
}

// TestLiveMergeRun runs a live merge's copy with Run, the one loop the
// host drives, under writers: cancelled halfway (a pause), it reports
// where it got and what is durable, resumes from there with From, and
// the switched disk reads the newest data; progress only moves forward,
// the leaf's whole blocks go file to file, and pacing sees every byte.
func TestLiveMergeRun(t *testing.T) {
	const size = 32 << 20
	d, want, base := liveChain(t, size)
	defer d.Close()
	rng := rand.New(rand.NewPCG(11, 12))
	fillRand(rng, want[2<<20:18<<20])
	if _, err := d.WriteAt(want[2<<20:18<<20], 2<<20); err != nil {
		t.Fatal(err)
	}
	m, err := d.StartMerge(vhdx.NewGUID())
	if err != nil {
		t.Fatal(err)
	}
	stop := make(chan struct{})
	var wg sync.WaitGroup
	var mu sync.Mutex
	for w := 0; w < 2; w++ {
		wg.Add(1)
		go func(w int) {
			defer wg.Done()
			rng := rand.New(rand.NewPCG(uint64(w), 13))
			buf := make([]byte, 64<<10)
			for {
				select {
				case <-stop:
					return
				default:
				}
				n := int64(rng.IntN(128)+1) * 512
				off := int64(w)*size/2 + rng.Int64N((size/2-n)/512)*512
				fillRand(rng, buf[:n])
				if _, err := d.WriteAt(buf[:n], off); err != nil {
					t.Error(err)
					return
				}
				mu.Lock()
				copy(want[off:off+n], buf[:n])
				mu.Unlock()
			}
		}(w)
	}
	ctx, cancel := context.WithCancel(context.Background())
	var done, paced, durable int64
	opts := Options{
		Progress: func(d, total int64) {
			if d < done || total != m.Total() {
				t.Errorf("progress %d of %d after %d of %d", d, total, done, m.Total())
			}
			done = d
			if d > total/2 {
				cancel()
			}
		},
		Pace:    func(n int64) { paced += n },
		Durable: func(off int64) { durable = off },
	}
	reached, err := m.Run(ctx, opts)
	if !errors.Is(err, context.Canceled) {
		t.Fatalf("cancelled Run: %v", err)
	}
	if reached <= 0 || reached >= size || durable > reached {
		t.Fatalf("cancelled at %d (durable %d) of %d", reached, durable, size)
	}
	opts.From = reached
	if reached, err = m.Run(context.Background(), opts); err != nil || reached != size {
		t.Fatalf("resumed Run: reached %d, %v", reached, err)
	}
	if done != m.Total() || paced < m.Total()-opts.From {
		t.Fatalf("progress ended at %d, paced %d, of %d", done, paced, m.Total())
	}
	if mv := m.Moved(); mv.Cloned+mv.KernelCopied < 8<<20 {
		t.Fatalf("moved %+v: the leaf's whole blocks did not go file to file", mv)
	}
	if err := m.Complete(nil); err != nil {
		t.Fatal(err)
	}
	close(stop)
	wg.Wait()
	if d.Leaf() != base {
		t.Fatalf("leaf %s, want %s", d.Leaf(), base)
	}
	got := make([]byte, size)
	if _, err := d.ReadAt(got, 0); err != nil {
		t.Fatal(err)
	}
	if i := firstDiff(got, want); i >= 0 {
		t.Fatalf("after the merge the disk differs at %d", i)
	}
}

// TestLiveMergeClonesOnXFS: on XFS with reflink the live merge's copier
// clones the leaf's blocks into the target while a writer goes on: the
// target's extents are shared with the leaf's (FIEMAP) before the leaf is
// removed, and the switched disk reads the newest data.
func TestLiveMergeClonesOnXFS(t *testing.T) {
	mnt := testenv.MountLoop(t, 512<<20, "mkfs.xfs", "-m", "reflink=1")
	const size = 32 << 20
	d, want, base := liveChainIn(t, mnt, size)
	defer d.Close()
	rng := rand.New(rand.NewPCG(21, 22))
	fillRand(rng, want[4<<20:20<<20])
	if _, err := d.WriteAt(want[4<<20:20<<20], 4<<20); err != nil {
		t.Fatal(err)
	}
	m, err := d.StartMerge(vhdx.NewGUID())
	if err != nil {
		t.Fatal(err)
	}
	stop := make(chan struct{})
	done := make(chan struct{})
	go func() { // a writer on the second half, behind and ahead of the copier
		defer close(done)
		buf := make([]byte, 8192)
		for i := int64(0); ; i++ {
			select {
			case <-stop:
				return
			default:
			}
			off := 16<<20 + (i*12345*512)%(16<<20-8192)
			fillRand(rng, buf)
			if _, err := d.WriteAt(buf, off); err != nil {
				t.Error(err)
				return
			}
			copy(want[off:], buf)
		}
	}()
	if _, err := m.Run(context.Background(), Options{}); err != nil {
		t.Fatal(err)
	}
	close(stop)
	<-done
	if mv := m.Moved(); mv.Cloned < 8<<20 {
		t.Fatalf("moved %+v: want the leaf's whole blocks cloned", mv)
	}
	top := d.Leaf()
	if err := m.Complete(nil); err != nil {
		t.Fatal(err)
	}
	if shared := testenv.SharedBytes(t, base); shared < 8<<20 {
		t.Fatalf("filefrag shows %d bytes of the target shared with the leaf", shared)
	}
	if err := os.Remove(top); err != nil {
		t.Fatal(err)
	}
	got := make([]byte, size)
	if _, err := d.ReadAt(got, 0); err != nil {
		t.Fatal(err)
	}
	if i := firstDiff(got, want); i >= 0 {
		t.Fatalf("after the merge the disk differs at %d", i)
	}
}
