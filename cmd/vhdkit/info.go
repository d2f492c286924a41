package main

import (
	"context"
	"encoding/json"
	"flag"
	"fmt"
	"io"
	"os"
	"strings"

	"github.com/vhdkit/vhdkit/vhd"
	"github.com/vhdkit/vhdkit/vhdx"
)

func infoCommand() *command {
	return &command{
		name:     "info",
		synopsis: "[--json] FILE",
		summary:  "show what a virtual disk is: format, kind, sizes, GUIDs, parent chain (like Get-VHD)",
		help: `The image and its parents are opened read-only: info never modifies a file,
not even to replay a pending log. Sizes are in bytes. For a differencing
image, parent is the resolved parent and chain lists the files from the
image itself (first) to the base.

Examples:
  vhdkit info disk.vhdx
  vhdkit info --json child.avhdx
`,
		setup: func(fs *flag.FlagSet) func(context.Context, *cli, []string) error {
			asJSON := fs.Bool("json", false, "print a JSON object instead of a table")
			return func(ctx context.Context, c *cli, args []string) error {
				if len(args) != 1 {
					return usagef("want exactly one FILE, got %d arguments", len(args))
				}
				info, err := describe(args[0])
				if err != nil {
					return err
				}
				if *asJSON {
					return writeJSON(c.stdout, info)
				}
				info.writeTable(c.stdout)
				return nil
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
}

// describe opens path read-only and reports what it is.
func describe(path string) (*imageInfo, error) {
	format, err := formatOf(path)
	if err != nil {
		return nil, err
	}
	im, err := openImage(path, true)
	if err != nil {
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
	return info, nil
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
		info.Parent = &in.ParentPath
		info.ParentLinkage = stringOf(in.ParentLinkage)
		if !in.ParentLinkage2.IsZero() {
			info.ParentLinkage2 = stringOf(in.ParentLinkage2)
		}
		info.Chain = in.Chain
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
		info.Parent = &in.ParentPath
		info.ParentLinkage = stringOf(in.ParentUniqueID)
		info.Chain = in.Chain
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
	width := 0
	for _, r := range rows {
		width = max(width, len(r.key)+1)
	}
	for _, r := range rows {
		fmt.Fprintf(w, "%-*s %s\n", width, r.key+":", r.value)
	}
}
