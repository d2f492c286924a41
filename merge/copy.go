package merge

import (
	"context"
	"fmt"

	"github.com/vhdkit/vhdkit/disk"
	"github.com/vhdkit/vhdkit/imagecopy"
	"github.com/vhdkit/vhdkit/vhdx"
)

// copyInto copies every range the k layers above the target define into
// it (steps 2 and 3): data is moved from the layer that holds it (cloned
// where the file system can, see imagecopy), declared zeros become zero
// ranges.
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
	todo := exts[:0] // in place: a fragmented child has thousands
	for _, e := range exts {
		if e.Depth < k && e.Type != disk.Hole {
			todo = append(todo, e)
		}
	}
	st, err := imagecopy.Copy(ctx, dst, src, todo, copyOptions(opts))
	res.Moved = res.Moved.Add(st.Moved)
	res.Copied += st.Moved.Total()
	res.Zeroed += st.Zeroed
	return err
}

// copyOptions are the engine's options for a merge's copy: the target
// is not fresh (what the layers declare zero is written as zeros), data
// is moved as stored.
func copyOptions(opts Options) imagecopy.Options {
	o := imagecopy.Options{From: opts.From, Pace: opts.Pace, Durable: opts.Durable, JoinGaps: true}
	if opts.Progress != nil {
		o.Progress = func(p imagecopy.Progress) { opts.Progress(p.Done, p.Total) }
	}
	return o
}
