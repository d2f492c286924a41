package merge

import (
	"path/filepath"
	"slices"
)

// dependents are the files outside the merged chain whose parent is one
// of its layers, by the layer they hang on.
type dependents struct {
	ofTop    []string // read the same through T: re-pointed without asking
	ofTarget []string // would see T change
	between  []string // would lose their parent and see T change
}

// others lists the dependents whose content the merge would change.
func (d *dependents) others() []string {
	return append(slices.Clone(d.ofTarget), d.between...)
}

// findDependents looks for children of layers[0..k] (TOP down to the
// target) among the files in the layers' folders and those the caller
// names. Children open elsewhere are the caller's to name, as children of
// TOP.
func findDependents(layers []string, k int, opts Options) *dependents {
	d := &dependents{}
	open := map[string]bool{}
	for _, o := range opts.Open {
		open[o.Leaf()] = true
		d.ofTop = append(d.ofTop, o.Leaf())
	}
	seen := map[string]bool{}
	var candidates []string
	add := func(p string) {
		if !seen[p] && !open[p] && indexOf(layers[:k+1], p) < 0 {
			seen[p] = true
			candidates = append(candidates, p)
		}
	}
	for _, c := range opts.Children {
		add(c)
	}
	dirs := map[string]bool{}
	for _, l := range layers[:k+1] {
		if opts.NoScan {
			break
		}
		dir := filepath.Dir(l)
		if dirs[dir] {
			continue
		}
		dirs[dir] = true
		for _, pat := range []string{"*.vhdx", "*.avhdx", "*.vhd", "*.avhd"} {
			m, _ := filepath.Glob(filepath.Join(dir, pat))
			for _, p := range m {
				add(p)
			}
		}
	}
	for _, c := range candidates {
		switch i := indexOf(layers[:k+1], parentOf(c, opts)); {
		case i < 0:
		case i == 0:
			d.ofTop = append(d.ofTop, c)
		case i == k:
			d.ofTarget = append(d.ofTarget, c)
		default:
			d.between = append(d.between, c)
		}
	}
	return d
}
