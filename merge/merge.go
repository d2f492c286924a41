// Package merge folds differencing layers of a VHDX or VHD chain into an
// ancestor (Hyper-V's Merge-VHD), crash-safely and resumably, offline
// (Merge) or under a running VHDX disk (Disk, LiveMerge), and re-points a
// child at a moved parent (SetParent).
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
//     reuses it. (VHD and raw targets keep their identity: see format.go.)
//  2. T's header takes G before its first change; T grows if TOP is
//     larger.
//  3. Every range the merged layers define (data, and zeros they declare)
//     is copied into T; T is flushed and closed. Reads through TOP are
//     unaffected: TOP's chain still holds every merged range above T.
//  4. A journal beside TOP records what is left: the files to point at T
//     (with linkage G) and the merged-away files to delete. Then TOP's own
//     children, which read the same data through T as through TOP, are
//     re-pointed at T; so is TOP itself if layers lie between it and T,
//     whereupon those are deleted; TOP still opens, over T alone.
//  5. TOP is deleted and the journal dropped: T is the leaf.
//
// Other children of T or of the layers between (files in their folders
// whose locator names them, or ones the caller names) would see their
// content change; the merge is refused unless the caller asks for them
// to be re-linked, in which case the children of T get G as
// parent_linkage2 in step 1 and all are re-pointed at T in step 4.
package merge

import (
	"context"
	"errors"
	"fmt"
	"os"
	"strings"

	"github.com/vhdkit/vhdkit/storage"
	"github.com/vhdkit/vhdkit/vhdx"
)

// Options control a merge.
type Options struct {
	// Into is the ancestor to merge into; empty means TOP's parent.
	Into string
	// Relink re-links the other children of the target and of the layers
	// between instead of refusing the merge.
	Relink bool
	// Children names more files that may depend on the chain's layers than
	// a scan of their folders finds; the merge sorts out which do.
	Children []string
	// NoScan leaves the folders unscanned: the caller names every file
	// that may depend on the layers (Children, Open).
	NoScan bool
	// Open lists children of TOP that are open elsewhere (a running
	// disk's leaf): the merge re-points them through Reparent instead of
	// opening their files, and the folder scan leaves their files alone.
	Open []OpenChild
	// Progress, when set, is called as bytes are copied.
	Progress func(done, total int64)
	// Pace, when set, is called after each piece of the copy with its
	// length; it may sleep to limit the bandwidth.
	Pace func(n int64)
	// From resumes a copy: the ranges below this virtual offset are
	// already durable in the target (Durable said so). Only valid for
	// the same merge with nothing written to TOP's chain since.
	From int64
	// Durable, when set, is told now and then that every range below off
	// is copied and durable in the target.
	Durable func(off int64)
	// ParentDirs, when not empty, confines the parents found through the
	// layers' locators to these folders (see vhdx.OpenOptions.ParentDirs):
	// a locator pointing elsewhere is not followed.
	ParentDirs []string
	// Outside, when set, is told before anything changes of each link
	// from TOP down to the target that resolved outside its child's
	// folder (OutsideParents): the merge writes there.
	Outside func(OutsideParent)
	// FS, when set, is the file system every file of the merge is opened,
	// written and removed in (nil: the operating system's): the seam
	// fault and crash sweeps use (storage.MemFS).
	FS storage.FS
}

// An OpenChild is a disk running on a child of TOP.
type OpenChild interface {
	// Leaf is the path of the child file.
	Leaf() string
	// Reparent points the child at parent, whose DataWriteGuid is g, and
	// goes on reading through it.
	Reparent(parent string, g vhdx.GUID) error
}

// Result says what a merge did.
type Result struct {
	Target  string   // the file that is now the leaf
	Removed []string // merged-away files, TOP first
	Copied  int64    // bytes of data carried into the target
	// Moved says how the data went: cloned, copied in the kernel, copied.
	Moved    storage.Moved
	Zeroed   int64    // bytes the merged layers declared zero
	Grown    int64    // the target's new size if it grew, else 0
	Relinked []string // other files now pointing at the target
}

// ErrOtherChildren reports children of the target a merge would break.
var ErrOtherChildren = errors.New("other images depend on the merge target")

// Merge merges TOP down into its parent, or into opts.Into.
func Merge(ctx context.Context, top string, opts Options) (*Result, error) {
	if j, err := loadJournal(top, storage.OrOS(opts.FS)); err != nil {
		return nil, err
	} else if j != nil {
		// An earlier run copied everything; finish its clean-up.
		if err := j.finish(opts); err != nil {
			return nil, err
		}
		return &Result{Target: j.Target, Removed: j.Remove, Relinked: j.Relink}, nil
	}
	layers, ids, err := readChain(top, opts)
	if err != nil {
		return nil, err
	}
	if len(layers) < 2 {
		return nil, fmt.Errorf("merge: %s is not a differencing image", top)
	}
	k := 1
	if opts.Into != "" {
		if k = indexOf(layers, opts.Into); k < 1 {
			return nil, fmt.Errorf("merge: %s is not an ancestor of %s (its chain: %s)", opts.Into, top, chainNames(layers))
		}
	}
	target := layers[k]
	if opts.Outside != nil {
		for _, o := range OutsideParents(layers[:k+1]) {
			opts.Outside(o)
		}
	}
	deps := findDependents(layers, k, opts)
	if others := deps.others(); len(others) > 0 && !opts.Relink {
		return nil, fmt.Errorf("merge: %w: %s (re-link them to merge anyway)", ErrOtherChildren, strings.Join(others, ", "))
	}
	res := &Result{Target: target}

	// Step 1: choose T's new DataWriteGuid and record it above T.
	g, err := prepare(target, append([]string{layers[k-1]}, deps.ofTarget...), ids, opts)
	if err != nil {
		return nil, err
	}
	// Steps 2 and 3: copy into T under G.
	if err := copyInto(ctx, top, target, k, g, opts, res); err != nil {
		return nil, err
	}
	// Steps 4 and 5 run from a journal, so a re-run after a crash
	// finishes them even when TOP no longer shows the chain.
	j := &journal{Top: top, Target: target, GUID: g.String()}
	j.Relink = append(append(append(j.Relink, deps.ofTop...), deps.ofTarget...), deps.between...)
	if k > 1 {
		j.Relink = append(j.Relink, top)
	}
	j.Remove = append(append([]string(nil), layers[1:k]...), top)
	if err := j.save(storage.OrOS(opts.FS)); err != nil {
		return nil, err
	}
	if err := j.finish(opts); err != nil {
		return nil, err
	}
	res.Relinked = append(append(append(res.Relinked, deps.ofTop...), deps.ofTarget...), deps.between...)
	res.Removed = append([]string{top}, layers[1:k]...)
	return res, nil
}

// chainPaths opens TOP's chain read-only and lists its files, TOP first.
func chainPaths(top string, opts Options) ([]string, error) {
	layers, _, err := readChain(top, opts)
	return layers, err
}

// readChain is chainPaths that also returns, from the same open, the
// identities of the chain's VHDX layers, so that step 1 need not open
// them again (every open reads headers, region table and metadata anew).
func readChain(top string, opts Options) ([]string, map[string]vhdxIDs, error) {
	im, err := open(top, true, opts)
	if err != nil {
		return nil, nil, fmt.Errorf("merge: %w", err)
	}
	defer im.Close()
	return layers(im, top), chainIDs(im), nil
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

// prepare returns the DataWriteGuid a VHDX target is to take (zero for
// other formats), recording it in each child's parent_linkage2 first
// (step 1). A target that already has the GUID its child L records (an
// interrupted merge) keeps it.
// ids holds what the open chain read of its VHDX layers; files not in
// it (other children of the target) are opened to be read.
func prepare(target string, children []string, ids map[string]vhdxIDs, opts Options) (vhdx.GUID, error) {
	t, known := ids[target]
	if !known && kindOf(target) != kindVHDX {
		return vhdx.GUID{}, nil
	}
	current := t.dataWrite
	if !known {
		var err error
		if current, err = identity(target, opts); err != nil {
			return vhdx.GUID{}, fmt.Errorf("merge: %w", err)
		}
	}
	l2s := make([]vhdx.GUID, len(children))
	for i, c := range children {
		if id, ok := ids[c]; ok {
			l2s[i] = id.linkage2
			continue
		}
		l2, err := linkage2(c, opts)
		if err != nil {
			return vhdx.GUID{}, fmt.Errorf("merge: %w", err)
		}
		l2s[i] = l2
	}
	g := l2s[0]
	if g != current || g.IsZero() {
		g = vhdx.NewGUID() // not resuming: a fresh identity for the target
	}
	for i, c := range children {
		if l2s[i] == g {
			continue
		}
		_, isVHDX := ids[c]
		if err := setLinkage2(c, isVHDX, g, opts); err != nil {
			return g, fmt.Errorf("merge: recording the target's new identity in %s: %w", c, err)
		}
	}
	return g, nil
}

// setParent points child at target, whose DataWriteGuid is g: through
// its owner if it is open, else by changing its file.
func setParent(child, target string, g vhdx.GUID, opts Options) error {
	for _, o := range opts.Open {
		if o.Leaf() == child {
			if err := o.Reparent(target, g); err != nil {
				return fmt.Errorf("merge: re-linking the running disk %s: %w", child, err)
			}
			return nil
		}
	}
	if err := repoint(child, target, g, opts); err != nil {
		return fmt.Errorf("merge: re-linking %s: %w", child, err)
	}
	return nil
}
