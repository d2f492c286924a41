package vhdx

import (
	"encoding/binary"
	"unicode/utf16"
)

// metaEntry is one row of the metadata table.
type metaEntry struct {
	ID            GUID
	Offset        uint32 // from the start of the metadata region
	Length        uint32
	IsUser        bool
	IsVirtualDisk bool
	IsRequired    bool
}

// Metadata table layout (first 64 KiB of the metadata region):
//
//	0 signature "metadata"  8 reserved (u16)  10 entry count (u16)  12 reserved
//	32 + 32*i: ItemId (16), Offset (u32), Length (u32), flags (u32:
//	           bit 0 IsUser, bit 1 IsVirtualDisk, bit 2 IsRequired), reserved
func parseMetaTable(b []byte, off int64, regionLen uint32) ([]metaEntry, error) {
	const name = "metadata table"
	if len(b) < metaTableSize {
		return nil, formatErr(name, off, "short read")
	}
	if binary.LittleEndian.Uint64(b[0:]) != sigMetadata {
		return nil, formatErr(name, off, "bad signature %q", b[0:8])
	}
	n := int(binary.LittleEndian.Uint16(b[10:]))
	if n > maxMetaEntries {
		return nil, formatErr(name, off+10, "%d entries, at most %d allowed", n, maxMetaEntries)
	}
	entries := make([]metaEntry, n)
	for i := range entries {
		e := b[32+32*i:]
		eoff := off + 32 + 32*int64(i)
		m := &entries[i]
		copy(m.ID[:], e[0:16])
		m.Offset = binary.LittleEndian.Uint32(e[16:])
		m.Length = binary.LittleEndian.Uint32(e[20:])
		flags := binary.LittleEndian.Uint32(e[24:])
		m.IsUser, m.IsVirtualDisk, m.IsRequired = flags&1 != 0, flags&2 != 0, flags&4 != 0
		if m.Length == 0 {
			if m.Offset != 0 {
				return nil, formatErr(name, eoff, "item %s: zero length at non-zero offset %#x", m.ID, m.Offset)
			}
			continue
		}
		if m.Length > mib {
			return nil, formatErr(name, eoff, "item %s is %d bytes, more than 1 MiB", m.ID, m.Length)
		}
		if m.Offset < metaTableSize || m.Offset > regionLen || m.Length > regionLen-m.Offset {
			return nil, formatErr(name, eoff, "item %s [%#x, +%#x) outside the metadata region (%#x bytes)", m.ID, m.Offset, m.Length, regionLen)
		}
		for j := range entries[:i] {
			if entries[j].ID == m.ID && entries[j].IsUser == m.IsUser {
				return nil, formatErr(name, eoff, "item %s listed twice", m.ID)
			}
		}
	}
	return entries, nil
}

func marshalMetaTable(entries []metaEntry) []byte {
	b := make([]byte, metaTableSize)
	binary.LittleEndian.PutUint64(b[0:], sigMetadata)
	binary.LittleEndian.PutUint16(b[10:], uint16(len(entries)))
	for i, m := range entries {
		e := b[32+32*i:]
		copy(e[0:], m.ID[:])
		binary.LittleEndian.PutUint32(e[16:], m.Offset)
		binary.LittleEndian.PutUint32(e[20:], m.Length)
		var flags uint32
		if m.IsUser {
			flags |= 1
		}
		if m.IsVirtualDisk {
			flags |= 2
		}
		if m.IsRequired {
			flags |= 4
		}
		binary.LittleEndian.PutUint32(e[24:], flags)
	}
	return b
}

// params are the decoded system metadata items.
type params struct {
	BlockSize          uint32
	LeaveAllocated     bool
	HasParent          bool
	VirtualSize        uint64
	DiskID             GUID
	LogicalSectorSize  uint32
	PhysicalSectorSize uint32
	Locator            *parentLocator // nil unless HasParent
}

// parseParams decodes the known items, read through read, and checks them
// against the spec; off is the metadata region's file offset. An unknown
// item marked required refuses with ErrUnsupported.
func parseParams(entries []metaEntry, read func(metaEntry) ([]byte, error), off int64) (params, error) {
	var p params
	item := func(id GUID, size int) ([]byte, int64, error) {
		for _, e := range entries {
			if e.ID != id || e.IsUser {
				continue
			}
			ioff := off + int64(e.Offset)
			if size > 0 && int(e.Length) != size {
				return nil, ioff, formatErr("metadata item "+itemName(id), ioff, "length %d, want %d", e.Length, size)
			}
			b, err := read(e)
			return b, ioff, err
		}
		return nil, off, formatErr("metadata item "+itemName(id), off, "missing")
	}
	for _, e := range entries {
		if e.IsRequired && itemName(e.ID) == "" {
			return p, unsupportedErr("metadata table", off, "unknown required item %s", e.ID)
		}
	}
	b, ioff, err := item(itemFileParameters, 8)
	if err != nil {
		return p, err
	}
	p.BlockSize = binary.LittleEndian.Uint32(b[0:])
	flags := binary.LittleEndian.Uint32(b[4:])
	p.LeaveAllocated, p.HasParent = flags&1 != 0, flags&2 != 0
	if p.BlockSize < minBlockSize || p.BlockSize > maxBlockSize || p.BlockSize&(p.BlockSize-1) != 0 {
		return p, formatErr("file parameters", ioff, "block size %d is not a power of two in [1 MiB, 256 MiB]", p.BlockSize)
	}
	if b, ioff, err = item(itemLogicalSectorSize, 4); err != nil {
		return p, err
	}
	p.LogicalSectorSize = binary.LittleEndian.Uint32(b)
	if p.LogicalSectorSize != 512 && p.LogicalSectorSize != 4096 {
		return p, formatErr("logical sector size", ioff, "%d is neither 512 nor 4096", p.LogicalSectorSize)
	}
	if b, ioff, err = item(itemPhysicalSectorSize, 4); err != nil {
		return p, err
	}
	p.PhysicalSectorSize = binary.LittleEndian.Uint32(b)
	if p.PhysicalSectorSize != 512 && p.PhysicalSectorSize != 4096 {
		return p, formatErr("physical sector size", ioff, "%d is neither 512 nor 4096", p.PhysicalSectorSize)
	}
	if b, ioff, err = item(itemVirtualDiskSize, 8); err != nil {
		return p, err
	}
	p.VirtualSize = binary.LittleEndian.Uint64(b)
	if p.VirtualSize == 0 || p.VirtualSize > MaxVirtualSize || p.VirtualSize%uint64(p.LogicalSectorSize) != 0 {
		return p, formatErr("virtual disk size", ioff, "%d is not a multiple of the sector size in (0, 64 TiB]", p.VirtualSize)
	}
	if b, _, err = item(itemVirtualDiskID, 16); err != nil {
		return p, err
	}
	copy(p.DiskID[:], b)
	if p.HasParent {
		if b, ioff, err = item(itemParentLocator, 0); err != nil {
			return p, err
		}
		loc, err := parseParentLocator(b, ioff)
		if err != nil {
			return p, err
		}
		p.Locator = &loc
	}
	return p, nil
}

func itemName(id GUID) string {
	switch id {
	case itemFileParameters:
		return "file parameters"
	case itemVirtualDiskSize:
		return "virtual disk size"
	case itemVirtualDiskID:
		return "virtual disk id"
	case itemLogicalSectorSize:
		return "logical sector size"
	case itemPhysicalSectorSize:
		return "physical sector size"
	case itemParentLocator:
		return "parent locator"
	}
	return ""
}

// parentLocator is the decoded parent locator item: its key/value pairs in
// file order (keys are case-sensitive; values are UTF-16 strings).
type parentLocator struct {
	Type    GUID
	Entries []locatorEntry
}

type locatorEntry struct{ Key, Value string }

// Get returns the value of key.
func (l *parentLocator) Get(key string) (string, bool) {
	for _, e := range l.Entries {
		if e.Key == key {
			return e.Value, true
		}
	}
	return "", false
}

// Set sets key to value, adding it when absent.
func (l *parentLocator) Set(key, value string) {
	for i := range l.Entries {
		if l.Entries[i].Key == key {
			l.Entries[i].Value = value
			return
		}
	}
	l.Entries = append(l.Entries, locatorEntry{key, value})
}

// Parent locator layout:
//
//	0 LocatorType (GUID)  16 reserved (u16)  18 KeyValueCount (u16)
//	20 + 12*i: KeyOffset (u32), ValueOffset (u32), KeyLength (u16), ValueLength (u16)
//
// Offsets are from the start of the item; strings are UTF-16LE.
func parseParentLocator(b []byte, off int64) (parentLocator, error) {
	const name = "parent locator"
	var l parentLocator
	if len(b) < 20 {
		return l, formatErr(name, off, "%d bytes, shorter than its header", len(b))
	}
	copy(l.Type[:], b[0:16])
	if l.Type != locatorTypeVHDX {
		return l, unsupportedErr(name, off, "locator type %s", l.Type)
	}
	n := int(binary.LittleEndian.Uint16(b[18:]))
	if 20+12*n > len(b) {
		return l, formatErr(name, off+18, "%d entries do not fit in %d bytes", n, len(b))
	}
	str := func(o uint32, n uint16, eoff int64) (string, error) {
		if n == 0 || n%2 != 0 || uint64(o)+uint64(n) > uint64(len(b)) {
			return "", formatErr(name, eoff, "string [%#x, +%d) outside the %d-byte item or odd", o, n, len(b))
		}
		u := make([]uint16, n/2)
		for i := range u {
			u[i] = binary.LittleEndian.Uint16(b[int(o)+2*i:])
		}
		return string(utf16.Decode(u)), nil
	}
	l.Entries = make([]locatorEntry, n)
	for i := range l.Entries {
		e := b[20+12*i:]
		eoff := off + 20 + 12*int64(i)
		k, err := str(binary.LittleEndian.Uint32(e[0:]), binary.LittleEndian.Uint16(e[8:]), eoff)
		if err != nil {
			return l, err
		}
		v, err := str(binary.LittleEndian.Uint32(e[4:]), binary.LittleEndian.Uint16(e[10:]), eoff)
		if err != nil {
			return l, err
		}
		for _, prev := range l.Entries[:i] {
			if prev.Key == k {
				return l, formatErr(name, eoff, "key %q listed twice", k)
			}
		}
		l.Entries[i] = locatorEntry{k, v}
	}
	if _, ok := l.Get("parent_linkage"); !ok {
		return l, formatErr(name, off, "no parent_linkage")
	}
	return l, nil
}

func (l *parentLocator) marshal() []byte {
	n := len(l.Entries)
	b := make([]byte, 20+12*n)
	copy(b[0:], l.Type[:])
	binary.LittleEndian.PutUint16(b[18:], uint16(n))
	put := func(s string) (uint32, uint16) {
		o := uint32(len(b))
		for _, c := range utf16.Encode([]rune(s)) {
			b = binary.LittleEndian.AppendUint16(b, c)
		}
		return o, uint16(uint32(len(b)) - o)
	}
	for i, e := range l.Entries {
		ko, kl := put(e.Key)
		vo, vl := put(e.Value)
		h := b[20+12*i:]
		binary.LittleEndian.PutUint32(h[0:], ko)
		binary.LittleEndian.PutUint32(h[4:], vo)
		binary.LittleEndian.PutUint16(h[8:], kl)
		binary.LittleEndian.PutUint16(h[10:], vl)
	}
	return b
}
