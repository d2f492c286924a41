// Package vhdx reads and writes Hyper-V virtual hard disks in the VHDX
// format (MS-VHDX v1.0): fixed, dynamic and differencing images, with
// 512- or 4096-byte logical sectors, crash-safe through the format's log.
//
// On-disk layout (every region 1 MiB-aligned except the first 1 MiB):
//
//	0        64K      128K     192K      256K      320K     1M
//	+--------+--------+--------+---------+---------+--------+-----------------+
//	| file   | header | header | region  | region  |reserved| log, metadata,  |
//	| ident  |   1    |   2    | table 1 | table 2 |        | BAT, payload    |
//	+--------+--------+--------+---------+---------+--------+-----------------+
//
// The current header is the valid one (CRC-32C over 4 KiB) with the higher
// sequence number; it locates the log. The region table locates the BAT and
// the metadata region. The metadata region holds a table of items (block
// size, virtual size, sector sizes, disk id, and for a differencing image
// the parent locator). The BAT maps each payload block of the virtual disk
// to a 1 MiB-aligned file offset; every chunkRatio payload entries are
// followed by one entry for a 1 MiB sector-bitmap block, which in a
// differencing image says, one bit per logical sector, whether the sector
// is in this file or in the parent.
//
// # Commit protocol
//
// Payload data is written in place. Every change to the BAT, sector bitmaps
// and metadata is kept in memory as dirty 4 KiB pages and reaches the file
// only through the log, once per Flush:
//
//  1. sync: payload written since the last Flush, and the pages the last
//     Flush applied, become durable;
//  2. write the dirty pages as a log entry, then sync: the Flush is
//     durable. An entry holds at most 126 pages (a 1 MiB log); more take
//     several rounds, each syncing the pages the one before applied;
//  3. write the pages to their final places, without a sync: until the next
//     Flush's step 1, a crash is repaired by replaying the log.
//
// Entries alternate between the two halves of the log, each shorter than
// its half, so writing one never destroys the one before (see logWriter in
// log.go).
//
// Headers are never logged: they are updated by writing the non-current copy
// with a higher sequence number and syncing, so one valid copy always
// exists. The first write after open changes FileWriteGuid and
// DataWriteGuid in one header update. The header names a LogGuid only once
// an entry carries it: the first Flush with pages to log writes an empty
// entry, syncs (which serves as that Flush's step 1), then updates the
// header. Close syncs and clears the LogGuid, leaving a clean file that
// needs no replay.
//
// A block made ZERO or UNMAPPED gives up its space (its FileOffsetMB is
// 0); the space is free for new blocks once the Flush committing the
// change is durable, and punched out of the host file then (freespace.go).
//
// # Resizing
//
// Resize changes the virtual disk size item and, when the BAT region is too
// small for the new size, moves the BAT to new space at the end of the file
// and points both region table copies at it. It flushes first, then
// commits through the log in three parts:
//
//  1. what the old size does not read: BAT entries past its end (or the
//     moved BAT's pages holding entries, in new space nothing names yet,
//     which reads as zeros) and sector bitmap bits past its end; payload
//     past the old end is zeroed in place before;
//  2. the switch, one log entry: the metadata region, the changed pages of
//     both region tables and the BAT pages the old size reads. A crash
//     before the entry is synced leaves the old size, which part 1 left
//     alone; after it, replay gives the new size;
//  3. after a shrink, the entries of blocks wholly past the new end are
//     dropped, which the new size does not read.
//
// A differencing image may be larger than its parent (Hyper-V expands
// them): past the parent's end the chain holds nothing and reads as zeros.
// Growing one marks its new blocks ZERO and the old last block's new
// sectors present (zeros), so the new range never reads through to the
// parent: not its data under a shrunk child's old range, and not past its
// end, where 7-Zip stops reading.
package vhdx

import "hash/crc32"

const (
	kib = 1 << 10
	mib = 1 << 20

	fileIdentOffset = 0
	header1Offset   = 64 * kib
	header2Offset   = 128 * kib
	region1Offset   = 192 * kib
	region2Offset   = 256 * kib

	headerSize      = 4 * kib  // checksummed part of a header
	regionTableSize = 64 * kib // checksummed region table
	metaTableSize   = 64 * kib // metadata table at the start of its region

	maxRegionEntries = 2047
	maxMetaEntries   = 2047

	minBlockSize = 1 * mib
	maxBlockSize = 256 * mib

	// MaxVirtualSize is the largest virtual disk the specification allows.
	MaxVirtualSize = 64 << 40

	// sectorsPerBitmap is the number of logical sectors one 1 MiB sector
	// bitmap block describes (2^23).
	sectorsPerBitmap = 1 << 23
	bitmapBlockSize  = 1 * mib

	logSectorSize = 4 * kib
	pageSize      = 4 * kib // granularity of logged metadata updates

	defaultLogSize       = 1 * mib
	defaultBlockSize     = 32 * mib
	defaultDiffBlockSize = 2 * mib
)

// Signatures, read as little-endian integers.
const (
	sigFileIdent = 0x656C696678646876 // "vhdxfile"
	sigHeader    = 0x64616568         // "head"
	sigRegion    = 0x69676572         // "regi"
	sigMetadata  = 0x617461646174656D // "metadata"
	sigLogEntry  = 0x65676F6C         // "loge"
	sigZeroDesc  = 0x6F72657A         // "zero"
	sigDataDesc  = 0x63736564         // "desc"
	sigDataSect  = 0x61746164         // "data"
)

// Region and metadata item identifiers.
var (
	regionBAT      = mustGUID("2DC27766-F623-4200-9D64-115E9BFD4A08")
	regionMetadata = mustGUID("8B7CA206-4790-4B9A-B8FE-575F050F886E")

	itemFileParameters     = mustGUID("CAA16737-FA36-4D43-B3B6-33F0AA44E76B")
	itemVirtualDiskSize    = mustGUID("2FA54224-CD1B-4876-B211-5DBED83BF4B8")
	itemVirtualDiskID      = mustGUID("BECA12AB-B2E6-4523-93EF-C309E000C746")
	itemLogicalSectorSize  = mustGUID("8141BF1D-A96F-4709-BA47-F233A8FAAB5F")
	itemPhysicalSectorSize = mustGUID("CDA348C7-445D-4471-9CC9-E9885251C556")
	itemParentLocator      = mustGUID("A8D35F2D-B30B-454D-ABF7-D3D84834AB0C")

	locatorTypeVHDX = mustGUID("B04AEFB7-D19E-4A81-B789-25B8E9445913")
)

// BAT entry states.
const (
	payloadNotPresent       = 0
	payloadUndefined        = 1
	payloadZero             = 2
	payloadUnmapped         = 3
	payloadFullyPresent     = 6
	payloadPartiallyPresent = 7

	bitmapNotPresent = 0
	bitmapPresent    = 6
)

var castagnoli = crc32.MakeTable(crc32.Castagnoli)

// checksum computes the CRC-32C of b with the 4-byte field at off zeroed.
func checksum(b []byte, off int) uint32 {
	var zero [4]byte
	c := crc32.Update(0, castagnoli, b[:off])
	c = crc32.Update(c, castagnoli, zero[:])
	return crc32.Update(c, castagnoli, b[off+4:])
}

func alignUp(x, a int64) int64 { return (x + a - 1) / a * a }
