package merge

import (
	"context"
	"fmt"
	"sync"
	"time"

	"github.com/vhdkit/vhdkit/disk"
	"github.com/vhdkit/vhdkit/vhdx"
)

// copyInto copies every range the k layers above the target define into
// it (steps 2 and 3): data is read through TOP, declared zeros become
// zero ranges. A reader and a writer run side by side.
func copyInto(ctx context.Context, top, target string, k int, g vhdx.GUID, opts Options, res *Result) error {
	src, err := open(top, true, opts)
	if err != nil {
		return fmt.Errorf("merge: %w", err)
	}
	defer src.Close()
	dst, err := open(target, false, opts)
	if err != nil {
		return fmt.Errorf("merge: %w", err)
	}
	err = copyOpen(ctx, src, dst, k, g, opts, res)
	if ferr := dst.Flush(); err == nil {
		err = ferr
	}
	if cerr := dst.Close(); err == nil {
		err = cerr
	}
	if err != nil {
		return fmt.Errorf("merge: copying into %s: %w", target, err)
	}
	return nil
}

func copyOpen(ctx context.Context, src, dst disk.Image, k int, g vhdx.GUID, opts Options, res *Result) error {
	if err := beginChange(dst, g); err != nil {
		return err
	}
	if size := src.Size(); size > dst.Size() {
		if err := grow(dst, size); err != nil {
			return err
		}
		res.Grown = size
	}
	x, ok := src.(disk.Extenter)
	if !ok {
		return fmt.Errorf("%T reports no allocation map", src)
	}
	exts, err := x.Extents(0, src.Size())
	if err != nil {
		return err
	}
	var todo []disk.Extent
	var total, skipped int64
	for _, e := range exts {
		if e.Depth >= k || e.Type == disk.Hole {
			continue
		}
		total += e.Length
		if end := e.Offset + e.Length; end <= opts.From {
			skipped += e.Length
			continue
		} else if e.Offset < opts.From {
			skipped += opts.From - e.Offset
			e.Length, e.Offset = end-opts.From, opts.From
		}
		todo = append(todo, e)
	}
	p := &pump{src: src, dst: dst, opts: opts, res: res, total: total, done: skipped}
	return p.run(ctx, todo)
}

// chunkSize is the piece the copy reads and writes: 1 MiB pieces measured
// about 4% faster than 4 MiB ones (fresh page-cache pages cost less in
// small writes; see vhdx's payload write size).
const chunkSize = 1 << 20

// durableEvery is how often a copy with a Durable callback flushes the
// target to report its progress.
const durableEvery = time.Second

// chunk is a piece of the copy: data in buf, or n zero bytes (buf nil).
type chunk struct {
	off int64
	n   int64
	buf []byte
}

// pump copies extents from src to dst with one reader and one writer.
type pump struct {
	src        disk.Image
	dst        disk.Image
	opts       Options
	res        *Result
	total      int64
	done       int64
	lastReport time.Time
}

func (p *pump) run(ctx context.Context, todo []disk.Extent) error {
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	ch := make(chan chunk, 4)
	pool := sync.Pool{New: func() any { return make([]byte, chunkSize) }}
	var rerr error
	go func() {
		defer close(ch)
		for _, e := range todo {
			for off := e.Offset; off < e.Offset+e.Length; {
				n := min(int64(chunkSize), e.Offset+e.Length-off)
				c := chunk{off: off, n: n}
				if e.Type == disk.Data {
					c.buf = pool.Get().([]byte)[:n]
					if _, err := p.src.ReadAt(c.buf, off); err != nil {
						rerr = err
						return
					}
				}
				select {
				case ch <- c:
				case <-ctx.Done():
					return
				}
				off += n
			}
		}
	}()
	drain := func(err error) error {
		cancel()
		for range ch {
		}
		return err
	}
	p.lastReport = time.Now()
	if p.opts.Progress != nil && p.done > 0 {
		p.opts.Progress(p.done, p.total)
	}
	for c := range ch {
		if err := ctx.Err(); err != nil {
			return drain(err)
		}
		var err error
		if c.buf == nil {
			err = zeroFill(p.dst, c.off, c.n)
			p.res.Zeroed += c.n
		} else {
			_, err = p.dst.WriteAt(c.buf, c.off)
			p.res.Copied += c.n
			pool.Put(c.buf[:cap(c.buf)])
		}
		if err == nil {
			err = p.report(c.off + c.n)
		}
		if err != nil {
			return drain(err)
		}
		p.done += c.n
		if p.opts.Progress != nil {
			p.opts.Progress(p.done, p.total)
		}
		if p.opts.Pace != nil {
			p.opts.Pace(c.n)
		}
	}
	if rerr != nil {
		return rerr
	}
	return ctx.Err()
}

// report flushes the target and tells the caller, at most every
// durableEvery, that the copy below end is durable.
func (p *pump) report(end int64) error {
	if p.opts.Durable == nil || time.Since(p.lastReport) < durableEvery {
		return nil
	}
	if err := p.dst.Flush(); err != nil {
		return err
	}
	p.lastReport = time.Now()
	p.opts.Durable(end)
	return nil
}
