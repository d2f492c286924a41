package merge

import (
	"fmt"

	"github.com/vhdkit/vhdkit/disk"
	"github.com/vhdkit/vhdkit/vhd"
	"github.com/vhdkit/vhdkit/vhdx"
)

// SetParent points a differencing image at its parent's new path, after
// the parent was moved or renamed (Hyper-V's Set-VHD -ParentPath). The new
// parent must be the image the child was made from: for a VHDX child its
// DataWriteGuid must match one of the child's linkages; for a VHD child
// whose parent is a VHD, its unique id must match the one the child
// records. Otherwise SetParent fails with an error wrapping
// disk.ErrParentMismatch, unless force is set. Of opts only OpenFile and
// ParentDirs (for the new parent's own chain) are used. The change is
// crash-safe: the child opens with its old or its new link whenever it
// stops.
func SetParent(child, parent string, force bool, opts Options) error {
	switch kindOf(child) {
	case kindVHDX:
		link, err := vhdx.ReadParentLink(child, vhdx.OpenOptions{FS: opts.FS})
		if err != nil {
			return err
		}
		if link == nil {
			return fmt.Errorf("%s is not a differencing disk", child)
		}
		p, err := vhdx.Open(parent, vhdx.OpenOptions{ReadOnly: true, ParentDirs: opts.ParentDirs, FS: opts.FS})
		if err != nil {
			return err
		}
		g := p.Info().DataWriteGUID
		p.Close()
		if g != link.Linkage && (link.Linkage2.IsZero() || g != link.Linkage2) && !force {
			return fmt.Errorf("%s has DataWriteGuid {%s}, but %s was made from {%s}: not its parent: %w",
				parent, g, child, link.Linkage, disk.ErrParentMismatch)
		}
		return repoint(child, parent, g, opts)
	case kindVHD:
		link, err := vhd.ReadParentLink(child, vhd.OpenOptions{FS: opts.FS})
		if err != nil {
			return err
		}
		if link == nil {
			return fmt.Errorf("%s is not a differencing disk", child)
		}
		p, err := open(parent, true, opts)
		if err != nil {
			return err
		}
		var id vhd.UUID
		pv, isVHD := p.(*vhd.Image)
		if isVHD {
			id = pv.Info().UniqueID
		}
		p.Close()
		if isVHD && !link.UniqueID.IsZero() && id != link.UniqueID && !force {
			return fmt.Errorf("%s has unique id %s, but %s was made from %s: not its parent: %w",
				parent, id, child, link.UniqueID, disk.ErrParentMismatch)
		}
		return repoint(child, parent, vhdx.GUID{}, opts)
	}
	return fmt.Errorf("%s is not a VHDX or VHD differencing disk", child)
}
