// Package merge folds differencing layers of a VHDX chain into an ancestor
// (Hyper-V's Merge-VHD), crash-safely and resumably.
//
// # Protocol
//
// Merging the layers above target T (the top one, TOP, and any between;
// L is the one directly above T) runs in this order, and a crash at any
// point leaves a chain that opens from TOP and reads the newest data;
// running the same merge again completes it:
//
//  1. A new DataWriteGuid G for T is chosen and recorded in L's
//     parent_linkage2 (through L's log); L now opens over T before and after
//     T changes. A re-run finds G there, equal to T's DataWriteGuid, and
//     reuses it.
//  2. T's header takes G before its first change.
//  3. Every range the merged layers define (data, and zeros they declare)
//     is copied into T; T is flushed and closed. Reads through TOP are
//     unaffected: TOP's chain still holds every merged range above T.
//  4. If layers lie between TOP and T, TOP is re-pointed at T (linkage G),
//     then they are deleted; TOP still opens, over T alone.
//  5. TOP is deleted: T is the leaf.
//
// Other children of T (files in T's folder whose locator names T, or ones
// the caller names) would see T's content change under them; the merge is
// refused unless the caller asks for them to be re-linked, in which case
// they get G as parent_linkage2 in step 1 and are re-pointed at T in step 4.
package merge

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"sync"

	"github.com/vhdkit/vhdkit/disk"
	"github.com/vhdkit/vhdkit/storage"
	"github.com/vhdkit/vhdkit/vhdx"
)

// Options control a merge.
type Options struct {
	// Into is the ancestor to merge into; empty means TOP's parent.
	Into string
	// Relink re-links the other children of the target instead of
	// refusing the merge; Children names more of them than a scan of the
	// target's folder finds.
	Relink   bool
	Children []string
	// Progress, when set, is called as bytes are copied.
	Progress func(done, total int64)
	// OpenFile, when set, opens every image file (the test seam for
	// injected faults); Remove, when set, deletes the merged files.
	OpenFile func(path string, flag int) (storage.File, error)
	Remove   func(path string) error
}

// Result says what a merge did.
type Result struct {
	Target   string   // the file that is now the leaf
	Removed  []string // merged-away files, TOP first
	Copied   int64    // bytes copied (data) into the target
	Zeroed   int64    // bytes the merged layers declared zero
	Relinked []string
}

// ErrOtherChildren reports children of the target a merge would break.
var ErrOtherChildren = errors.New("other images depend on the merge target")

// Merge merges TOP down into its parent, or into opts.Into.
func Merge(ctx context.Context, top string, opts Options) (*Result, error) {
	if j, err := loadJournal(top); err != nil {
		return nil, err
	} else if j != nil {
		// An earlier run copied everything; finish its clean-up.
		if err := j.finish(opts); err != nil {
			return nil, err
		}
		return &Result{Target: j.Target, Removed: j.Remove, Relinked: j.Relink}, nil
	}
	layers, err := chainPaths(top, opts)
	if err != nil {
		return nil, err
	}
	k := 1
	if opts.Into != "" {
		if k = indexOf(layers, opts.Into); k < 1 {
			return nil, fmt.Errorf("merge: %s is not an ancestor of %s (its chain: %s)", opts.Into, top, strings.Join(layers, " -> "))
		}
	}
	if len(layers) < 2 {
		return nil, fmt.Errorf("merge: %s is not a differencing image", top)
	}
	target := layers[k]
	others, err := otherChildren(target, layers, opts)
	if err != nil {
		return nil, err
	}
	if len(others) > 0 && !opts.Relink {
		return nil, fmt.Errorf("merge: %s: %w: %s (re-link them to merge anyway)", target, ErrOtherChildren, strings.Join(others, ", "))
	}
	res := &Result{Target: target}

	// Step 1: choose T's new DataWriteGuid and record it above T.
	g, err := prepare(target, append([]string{layers[k-1]}, others...), opts)
	if err != nil {
		return nil, err
	}
	// Steps 2 and 3: copy into T under G.
	if err := copyInto(ctx, top, target, k, g, opts, res); err != nil {
		return nil, err
	}
	// Steps 4 and 5 run from a journal, so a re-run after a crash
	// finishes them even when TOP no longer shows the chain.
	j := &journal{Top: top, Target: target, GUID: g.String(), Relink: others}
	if k > 1 {
		j.Relink = append([]string{top}, others...)
	}
	j.Remove = append(append([]string(nil), layers[1:k]...), top)
	if err := j.save(); err != nil {
		return nil, err
	}
	if err := j.finish(opts); err != nil {
		return nil, err
	}
	res.Relinked, res.Removed = others, append([]string{top}, layers[1:k]...)
	return res, nil
}

func openOpts(opts Options, ro bool) vhdx.OpenOptions {
	return vhdx.OpenOptions{ReadOnly: ro, OpenFile: opts.OpenFile}
}

// chainPaths opens TOP's chain read-only and lists its files, TOP first.
func chainPaths(top string, opts Options) ([]string, error) {
	im, err := vhdx.Open(top, openOpts(opts, true))
	if err != nil {
		return nil, fmt.Errorf("merge: %w", err)
	}
	defer im.Close()
	return im.Info().Chain, nil
}

// indexOf finds path among layers by file identity.
func indexOf(layers []string, path string) int {
	fi, err := os.Stat(path)
	if err != nil {
		return -1
	}
	for i, l := range layers {
		if li, err := os.Stat(l); err == nil && os.SameFile(fi, li) {
			return i
		}
	}
	return -1
}

// otherChildren lists images, other than the chain's own, whose locator
// points at target: those in target's folder and those named.
func otherChildren(target string, layers []string, opts Options) ([]string, error) {
	tfi, err := os.Stat(target)
	if err != nil {
		return nil, err
	}
	candidates := append([]string(nil), opts.Children...)
	for _, pat := range []string{"*.vhdx", "*.avhdx"} {
		m, _ := filepath.Glob(filepath.Join(filepath.Dir(target), pat))
		candidates = append(candidates, m...)
	}
	var out []string
	for _, c := range candidates {
		if indexOf(layers, c) >= 0 || indexOf(out, c) >= 0 {
			continue
		}
		link, err := vhdx.ReadParentLink(c, openOpts(opts, true))
		if err != nil || link == nil {
			continue // not a child of anything we can read
		}
		for _, p := range link.Candidates {
			if fi, err := os.Stat(p); err == nil && os.SameFile(fi, tfi) {
				out = append(out, c)
				break
			}
		}
	}
	return out, nil
}

// prepare returns the DataWriteGuid the target is to take, recording it in
// each child's parent_linkage2 first (step 1). A target that already has
// the GUID its child L records (an interrupted merge) keeps it.
func prepare(target string, children []string, opts Options) (vhdx.GUID, error) {
	t, err := vhdx.Open(target, openOpts(opts, true))
	if err != nil {
		return vhdx.GUID{}, fmt.Errorf("merge: %w", err)
	}
	current := t.Info().DataWriteGUID
	t.Close()
	link, err := vhdx.ReadParentLink(children[0], openOpts(opts, true))
	if err != nil {
		return vhdx.GUID{}, fmt.Errorf("merge: %w", err)
	}
	g := link.Linkage2
	if g != current || g.IsZero() {
		g = vhdx.NewGUID() // not resuming: a fresh identity for the target
	}
	for _, c := range children {
		link, err := vhdx.ReadParentLink(c, openOpts(opts, true))
		if err != nil {
			return g, fmt.Errorf("merge: %w", err)
		}
		if link.Linkage2 == g {
			continue
		}
		if err := relink(c, opts, func(im *vhdx.Image) error { return im.SetParentLinkage2(g) }); err != nil {
			return g, fmt.Errorf("merge: recording the target's new identity in %s: %w", c, err)
		}
	}
	return g, nil
}

// setParent points child at target, whose DataWriteGuid is g.
func setParent(child, target string, g vhdx.GUID, opts Options) error {
	if err := relink(child, opts, func(im *vhdx.Image) error { return im.SetParent(target, g) }); err != nil {
		return fmt.Errorf("merge: re-linking %s: %w", child, err)
	}
	return nil
}

// relink opens a child without its parent, changes its links and closes it.
func relink(child string, opts Options, change func(*vhdx.Image) error) error {
	im, err := vhdx.Open(child, vhdx.OpenOptions{OpenFile: opts.OpenFile, NoParent: true})
	if err != nil {
		return err
	}
	err = change(im)
	if cerr := im.Close(); err == nil {
		err = cerr
	}
	return err
}

// copyInto copies every range the k layers above the target define into
// it (steps 2 and 3): data is read through TOP, declared zeros become
// zero ranges. A reader and a writer run side by side.
func copyInto(ctx context.Context, top, target string, k int, g vhdx.GUID, opts Options, res *Result) error {
	src, err := vhdx.Open(top, openOpts(opts, true))
	if err != nil {
		return fmt.Errorf("merge: %w", err)
	}
	defer src.Close()
	dst, err := vhdx.Open(target, openOpts(opts, false))
	if err != nil {
		return fmt.Errorf("merge: %w", err)
	}
	if err := dst.BeginDataChange(g); err != nil {
		dst.Close()
		return fmt.Errorf("merge: %w", err)
	}
	exts, err := src.Extents(0, src.Size())
	if err != nil {
		dst.Close()
		return fmt.Errorf("merge: %w", err)
	}
	var todo []disk.Extent
	var total int64
	for _, e := range exts {
		if e.Depth < k && e.Type != disk.Hole {
			todo = append(todo, e)
			total += e.Length
		}
	}
	err = pump(ctx, src, dst, todo, total, opts.Progress, res)
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

const chunkSize = 4 << 20

// chunk is a piece of the copy: data in buf, or n zero bytes (buf nil).
type chunk struct {
	off int64
	n   int64
	buf []byte
}

// pump copies extents from src to dst with one reader and one writer.
func pump(ctx context.Context, src disk.Image, dst *vhdx.Image, todo []disk.Extent, total int64, progress func(int64, int64), res *Result) error {
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
					if _, err := src.ReadAt(c.buf, off); err != nil {
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
	var done int64
	for c := range ch {
		if err := ctx.Err(); err != nil {
			return err
		}
		n := c.n
		var err error
		if c.buf == nil {
			err = dst.WriteZeroes(c.off, n, true)
			res.Zeroed += n
		} else {
			_, err = dst.WriteAt(c.buf, c.off)
			res.Copied += n
			pool.Put(c.buf[:cap(c.buf)])
		}
		if err != nil {
			cancel()
			for range ch {
			}
			return err
		}
		done += n
		if progress != nil {
			progress(done, total)
		}
	}
	if rerr != nil {
		return rerr
	}
	return ctx.Err()
}
