package faulttest

import (
	"bytes"
	"strings"
	"testing"
)

func TestModel(t *testing.T) {
	m := NewModel(make([]byte, 4096), 512)
	a := bytes.Repeat([]byte{0xa}, 1024)
	m.Write(512, a)
	m.Flushed()
	b := bytes.Repeat([]byte{0xb}, 700) // sector 2 whole, sector 3 in part
	m.Write(1024, b)
	c := bytes.Repeat([]byte{0xc}, 100) // sector 3 again, in part
	m.Write(1536, c)

	got := bytes.Clone(m.Acked())
	if err := m.Check(got); err != nil {
		t.Fatalf("the acknowledged state: %v", err)
	}
	// Sector 2 from b, sector 3 as b left it (0xb then zeros), then as c
	// left it (c over that).
	copy(got[1024:], b)
	if err := m.Check(got); err != nil {
		t.Fatalf("b landed: %v", err)
	}
	copy(got[1536:], c)
	if err := m.Check(got); err != nil {
		t.Fatalf("b and c landed: %v", err)
	}
	// c's sector without b's part of it: a version never written.
	mixed := bytes.Clone(m.Acked())
	copy(mixed[1536:], c)
	if err := m.Check(mixed); err == nil || !strings.Contains(err.Error(), "0x600") {
		t.Fatalf("a sector mixing versions: %v", err)
	}
	// An acknowledged sector lost.
	lost := bytes.Clone(m.Acked())
	lost[600] = 0
	if err := m.Check(lost); err == nil || !strings.Contains(err.Error(), "0x200") {
		t.Fatalf("an acknowledged sector lost: %v", err)
	}
	m.Settle(got)
	if err := m.Check(got); err != nil || len(m.pending) != 0 {
		t.Fatalf("after Settle: %v", err)
	}
}
