// Package partition reads the partition table at the start of a disk —
// an MBR, or a GPT behind its protective MBR — to learn where the
// partitions end, and rewrites what a GPT keeps at the disk's end for a
// new disk size, so that a disk can shrink to the end of its last
// partition (Resize-VHD -ToMinimumSize) and still hold a valid table.
//
// A GPT disk, in logical sectors (LBA; 512 or 4096 bytes):
//
//	LBA 0             protective MBR: one partition of type 0xEE over the disk
//	LBA 1             primary GPT header ─────────── AlternateLBA ──┐
//	LBA 2 …           partition entry array (usually 128 × 128 bytes)│
//	FirstUsableLBA    ┐                                               │
//	  …               │ the partitions                                │
//	LastUsableLBA     ┘                                               │
//	…                 backup entry array (the same entries)           │
//	last LBA          backup GPT header  ◄──────────────────────────────┘
//
// An MBR disk has its table in the first 512 bytes of LBA 0: four entries,
// one of which may be an extended partition that holds the logical
// partitions; it counts here as a whole, since they lie inside it.
//
// Every number read is checked before it is used: signatures, both CRC32s
// of a GPT, the header's size, the entry array's size (at most
// MaxEntryArray bytes) and place, and each partition's bounds against the
// usable range and the disk. A table that fails a check is refused with a
// *FormatError; nothing of it is used.
package partition

import (
	"errors"
	"fmt"
	"io"
)

// Errors from Read wrap one of these: errors.Is(err, ErrNoTable) means the
// disk holds no partition table at all (nothing to shrink to).
var (
	ErrNoTable     = errors.New("no partition table")
	ErrFormat      = errors.New("malformed partition table")
	ErrChecksum    = errors.New("partition table checksum mismatch")
	ErrUnsupported = errors.New("unsupported partition table")
	// ErrSectorSize: the GPT is laid out for the other sector size (512
	// or 4096) than the one Read was given.
	ErrSectorSize = errors.New("partition table of another sector size")
)

// FormatError describes a structure of the table that cannot be used.
type FormatError struct {
	Structure string // "MBR entry 2", "GPT header", "GPT entry 5", ...
	Offset    int64  // disk offset of the structure
	Msg       string
	Err       error // ErrNoTable, ErrFormat, ErrChecksum, ErrUnsupported or ErrSectorSize
}

func (e *FormatError) Error() string {
	return fmt.Sprintf("partition: %s at offset %#x: %s", e.Structure, e.Offset, e.Msg)
}

func (e *FormatError) Unwrap() error { return e.Err }

func formatErr(kind error, structure string, off int64, format string, args ...any) error {
	return &FormatError{Structure: structure, Offset: off, Msg: fmt.Sprintf(format, args...), Err: kind}
}

// Kind is the kind of a partition table.
type Kind int

// The kinds of table Read knows.
const (
	MBR Kind = 1 + iota
	GPT
)

func (k Kind) String() string {
	switch k {
	case MBR:
		return "MBR"
	case GPT:
		return "GPT"
	}
	return fmt.Sprintf("Kind(%d)", int(k))
}

// Partition is one used entry of a table.
type Partition struct {
	// Number is the partition's number as fdisk and sgdisk show it: the
	// MBR slot (1–4) or the GPT entry's index plus one.
	Number int
	Start  int64  // disk offset of its first byte
	Length int64  // bytes
	Type   string // MBR: the type byte, "0x83"; GPT: the type GUID
	Name   string // GPT: the partition's name
}

// End is the disk offset just past the partition.
func (p Partition) End() int64 { return p.Start + p.Length }

// Table is a disk's partition table as Read found it.
type Table struct {
	Kind       Kind
	SectorSize int   // the logical sector size its LBAs count in
	DiskSize   int64 // the disk size it was read and checked against
	// Partitions holds the used entries in table order. A GPT disk's
	// list holds its GPT partitions and, of a hybrid MBR, the MBR entries
	// other than the protective one.
	Partitions []Partition

	sector0 []byte // LBA 0 as read: the MBR in its first 512 bytes
	gpt     *gptTable
}

// MaxEntryArray bounds a GPT's partition entry array in bytes (the usual
// one is 16 KiB): a larger one is refused, whatever its header claims.
const MaxEntryArray = 1 << 20

// Read reads the partition table of a disk of diskSize bytes whose
// logical sectors are sectorSize bytes (512 or 4096; 0 when the disk does
// not say, as a raw file does not: 512, unless the GPT is laid out for
// 4096). The protective MBR of a GPT disk leads to the GPT; a GPT
// signature at LBA 1 is read even without one. A disk without a table (no
// MBR signature, or a file system's boot sector in LBA 0) gives an error
// wrapping ErrNoTable; a GPT laid out for the other sector size one
// wrapping ErrSectorSize.
func Read(r io.ReaderAt, diskSize int64, sectorSize int) (*Table, error) {
	if sectorSize == 0 {
		t, err := Read(r, diskSize, 512)
		if errors.Is(err, ErrSectorSize) {
			return Read(r, diskSize, 4096)
		}
		return t, err
	}
	if sectorSize != 512 && sectorSize != 4096 {
		return nil, fmt.Errorf("partition: %w: sector size %d is neither 512 nor 4096", ErrUnsupported, sectorSize)
	}
	if diskSize < 2*int64(sectorSize) || diskSize%int64(sectorSize) != 0 {
		return nil, fmt.Errorf("partition: %w: a %d-byte disk of %d-byte sectors holds no table", ErrNoTable, diskSize, sectorSize)
	}
	t := &Table{SectorSize: sectorSize, DiskSize: diskSize, sector0: make([]byte, sectorSize)}
	if err := readFull(r, t.sector0, 0); err != nil {
		return nil, err
	}
	m, mbrErr := parseMBR(t.sector0[:mbrSize], t.totalSectors(), sectorSize)
	protective := mbrErr == nil && m.protective >= 0
	if mbrErr != nil && !errors.Is(mbrErr, ErrNoTable) {
		return nil, mbrErr
	}
	if mbrErr == nil && !protective {
		t.Kind = MBR
		t.Partitions = m.partitions
		if err := t.checkEnds(); err != nil {
			return nil, err
		}
		return t, nil
	}
	// A GPT: behind a protective MBR, or found by its signature.
	g, err := readGPT(r, t)
	switch {
	case err == nil:
	case !protective && errors.Is(err, ErrNoTable):
		return nil, mbrErr // neither table: say why LBA 0 is none
	case errors.Is(err, ErrNoTable):
		return nil, formatErr(ErrFormat, "GPT header", int64(sectorSize), "the protective MBR announces a GPT, but LBA 1 holds none")
	default:
		return nil, err
	}
	t.Kind = GPT
	t.gpt = g
	t.Partitions = g.partitions
	if protective {
		t.Partitions = append(t.Partitions, m.partitions...) // a hybrid MBR's others
	}
	if err := t.checkEnds(); err != nil {
		return nil, err
	}
	return t, nil
}

// checkEnds refuses partitions that run past the disk's end: a table for
// some other disk, or for this disk before a careless shrink.
func (t *Table) checkEnds() error {
	for _, p := range t.Partitions {
		if p.End() > t.DiskSize {
			return fmt.Errorf("partition: %w: partition %d ends at byte %d, past the disk's end at %d", ErrFormat, p.Number, p.End(), t.DiskSize)
		}
	}
	return nil
}

func (t *Table) totalSectors() int64 { return t.DiskSize / int64(t.SectorSize) }

// End is the disk offset just past the last partition: 0 for a table
// without partitions.
func (t *Table) End() int64 {
	var end int64
	for _, p := range t.Partitions {
		end = max(end, p.End())
	}
	return end
}

// Last is the partition that ends last; ok is false when there is none.
func (t *Table) Last() (p Partition, ok bool) {
	for _, q := range t.Partitions {
		if !ok || q.End() > p.End() {
			p, ok = q, true
		}
	}
	return p, ok
}

// MinimumSize is the smallest disk size that holds every partition and,
// for a GPT, the backup entry array and header after them, rounded up to
// a multiple of align (a multiple of the sector size; 0 means the sector
// size). It may exceed DiskSize when DiskSize is not such a multiple.
func (t *Table) MinimumSize(align int64) int64 {
	ss := int64(t.SectorSize)
	if align <= 0 {
		align = ss
	}
	end := max(t.End(), ss) // at least the MBR's sector
	if g := t.gpt; g != nil {
		// The backup goes after the last usable sector, which comes after
		// the primary entry array even without partitions.
		end = max(end, int64(g.firstUsable)*ss) + g.backupSectors()*ss
	}
	return (end + align - 1) / align * align
}

// Disk is what SetDiskSize writes through: the disk's bytes, and Flush,
// which makes what was written durable (disk.Image has both).
type Disk interface {
	io.WriterAt
	Flush() error
}

// SetDiskSize rewrites what the table keeps about the disk's size so that
// it is valid for a disk of size bytes, no more than DiskSize and at least
// MinimumSize(0). A shrink calls it before cutting the disk, a grow after
// making the disk larger (and reading the table again). An MBR records no
// size: nothing is written. For a GPT it is done as Hyper-V does it, in
// an order that keeps the primary header valid and naming a valid backup
// at every step (unless an old backup header lies where the new entries
// go, a disk grown without moving it: then only the primary is valid
// until step 2):
//
//  1. the backup entry array and header are written at the new end (still
//     inside the disk, past every partition), then flushed;
//  2. the primary header, in one sector write, points at them and takes
//     the new last usable LBA, and a protective MBR's 0xEE entry is made
//     to end at the new last LBA; flushed;
//  3. a backup header the old table had inside the new size but elsewhere
//     (a disk grown before without moving it) is zeroed, so that no
//     tool finds two; flushed.
//
// The old backup at the old end stays until the disk is cut: a crash
// before the cut leaves a table whose primary header names the new
// backup, which tools accept as a disk with space past the table;
// running the shrink again finishes it.
func (t *Table) SetDiskSize(d Disk, size int64) error {
	ss := int64(t.SectorSize)
	if size%ss != 0 || size > t.DiskSize || size < t.MinimumSize(ss) {
		return fmt.Errorf("partition: %w: a disk size of %d bytes for this table must be a multiple of %d from %d to %d",
			ErrUnsupported, size, ss, t.MinimumSize(ss), t.DiskSize)
	}
	if t.gpt == nil {
		return nil
	}
	return t.gpt.setDiskSize(d, t, size/ss)
}

// readFull reads len(p) bytes at off; a disk that ends early has no
// table there.
func readFull(r io.ReaderAt, p []byte, off int64) error {
	n, err := r.ReadAt(p, off)
	if n == len(p) {
		return nil
	}
	if err == nil || errors.Is(err, io.EOF) {
		err = io.ErrUnexpectedEOF
	}
	return fmt.Errorf("partition: reading %d bytes at offset %#x: %w", len(p), off, err)
}
