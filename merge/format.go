package merge

import (
	"fmt"
	"os"
	"strings"

	"github.com/vhdkit/vhdkit/disk"
	"github.com/vhdkit/vhdkit/raw"
	"github.com/vhdkit/vhdkit/vhd"
	"github.com/vhdkit/vhdkit/vhdx"
)

// What a merge does differs by format only in how a child names and
// checks its parent. A VHDX child checks its parent's DataWriteGuid, which
// the merge changes by the protocol (parent_linkage2 first). A VHD child
// checks its parent's unique id, which no write changes, and records a
// time stamp that is advisory only; so a VHD target keeps its identity,
// and the merge relies on the dependents scan (and the journal) alone.
// Any registered format can be the base of a chain; raw ones are merged
// into like the rest.

// kind is the format of a chain's file, as disk.Detect tells it from the
// content. A file Detect cannot tell goes by its name: one that lives
// behind the OpenFile seam (tests) is not what the disk holds, and a VHDX
// or VHD name on other content fails in that format's parser, never read
// as raw.
type kind int

const (
	kindOther kind = iota
	kindVHDX
	kindVHD
	kindRaw
)

func kindOf(path string) kind {
	f, err := disk.Detect(path)
	if err != nil {
		var ok bool
		if f, ok = disk.FormatForPath(path); !ok {
			return kindOther
		}
	}
	switch f.Name {
	case "vhdx":
		return kindVHDX
	case "vhd":
		return kindVHD
	case "raw":
		return kindRaw
	}
	return kindOther
}

// open opens the chain whose leaf is path.
func open(path string, ro bool, opts Options) (disk.Image, error) {
	switch kindOf(path) {
	case kindVHDX:
		im, err := vhdx.Open(path, vhdx.OpenOptions{ReadOnly: ro, ParentDirs: opts.ParentDirs, FS: opts.FS})
		if err != nil {
			return nil, err
		}
		return im, nil
	case kindVHD:
		im, err := vhd.Open(path, vhd.OpenOptions{ReadOnly: ro, ParentDirs: opts.ParentDirs, FS: opts.FS})
		if err != nil {
			return nil, err
		}
		return im, nil
	case kindRaw:
		if opts.FS != nil {
			flag := os.O_RDWR
			if ro {
				flag = os.O_RDONLY
			}
			f, err := opts.FS.OpenFile(path, flag, 0)
			if err != nil {
				return nil, err
			}
			im, err := raw.New(f, ro)
			if err != nil {
				f.Close()
				return nil, err
			}
			return im, nil
		}
	}
	return disk.Open(path, disk.OpenOptions{ReadOnly: ro, ParentDirs: opts.ParentDirs})
}

// layers lists the files of an open chain, leaf first.
func layers(im disk.Image, path string) []string {
	switch im := im.(type) {
	case *vhdx.Image:
		return im.Info().Chain
	case *vhd.Image:
		return im.Info().Chain
	}
	return []string{path}
}

// parentOf returns the file a differencing image would open as its
// parent: the first of its locator's candidates that exists. It returns
// "" for files that are not differencing images, or not images at all.
func parentOf(path string, opts Options) string {
	var candidates []string
	switch kindOf(path) {
	case kindVHDX:
		link, err := vhdx.ReadParentLink(path, vhdx.OpenOptions{FS: peekFS(opts)})
		if err != nil || link == nil {
			return ""
		}
		candidates = link.Candidates
	case kindVHD:
		link, err := vhd.ReadParentLink(path, vhd.OpenOptions{FS: peekFS(opts)})
		if err != nil || link == nil {
			return ""
		}
		candidates = link.Candidates
	}
	for _, c := range candidates {
		if _, err := os.Stat(c); err == nil {
			return c
		}
	}
	return ""
}

// identity returns the DataWriteGuid of a VHDX target; other formats
// have none a merge changes (zero).
func identity(target string, opts Options) (vhdx.GUID, error) {
	if kindOf(target) != kindVHDX {
		return vhdx.GUID{}, nil
	}
	t, err := vhdx.Open(target, vhdx.OpenOptions{ReadOnly: true, ParentDirs: opts.ParentDirs, FS: opts.FS})
	if err != nil {
		return vhdx.GUID{}, err
	}
	defer t.Close()
	return t.Info().DataWriteGUID, nil
}

// vhdxIDs are the identities of a VHDX file that a merge compares: its
// DataWriteGuid and, for a child, its parent_linkage2 (zero when absent).
type vhdxIDs struct{ dataWrite, linkage2 vhdx.GUID }

// chainIDs returns the identities of each VHDX layer of an open chain, by
// path, as the open read them (a pending log replayed).
func chainIDs(im disk.Image) map[string]vhdxIDs {
	ids := map[string]vhdxIDs{}
	v, _ := im.(*vhdx.Image)
	for ; v != nil; v = v.Parent() {
		inf := v.Info()
		ids[inf.Path] = vhdxIDs{dataWrite: inf.DataWriteGUID, linkage2: inf.ParentLinkage2}
	}
	return ids
}

// linkage2 returns a VHDX child's parent_linkage2 (zero when absent, and
// for other formats).
func linkage2(child string, opts Options) (vhdx.GUID, error) {
	if kindOf(child) != kindVHDX {
		return vhdx.GUID{}, nil
	}
	link, err := vhdx.ReadParentLink(child, vhdx.OpenOptions{ReadOnly: true, FS: opts.FS})
	if err != nil {
		return vhdx.GUID{}, err
	}
	if link == nil {
		return vhdx.GUID{}, fmt.Errorf("%s is not a differencing image", child)
	}
	return link.Linkage2, nil
}

// setLinkage2 records g as a VHDX child's parent_linkage2; children of
// other formats do not check a VHDX parent's identity. isVHDX says the
// caller knows child is VHDX (it opened it), so it is not probed again.
func setLinkage2(child string, isVHDX bool, g vhdx.GUID, opts Options) error {
	if !isVHDX && kindOf(child) != kindVHDX {
		return nil
	}
	return relinkVHDX(child, opts, func(im *vhdx.Image) error { return im.SetParentLinkage2(g) })
}

// repoint points child's file at target, whose DataWriteGuid (for a VHDX
// target) is g.
func repoint(child, target string, g vhdx.GUID, opts Options) error {
	switch kindOf(child) {
	case kindVHDX:
		return relinkVHDX(child, opts, func(im *vhdx.Image) error { return im.SetParent(target, g) })
	case kindVHD:
		im, err := vhd.Open(child, vhd.OpenOptions{NoParent: true, FS: opts.FS})
		if err != nil {
			return err
		}
		err = im.SetParent(target)
		if cerr := im.Close(); err == nil {
			err = cerr
		}
		return err
	}
	return fmt.Errorf("%s is not a differencing image vhdkit can re-link", child)
}

// relinkVHDX opens a child without its parent, changes its links and
// closes it.
func relinkVHDX(child string, opts Options, change func(*vhdx.Image) error) error {
	im, err := vhdx.Open(child, vhdx.OpenOptions{FS: opts.FS, NoParent: true})
	if err != nil {
		return err
	}
	err = change(im)
	if cerr := im.Close(); err == nil {
		err = cerr
	}
	return err
}

// beginChange readies the target for writing under identity g (VHDX:
// BeginDataChange).
func beginChange(dst disk.Image, g vhdx.GUID) error {
	if im, ok := dst.(*vhdx.Image); ok {
		return im.BeginDataChange(g)
	}
	return nil
}

// grow makes the target as large as TOP.
func grow(dst disk.Image, size int64) error {
	r, ok := dst.(interface{ Resize(int64) error })
	if !ok {
		return fmt.Errorf("the target is %d bytes, TOP %d, and this format cannot grow", dst.Size(), size)
	}
	return r.Resize(size)
}

// chainNames joins paths for messages.
func chainNames(paths []string) string { return strings.Join(paths, " -> ") }
