package vhdx

import (
	"encoding/binary"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

// TestCorruptImages: damaged and unknown structures give clean errors that
// name the structure and its offset, and one bad copy of a redundant
// structure is survived.
func TestCorruptImages(t *testing.T) {
	dir := t.TempDir()
	good := filepath.Join(dir, "good.vhdx")
	im, err := Create(good, CreateOptions{Size: 8 << 20, BlockSize: 1 << 20})
	if err != nil {
		t.Fatal(err)
	}
	im.WriteAt([]byte("data"), 1<<20)
	im.Close()
	orig, _ := os.ReadFile(good)

	// refix recomputes the checksum of a structure after an edit.
	refix := func(b []byte, off, n int64) {
		binary.LittleEndian.PutUint32(b[off+4:], checksum(b[off:off+n], 4))
	}
	cases := []struct {
		name    string
		edit    func(b []byte) []byte
		wantErr error  // nil: must open
		wantMsg string // in the error
	}{
		{"header 1 checksum", func(b []byte) []byte { b[header1Offset+100] ^= 1; return b }, nil, ""},
		{"both header checksums", func(b []byte) []byte {
			b[header1Offset+100] ^= 1
			b[header2Offset+100] ^= 1
			return b
		}, ErrChecksum, "header 1 at offset 0x10000"},
		{"region table 1 checksum", func(b []byte) []byte { b[region1Offset+40] ^= 1; return b }, nil, ""},
		{"both region tables", func(b []byte) []byte {
			b[region1Offset+40] ^= 1
			b[region2Offset+40] ^= 1
			return b
		}, ErrChecksum, "region table 1 at offset 0x30000"},
		{"unknown required region", func(b []byte) []byte {
			for _, off := range []int64{region1Offset, region2Offset} {
				binary.LittleEndian.PutUint32(b[off+8:], 3)
				e := b[off+16+64:]
				copy(e, []byte("0123456789abcdef"))
				binary.LittleEndian.PutUint64(e[16:], 6*mib)
				binary.LittleEndian.PutUint32(e[24:], mib)
				binary.LittleEndian.PutUint32(e[28:], 1)
				refix(b, off, regionTableSize)
			}
			return b
		}, ErrUnsupported, "unknown required region"},
		{"unknown required metadata item", func(b []byte) []byte {
			m := b[newMetaOffset:]
			n := binary.LittleEndian.Uint16(m[10:])
			binary.LittleEndian.PutUint16(m[10:], n+1)
			e := m[32+32*int(n):]
			copy(e, []byte("fedcba9876543210"))
			binary.LittleEndian.PutUint32(e[16:], metaTableSize+512)
			binary.LittleEndian.PutUint32(e[20:], 8)
			binary.LittleEndian.PutUint32(e[24:], 4) // IsRequired
			return b
		}, ErrUnsupported, "unknown required item"},
		{"block size not a power of two", func(b []byte) []byte {
			binary.LittleEndian.PutUint32(b[newMetaOffset+metaTableSize:], 3<<20)
			return b
		}, ErrFormat, "block size"},
		{"BAT entry past the end", func(b []byte) []byte {
			binary.LittleEndian.PutUint64(b[newBATOffset+16:], batEntry(payloadFullyPresent, 1<<40))
			return b
		}, ErrFormat, "BAT entry 2 at offset 0x300010"},
		// Regions are checked against each other, the log and the file,
		// known or not (an optional region still holds someone's data).
		{"optional region over the BAT", func(b []byte) []byte {
			return addRegionEntry(b, newBATOffset, mib, false)
		}, ErrFormat, "overlaps entry 0"},
		{"optional region over the log", func(b []byte) []byte {
			return addRegionEntry(b, newLogOffset, mib, false)
		}, ErrFormat, "overlaps the log"},
		{"optional region past the end", func(b []byte) []byte {
			return addRegionEntry(b, 64*mib, mib, false)
		}, ErrFormat, "beyond end of file"},
		// Blocks may not lie in the structures, over each other, or past
		// the end of the file, where writes would destroy them.
		{"BAT entry into the log", func(b []byte) []byte {
			binary.LittleEndian.PutUint64(b[newBATOffset+16:], batEntry(payloadFullyPresent, newLogOffset))
			return b
		}, ErrFormat, "BAT entry 2 at offset 0x300010: [0x100000, +0x100000) overlaps the log"},
		{"BAT entry into the metadata", func(b []byte) []byte {
			binary.LittleEndian.PutUint64(b[newBATOffset+16:], batEntry(payloadFullyPresent, newMetaOffset))
			return b
		}, ErrFormat, "overlaps the metadata region"},
		{"BAT entry into the BAT", func(b []byte) []byte {
			binary.LittleEndian.PutUint64(b[newBATOffset+16:], batEntry(payloadFullyPresent, newBATOffset))
			return b
		}, ErrFormat, "overlaps the BAT region"},
		{"BAT entry into an optional region", func(b []byte) []byte {
			b = append(b, make([]byte, 2*mib)...)
			binary.LittleEndian.PutUint64(b[newBATOffset+16:], batEntry(payloadFullyPresent, 6*mib))
			return addRegionEntry(b, 5*mib, 2*mib, false)
		}, ErrFormat, "overlaps region"},
		{"two BAT entries, one block", func(b []byte) []byte {
			copy(b[newBATOffset+16:], b[newBATOffset+8:newBATOffset+16])
			return b
		}, ErrFormat, "BAT entry 2 at offset 0x300010: [0x400000, +0x100000) overlaps BAT entry 1"},
		{"block cut off by the end of the file", func(b []byte) []byte { return b[:len(b)-mib/2] }, ErrFormat, "cut off by the end of the file"},
		{"truncated", func(b []byte) []byte { return b[:newBATOffset+100] }, ErrFormat, "beyond end of file"},
		{"tiny", func(b []byte) []byte { return b[:1000] }, ErrFormat, "too short"},
		{"not a vhdx", func(b []byte) []byte { copy(b, "conectix"); return b }, ErrFormat, "not a VHDX"},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			b := c.edit(append([]byte(nil), orig...))
			path := filepath.Join(t.TempDir(), "x.vhdx")
			os.WriteFile(path, b, 0o644)
			im, err := Open(path, OpenOptions{ReadOnly: true})
			if c.wantErr == nil {
				if err != nil {
					t.Fatalf("one bad copy must be survived: %v", err)
				}
				buf := make([]byte, 4)
				im.ReadAt(buf, 1<<20)
				im.Close()
				if string(buf) != "data" {
					t.Errorf("read %q", buf)
				}
				return
			}
			if err == nil {
				im.Close()
				t.Fatal("opened")
			}
			if !errors.Is(err, c.wantErr) || !strings.Contains(err.Error(), c.wantMsg) {
				t.Errorf("error %q, want %v containing %q", err, c.wantErr, c.wantMsg)
			}
			if probs, err := Check(path, false); err != nil || len(probs) == 0 {
				t.Errorf("check: %v %v", probs, err)
			}
		})
	}
}

// addRegionEntry adds a region entry to both region tables of b.
func addRegionEntry(b []byte, off, length int64, required bool) []byte {
	for _, at := range []int64{region1Offset, region2Offset} {
		n := binary.LittleEndian.Uint32(b[at+8:])
		binary.LittleEndian.PutUint32(b[at+8:], n+1)
		e := b[at+16+32*int64(n):]
		copy(e, []byte("0123456789abcdef"))
		binary.LittleEndian.PutUint64(e[16:], uint64(off))
		binary.LittleEndian.PutUint32(e[24:], uint32(length))
		if required {
			binary.LittleEndian.PutUint32(e[28:], 1)
		}
		binary.LittleEndian.PutUint32(b[at+4:], checksum(b[at:at+regionTableSize], 4))
	}
	return b
}
