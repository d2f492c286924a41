package main

import (
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"strings"

	"github.com/vhdkit/vhdkit/disk"
	"github.com/vhdkit/vhdkit/merge"
	"github.com/vhdkit/vhdkit/vhd"
	"github.com/vhdkit/vhdkit/vhdx"
)

func infoCommand() *command {
	return &command{
		name:     "info",
		synopsis: "[--json] [--format FORMAT] [--force-share] FILE",
		summary:  "show what a virtual disk is: format, kind, sizes, GUIDs, parent chain (like Get-VHD)",
		help: `The image and its parents are opened read-only: info never modifies a file,
not even to replay a pending log. Sizes are in bytes. For a differencing
image, parent is the resolved parent and chain lists the files from the
image itself (first) to the base.

A parent found outside the child's folder through the absolute path the
child stores (not its relative locator) is named in a warning: a merge of
that chain writes there.

When a differencing image's parent cannot be found or does not match, info
still shows what the image itself holds (sizes, the parent candidates its
locator names, its linkage GUIDs) with the error, and exits 1: set-parent
then repairs the link.

A file another program is writing (a running QEMU, vhdkit nbd) is refused;
--force-share (-U, as qemu-img) reads it anyway, warning that what is
shown may be inconsistent.

Examples:
  vhdkit info disk.vhdx
  vhdkit info --json child.avhdx
  vhdkit info -U running.vhdx
`,
		setup: func(fs *flag.FlagSet) func(context.Context, *cli, []string) error {
			asJSON := fs.Bool("json", false, "print a JSON object instead of a table")
			var in input
			addInputFlags(fs, &in, true)
			return func(ctx context.Context, c *cli, args []string) error {
				if len(args) != 1 {
					return usagef("want exactly one FILE, got %d arguments", len(args))
				}
				info, err := c.describe(args[0], in)
				if info == nil {
					return err
				}
				if *asJSON {
					if werr := writeJSON(c.stdout, info); werr != nil {
						return werr
					}
				} else {
					info.writeTable(c.stdout)
				}
				return err
			}
		},
	}
}

// imageInfo is what info reports; its JSON form is part of the CLI
// contract.
type imageInfo struct {
	Path               string   `json:"path"`
	Format             string   `json:"format"`
	Type               string   `json:"type"`
	VirtualSize        int64    `json:"virtual_size"`
	FileSize           int64    `json:"file_size"`
	BlockSize          int64    `json:"block_size"`
	LogicalSectorSize  int      `json:"logical_sector_size"`
	PhysicalSectorSize int      `json:"physical_sector_size"`
	Parent             *string  `json:"parent"`
	ParentLinkage      *string  `json:"parent_linkage,omitempty"`
	ParentLinkage2     *string  `json:"parent_linkage2,omitempty"`
	DiskID             *string  `json:"disk_id"`
	DataWriteGUID      *string  `json:"data_write_guid"`
	FileWriteGUID      *string  `json:"file_write_guid"`
	Chain              []string `json:"chain,omitempty"`
	// LogPending says the file holds a log not yet applied (info replays
	// it in memory only).
	LogPending bool   `json:"log_pending"`
	Creator    string `json:"creator,omitempty"`
	// ParentCandidates are the paths the parent locator names, best
	// first: shown when the parent could not be opened.
	ParentCandidates []string `json:"parent_candidates,omitempty"`
	// Warnings are facts about the chain worth knowing before changing
	// it, such as a parent resolved outside the child's folder.
	Warnings []string `json:"warnings,omitempty"`
	// Error is why the chain could not be opened; the rest describes the
	// image alone.
	Error string `json:"error,omitempty"`
}

// describe opens path read-only and reports what it is. When the image
// opens but its parent does not, it returns what the image itself holds
// together with the error.
func (c *cli) describe(path string, in input) (*imageInfo, error) {
	format, err := in.formatOf(path)
	if err != nil {
		return nil, err
	}
	im, err := in.open(c, path, true)
	if err != nil {
		if errors.Is(err, disk.ErrParentNotFound) || errors.Is(err, disk.ErrParentMismatch) {
			return describeAlone(path, format, in, err)
		}
		return nil, err
	}
	defer im.Close()
	var info *imageInfo
	switch im := im.(type) {
	case *vhdx.Image:
		info = vhdxInfo(path, im.Info())
	case *vhd.Image:
		info = vhdInfo(path, im.Info())
	default:
		logical, physical := sectorSizes(im)
		info = &imageInfo{
			Path:               path,
			Format:             format,
			Type:               "fixed",
			VirtualSize:        im.Size(),
			LogicalSectorSize:  logical,
			PhysicalSectorSize: physical,
		}
	}
	if info.FileSize == 0 {
		fi, err := os.Stat(path)
		if err != nil {
			return nil, err
		}
		info.FileSize = fi.Size()
	}
	for _, o := range merge.OutsideParents(info.Chain) {
		info.Warnings = append(info.Warnings, o.String())
	}
	return info, nil
}

// describeAlone reports a differencing image whose chain did not open
// (openErr): what the file holds, and where its locator looks for the
// parent, so that set-parent can repair the link.
func describeAlone(path, format string, in input, openErr error) (*imageInfo, error) {
	var info *imageInfo
	var candidates []string
	switch format {
	case "vhdx":
		im, err := vhdx.Open(path, vhdx.OpenOptions{ReadOnly: true, NoParent: true, ForceShare: in.forceShare})
		if err != nil {
			return nil, openErr
		}
		info = vhdxInfo(path, im.Info())
		im.Close()
		if l, err := vhdx.ReadParentLink(path, vhdx.OpenOptions{}); err == nil && l != nil {
			candidates = l.Candidates
		}
	case "vhd":
		im, err := vhd.Open(path, vhd.OpenOptions{ReadOnly: true, NoParent: true, ForceShare: in.forceShare})
		if err != nil {
			return nil, openErr
		}
		info = vhdInfo(path, im.Info())
		im.Close()
		if l, err := vhd.ReadParentLink(path, vhd.OpenOptions{}); err == nil && l != nil {
			candidates = l.Candidates
		}
	default:
		return nil, openErr
	}
	info.ParentCandidates = candidates
	info.Error = oneLine(openErr.Error())
	return info, &exitError{code: 1, msg: fmt.Sprintf("%s (set-parent --parent PATH %s points it at its parent)", openErr, path)}
}

func vhdxInfo(path string, in vhdx.Info) *imageInfo {
	info := &imageInfo{
		Path:               path,
		Format:             "vhdx",
		Type:               in.Type.String(),
		VirtualSize:        int64(in.VirtualSize),
		FileSize:           in.FileSize,
		BlockSize:          int64(in.BlockSize),
		LogicalSectorSize:  int(in.LogicalSectorSize),
		PhysicalSectorSize: int(in.PhysicalSectorSize),
		DiskID:             stringOf(in.DiskID),
		DataWriteGUID:      stringOf(in.DataWriteGUID),
		FileWriteGUID:      stringOf(in.FileWriteGUID),
		LogPending:         in.LogReplayed,
		Creator:            in.Creator,
	}
	if in.Type == vhdx.Differencing {
		info.ParentLinkage = stringOf(in.ParentLinkage)
		if !in.ParentLinkage2.IsZero() {
			info.ParentLinkage2 = stringOf(in.ParentLinkage2)
		}
		if in.ParentPath != "" { // opened with its parent
			info.Parent = &in.ParentPath
			info.Chain = in.Chain
		}
	}
	return info
}

// vhdInfo reports a VHD: its unique id is the disk id; it has no data
// write GUID.
func vhdInfo(path string, in vhd.Info) *imageInfo {
	info := &imageInfo{
		Path:               path,
		Format:             "vhd",
		Type:               in.Type.String(),
		VirtualSize:        in.Size,
		FileSize:           in.FileSize,
		BlockSize:          int64(in.BlockSize),
		LogicalSectorSize:  int(in.LogicalSectorSize),
		PhysicalSectorSize: int(in.PhysicalSectorSize),
		DiskID:             stringOf(in.UniqueID),
		Creator:            strings.TrimSpace(in.Creator + " " + in.CreatorVersion),
	}
	if in.Type == vhd.Differencing {
		info.ParentLinkage = stringOf(in.ParentUniqueID)
		if in.ParentPath != "" { // opened with its parent
			info.Parent = &in.ParentPath
			info.Chain = in.Chain
		}
	}
	return info
}

// stringOf returns a GUID's text form, as Windows prints it.
func stringOf(g fmt.Stringer) *string {
	s := g.String()
	return &s
}

func writeJSON(w io.Writer, v any) error {
	enc := json.NewEncoder(w)
	enc.SetIndent("", "  ")
	return enc.Encode(v)
}

// writeTable prints the info as an aligned "key: value" table.
func (in *imageInfo) writeTable(w io.Writer) {
	type row struct{ key, value string }
	sizeRow := func(n int64) string {
		if n == 0 {
			return "0"
		}
		return fmt.Sprintf("%d (%s)", n, formatSize(n))
	}
	rows := []row{
		{"Path", in.Path},
		{"Format", in.Format},
		{"Type", in.Type},
		{"Virtual size", sizeRow(in.VirtualSize)},
		{"File size", sizeRow(in.FileSize)},
	}
	if in.BlockSize != 0 {
		rows = append(rows, row{"Block size", sizeRow(in.BlockSize)})
	}
	rows = append(rows,
		row{"Logical sector size", fmt.Sprint(in.LogicalSectorSize)},
		row{"Physical sector size", fmt.Sprint(in.PhysicalSectorSize)})
	for _, r := range []struct {
		key string
		v   *string
	}{{"Disk ID", in.DiskID}, {"Data write GUID", in.DataWriteGUID}, {"File write GUID", in.FileWriteGUID}, {"Parent", in.Parent}, {"Parent linkage", in.ParentLinkage}, {"Parent linkage 2", in.ParentLinkage2}} {
		if r.v != nil {
			rows = append(rows, row{r.key, *r.v})
		}
	}
	if len(in.Chain) > 0 {
		rows = append(rows, row{"Chain", strings.Join(in.Chain, " -> ")})
	}
	if in.Creator != "" {
		rows = append(rows, row{"Creator", in.Creator})
	}
	if in.LogPending {
		rows = append(rows, row{"Log", "pending (read as replayed; check --repair writes it)"})
	}
	for _, c := range in.ParentCandidates {
		rows = append(rows, row{"Parent candidate", c})
	}
	for _, w := range in.Warnings {
		rows = append(rows, row{"Warning", w})
	}
	if in.Error != "" {
		rows = append(rows, row{"Error", in.Error})
	}
	width := 0
	for _, r := range rows {
		width = max(width, len(r.key)+1)
	}
	for _, r := range rows {
		fmt.Fprintf(w, "%-*s %s\n", width, r.key+":", r.value)
	}
}
