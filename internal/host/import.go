package host

import (
	"errors"
	"fmt"
	"io"
	"net/http"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"time"

	"github.com/vhdkit/vhdkit/internal/api"
	"github.com/vhdkit/vhdkit/merge"
	"github.com/vhdkit/vhdkit/vhdx"
)

// A Hyper-V VM folder, exported or copied, holds its disks in
// "Virtual Hard Disks" (older exports and hand-made folders hold them at
// the top): one .vhdx per disk and one .avhdx per checkpoint made on it.
// Which file is whose parent is read from the files themselves, by
// identity: a child's parent_linkage is its parent's DataWriteGuid. The
// names, and the locators' paths (Windows paths of the machine the folder
// came from), are not trusted for that.
//
// Each disk's files form a tree rooted at its .vhdx. The daemon's model
// (state.go) is one running leaf per disk, every other file the frozen
// state of a checkpoint, a checkpoint's parent the checkpoint whose file
// is its file's parent. The running leaf is the leaf written last (the
// newest modification time): Hyper-V's record of it is in the machine's
// binary .vmcx, which is not read. Every disk must have the same tree.
//
// Checkpoints are named after their files' base names (disk 0's), e.g.
// "web_6A1F...": unlike a number by modification time, the name lets the
// admin tell which file holds which checkpoint, and stays the same if
// the folder is imported again; the time is the checkpoint's Created.

// importedFile is one VHDX file of the folder.
type importedFile struct {
	path     string
	dwg      vhdx.GUID // its DataWriteGuid: what its children link to
	link     *vhdx.ParentLink
	mtime    time.Time
	parent   *importedFile
	children []*importedFile // oldest first
}

// importDirs are the folders machines were imported from in place: the
// parents of their disks' chains lie there (parentDirs).
type importDirs struct {
	mu   sync.Mutex
	dirs []string
}

func (d *importDirs) add(dir string) {
	d.mu.Lock()
	defer d.mu.Unlock()
	if !slices.Contains(d.dirs, dir) {
		d.dirs = append(d.dirs, dir)
	}
}

func (d *importDirs) list() []string {
	d.mu.Lock()
	defer d.mu.Unlock()
	return slices.Clone(d.dirs)
}

// load records the folders of st's machines imported in place.
func (d *importDirs) load(st *state) {
	for _, m := range st.Machines {
		if m.Imported != "" {
			d.add(m.Imported)
		}
	}
}

func (h *Host) importRoute(r *http.Request) (any, error) {
	var req api.ImportVM
	if err := decode(r, &req); err != nil {
		return nil, err
	}
	return h.ImportVM(req)
}

// ImportVM makes a machine of a Hyper-V VM folder (see above). A folder
// whose files do not form one tree per disk, the same for every disk, is
// refused with the reason, and nothing is left behind.
func (h *Host) ImportVM(req api.ImportVM) (*api.VM, error) {
	if !nameRE.MatchString(req.Name) {
		return nil, errorf(statusBadRequest, "machine name %q: use 1 to 64 letters, digits, '.', '_' or '-', starting with a letter or digit", req.Name)
	}
	if !filepath.IsAbs(req.Dir) {
		return nil, errorf(statusBadRequest, "import folder %q: give an absolute path", req.Dir)
	}
	dir := filepath.Clean(req.Dir)
	roots, err := readImportFolder(dir)
	if err != nil {
		return nil, err
	}
	running, err := runningLeaves(roots)
	if err != nil {
		return nil, err
	}
	// Copies are made before the host is locked, which a copy of many
	// gigabytes would hold for minutes: into a folder of their own whose
	// name no machine can have, renamed into place under the lock.
	var copies [][]string
	var staging string
	if req.Copy {
		h.mu.Lock()
		taken := h.vms[req.Name] != nil
		h.mu.Unlock()
		if taken {
			return nil, errorf(statusConflict, "a machine named %q exists", req.Name)
		}
		if staging, err = os.MkdirTemp(filepath.Join(h.dir, "vms"), ".import-"); err != nil {
			return nil, err
		}
		defer os.RemoveAll(staging) // gone already once renamed
		if copies, err = copyTrees(roots, staging); err != nil {
			return nil, err
		}
	}

	h.mu.Lock()
	defer h.mu.Unlock()
	if h.vms[req.Name] != nil {
		return nil, errorf(statusConflict, "a machine named %q exists", req.Name)
	}
	for _, r := range roots {
		for _, f := range preorder(r) {
			if h.inUse(f.path) || h.referenced(f.path) {
				return nil, errorf(statusConflict, "%s is already a file of a machine", f.path)
			}
		}
	}
	mdir := h.machineDir(req.Name)
	if req.Copy {
		if err := os.Rename(staging, mdir); err != nil {
			return nil, errorf(statusConflict, "placing the copies: %v (a folder of that name is in the way)", err)
		}
	} else if err := mkdirPrivate(mdir); err != nil {
		return nil, err
	}
	ms := &machineState{Name: req.Name, Created: time.Now().UTC()}
	if ms.Settings, err = settingsOf(nil); err != nil {
		return nil, err
	}
	v := &vm{st: ms}
	fail := func(err error) (*api.VM, error) {
		for _, d := range v.disks {
			d.Close()
		}
		if req.Copy {
			os.RemoveAll(mdir)
		} else {
			os.Remove(mdir) // made above, empty
		}
		return nil, err
	}
	// paths[i][k] is disk i's k-th file in preorder; the copies when
	// copying.
	var paths [][]string
	for _, r := range roots {
		var ps []string
		for _, f := range preorder(r) {
			ps = append(ps, f.path)
		}
		paths = append(paths, ps)
	}
	parentDirs := []string{dir}
	if req.Copy {
		for i := range copies {
			for k := range copies[i] {
				copies[i][k] = filepath.Join(mdir, filepath.Base(copies[i][k]))
			}
		}
		paths = copies
		if err := linkCopies(roots, paths, mdir); err != nil {
			return fail(err)
		}
		parentDirs = []string{mdir}
	}
	// Every file must open through its own locator to the parent found
	// by identity: the daemon and the merges follow locators.
	for i, r := range roots {
		files := preorder(r)
		for k, f := range files {
			if len(f.children) > 0 {
				continue
			}
			want := []string{}
			for p := f; p != nil; p = p.parent {
				want = append(want, paths[i][slices.Index(files, p)])
			}
			im, err := vhdx.Open(paths[i][k], vhdx.OpenOptions{ReadOnly: true, ParentDirs: parentDirs, FS: h.opts.FS})
			if err != nil {
				return fail(errorf(statusBadRequest, "%s: %v; by identity its chain is %s (each file followed by its parent): vhdkit set-parent can point each file at its parent, or import with --copy",
					paths[i][k], err, strings.Join(want, " -> ")))
			}
			got := im.Info().Chain
			im.Close()
			if !slices.Equal(got, want) {
				return fail(errorf(statusBadRequest, "%s opens through %s, but by identity its chain is %s (each file followed by its parent): point it at its parent with vhdkit set-parent, or import with --copy",
					paths[i][k], strings.Join(got, " -> "), strings.Join(want, " -> ")))
			}
		}
	}
	// Checkpoints: every file but the running leaves, in disk 0's
	// preorder (the same shape on every disk, runningLeaves checked).
	files0 := preorder(roots[0])
	runIdx := slices.Index(files0, running[0])
	ids := make([]string, len(files0))
	for k, f := range files0 {
		if k == runIdx {
			continue
		}
		c := &checkpointState{ID: h.st.nextID(), Name: checkpointNameOf(f.path, files0), Created: f.mtime.UTC()}
		if f.parent != nil {
			c.Parent = ids[slices.Index(files0, f.parent)]
		}
		for i := range roots {
			c.Files = append(c.Files, paths[i][k])
		}
		ids[k] = c.ID
		ms.Checkpoints = append(ms.Checkpoints, c)
	}
	if p := running[0].parent; p != nil {
		ms.Current = ids[slices.Index(files0, p)]
	}
	if !req.Copy {
		ms.Imported = dir
		h.imported.add(dir)
	}
	for i := range roots {
		leaf := paths[i][runIdx]
		d, err := merge.OpenDisk(leaf, h.openOptions(leaf))
		if err != nil {
			return fail(errorf(statusBadRequest, "disk %d: %v", i, err))
		}
		ms.Disks = append(ms.Disks, &diskState{Leaf: leaf, Size: d.Size()})
		v.disks = append(v.disks, d)
	}
	h.st.Machines = append(h.st.Machines, ms)
	if err := h.save(); err != nil {
		h.st.Machines = h.st.Machines[:len(h.st.Machines)-1]
		return fail(err)
	}
	h.vms[req.Name] = v
	h.export(v)
	h.log.Info("machine imported", "vm", req.Name, "from", dir, "copy", req.Copy, "disks", len(ms.Disks), "checkpoints", len(ms.Checkpoints))
	out := h.view(v)
	return &out, nil
}

// readImportFolder reads the VHDX files of dir and dir/Virtual Hard Disks
// and links each child to its parent by identity; it returns the roots
// (one per disk, by name), each file's children oldest first.
func readImportFolder(dir string) ([]*importedFile, error) {
	var names []string
	for _, d := range []string{dir, filepath.Join(dir, "Virtual Hard Disks")} {
		entries, err := os.ReadDir(d)
		if errors.Is(err, os.ErrNotExist) && d != dir {
			continue
		}
		if err != nil {
			return nil, errorf(statusBadRequest, "import folder: %v", err)
		}
		for _, e := range entries {
			low := strings.ToLower(e.Name())
			if e.Type().IsRegular() && (strings.HasSuffix(low, ".vhdx") || strings.HasSuffix(low, ".avhdx")) {
				names = append(names, filepath.Join(d, e.Name()))
			}
		}
	}
	if len(names) == 0 {
		return nil, errorf(statusBadRequest, "%s: no .vhdx or .avhdx files in it or in its \"Virtual Hard Disks\" folder", dir)
	}
	var files []*importedFile
	byGUID := map[vhdx.GUID]*importedFile{}
	for _, p := range names {
		f := &importedFile{path: p}
		fi, err := os.Stat(p)
		if err != nil {
			return nil, errorf(statusBadRequest, "%v", err)
		}
		f.mtime = fi.ModTime()
		if f.link, err = vhdx.ReadParentLink(p, vhdx.OpenOptions{}); err != nil {
			return nil, errorf(statusBadRequest, "%s: %v", p, err)
		}
		im, err := vhdx.Open(p, vhdx.OpenOptions{ReadOnly: true, NoParent: true})
		if err != nil {
			return nil, errorf(statusBadRequest, "%s: %v", p, err)
		}
		inf := im.Info()
		im.Close()
		f.dwg = inf.DataWriteGUID
		if o := byGUID[f.dwg]; o != nil {
			return nil, errorf(statusBadRequest, "%s and %s are the same image (DataWriteGuid {%s}): one is a copy of the other; remove one", o.path, p, f.dwg)
		}
		byGUID[f.dwg] = f
		files = append(files, f)
	}
	var roots []*importedFile
	for _, f := range files {
		if f.link == nil {
			roots = append(roots, f)
			continue
		}
		p := byGUID[f.link.Linkage]
		if p == nil && !f.link.Linkage2.IsZero() {
			p = byGUID[f.link.Linkage2]
		}
		if p == nil {
			named := "no path"
			if len(f.link.Candidates) > 0 {
				named = f.link.Candidates[0]
			}
			return nil, errorf(statusBadRequest, "%s: its parent is missing: no file of the folder has DataWriteGuid {%s} (its locator names %s)", f.path, f.link.Linkage, named)
		}
		f.parent = p
		p.children = append(p.children, f)
	}
	// A file none of whose ancestors is a root is on a loop (or hangs
	// from one): every file has a parent there.
	for _, f := range files {
		seen := map[*importedFile]bool{}
		p := f
		for p.parent != nil && !seen[p] {
			seen[p] = true
			p = p.parent
		}
		if p.parent != nil {
			var loop []string
			for q := p; ; q = q.parent {
				loop = append(loop, filepath.Base(q.path))
				if q.parent == p {
					break
				}
			}
			return nil, errorf(statusBadRequest, "%s: its parent links form a loop (%s -> %s, each file followed by its parent): no base disk to rebuild the chain from",
				f.path, strings.Join(loop, " -> "), filepath.Base(p.path))
		}
	}
	for _, f := range files {
		slices.SortFunc(f.children, func(a, b *importedFile) int {
			if c := a.mtime.Compare(b.mtime); c != 0 {
				return c
			}
			return strings.Compare(a.path, b.path)
		})
	}
	slices.SortFunc(roots, func(a, b *importedFile) int { return strings.Compare(a.path, b.path) })
	return roots, nil
}

// runningLeaves picks each disk's running leaf, the leaf modified last,
// and checks every disk has disk 0's tree with the running leaf at the
// same place.
func runningLeaves(roots []*importedFile) ([]*importedFile, error) {
	var running []*importedFile
	var shapes []string
	for _, r := range roots {
		var newest *importedFile
		tie := false
		for _, f := range preorder(r) {
			if len(f.children) > 0 {
				continue
			}
			switch {
			case newest == nil || f.mtime.After(newest.mtime):
				newest, tie = f, false
			case f.mtime.Equal(newest.mtime):
				tie = true
			}
		}
		if tie {
			return nil, errorf(statusBadRequest, "%s: two of its leaf files were modified at the same instant (%s): cannot tell which one the machine runs on; touch the one it runs on (touch FILE) and import again",
				r.path, newest.mtime.UTC().Format(time.RFC3339Nano))
		}
		running = append(running, newest)
		shapes = append(shapes, shape(r, newest))
	}
	for i := 1; i < len(roots); i++ {
		if shapes[i] != shapes[0] {
			return nil, errorf(statusBadRequest, "disk %s has checkpoint tree %s, disk %s has %s (R: the running file): the disks disagree on the checkpoints",
				roots[0].path, shapes[0], roots[i].path, shapes[i])
		}
	}
	return running, nil
}

// shape renders a tree, children oldest first, its running leaf as R.
func shape(f, running *importedFile) string {
	if f == running {
		return "R"
	}
	s := "C"
	if len(f.children) > 0 {
		var parts []string
		for _, k := range f.children {
			parts = append(parts, shape(k, running))
		}
		s += "(" + strings.Join(parts, " ") + ")"
	}
	return s
}

// preorder lists a tree's files, a parent before its children.
func preorder(r *importedFile) []*importedFile {
	out := []*importedFile{r}
	for _, k := range r.children {
		out = append(out, preorder(k)...)
	}
	return out
}

// checkpointNameOf names a checkpoint after its file: the base name
// without extension, or with it where two files share a base name or the
// name would read as an ID.
func checkpointNameOf(path string, files []*importedFile) string {
	base := filepath.Base(path)
	stem := strings.TrimSuffix(base, filepath.Ext(base))
	for _, f := range files {
		if f.path != path && strings.EqualFold(strings.TrimSuffix(filepath.Base(f.path), filepath.Ext(f.path)), stem) {
			return base
		}
	}
	if stem == "" || cpIDRE.MatchString(stem) {
		return base
	}
	return stem
}

// copyTrees copies every disk's files into mdir and returns the copies'
// paths, per disk in preorder.
func copyTrees(roots []*importedFile, mdir string) ([][]string, error) {
	var out [][]string
	taken := map[string]bool{}
	for _, r := range roots {
		files := preorder(r)
		var ps []string
		for _, f := range files {
			dst := filepath.Join(mdir, filepath.Base(f.path))
			if taken[strings.ToLower(dst)] {
				return nil, errorf(statusBadRequest, "%s: another file of the folder has the name %s", f.path, filepath.Base(f.path))
			}
			taken[strings.ToLower(dst)] = true
			if err := copyFile(f.path, dst); err != nil {
				return nil, fmt.Errorf("copying %s: %w", f.path, err)
			}
			ps = append(ps, dst)
		}
		out = append(out, ps)
	}
	return out, nil
}

// linkCopies points each copy (paths, as copyTrees returns them) at its
// copied parent: the copies are a chain of their own, the originals
// untouched.
func linkCopies(roots []*importedFile, paths [][]string, mdir string) error {
	for i, r := range roots {
		files := preorder(r)
		// Parents before children: each parent's copy is linked (and so
		// opens) before its children are pointed at it.
		for k, f := range files {
			if f.parent == nil {
				continue
			}
			parent := paths[i][slices.Index(files, f.parent)]
			if err := merge.SetParent(paths[i][k], parent, false, merge.Options{ParentDirs: []string{mdir}}); err != nil {
				return fmt.Errorf("linking the copy of %s to its parent's: %w", f.path, err)
			}
		}
	}
	return nil
}

// copyFile copies src to a new file dst, durably.
func copyFile(src, dst string) error {
	in, err := os.Open(src)
	if err != nil {
		return err
	}
	defer in.Close()
	out, err := os.OpenFile(dst, os.O_WRONLY|os.O_CREATE|os.O_EXCL, 0o600)
	if err != nil {
		return err
	}
	if _, err := io.Copy(out, in); err != nil {
		out.Close()
		return err
	}
	if err := out.Sync(); err != nil {
		out.Close()
		return err
	}
	if err := out.Close(); err != nil {
		return err
	}
	// The modification time says which leaf runs: keep it.
	fi, err := in.Stat()
	if err != nil {
		return err
	}
	return os.Chtimes(dst, fi.ModTime(), fi.ModTime())
}
