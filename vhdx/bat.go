package vhdx

import "fmt"

// BAT entry layout (u64): bits 0-2 state, 3-19 reserved, 20-63 file offset
// in MiB.
func batState(e uint64) uint8  { return uint8(e & 7) }
func batOffset(e uint64) int64 { return int64(e>>20) * mib }
func batEntry(state uint8, fileOff int64) uint64 {
	return uint64(fileOff/mib)<<20 | uint64(state)
}

// geometry is what the BAT's shape follows from: block size, sector size,
// virtual size and whether the image has a parent.
type geometry struct {
	blockSize     int64
	sectorSize    int64
	virtualSize   int64
	chunkRatio    int64 // payload blocks per sector bitmap block
	dataBlocks    int64
	bitmapBlocks  int64
	totalEntries  int64
	sectorsPerBlk int64
}

func newGeometry(blockSize, sectorSize uint32, virtualSize uint64, hasParent bool) geometry {
	g := geometry{blockSize: int64(blockSize), sectorSize: int64(sectorSize), virtualSize: int64(virtualSize)}
	g.chunkRatio = sectorsPerBitmap * g.sectorSize / g.blockSize
	g.dataBlocks = (g.virtualSize + g.blockSize - 1) / g.blockSize
	g.bitmapBlocks = (g.dataBlocks + g.chunkRatio - 1) / g.chunkRatio
	if hasParent {
		g.totalEntries = g.bitmapBlocks * (g.chunkRatio + 1)
	} else {
		g.totalEntries = g.dataBlocks + (g.dataBlocks-1)/g.chunkRatio
	}
	g.sectorsPerBlk = g.blockSize / g.sectorSize
	return g
}

// payloadIndex is the BAT index of payload block b.
func (g *geometry) payloadIndex(b int64) int64 { return b + b/g.chunkRatio }

// bitmapIndex is the BAT index of the sector bitmap block of chunk c.
func (g *geometry) bitmapIndex(c int64) int64 { return c*(g.chunkRatio+1) + g.chunkRatio }

// batBytes is the size of the BAT region a new image needs.
func (g *geometry) batBytes() int64 { return alignUp(g.totalEntries*8, mib) }

// checkBAT validates entry i of the BAT against the file: a known state, and
// an offset whose block lies inside the file. fileSize is the physical size.
func (g *geometry) checkEntry(i int64, e uint64, fileSize int64, hasParent bool, batOff int64) error {
	eoff := batOff + 8*i
	st := batState(e)
	isBitmap := (i+1)%(g.chunkRatio+1) == 0
	if isBitmap {
		switch st {
		case bitmapNotPresent:
			return nil
		case bitmapPresent:
			if !hasParent {
				// Harmless, and written by some tools: ignored for
				// images without a parent.
				return nil
			}
			return checkExtent(i, eoff, batOffset(e), bitmapBlockSize, fileSize)
		}
		return formatErr(entryName(i), eoff, "sector bitmap state %d", st)
	}
	switch st {
	case payloadNotPresent, payloadUndefined, payloadZero, payloadUnmapped:
		return nil
	case payloadFullyPresent:
		return checkExtent(i, eoff, batOffset(e), g.blockSize, fileSize)
	case payloadPartiallyPresent:
		if !hasParent {
			return formatErr(entryName(i), eoff, "PARTIALLY_PRESENT in an image without a parent")
		}
		return checkExtent(i, eoff, batOffset(e), g.blockSize, fileSize)
	}
	return formatErr(entryName(i), eoff, "payload state %d", st)
}

func checkExtent(i, eoff, off, length, fileSize int64) error {
	// A block may not start in the first 1 MiB (headers) nor past the end of
	// the file. One that ends past the end reads as zeros there: files cut
	// short after a crash are repaired by the log's LastFileOffset, and
	// some writers do not extend the file over a final partial block.
	if off < mib || off >= fileSize {
		return formatErr(entryName(i), eoff, "block at %#x outside the file (%d bytes)", off, fileSize)
	}
	return nil
}

// entryName names BAT entry i in errors; built only when one is reported,
// since open checks every entry.
func entryName(i int64) string { return fmt.Sprintf("BAT entry %d", i) }
