package merge

import (
	"fmt"
	"os"
	"path/filepath"
	"slices"

	"github.com/vhdkit/vhdkit/storage"
	"github.com/vhdkit/vhdkit/vhd"
	"github.com/vhdkit/vhdkit/vhdx"
)

// Dependents are found one way, for every change that could break them
// (a merge, a resize): the differencing images among the files in the
// folders of the files that change, and among those the caller names
// (Options.Children), whose parent locator resolves to one of them.
// Children that live elsewhere and are not named are not found.

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
	for _, c := range candidates(layers[:k+1], opts, func(p string) bool { return open[p] }) {
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

// Dependents returns the differencing images whose parent is the file at
// path: those in its folder (unless opts.NoScan) and among opts.Children.
// Of opts only Children, NoScan and OpenFile are used. A change to path
// that alters its DataWriteGuid, size or content breaks them or changes
// what they read.
func Dependents(path string, opts Options) []string {
	var out []string
	for _, c := range candidates([]string{path}, opts, nil) {
		if indexOf([]string{path}, parentOf(c, opts)) == 0 {
			out = append(out, c)
		}
	}
	return out
}

// candidates lists the files that may depend on files: those the caller
// names, then the images in the files' folders, without files themselves
// and those skip says to leave.
func candidates(files []string, opts Options, skip func(string) bool) []string {
	seen := map[string]bool{}
	var list []string
	add := func(p string) {
		if !seen[p] && (skip == nil || !skip(p)) && indexOf(files, p) < 0 {
			seen[p] = true
			list = append(list, p)
		}
	}
	for _, c := range opts.Children {
		add(c)
	}
	dirs := map[string]bool{}
	for _, l := range files {
		if opts.NoScan {
			break
		}
		dir := filepath.Dir(l)
		if dirs[dir] {
			continue
		}
		dirs[dir] = true
		// One read of the folder (sorted by name), matched as four globs
		// would be, in the same order.
		entries, _ := os.ReadDir(dir)
		for _, pat := range []string{"*.vhdx", "*.avhdx", "*.vhd", "*.avhd"} {
			for _, e := range entries {
				if ok, _ := filepath.Match(pat, e.Name()); ok {
					add(filepath.Join(dir, e.Name()))
				}
			}
		}
	}
	return list
}

// peekFS is where a file is opened to read its parent link: the caller's
// seam if set, else the operating system's without refusing other users
// (a child some program writes is still a dependent).
func peekFS(opts Options) storage.FS {
	if opts.FS != nil && opts.FS != storage.OS {
		return opts.FS
	}
	return storage.OSForceShare
}

// An OutsideParent is a link of a chain that resolved outside the child's
// folder through a path stored in the child, not through its relative
// locator: the parent is not where the child's folder says, so a change to
// it (a merge into it) reaches a file the user may not expect.
type OutsideParent struct {
	Child, Parent string
}

func (o OutsideParent) String() string {
	return fmt.Sprintf("%s: parent resolved through its absolute path %s, outside the child's folder", o.Child, o.Parent)
}

// OutsideParents checks each link of chain (a leaf first, then its
// ancestors, as an open image lists them) and returns those resolved
// outside the child's folder through a stored absolute path.
func OutsideParents(chain []string) []OutsideParent {
	var out []OutsideParent
	opts := Options{}
	for i := 0; i+1 < len(chain); i++ {
		child, parent := chain[i], chain[i+1]
		if inDir(parent, filepath.Dir(child)) {
			continue // found by name beside the child: no need to read it
		}
		rel := ""
		switch kindOf(child) {
		case kindVHDX:
			l, err := vhdx.ReadParentLink(child, vhdx.OpenOptions{FS: peekFS(opts)})
			if err != nil || l == nil {
				continue
			}
			rel = l.Relative
		case kindVHD:
			l, err := vhd.ReadParentLink(child, vhd.OpenOptions{FS: peekFS(opts)})
			if err != nil || l == nil {
				continue
			}
			rel = l.Relative
		default:
			continue
		}
		if rel != "" && indexOf([]string{parent}, rel) == 0 {
			continue // where the child's folder says
		}
		out = append(out, OutsideParent{Child: child, Parent: parent})
	}
	return out
}

// inDir reports whether path lies directly in dir, symbolic links
// resolved.
func inDir(path, dir string) bool {
	p, err := filepath.EvalSymlinks(path)
	if err != nil {
		return false
	}
	d, err := filepath.EvalSymlinks(dir)
	if err != nil {
		return false
	}
	p, err1 := filepath.Abs(p)
	d, err2 := filepath.Abs(d)
	return err1 == nil && err2 == nil && filepath.Dir(p) == d
}
