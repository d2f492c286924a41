package storage

import (
	"bytes"
	"errors"
	"io/fs"
	"math/rand/v2"
	"os"
	"slices"
	"testing"
)

// TestMemFSNames: name changes are in effect at once; a crash keeps the
// durable names and a prefix of the changes since the last SyncDir.
func TestMemFSNames(t *testing.T) {
	m := NewMemFS(map[string][]byte{"/d/a": []byte("A")})
	f, err := m.OpenFile("/d/b", os.O_RDWR|os.O_CREATE, 0o600)
	if err != nil {
		t.Fatal(err)
	}
	f.WriteAt([]byte("B"), 0)
	f.Sync()
	f.Close()
	if err := m.Rename("/d/b", "/d/a"); err != nil {
		t.Fatal(err)
	}
	if got := m.Names(); !slices.Equal(got, []string{"/d/a"}) {
		t.Fatalf("names %v", got)
	}
	if fi, err := m.Stat("/d/a"); err != nil || fi.Size() != 1 || fi.Mode() != 0o600 {
		t.Fatalf("stat %v %v", fi, err)
	}
	// Pending: create b, b->a (two changes). A crash keeps a prefix.
	seen := map[string]bool{}
	rng := rand.New(rand.NewPCG(1, 2))
	for range 100 {
		c := m.CrashClone(rng)
		a, _ := c.Bytes("/d/a")
		_, hasB := c.Bytes("/d/b")
		seen[string(a)+map[bool]string{true: "+b", false: ""}[hasB]] = true
	}
	// Only A, A with b, or B alone: never B with b still there.
	for k := range seen {
		if k != "A" && k != "A+b" && k != "B" {
			t.Fatalf("a crash left %q", k)
		}
	}
	if len(seen) != 3 {
		t.Fatalf("crash states %v", seen)
	}
	if err := m.SyncDir("/d"); err != nil {
		t.Fatal(err)
	}
	if c := m.CrashClone(rng); !slices.Equal(c.Names(), []string{"/d/a"}) {
		t.Fatalf("after SyncDir a crash left %v", c.Names())
	} else if b, _ := c.Bytes("/d/a"); string(b) != "B" {
		t.Fatalf("after SyncDir a crash left %q", b)
	}
	if err := m.Remove("/d/nothing"); !errors.Is(err, fs.ErrNotExist) {
		t.Fatal(err)
	}
	if _, err := m.OpenFile("/d/a", os.O_RDWR|os.O_CREATE|os.O_EXCL, 0o600); !errors.Is(err, fs.ErrExist) {
		t.Fatal(err)
	}
}

// TestMemFSFaults: one schedule over file I/O and name operations, open
// handles included; read-only handles refuse writes.
func TestMemFSFaults(t *testing.T) {
	m := NewMemFS(map[string][]byte{"/a": bytes.Repeat([]byte{1}, 4096)})
	ro, err := m.OpenFile("/a", os.O_RDONLY, 0)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := ro.WriteAt([]byte{2}, 0); err == nil {
		t.Fatal("a read-only handle took a write")
	}
	ff := &FaultFile{FailAt: 2}
	m.SetFaults(ff)
	buf := make([]byte, 10)
	if _, err := ro.ReadAt(buf, 0); err != nil { // op 0
		t.Fatal(err)
	}
	if err := m.Rename("/a", "/b"); err != nil { // op 1
		t.Fatal(err)
	}
	if err := m.SyncDir("/"); !errors.Is(err, ErrInjected) { // op 2
		t.Fatalf("op 2: %v", err)
	}
	if _, err := ro.ReadAt(buf, 0); err != nil || ff.Ops() != 4 {
		t.Fatalf("op 3: %v, %d ops", err, ff.Ops())
	}
	m.SetFaults(nil)
	if err := m.SyncDir("/"); err != nil {
		t.Fatal(err)
	}
}
