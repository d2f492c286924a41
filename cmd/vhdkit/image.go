package main

import (
	"errors"
	"flag"
	"fmt"
	"io"
	"path/filepath"
	"strings"

	"github.com/vhdkit/vhdkit/disk"
	"github.com/vhdkit/vhdkit/raw"
	"github.com/vhdkit/vhdkit/storage"
	"github.com/vhdkit/vhdkit/vhd"
	"github.com/vhdkit/vhdkit/vhdx"
)

// The formats register themselves with package disk (raw: .img .raw .bin;
// vhdx: .vhdx .avhdx; vhd: .vhd .avhd). vhdkit reads any registered format
// through disk; creating and describing an image needs its package.
//
// What a file is comes from its content (disk.Detect): VHDX and VHD by
// their signatures whatever the name; raw only without a signature and
// with a raw name (.img, .raw, .bin) or as a block device; a name that
// claims another format than the content holds is refused. --format
// names the format of an input, --output-format that of a new image.

// formatNames are the values --format and --output-format take.
const formatNames = "vhdx, vhd or raw"

// formatOf returns the format of the existing image at path, by its
// content (see disk.Detect).
func formatOf(path string) (string, error) {
	f, err := disk.Detect(path)
	if err != nil {
		if errors.Is(err, disk.ErrFormatMismatch) {
			err = fmt.Errorf("%w (--format %s names it)", err, formatNames)
		}
		return "", err
	}
	return f.Name, nil
}

// formatFlag checks a --format or --output-format value.
func formatFlag(name, value string) (string, error) {
	switch value {
	case "", "vhdx", "vhd", "raw":
		return value, nil
	}
	return "", usagef("unknown --%s %q (want %s)", name, value, formatNames)
}

// input is how a verb opens the image it reads or changes.
type input struct {
	format     string // --format: the format to read; "" tells it by content
	forceShare bool   // --force-share: read without refusing other users
	// parentDirs (--allow-parent-dir) are folders besides the image's
	// own that its chain's parents may lie in.
	parentDirs stringList
	// verb, for read-only inspection verbs, says the image may be read
	// with --force-share when it is in use.
	inspect bool
}

// addInputFlags defines --format (and, for inspection verbs, --force-share
// and -U) on fs.
func addInputFlags(fs *flag.FlagSet, in *input, inspect bool) {
	in.inspect = inspect
	fs.StringVar(&in.format, "format", "", "read FILE as `FORMAT` ("+formatNames+") instead of telling it by content")
	addParentDirFlag(fs, &in.parentDirs)
	if inspect {
		fs.BoolVar(&in.forceShare, "force-share", false, "read the image even while another program writes it (like qemu-img -U); what is shown may be inconsistent")
		fs.BoolVar(&in.forceShare, "U", false, "short for --force-share")
	}
}

// formatOf returns the format path is read as.
func (in input) formatOf(path string) (string, error) {
	if in.format != "" {
		if _, err := formatFlag("format", in.format); err != nil {
			return "", err
		}
		return in.format, nil
	}
	return formatOf(path)
}

// open opens the image at path, a differencing image with its whole
// chain. A read-only open never modifies any file. With forceShare, a
// warning goes to c's stderr for every file of the chain another program
// is writing.
func (in input) open(c *cli, path string, readOnly bool) (disk.Image, error) {
	format, err := in.formatOf(path)
	if err != nil {
		return nil, err
	}
	f, ok := disk.FormatByName(format)
	if !ok {
		return nil, fmt.Errorf("%s: unknown image format %q", path, format)
	}
	im, err := f.Open(path, disk.OpenOptions{ReadOnly: readOnly, ForceShare: in.forceShare && readOnly, ParentDirs: parentDirs(path, in.parentDirs)})
	if err != nil {
		return nil, outsideHint(in.inUse(err))
	}
	if in.forceShare {
		in.warnWriters(c, chainOf(im, path))
	}
	return im, nil
}

// Parents are confined. A differencing image names its parent by paths
// stored in the file, and whoever made the file chose them: followed
// anywhere, they would make vhdkit read (and serve, and merge into) any
// file the user can open. So a chain's parents are looked for only in the
// folder of the image named on the command line and in the folders named
// with --allow-parent-dir; a parent given explicitly (--parent) is the
// user's choice, and its own parents are confined to its folder.

// addParentDirFlag defines --allow-parent-dir on fs.
func addParentDirFlag(fs *flag.FlagSet, dirs *stringList) {
	fs.Var(dirs, "allow-parent-dir", "follow parent links into `DIR` too, not only the image's folder (repeatable)")
}

// parentDirs are the folders the parents of the chain whose leaf is path
// may lie in: path's folder and the allowed ones.
func parentDirs(path string, allowed []string) []string {
	return append([]string{filepath.Dir(path)}, allowed...)
}

// outsideHint adds to a parent refused for lying outside the allowed
// folders how to allow it.
func outsideHint(err error) error {
	if err != nil && errors.Is(err, disk.ErrParentNotFound) && strings.Contains(err.Error(), "outside the allowed") {
		return fmt.Errorf("%w (--allow-parent-dir DIR follows parents into DIR)", err)
	}
	return err
}

// inUse adds to a refusal by image locking how an inspection verb reads
// the file anyway.
func (in input) inUse(err error) error {
	if in.inspect && !in.forceShare && errors.Is(err, storage.ErrInUse) {
		return fmt.Errorf("%w (--force-share reads it anyway; what it shows may then be inconsistent)", err)
	}
	return err
}

// warnWriters warns, for each of files that another program holds for
// writing, that what is read of it may be inconsistent.
func (in input) warnWriters(c *cli, files []string) {
	for _, p := range files {
		if w, err := storage.HasWriter(p); err == nil && w {
			fmt.Fprintf(c.stderr, "vhdkit: warning: %s is being written by another program; what is read of it may be inconsistent\n", p)
		}
	}
}

// chainOf lists the files of an open image, leaf first.
func chainOf(im disk.Image, path string) []string {
	switch im := im.(type) {
	case *vhdx.Image:
		if c := im.Info().Chain; len(c) > 0 {
			return c
		}
	case *vhd.Image:
		if c := im.Info().Chain; len(c) > 0 {
			return c
		}
	}
	return []string{path}
}

// openImage opens the image at path by its content, as the verbs do
// without flags.
func openImage(path string, readOnly bool) (disk.Image, error) {
	return input{}.open(&cli{stdout: io.Discard, stderr: io.Discard}, path, readOnly)
}

// sectorSizes returns an image's logical and physical sector sizes, 512
// for images that do not say.
func sectorSizes(im disk.Image) (logical, physical int) {
	if s, ok := im.(disk.SectorSizer); ok {
		return s.LogicalSectorSize(), s.PhysicalSectorSize()
	}
	return 512, 512
}

// extentWindow is how much of the disk one Extents call covers, so that a
// huge, fragmented disk is mapped piece by piece.
const extentWindow = 1 << 30

// imageExtents describes [off, off+n) of im. Images without an allocation
// map are one data extent at depth 0.
func imageExtents(im disk.Image, off, n int64) ([]disk.Extent, error) {
	if e, ok := im.(disk.Extenter); ok {
		return e.Extents(off, n)
	}
	return []disk.Extent{{Offset: off, Length: n, Type: disk.Data}}, nil
}

// newImage is an image to create, checked against what its format takes.
type newImage struct {
	format string // "raw", "vhdx" or "vhd"
	kind   string // "fixed", "dynamic" or "differencing"
	// size is the virtual size; 0 for a child means its parent's.
	size      int64
	blockSize int64 // 0: the format's default
	logical   int   // 0: the format's default (a child: its parent's)
	physical  int   // likewise
	parent    string
	// sparse leaves a fixed image's blocks unallocated (--sparse).
	sparse bool
}

// imageFlags are the flags create and convert share.
type imageFlags struct {
	typ               string
	blockSize         sizeValue
	logical, physical int
	parent            string
	format            string // --output-format
	sparse            bool   // --sparse
}

// addOutputFormat defines --output-format and its short form -O.
func addOutputFormat(fs *flag.FlagSet, fl *imageFlags, what string) {
	fs.StringVar(&fl.format, "output-format", "", "make "+what+" a `FORMAT` image ("+formatNames+") whatever its name")
	fs.StringVar(&fl.format, "O", "", "short for --output-format `FORMAT`")
}

// outputFormat decides the format of a new image at path: --output-format
// if given, else the extension; a block device is written raw. A name
// that claims another format (a VHDX called .vhd) is refused, since the
// image would then be refused when read.
func outputFormat(path, explicit string) (string, error) {
	if _, err := formatFlag("output-format", explicit); err != nil {
		return "", err
	}
	if disk.IsBlockDevice(path) {
		if explicit != "" && explicit != "raw" {
			return "", usagef("%s is a block device: vhdkit writes disks to block devices raw, not as %s", path, strings.ToUpper(explicit))
		}
		return "raw", nil
	}
	named, ok := disk.FormatForPath(path)
	switch {
	case explicit == "" && ok:
		return named.Name, nil
	case explicit == "" && filepath.Ext(path) == "":
		return "", fmt.Errorf("%s: no file extension to tell the image format by (use .vhdx, .avhdx, .vhd, .avhd, .img or .raw, or --output-format)", path)
	case explicit == "":
		return "", fmt.Errorf("%s: unknown image format %q (use .vhdx, .avhdx, .vhd, .avhd, .img or .raw, or --output-format)", path, filepath.Ext(path))
	case ok && named.Name != explicit && named.Name != "raw":
		return "", usagef("%s: its name says %s, not %s: a file named %s must hold %s (name it for what it holds)",
			path, strings.ToUpper(named.Name), strings.ToUpper(explicit), filepath.Ext(path), strings.ToUpper(named.Name))
	}
	return explicit, nil
}

// planImage checks the flags for a new image at path and returns what to
// create. Mistakes are usage errors.
func planImage(path string, fl imageFlags) (*newImage, error) {
	format, err := outputFormat(path, fl.format)
	if err != nil {
		return nil, err
	}
	n := &newImage{format: format, parent: fl.parent, sparse: fl.sparse}
	if format == "raw" {
		switch {
		case fl.typ != "" && fl.typ != "fixed":
			return nil, usagef("a raw image cannot be %s (raw images take only --size)", fl.typ)
		case fl.blockSize.set, fl.logical != 0, fl.physical != 0:
			return nil, usagef("raw images have no block or sector sizes (they take only --size)")
		case fl.parent != "":
			return nil, usagef("a raw image cannot have a parent (use a .vhdx, .avhdx, .vhd or .avhd file)")
		}
		n.kind = "fixed"
		return n, nil
	}
	if format != "vhdx" && format != "vhd" {
		return nil, fmt.Errorf("%s: vhdkit cannot create %s images", path, format)
	}
	switch fl.typ {
	case "", "dynamic":
		n.kind = "dynamic"
		if fl.parent != "" {
			if fl.typ != "" {
				return nil, usagef("--parent makes a differencing image, not --type %s", fl.typ)
			}
			n.kind = "differencing"
		}
	case "fixed":
		if fl.parent != "" {
			return nil, usagef("--parent makes a differencing image, not --type %s", fl.typ)
		}
		n.kind = "fixed"
	case "differencing":
		if fl.parent == "" {
			return nil, usagef("--type differencing needs --parent")
		}
		n.kind = "differencing"
	default:
		return nil, usagef("unknown --type %q (want fixed, dynamic or differencing)", fl.typ)
	}
	minBlock, maxBlock := int64(1<<20), int64(256<<20)
	if format == "vhd" {
		minBlock = 512
	}
	if fl.blockSize.set {
		b := fl.blockSize.n
		if b < minBlock || b > maxBlock || b&(b-1) != 0 {
			return nil, usagef("--block-size %s: want a power of two from %s to 256M", formatSize(b), strings.ReplaceAll(formatSize(minBlock), " MiB", "M"))
		}
		if n.kind == "fixed" && format == "vhd" {
			return nil, usagef("a fixed VHD has no blocks (--block-size is for dynamic and differencing VHDs)")
		}
		n.blockSize = b
	}
	for _, s := range []struct {
		name string
		v    int
		dst  *int
	}{{"logical-sector", fl.logical, &n.logical}, {"physical-sector", fl.physical, &n.physical}} {
		switch {
		case s.v == 0:
		case format == "vhd" && s.v != 512:
			return nil, usagef("--%s %d: VHD images have 512-byte sectors only", s.name, s.v)
		case s.v == 512 || s.v == 4096:
			*s.dst = s.v
		default:
			return nil, usagef("--%s %d: want 512 or 4096", s.name, s.v)
		}
	}
	if n.logical == 4096 && n.physical == 512 {
		return nil, usagef("a logical sector size of 4096 needs a physical sector size of 4096")
	}
	if n.kind == "differencing" && (n.logical != 0 || n.physical != 0) {
		return nil, usagef("a differencing image takes its sector sizes from its parent")
	}
	if n.parent != "" {
		// A parent is read by its content too; one misnamed is refused.
		if _, err := formatOf(n.parent); errors.Is(err, disk.ErrFormatMismatch) {
			return nil, err
		}
	}
	return n, nil
}

// sectorSize is the logical sector size the new image will have.
func (n *newImage) sectorSize() (int64, error) {
	switch {
	case n.format == "raw":
		return 1, nil
	case n.format == "vhd":
		return vhd.SectorSize, nil
	case n.parent != "":
		p, err := openImage(n.parent, true)
		if err != nil {
			return 0, err
		}
		defer p.Close()
		l, _ := sectorSizes(p)
		return int64(l), nil
	case n.logical != 0:
		return int64(n.logical), nil
	}
	return 512, nil
}

// create creates the image at path, which must not exist.
func (n *newImage) create(path string) (disk.Image, error) {
	if err := refuseExisting(path); err != nil {
		return nil, err
	}
	if n.kind != "differencing" || n.size != 0 {
		sector, err := n.sectorSize()
		if err != nil {
			return nil, err
		}
		if n.size%sector != 0 {
			return nil, fmt.Errorf("the size %d is not a multiple of the logical sector size %d", n.size, sector)
		}
	}
	switch n.format {
	case "raw":
		if n.sparse {
			return raw.Create(path, n.size)
		}
		return raw.CreateAllocated(path, n.size)
	case "vhdx":
		o := vhdx.CreateOptions{
			Type:               map[string]vhdx.Type{"fixed": vhdx.Fixed, "dynamic": vhdx.Dynamic, "differencing": vhdx.Differencing}[n.kind],
			Size:               uint64(n.size),
			BlockSize:          uint32(n.blockSize),
			LogicalSectorSize:  uint32(n.logical),
			PhysicalSectorSize: uint32(n.physical),
			Parent:             n.parent,
			Sparse:             n.sparse,
		}
		im, err := vhdx.Create(path, o)
		if err != nil {
			return nil, err
		}
		return im, nil
	case "vhd":
		o := vhd.CreateOptions{
			Type:      map[string]vhd.Type{"fixed": vhd.Fixed, "dynamic": vhd.Dynamic, "differencing": vhd.Differencing}[n.kind],
			Size:      uint64(n.size),
			BlockSize: uint32(n.blockSize),
			Parent:    n.parent,
			Sparse:    n.sparse,
		}
		im, err := vhd.Create(path, o)
		if err != nil {
			return nil, err
		}
		return im, nil
	}
	return nil, fmt.Errorf("%s: vhdkit cannot create %s images", path, n.format)
}

// describe says what was created, e.g. "dynamic VHDX, 64 MiB".
func (n *newImage) describe(size int64) string {
	if n.format == "raw" {
		return "raw, " + formatSize(size)
	}
	s := fmt.Sprintf("%s %s, %s", n.kind, strings.ToUpper(n.format), formatSize(size))
	if n.parent != "" {
		s += ", parent " + n.parent
	}
	return s
}
