// Package vhd reads and writes Microsoft Virtual Hard Disk (VHD) images —
// fixed, dynamic and differencing — as described by the Virtual Hard Disk
// Image Format Specification v1.0, and registers the format ("vhd", files
// ending in .vhd or .avhd) with package disk.
//
// # On-disk layout
//
// All integers are big-endian. A fixed image is the disk itself followed by
// a footer:
//
//	0                                  CurrentSize       +512
//	+----------------------------------+-----------------+
//	| virtual disk, byte for byte      | footer          |
//	+----------------------------------+-----------------+
//
// (Images from before Virtual PC 2004 may end in a 511-byte footer: it is
// read, never written.)
//
// A dynamic or differencing image:
//
//	0        512               1536
//	+--------+-----------------+--------------+------------+---------+-----+---------+--------+
//	| footer | dynamic header  | BAT          | parent     | block   | ... | block   | footer |
//	| copy   | (1024 bytes)    | 4 bytes per  | locator    | (bitmap |     |         |        |
//	|        | cookie cxsparse | block, padded| data       | + data) |     |         |        |
//	+--------+-----------------+--------------+------------+---------+-----+---------+--------+
//	  ^ identical to the last 512 bytes           ^ W2ku/W2ru paths, differencing only
//
// That is how Create lays them out; only the footer's data offset says
// where the header is, and only the header where the BAT and the locator
// data are (SetParent and Resize move them, see "Moving the header").
//
//	footer        0 cookie "conectix"   8 features    12 version      16 data offset (header)
//	 (512 bytes) 24 time stamp         28 creator    32 creator ver  36 creator host OS
//	             40 original size      48 current size               56 geometry C/H/S
//	             60 disk type          64 checksum   68 unique id    84 saved state
//	header        0 cookie "cxsparse"   8 data offset 16 table offset  24 version
//	 (1024)      28 max table entries  32 block size 36 checksum      40 parent unique id
//	             56 parent time stamp  64 parent name (UTF-16BE, 512 bytes)
//	             576 eight parent locator entries of 24 bytes:
//	                 0 platform code  4 data space  8 data length  16 data offset
//	BAT entry     sector number (offset/512) of a block, 0xFFFFFFFF = not allocated
//	block         sector bitmap (1 bit per 512-byte sector, most significant bit
//	              first, padded to 512 bytes), then BlockSize bytes of data
//
// A set bitmap bit means the sector is stored in this file; a clear bit
// means it reads as zeros (dynamic) or from the parent (differencing).
// Checksums are the one's complement of the byte sum of the structure
// with its checksum field taken as zero.
//
// # Virtual size
//
// The footer holds both a current size and a CHS geometry, and creators
// disagree about which is the disk's size. Size returns the current size
// (rounded down to a whole sector) except for images whose creator is
// "vpc " (Virtual PC) or "qemu" (QEMU before force_size existed): those
// tools size the disk by geometry, so Size is cylinders*heads*sectors*512
// — unless the geometry is the maximum 65535/16/255 (the disk is larger
// than CHS can express) or the CHS size exceeds the current size, where
// the current size wins. This matches qemu-img; 7-Zip always uses the
// current size, so for a Virtual PC image whose geometry rounds down
// (virtualpc-dynamic.vhd: CHS 136363130880, current 136365211648 bytes)
// the two tools, and we with qemu-img, disagree with 7-Zip by the tail.
// Images we create use creator "vhdk" and keep the size asked for (a
// whole number of sectors). Their geometry is the spec's when it describes
// that size exactly, else the maximum 65535/16/255: QEMU before 10.0 sizes
// VHDs of creators it does not know by their geometry, except at the
// maximum, so this way every QEMU reads the whole disk (see
// footerGeometry for why the size is not rounded up instead).
//
// # Writing and crash safety
//
// Fixed images are written in place. In a dynamic or differencing image a
// write to an unallocated block appends a block at the end of the file: the
// footer moves behind the new block at once (the old footer stays intact,
// and the copy at offset 0 never changes), the data is written into the
// new block, and the BAT entry and sector bitmap are kept in memory. Flush
// commits them in this order, two syncs per Flush however many blocks were
// allocated:
//
//  1. write the sector bitmaps of the blocks allocated since the last
//     Flush (no BAT entry on disk points at them yet);
//  2. sync: user data, those bitmaps and the moved footer are durable;
//  3. write the changed bitmaps of already published blocks and the
//     changed BAT sectors, which publishes the new blocks;
//  4. sync.
//
// A crash before step 4 leaves every BAT entry on disk pointing either
// where it pointed before or at a block whose data and bitmap are durable,
// and every bitmap bit on disk set only over durable data; at worst a
// block is leaked at the end of the file. If the crash left the file
// without a valid footer at its end, Open uses the copy at offset 0 and a
// writable Open rewrites the end footer; a writable Open also rewrites a
// copy at 0 that differs from a valid end footer (see "Moving the
// header"). An error during Flush makes the image refuse further writes
// (the on-disk state is whatever the last completed Flush left, plus
// unpublished blocks).
//
// Writes set the bitmap bits of exactly the sectors they cover; a partial
// sector in a differencing image is completed from the parent first. There
// is no copy-up of whole blocks.
//
// Trim of a whole block, and WriteZeroes with mayUnmap of a whole block
// of a dynamic image, clear its BAT entry: the block then reads as zeros
// (dynamic) or as the parent (differencing). Its space in the file is not
// reused; Check reports it and Optimize (or converting the image) compacts
// it. Trimming
// or zeroing part of a dynamic block writes zeros over its stored sectors
// (QEMU ignores the bitmap and must see zeros; 7-Zip insists on them).
// Trimming part of a differencing block clears the bits of its whole
// sectors and copies the parent's bytes over the stored part of partial
// ones. WriteZeroes on a differencing image writes zeros, since unmapping
// would expose the parent; on a fixed image Trim and WriteZeroes write
// zeros.
//
// # Parents
//
// A differencing image's parent is found, in this order, from the W2ru
// locator (relative to the child's folder), the W2ku locator (absolute),
// the deprecated Wi2r/Wi2k and MacX locators and the header's parent name.
// Windows paths are mapped: backslashes become slashes, and a path that
// cannot exist here (drive letter, UNC) falls back to its file name in the
// child's folder. A candidate is taken only if it is a regular file (not a
// FIFO or device, which could block or serve anything), a VHD by its
// content, and carries the unique id the child records; others are passed
// over, and when none fits Open fails with an error wrapping
// disk.ErrParentMismatch (or disk.ErrParentNotFound). A locator may name
// any file on the host: without these checks a crafted image would serve
// a raw file's or another disk's bytes as its own. OpenOptions.ParentDirs
// further confines candidates to folders. The parent is opened read-only. The parent time stamp is not enforced: copying a
// parent changes its modification time, and Windows opens such chains too.
// A mismatch (against both the parent's footer time stamp and its file
// modification time; zero means not recorded) is reported by Info and
// Check. A child larger than its parent (grown by Resize) reads zeros
// past the parent's end (7-Zip and libvhdi fail there instead: grow the
// parent too for them); a smaller one hides the parent's tail, which Open
// reports as a warning.
//
// OpenOptions.NoParent opens a differencing image without its parent, and
// ReadParentLink reads where the parent should be without opening
// anything else. SetParent rewrites the link for another parent file, as
// Create writes it for a new child, by moving the header.
//
// # Moving the header
//
// SetParent and Resize change the dynamic header (the parent link,
// MaxTableEntries, the BAT's offset) and, for Resize, the footer's sizes.
// The header spans two sectors and has no copy, so it is never rewritten
// in place. A new header goes where the next block would go, followed by
// the new locator data (SetParent) and a copy of the BAT — last, so that
// readers that put new blocks after the BAT and the blocks they know of
// (QEMU) do not write over the header — and the footer moves behind them.
// Only the footer's data offset leads to the header, so switching footers
// switches headers. After a Flush of pending writes:
//
//  1. write the header, the locator data and the BAT at the end of the
//     file, and the current footer behind them; sync: nothing on disk
//     refers to them yet;
//  2. write the new footer (new data offset, new sizes) over the end
//     footer; sync: this one sector is the commit;
//  3. write the new footer over the copy at offset 0; sync.
//
// A crash in step 1 leaves the old end footer or a damaged end, for which
// Open uses the copy at 0: both lead to the old header. In step 2 the end
// holds one whole footer or the other. After it the end leads to the new
// header while the copy may still lead to the old one; since the copy is
// read only when the end is damaged, a writable Open rewrites a copy that
// differs from the end footer, before a later crash can make it matter
// (it would bring back a BAT that lacks the blocks allocated since). The
// old header, locator data and BAT stay behind, referenced by nothing:
// Check reports such space once it adds up to a block, and Optimize (or
// converting the image) compacts it.
//
// # Checking and optimizing
//
// Check is strict: it reads the raw structures and reports, with the
// structure, a rule id and the file offset, every rule of the
// specification a file can break (strict.go lists them), besides what
// Open finds about the parent. Optimize releases blocks that add nothing
// (none of their sectors stored; with Full, stored sectors equal to what
// lies below), moves the last blocks down into space nothing refers to,
// cuts the file and punches the gaps it cannot cut, crash-safe step by
// step (see Image.Optimize).
//
// # Resizing
//
// Resize of a dynamic or differencing image moves the header as above,
// with a BAT of exactly the entries the new size needs (7-Zip insists on
// MaxTableEntries being that): new entries are unused, and entries past
// the new end are dropped with their blocks, whose space leaks. Before it
// grows the disk, the part of the old last block past the old end is
// cleared — zeros over its stored sectors (dynamic), its bits (differencing)
// — since a shrink may have left data there; the old disk does not show
// those bytes, so the Flush before step 1 orders them enough.
//
// A fixed image grows by moving its footer: the old footer is written at
// the new end and synced, so that the file ends in a footer for the old
// size; zeros go over the old footer (and over any bytes between the old
// end and it) and are synced; then one sector written at the new end
// switches to the new footer, and a sync. It shrinks by rewriting the end
// footer for the new size (the commit), then writing it right after the
// new end, syncing and cutting the file there. A crash leaves the old size
// or the new one, the new range reading as zeros — unless it tears the
// change of the file's length, which a fixed image, having no footer copy,
// cannot survive by itself: the grown length durable without the footer
// written at its end, or a cut that zeroed the old last sector without
// shortening the file. Open then finds no footer. Check with repair searches back
// from the end for the footer the resize left (a valid fixed footer whose
// current size is its own offset) and cuts the file after it, which gives
// the old image (growth) or the new one (shrink). File systems that make a
// length durable only with the data it covers, and cut files atomically,
// do not produce these states.
package vhd

import (
	"encoding/binary"
	"fmt"
	"time"

	"github.com/vhdkit/vhdkit/disk"
)

const (
	// SectorSize is the VHD sector: the unit of offsets, bitmaps and
	// geometry.
	SectorSize = 512
	// DefaultBlockSize is the block size of new dynamic and differencing
	// images, as Hyper-V and Virtual PC use.
	DefaultBlockSize = 2 << 20
	// MaxSize is the largest virtual size the format allows (2040 GiB).
	MaxSize = 2040 << 30
	// CreatorApp is the creator application written into images created
	// here ("vhdk", version CreatorVersion); readers that do not know it
	// use the footer's current size, which is what we mean.
	CreatorApp     = "vhdk"
	CreatorVersion = 0x00010000

	footerSize = 512
	headerSize = 1024

	footerCookie = "conectix"
	headerCookie = "cxsparse"

	formatVersion = 0x00010000 // footer and header version 1.0
	// featureReserved must always be set in the footer's features.
	featureReserved = 0x00000002
	// noDataOffset is the footer's data offset of a fixed image and the
	// header's unused data offset.
	noDataOffset = ^uint64(0)

	batUnused = 0xFFFFFFFF

	minBlockSize = SectorSize
	maxBlockSize = 256 << 20
	// maxBATEntries bounds the BAT we hold in memory (256 MiB of entries):
	// a 2040 GiB disk needs 1 Mi entries at the default block size.
	maxBATEntries = 64 << 20
	// maxLocatorLength bounds one locator's data: a Windows path holds at
	// most 32767 UTF-16 units.
	maxLocatorLength = 64 << 10
	// maxChainDepth bounds a differencing chain of VHDs.
	maxChainDepth = 256

	hostWindows = "Wi2k"
)

// vhdEpoch is the zero of VHD time stamps: seconds since 2000-01-01 UTC.
var vhdEpoch = time.Date(2000, 1, 1, 0, 0, 0, 0, time.UTC)

func vhdTime(t time.Time) uint32 {
	s := t.Sub(vhdEpoch) / time.Second
	if s < 0 {
		return 0
	}
	if s > 0xFFFFFFFF {
		return 0xFFFFFFFF
	}
	return uint32(s)
}

func fromVHDTime(s uint32) time.Time { return vhdEpoch.Add(time.Duration(s) * time.Second) }

// Type is the kind of a VHD image; its values are the footer's disk type.
type Type uint32

const (
	Fixed        Type = 2
	Dynamic      Type = 3
	Differencing Type = 4
)

func (t Type) String() string {
	switch t {
	case Fixed:
		return "fixed"
	case Dynamic:
		return "dynamic"
	case Differencing:
		return "differencing"
	}
	return fmt.Sprintf("type(%d)", uint32(t))
}

// UUID is a unique id as stored in the file. It prints its bytes in file
// order, which is how Windows tools and libvhdi show VHD ids.
type UUID [16]byte

func (u UUID) String() string {
	return fmt.Sprintf("%x-%x-%x-%x-%x", u[0:4], u[4:6], u[6:8], u[8:10], u[10:16])
}

// IsZero reports whether u is all zeros (no id recorded).
func (u UUID) IsZero() bool { return u == UUID{} }

// Geometry is the CHS geometry stored in the footer.
type Geometry struct {
	Cylinders       uint16
	Heads           uint8
	SectorsPerTrack uint8
}

// Size is the disk size the geometry describes, in bytes.
func (g Geometry) Size() int64 {
	return int64(g.Cylinders) * int64(g.Heads) * int64(g.SectorsPerTrack) * SectorSize
}

func (g Geometry) String() string {
	return fmt.Sprintf("%d/%d/%d", g.Cylinders, g.Heads, g.SectorsPerTrack)
}

var maxGeometry = Geometry{65535, 16, 255}

// GeometryFor computes the CHS geometry of a disk of size bytes with the
// specification's algorithm (appendix "CHS calculation"). The geometry
// rounds down: its Size may be smaller than size.
func GeometryFor(size int64) Geometry {
	total := size / SectorSize
	if total > 65535*16*255 {
		total = 65535 * 16 * 255
	}
	var spt, heads, cth int64
	if total >= 65535*16*63 {
		spt = 255
		heads = 16
		cth = total / spt
	} else {
		spt = 17
		cth = total / spt
		heads = (cth + 1023) / 1024
		if heads < 4 {
			heads = 4
		}
		if cth >= heads*1024 || heads > 16 {
			spt = 31
			heads = 16
			cth = total / spt
		}
		if cth >= heads*1024 {
			spt = 63
			heads = 16
			cth = total / spt
		}
	}
	return Geometry{Cylinders: uint16(cth / heads), Heads: uint8(heads), SectorsPerTrack: uint8(spt)}
}

// footerGeometry is the geometry written for a disk of size bytes: the
// spec's GeometryFor(size) when it describes the size exactly (or the size
// is beyond what CHS can express, where GeometryFor gives the maximum),
// else the maximum geometry 65535/16/255.
//
// Why not GeometryFor(size), which rounds down: QEMU before 10.0 sizes a
// VHD by its geometry unless the creator is one it knows (vpc.c:
// "win ", "qem2", "d2v ", "CTXS", "tap\0"), so it would read a "vhdk"
// image short and lose its tail (a GPT backup header). Every QEMU reads
// the current size when the geometry is the maximum (vpc.c: "Hyper-V
// sometimes sets the max geometry, but uses the current size"), which is
// what qemu-img's own force_size writes. Why not round the size up to a
// whole geometry, as qemu-img create does by default: the disk would no
// longer be the size asked for — a converted disk would grow, moving its
// GPT backup header off the end, and Azure takes only fixed VHDs of a
// whole number of MiB, which are almost never whole geometries (8 MiB,
// 1 GiB, 127 GiB are not). Readers that size by the current size
// (Hyper-V, Azure, VirtualBox, 7-Zip, libvhdi, QEMU 10) ignore the
// geometry either way; only a reader that trusts the geometry of an image
// it does not know (Virtual PC's ATA disks) is misled, and Virtual PC
// reads only its own images.
func footerGeometry(size int64) Geometry {
	if g := GeometryFor(size); g == maxGeometry || g.Size() == size {
		return g
	}
	return maxGeometry
}

func decodeGeometry(b []byte) Geometry {
	return Geometry{Cylinders: binary.BigEndian.Uint16(b[0:]), Heads: b[2], SectorsPerTrack: b[3]}
}

func (g Geometry) encode(b []byte) {
	binary.BigEndian.PutUint16(b[0:], g.Cylinders)
	b[2] = g.Heads
	b[3] = g.SectorsPerTrack
}

// FormatError reports a structure that is malformed, fails its checksum or
// uses a feature we do not support. It wraps disk.ErrFormat,
// disk.ErrChecksum or disk.ErrUnsupported.
type FormatError struct {
	Struct string // "footer", "dynamic header", "BAT", "parent locator 2", ...
	Offset int64  // file offset of the structure or of the offending field
	Msg    string
	Err    error
}

func (e *FormatError) Error() string {
	return fmt.Sprintf("vhd: %s at offset %d: %v: %s", e.Struct, e.Offset, e.Err, e.Msg)
}

func (e *FormatError) Unwrap() error { return e.Err }

func formatErr(structure string, off int64, format string, args ...any) *FormatError {
	return &FormatError{Struct: structure, Offset: off, Msg: fmt.Sprintf(format, args...), Err: disk.ErrFormat}
}

func unsupportedErr(structure string, off int64, format string, args ...any) *FormatError {
	return &FormatError{Struct: structure, Offset: off, Msg: fmt.Sprintf(format, args...), Err: disk.ErrUnsupported}
}

func checksumErr(structure string, off int64, stored, computed uint32) *FormatError {
	return &FormatError{Struct: structure, Offset: off,
		Msg: fmt.Sprintf("stored %#08x, computed %#08x", stored, computed), Err: disk.ErrChecksum}
}

// rebase moves an error from a Validate method, whose offsets are relative
// to the structure, to the structure's place in the file.
func rebase(err error, base int64) error {
	if fe, ok := err.(*FormatError); ok {
		c := *fe
		c.Offset += base
		return &c
	}
	return err
}

// checksum is the one's complement of the byte sum of b, skipping the four
// bytes of the checksum field at at.
func checksum(b []byte, at int) uint32 {
	var sum uint32
	for i, c := range b {
		if i >= at && i < at+4 {
			continue
		}
		sum += uint32(c)
	}
	return ^sum
}

func isPowerOfTwo(v uint64) bool { return v != 0 && v&(v-1) == 0 }

func alignUp(v, a int64) int64 { return (v + a - 1) / a * a }
