package faulttest

import (
	"bytes"
	"fmt"
)

// Model is the byte model of a disk under crashes: what every sector may
// read after the disk stopped anywhere. A sector reads what the last
// successful flush acknowledged, or one of the versions written to it
// since (a crash keeps any part of unflushed writes, sector by sector,
// each sector whole: the formats write whole sectors).
type Model struct {
	acked   []byte
	pending map[int64][][]byte // versions written since the last flush, by sector
	sector  int64
}

// NewModel models a disk whose content, all acknowledged, is initial
// (kept, not copied), checked in sectors of sector bytes.
func NewModel(initial []byte, sector int) *Model {
	return &Model{acked: initial, pending: map[int64][][]byte{}, sector: int64(sector)}
}

// Write records a write (call it before issuing the write: a write that
// fails may still have landed in part). Zeroing and trimming are writes
// of zeros.
func (m *Model) Write(off int64, p []byte) {
	for s := off / m.sector; s*m.sector < off+int64(len(p)); s++ {
		lo, hi := s*m.sector, (s+1)*m.sector
		v := make([]byte, m.sector)
		// The newest version a sector could hold: a partial write keeps
		// the rest of the sector as it was last written.
		copy(v, m.newest(s))
		copy(v[max(off-lo, 0):], p[max(lo-off, 0):min(hi-off, int64(len(p)))])
		m.pending[s] = append(m.pending[s], v)
	}
}

// newest is the last version written to sector s.
func (m *Model) newest(s int64) []byte {
	if v := m.pending[s]; len(v) > 0 {
		return v[len(v)-1]
	}
	return m.acked[s*m.sector : (s+1)*m.sector]
}

// Flushed records a successful flush: every write so far is acknowledged.
func (m *Model) Flushed() {
	for s, v := range m.pending {
		copy(m.acked[s*m.sector:], v[len(v)-1])
	}
	clear(m.pending)
}

// Acked is the content every acknowledged write makes (not a copy).
func (m *Model) Acked() []byte { return m.acked }

// Check reports the first sector of got (the whole disk as read) that
// reads neither what was acknowledged nor a version written since.
func (m *Model) Check(got []byte) error {
	if len(got) != len(m.acked) {
		return fmt.Errorf("the disk reads %d bytes, the model holds %d", len(got), len(m.acked))
	}
	for lo := int64(0); lo < int64(len(got)); lo += m.sector {
		hi := min(lo+m.sector, int64(len(got)))
		if bytes.Equal(got[lo:hi], m.acked[lo:hi]) {
			continue
		}
		ok := false
		for _, v := range m.pending[lo/m.sector] {
			if bytes.Equal(got[lo:hi], v[:hi-lo]) {
				ok = true
				break
			}
		}
		if !ok {
			if len(m.pending[lo/m.sector]) == 0 {
				return fmt.Errorf("sector at %#x does not read what was acknowledged (and nothing was written to it since)", lo)
			}
			return fmt.Errorf("sector at %#x reads neither what was acknowledged nor any of the %d versions written since", lo, len(m.pending[lo/m.sector]))
		}
	}
	return nil
}

// Settle takes got, once Check accepted it, as the acknowledged content:
// after a crash and a reopen, what the disk reads is what it holds.
func (m *Model) Settle(got []byte) {
	copy(m.acked, got)
	clear(m.pending)
}
