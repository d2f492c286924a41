package merge

import "github.com/vhdkit/vhdkit/vhdx"

// Files describes each file of the disk's chain, the leaf first, from the
// open images: a second open of a file being written could read its log
// half written.
func (d *Disk) Files() []vhdx.Info {
	d.leafMu.Lock()
	defer d.leafMu.Unlock()
	var out []vhdx.Info
	for im := d.leaf; im != nil; im = im.Parent() {
		out = append(out, im.Info())
	}
	return out
}
