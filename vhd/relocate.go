package vhd

import (
	"fmt"
)

// locatorData is the data of one parent locator to write.
type locatorData struct {
	code uint32
	data []byte
}

// relocate commits a new dynamic header h, the BAT batRaw (whole sectors)
// and, when locs is not nil, new parent locators in place of h's, together
// with the footer ft, following "Moving the header" in the package doc:
//
//  1. write the header, the locator data and the BAT where the next block
//     would go, and the current footer behind them; sync;
//  2. write ft, pointing at the new header, over that footer; sync: this
//     is the commit;
//  3. write ft over the copy at offset 0; sync.
//
// It fills in h's table and locator offsets and ft's data offset. The
// caller holds im.mu exclusively and has flushed; on error it must mark
// the image failed (the in-memory state is the old one, the file holds
// the old or the new one).
func (im *Image) relocate(h header, locs []locatorData, batRaw []byte, ft footer) error {
	return im.relocateAt(h, locs, batRaw, ft, alignUp(im.nextAlloc, SectorSize))
}

// relocatedSize is the space relocate needs for a header with locs and
// batRaw.
func relocatedSize(locs []locatorData, batRaw []byte) int64 {
	n := int64(headerSize + len(batRaw))
	for _, l := range locs {
		n += alignUp(int64(len(l.data)), SectorSize)
	}
	return n
}

// relocateAt is relocate with the new structures at hdrOff: where the
// next block would go (relocate), or inside the file, in space nothing
// refers to, of relocatedSize bytes (Optimize). Inside the file, step 1
// writes no footer behind them (the end footer stays where it is) and
// step 2 commits over the end footer.
func (im *Image) relocateAt(h header, locs []locatorData, batRaw []byte, ft footer, hdrOff int64) error {
	appending := hdrOff == alignUp(im.nextAlloc, SectorSize)
	pos := hdrOff + headerSize
	buf := make([]byte, headerSize, headerSize+len(batRaw))
	var decoded []Locator
	if locs != nil {
		h.Locators = [8]locatorEntry{}
		for i, l := range locs {
			space := alignUp(int64(len(l.data)), SectorSize)
			// Data space in bytes, as Create and Hyper-V write it.
			h.Locators[i] = locatorEntry{Code: l.code, DataSpace: uint32(space), DataLength: uint32(len(l.data)), DataOffset: uint64(pos)}
			buf = append(buf, l.data...)
			buf = append(buf, make([]byte, space-int64(len(l.data)))...)
			p, err := decodeLocatorPath(l.code, l.data)
			if err != nil {
				return err
			}
			decoded = append(decoded, Locator{Platform: platformName(l.code), Path: p, Offset: pos, Length: uint32(len(l.data))})
			pos += space
		}
	}
	// The BAT goes last: readers that place new blocks after the BAT and
	// the blocks they know of (QEMU) then never write over the header.
	h.TableOffset = uint64(pos)
	buf = append(buf, batRaw...)
	end := pos + int64(len(batRaw))
	hb := h.encode()
	copy(buf, hb[:])
	ft.DataOffset = uint64(hdrOff)
	raw := ft.encode()

	footerAt := im.footerAt
	if appending {
		footerAt = end
	}
	// 1. Nothing on disk points at the new structures yet.
	if _, err := im.f.WriteAt(buf, hdrOff); err != nil {
		return err
	}
	if appending {
		if _, err := im.f.WriteAt(im.footerRaw[:], end); err != nil {
			return err
		}
	}
	if err := im.f.Sync(); err != nil {
		return err
	}
	// 2. Commit: the end footer is what Open reads.
	if _, err := im.f.WriteAt(raw[:], footerAt); err != nil {
		return err
	}
	if err := im.f.Sync(); err != nil {
		return err
	}
	// 3. The copy a damaged end falls back to.
	if _, err := im.f.WriteAt(raw[:], 0); err != nil {
		return err
	}
	if err := im.f.Sync(); err != nil {
		return fmt.Errorf("syncing the footer copy: %w", err)
	}

	im.hdr, im.hdrOff = h, hdrOff
	im.ft, im.footerRaw = ft, raw
	im.bat.off, im.bat.raw = int64(h.TableOffset), batRaw
	im.nextAlloc, im.footerAt = footerAt, footerAt
	if locs != nil {
		im.locators = decoded
	}
	return nil
}
