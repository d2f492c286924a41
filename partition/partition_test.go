package partition

import (
	"bytes"
	"crypto/sha256"
	"encoding/binary"
	"encoding/json"
	"errors"
	"hash/crc32"
	"math/rand/v2"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	"github.com/vhdkit/vhdkit/internal/testenv"
)

// These tests build disks with the tools people partition with (sfdisk,
// sgdisk) and judge what SetDiskSize leaves with them (sgdisk -v,
// sfdisk --verify, fdisk -l).

func run(t testing.TB, stdin string, name string, args ...string) string {
	t.Helper()
	cmd := exec.Command(name, args...)
	cmd.Stdin = strings.NewReader(stdin)
	out, err := cmd.CombinedOutput()
	if err != nil {
		t.Fatalf("%s %s: %v\n%s", name, strings.Join(args, " "), err, out)
	}
	return string(out)
}

// fileDisk is an OS file as a Disk.
type fileDisk struct{ *os.File }

func (d fileDisk) Flush() error { return d.Sync() }

// newDisk makes a raw disk file of size bytes partitioned by the sfdisk
// script, with every partition filled with random bytes.
func newDisk(t *testing.T, size int64, script string) string {
	t.Helper()
	testenv.Tool(t, "sfdisk")
	path := filepath.Join(t.TempDir(), "disk.img")
	if err := os.WriteFile(path, nil, 0o600); err != nil {
		t.Fatal(err)
	}
	if err := os.Truncate(path, size); err != nil {
		t.Fatal(err)
	}
	run(t, script, "sfdisk", "-q", "--no-reread", "--no-tell-kernel", path)
	f, err := os.OpenFile(path, os.O_RDWR, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	for _, p := range sfdiskPartitions(t, path) {
		if p.Type == "5" || p.Type == "f" || p.Type == "85" {
			continue // an extended partition's EBRs are not ours to fill
		}
		buf := make([]byte, p.Size*512)
		r := rand.New(rand.NewPCG(uint64(p.Start), 1))
		for i := range buf {
			buf[i] = byte(r.Uint32())
		}
		if _, err := f.WriteAt(buf, p.Start*512); err != nil {
			t.Fatal(err)
		}
	}
	return path
}

type sfdiskPartition struct {
	Node  string
	Start int64
	Size  int64
	Type  string
}

// sfdiskPartitions lists what sfdisk --json sees in the image at path (512-byte sectors).
func sfdiskPartitions(t *testing.T, path string) []sfdiskPartition {
	t.Helper()
	var out struct {
		PartitionTable struct {
			Partitions []sfdiskPartition
		}
	}
	if err := json.Unmarshal([]byte(run(t, "", "sfdisk", "--json", path)), &out); err != nil {
		t.Fatal(err)
	}
	return out.PartitionTable.Partitions
}

// partitionsHash hashes the bytes of every partition sfdisk lists.
func partitionsHash(t *testing.T, path string, parts []sfdiskPartition) []byte {
	t.Helper()
	f, err := os.Open(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	h := sha256.New()
	for _, p := range parts {
		buf := make([]byte, p.Size*512)
		if _, err := f.ReadAt(buf, p.Start*512); err != nil {
			t.Fatalf("%s: %v", p.Node, err)
		}
		h.Write(buf)
	}
	return h.Sum(nil)
}

func readTable(t *testing.T, path string) *Table {
	t.Helper()
	f, err := os.Open(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	fi, _ := f.Stat()
	tab, err := Read(f, fi.Size(), 512)
	if err != nil {
		t.Fatal(err)
	}
	return tab
}

// shrink moves the table's end to its minimum (1 MiB aligned) and cuts
// the file there, as resize --to-minimum does.
func shrink(t *testing.T, path string) int64 {
	t.Helper()
	tab := readTable(t, path)
	size := tab.MinimumSize(1 << 20)
	f, err := os.OpenFile(path, os.O_RDWR, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	if err := tab.SetDiskSize(fileDisk{f}, size); err != nil {
		t.Fatal(err)
	}
	if err := f.Truncate(size); err != nil {
		t.Fatal(err)
	}
	return size
}

// verifyGPT asserts that sgdisk, sfdisk and fdisk find nothing wrong.
func verifyGPT(t *testing.T, path string) {
	t.Helper()
	if out := run(t, "", "sgdisk", "-v", path); !strings.Contains(out, "No problems found") {
		t.Errorf("sgdisk -v:\n%s", out)
	}
	verifyAny(t, path)
}

func verifyAny(t *testing.T, path string) {
	t.Helper()
	if out := run(t, "", "sfdisk", "--verify", path); !strings.Contains(out, "No errors detected") {
		t.Errorf("sfdisk --verify:\n%s", out)
	}
	if out := run(t, "", "fdisk", "-l", path); strings.Contains(strings.ToLower(out), "mismatch") || strings.Contains(out, "corrupt") {
		t.Errorf("fdisk -l:\n%s", out)
	}
}

func TestGPTFromSfdisk(t *testing.T) {
	testenv.Tool(t, "sgdisk")
	testenv.Tool(t, "fdisk")
	path := newDisk(t, 64<<20, "label: gpt\nsize=10M, name=boot\nsize=20M\n")
	parts := sfdiskPartitions(t, path)
	tab := readTable(t, path)
	if tab.Kind != GPT || len(tab.Partitions) != 2 {
		t.Fatalf("read %v with %d partitions, want GPT with 2", tab.Kind, len(tab.Partitions))
	}
	for i, p := range tab.Partitions {
		if p.Number != i+1 || p.Start != parts[i].Start*512 || p.Length != parts[i].Size*512 || p.Type != parts[i].Type {
			t.Errorf("partition %d: %+v, sfdisk says %+v", i+1, p, parts[i])
		}
	}
	if tab.Partitions[0].Name != "boot" {
		t.Errorf("name %q, want boot", tab.Partitions[0].Name)
	}
	// 2048 + 20480 + 40960 sectors of partitions end at 31 MiB; the
	// backup's 33 sectors follow: 32 MiB at 1 MiB alignment.
	if got := tab.End(); got != 31<<20 {
		t.Errorf("End %d, want %d", got, 31<<20)
	}
	if got := tab.MinimumSize(1 << 20); got != 32<<20 {
		t.Errorf("MinimumSize(1 MiB) %d, want %d", got, 32<<20)
	}
	if got := tab.MinimumSize(0); got != 31<<20+33*512 {
		t.Errorf("MinimumSize(0) %d, want %d", got, 31<<20+33*512)
	}

	before := partitionsHash(t, path, parts)
	for _, size := range []int64{32 << 20} {
		if got := shrink(t, path); got != size {
			t.Fatalf("shrunk to %d, want %d", got, size)
		}
	}
	verifyGPT(t, path)
	if got := sfdiskPartitions(t, path); len(got) != 2 || got[0] != parts[0] || got[1] != parts[1] {
		t.Errorf("after the shrink sfdisk lists %+v, want %+v", got, parts)
	}
	if !bytes.Equal(partitionsHash(t, path, parts), before) {
		t.Error("the partitions' bytes changed")
	}
	// Shrinking again to the same size changes nothing and stays valid.
	shrink(t, path)
	verifyGPT(t, path)
}

// Without SetDiskSize a cut disk is what sgdisk complains about: the
// check above would catch a shrink that dropped the backup.
func TestGPTCutWithoutMoveIsBroken(t *testing.T) {
	testenv.Tool(t, "sgdisk")
	path := newDisk(t, 64<<20, "label: gpt\n,10M\n,20M\n")
	if err := os.Truncate(path, 32<<20); err != nil {
		t.Fatal(err)
	}
	if out := run(t, "", "sgdisk", "-v", path); strings.Contains(out, "No problems found") {
		t.Fatalf("sgdisk -v finds no problem in a cut disk:\n%s", out)
	}
	f, _ := os.Open(path)
	defer f.Close()
	if _, err := Read(f, 32<<20, 512); !errors.Is(err, ErrFormat) {
		t.Fatalf("Read of a GPT cut without moving its backup: %v, want ErrFormat", err)
	}
}

// A GPT whose backup is not at the end (a disk grown by a tool that did
// not move it) shrinks to a valid table too, and an old backup header
// left inside the new size is cleared.
func TestGPTGrownThenShrunk(t *testing.T) {
	testenv.Tool(t, "sgdisk")
	path := newDisk(t, 32<<20, "label: gpt\n,10M\n,20M\n")
	parts := sfdiskPartitions(t, path)
	before := partitionsHash(t, path, parts)
	// Grown as truncate grows it: the backup stays at 32 MiB - 512.
	if err := os.Truncate(path, 96<<20); err != nil {
		t.Fatal(err)
	}
	tab := readTable(t, path)
	oldBackup := tab.gpt.alternate
	if oldBackup != 32<<20/512-1 {
		t.Fatalf("backup header at LBA %d, want %d", oldBackup, 32<<20/512-1)
	}
	// Move the table's end to 64 MiB: the old backup at 32 MiB - 512 is
	// inside the new size and must not remain.
	f, err := os.OpenFile(path, os.O_RDWR, 0)
	if err != nil {
		t.Fatal(err)
	}
	if err := tab.SetDiskSize(fileDisk{f}, 64<<20); err != nil {
		t.Fatal(err)
	}
	f.Truncate(64 << 20)
	sig := make([]byte, 8)
	f.ReadAt(sig, int64(oldBackup)*512)
	f.Close()
	if string(sig) == gptSignature {
		t.Error("the old backup header is still inside the disk")
	}
	verifyGPT(t, path)
	if !bytes.Equal(partitionsHash(t, path, parts), before) {
		t.Error("the partitions' bytes changed")
	}
}

// A hybrid MBR (sgdisk -h): its 0xEE entry covers only the GPT's own
// sectors and another entry mirrors GPT partition 1; both stay as they
// are, and the disk shrinks to a table sgdisk accepts.
func TestGPTHybrid(t *testing.T) {
	testenv.Tool(t, "sgdisk")
	testenv.Tool(t, "fdisk")
	path := newDisk(t, 64<<20, "label: gpt\n,10M\n,20M\n")
	run(t, "", "sgdisk", "-h", "1", path)
	parts := sfdiskPartitions(t, path)
	before := partitionsHash(t, path, parts)
	mbrBefore, _ := os.ReadFile(path)
	mbrBefore = mbrBefore[:512]
	tab := readTable(t, path)
	if tab.Kind != GPT || len(tab.Partitions) != 3 || tab.Partitions[2].Type != "0x83" {
		t.Fatalf("read %v %+v, want GPT with two partitions and the hybrid MBR's one", tab.Kind, tab.Partitions)
	}
	if got := shrink(t, path); got != 32<<20 {
		t.Fatalf("shrunk to %d, want %d", got, 32<<20)
	}
	verifyGPT(t, path)
	mbrAfter, _ := os.ReadFile(path)
	if !bytes.Equal(mbrAfter[:512], mbrBefore) {
		t.Error("the hybrid MBR changed")
	}
	if !bytes.Equal(partitionsHash(t, path, parts), before) {
		t.Error("the partitions' bytes changed")
	}
}

func TestMBRFromSfdisk(t *testing.T) {
	testenv.Tool(t, "fdisk")
	// Three primaries, then an extended partition to 57 MiB with two
	// logical ones that end before it does: the extended one counts.
	path := newDisk(t, 64<<20, "label: dos\n,8M,83\n,8M,7\n,5M,83\n,35M,5\n,5M,83\n,5M,82\n")
	parts := sfdiskPartitions(t, path)
	if len(parts) != 6 || parts[5].Start+parts[5].Size >= 57<<20/512 {
		t.Fatalf("sfdisk made %+v", parts)
	}
	tab := readTable(t, path)
	if tab.Kind != MBR || len(tab.Partitions) != 4 {
		t.Fatalf("read %v with %+v, want MBR with 4 primary entries", tab.Kind, tab.Partitions)
	}
	for i, p := range tab.Partitions {
		want := parts[i]
		if p.Start != want.Start*512 || p.Length != want.Size*512 || p.Type != "0x"+strings.Repeat("0", 2-len(want.Type))+want.Type {
			t.Errorf("partition %d: %+v, sfdisk says %+v", i+1, p, want)
		}
	}
	if got, want := tab.MinimumSize(1<<20), int64(57<<20); got != want {
		t.Fatalf("MinimumSize %d, want %d", got, want)
	}
	before := partitionsHash(t, path, parts)
	shrink(t, path)
	verifyAny(t, path)
	if got := sfdiskPartitions(t, path); len(got) != len(parts) {
		t.Errorf("after the shrink sfdisk lists %+v, want %+v", got, parts)
	}
	if !bytes.Equal(partitionsHash(t, path, parts), before) {
		t.Error("the partitions' bytes changed")
	}
}

// A 4096-byte-sector disk: its GPT counts in 4 KiB sectors. sfdisk
// partitions a loop device with that sector size; the table read as 512
// is refused, as 4096 it shrinks to a table sgdisk accepts.
func TestGPT4K(t *testing.T) {
	testenv.Tool(t, "sgdisk")
	testenv.Tool(t, "sfdisk")
	if os.Geteuid() != 0 {
		t.Skip("a 4096-byte-sector loop device needs root")
	}
	path := filepath.Join(t.TempDir(), "disk4k.img")
	os.WriteFile(path, nil, 0o600)
	os.Truncate(path, 64<<20)
	out, err := exec.Command("losetup", "-f", "--show", "-b", "4096", path).CombinedOutput()
	if err != nil {
		t.Skipf("no 4096-byte loop device here: %v: %s", err, out)
	}
	dev := strings.TrimSpace(string(out))
	run(t, "label: gpt\n,10M\n,20M\n", "sfdisk", "-q", "--no-reread", dev)
	run(t, "", "losetup", "-d", dev)

	f, err := os.OpenFile(path, os.O_RDWR, 0)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := Read(f, 64<<20, 512); !errors.Is(err, ErrSectorSize) || !strings.Contains(err.Error(), "4096-byte sectors") {
		t.Errorf("a 4K GPT read with 512-byte sectors: %v, want ErrSectorSize naming 4096-byte sectors", err)
	}
	if tab, err := Read(f, 64<<20, 0); err != nil || tab.SectorSize != 4096 {
		t.Errorf("a 4K GPT read with the sector size unknown: %+v, %v; want it read with 4096", tab, err)
	}
	tab, err := Read(f, 64<<20, 4096)
	if err != nil {
		t.Fatal(err)
	}
	// 256 + 2560 + 5120 sectors end at 31 MiB; the backup's 4 + 1 sectors
	// follow.
	if tab.End() != 31<<20 || tab.MinimumSize(0) != 31<<20+5*4096 {
		t.Fatalf("End %d, MinimumSize(0) %d", tab.End(), tab.MinimumSize(0))
	}
	size := tab.MinimumSize(1 << 20)
	if err := tab.SetDiskSize(fileDisk{f}, size); err != nil {
		t.Fatal(err)
	}
	f.Truncate(size)
	f.Close()

	out, err = exec.Command("losetup", "-f", "--show", "-r", "-b", "4096", path).CombinedOutput()
	if err != nil {
		t.Fatalf("losetup: %v: %s", err, out)
	}
	dev = strings.TrimSpace(string(out))
	defer run(t, "", "losetup", "-d", dev)
	if out := run(t, "", "sgdisk", "-v", dev); !strings.Contains(out, "No problems found") {
		t.Errorf("sgdisk -v:\n%s", out)
	}
	if out := run(t, "", "sfdisk", "--verify", dev); !strings.Contains(out, "No errors detected") {
		t.Errorf("sfdisk --verify:\n%s", out)
	}
}

// gptDisk builds a 4 MiB disk with a protective MBR and a GPT of two
// partitions, in memory, for the hostile cases.
func gptDisk() []byte { return gptDiskSized(4 << 20) }

// gptDiskSized builds a disk of size bytes with a protective MBR and a
// GPT of two partitions, at LBAs 2048–4095 and 4096–6143 (1 to 3 MiB).
func gptDiskSized(size int) []byte {
	const ss = 512
	d := make([]byte, size)
	total := uint64(len(d) / ss)
	m := d[mbrEntriesOffset:]
	m[4] = mbrTypeProtective
	binary.LittleEndian.PutUint32(m[8:], 1)
	binary.LittleEndian.PutUint32(m[12:], uint32(total-1))
	d[510], d[511] = 0x55, 0xAA
	entries := make([]byte, 128*128)
	for i, r := range [][2]uint64{{2048, 4095}, {4096, 6143}} {
		e := entries[i*128:]
		copy(e, "\xaf\x3d\xc6\x0f\x83\x84\x72\x47\x8e\x79\x3d\x69\xd8\x47\x7d\xe4") // Linux filesystem
		e[16] = byte(i + 1)
		binary.LittleEndian.PutUint64(e[32:], r[0])
		binary.LittleEndian.PutUint64(e[40:], r[1])
	}
	le := binary.LittleEndian
	h := make([]byte, ss)
	copy(h, gptSignature)
	le.PutUint32(h[8:], gptRevision1)
	le.PutUint32(h[12:], gptHeaderMin)
	le.PutUint64(h[offMyLBA:], 1)
	le.PutUint64(h[offAlternate:], total-1)
	le.PutUint64(h[offFirstUsable:], 34)
	le.PutUint64(h[offLastUsable:], total-34)
	le.PutUint64(h[offEntryLBA:], 2)
	le.PutUint32(h[80:], 128)
	le.PutUint32(h[84:], 128)
	le.PutUint32(h[88:], crc32.ChecksumIEEE(entries))
	le.PutUint32(h[offHeaderCRC:], headerCRC(h[:gptHeaderMin]))
	copy(d[ss:], h)
	copy(d[2*ss:], entries)
	g := &gptTable{ss: ss, arraySecs: 32, header: h, headerSize: gptHeaderMin, entries: entries}
	copy(d[(total-33)*ss:], entries)
	copy(d[(total-1)*ss:], g.headerFor(total-1, 1, total-34, total-33))
	return d
}

// resealHeader recomputes the primary header's CRC (and the entries' CRC)
// after a test changed them, so only the change itself is wrong.
func resealHeader(d []byte) {
	h := d[512:1024]
	le := binary.LittleEndian
	n, size := le.Uint32(h[80:]), le.Uint32(h[84:])
	if a := uint64(n) * uint64(size); a <= 1<<20 && 1024+a <= uint64(len(d)) {
		le.PutUint32(h[88:], crc32.ChecksumIEEE(d[1024:1024+a]))
	}
	hs := le.Uint32(h[12:])
	if hs < 92 || hs > 512 {
		hs = 92
	}
	le.PutUint32(h[offHeaderCRC:], headerCRC(h[:hs]))
}

// mbrOnly makes gptDisk's disk an MBR disk: one partition of type 0x83
// where the GPT's first is, no GPT header.
func mbrOnly(d []byte) {
	clear(d[512:1024])
	d[mbrEntriesOffset+4] = 0x83
	binary.LittleEndian.PutUint32(d[mbrEntriesOffset+8:], 2048)
	binary.LittleEndian.PutUint32(d[mbrEntriesOffset+12:], 2048)
}

func TestHostile(t *testing.T) {
	good := gptDisk()
	if tab, err := Read(bytes.NewReader(good), int64(len(good)), 512); err != nil || len(tab.Partitions) != 2 || tab.End() != 6144*512 {
		t.Fatalf("the good disk: %+v, %v", tab, err)
	}
	if _, err := Read(bytes.NewReader(good), int64(len(good)), 4096); !errors.Is(err, ErrSectorSize) {
		t.Errorf("a 512-byte GPT read with 4096-byte sectors: %v, want ErrSectorSize", err)
	}
	d := bytes.Clone(good)
	mbrOnly(d)
	if tab, err := Read(bytes.NewReader(d), int64(len(d)), 512); err != nil || tab.Kind != MBR || len(tab.Partitions) != 1 || tab.End() != 4096*512 {
		t.Fatalf("the good MBR disk: %+v, %v", tab, err)
	}
	le := binary.LittleEndian
	for _, tc := range []struct {
		name   string
		change func(d []byte)
		reseal bool
		want   error
	}{
		{"zeros", func(d []byte) { clear(d) }, false, ErrNoTable},
		{"header CRC", func(d []byte) { d[512+60]++ }, false, ErrChecksum},
		{"entries CRC", func(d []byte) { d[1024+40]++ }, false, ErrChecksum},
		{"revision", func(d []byte) { le.PutUint32(d[512+8:], 2) }, true, ErrUnsupported},
		{"header size small", func(d []byte) { le.PutUint32(d[512+12:], 91) }, false, ErrFormat},
		{"header size large", func(d []byte) { le.PutUint32(d[512+12:], 513) }, false, ErrFormat},
		{"MyLBA", func(d []byte) { le.PutUint64(d[512+offMyLBA:], 5) }, true, ErrFormat},
		{"entry count huge", func(d []byte) { le.PutUint32(d[512+80:], 0xFFFFFFFF) }, true, ErrUnsupported},
		{"entry size not 128·2^n", func(d []byte) { le.PutUint32(d[512+84:], 384) }, true, ErrFormat},
		{"entry size huge", func(d []byte) { le.PutUint32(d[512+84:], 0x80000000) }, true, ErrUnsupported},
		{"entry size odd", func(d []byte) { le.PutUint32(d[512+84:], 129) }, true, ErrFormat},
		{"entry size small", func(d []byte) { le.PutUint32(d[512+84:], 64) }, true, ErrFormat},
		{"entry array LBA 0", func(d []byte) { le.PutUint64(d[512+offEntryLBA:], 0) }, true, ErrFormat},
		{"entry array past the end", func(d []byte) { le.PutUint64(d[512+offEntryLBA:], 1<<62) }, true, ErrFormat},
		{"entry array over usable", func(d []byte) { le.PutUint64(d[512+offFirstUsable:], 20) }, true, ErrFormat},
		{"last usable past the end", func(d []byte) { le.PutUint64(d[512+offLastUsable:], 1<<40) }, true, ErrFormat},
		{"last usable before first", func(d []byte) { le.PutUint64(d[512+offLastUsable:], 10) }, true, ErrFormat},
		{"last usable leaves no backup room", func(d []byte) { le.PutUint64(d[512+offLastUsable:], 8191-5) }, true, ErrFormat},
		{"backup past the end", func(d []byte) { le.PutUint64(d[512+offAlternate:], 1<<63) }, true, ErrFormat},
		{"backup inside usable", func(d []byte) { le.PutUint64(d[512+offAlternate:], 100) }, true, ErrFormat},
		{"partition before usable", func(d []byte) { le.PutUint64(d[1024+32:], 33) }, true, ErrFormat},
		{"partition past usable", func(d []byte) { le.PutUint64(d[1024+128+40:], 8191) }, true, ErrFormat},
		{"partition reversed", func(d []byte) { le.PutUint64(d[1024+32:], 5000) }, true, ErrFormat},
		{"partition LBA huge", func(d []byte) { le.PutUint64(d[1024+40:], 1<<63) }, true, ErrFormat},
		{"MBR status", func(d []byte) { mbrOnly(d); d[mbrEntriesOffset] = 0x12 }, false, ErrNoTable},
		{"protective MBR status", func(d []byte) { d[mbrEntriesOffset] = 0x12; clear(d[512:520]) }, false, ErrNoTable},
		{"MBR partition past the end", func(d []byte) {
			d[mbrEntriesOffset+16+4] = 0x83
			le.PutUint32(d[mbrEntriesOffset+16+8:], 100)
			le.PutUint32(d[mbrEntriesOffset+16+12:], 0xFFFFFFF0)
		}, false, ErrFormat},
		{"MBR partition at LBA 0", func(d []byte) {
			d[mbrEntriesOffset+16+4] = 0x83
			le.PutUint32(d[mbrEntriesOffset+16+12:], 10)
		}, false, ErrFormat},
		{"FAT boot sector", func(d []byte) { mbrOnly(d); copy(d[0x52:], "FAT32   ") }, false, ErrNoTable},
		{"NTFS boot sector", func(d []byte) { mbrOnly(d); copy(d[3:], "NTFS    ") }, false, ErrNoTable},
		{"protective MBR, no GPT", func(d []byte) { copy(d[512:], "NOT PART") }, false, ErrFormat},
	} {
		t.Run(tc.name, func(t *testing.T) {
			d := bytes.Clone(good)
			tc.change(d)
			if tc.reseal {
				resealHeader(d)
			}
			tab, err := Read(bytes.NewReader(d), int64(len(d)), 512)
			if !errors.Is(err, tc.want) {
				t.Fatalf("Read: %+v, %v; want %v", tab, err, tc.want)
			}
			if strings.Count(err.Error(), "\n") != 0 || !strings.HasPrefix(err.Error(), "partition: ") {
				t.Errorf("error %q is not one line starting with partition:", err)
			}
		})
	}
	// A disk that ends before a partition does.
	if _, err := Read(bytes.NewReader(good[:2<<20]), 2<<20, 512); !errors.Is(err, ErrFormat) {
		t.Errorf("a disk shorter than its table: %v, want ErrFormat", err)
	}
	// A reader that fails.
	if _, err := Read(bytes.NewReader(good[:600]), int64(len(good)), 512); err == nil {
		t.Error("a short read gave no error")
	}
}

// memDisk is a byte slice as a Disk that counts flushes.
type memDisk struct {
	b       []byte
	flushes int
}

func (m *memDisk) WriteAt(p []byte, off int64) (int, error) { return copy(m.b[off:], p), nil }
func (m *memDisk) Flush() error                             { m.flushes++; return nil }

func TestSetDiskSizeBounds(t *testing.T) {
	d := gptDisk()
	tab, err := Read(bytes.NewReader(d), int64(len(d)), 512)
	if err != nil {
		t.Fatal(err)
	}
	min := tab.MinimumSize(0)
	if min != 6144*512+33*512 {
		t.Fatalf("MinimumSize(0) = %d", min)
	}
	m := &memDisk{b: d}
	for _, size := range []int64{min - 512, min + 1, int64(len(d)) + 512} {
		if err := tab.SetDiskSize(m, size); !errors.Is(err, ErrUnsupported) {
			t.Errorf("SetDiskSize(%d): %v, want ErrUnsupported", size, err)
		}
	}
	if m.flushes != 0 || !bytes.Equal(m.b, gptDisk()) {
		t.Fatal("a refused SetDiskSize wrote")
	}
	if err := tab.SetDiskSize(m, min); err != nil {
		t.Fatal(err)
	}
	if m.flushes < 2 {
		t.Errorf("%d flushes: the backup must be durable before the primary names it", m.flushes)
	}
	again, err := Read(bytes.NewReader(m.b[:min]), min, 512)
	if err != nil {
		t.Fatalf("the table after SetDiskSize(%d): %v", min, err)
	}
	if again.gpt.alternate != uint64(min/512-1) || again.gpt.lastUsable != uint64(min/512-34) || again.End() != tab.End() {
		t.Errorf("after: backup at %d, last usable %d", again.gpt.alternate, again.gpt.lastUsable)
	}
	if got := binary.LittleEndian.Uint32(m.b[mbrEntriesOffset+12:]); int64(got) != min/512-1 {
		t.Errorf("protective MBR covers %d sectors, want %d", got, min/512-1)
	}
	// The backup header is a valid header for its place.
	b := m.b[min-512 : min]
	if string(b[:8]) != gptSignature || binary.LittleEndian.Uint32(b[16:]) != headerCRC(b[:92]) ||
		binary.LittleEndian.Uint64(b[offMyLBA:]) != uint64(min/512-1) || binary.LittleEndian.Uint64(b[offEntryLBA:]) != uint64(min/512-33) {
		t.Error("the backup header is not valid for its place")
	}
	if !bytes.Equal(m.b[min-33*512:min-33*512+128*128], tab.gpt.entries) {
		t.Error("the backup entries differ from the primary's")
	}
}

func TestMBRWithoutPartitions(t *testing.T) {
	d := make([]byte, 1<<20)
	d[510], d[511] = 0x55, 0xAA
	tab, err := Read(bytes.NewReader(d), int64(len(d)), 512)
	if err != nil || tab.Kind != MBR || len(tab.Partitions) != 0 {
		t.Fatalf("an empty MBR: %+v, %v", tab, err)
	}
	if _, ok := tab.Last(); ok {
		t.Error("Last found a partition in an empty table")
	}
	if got := tab.MinimumSize(0); got != 512 {
		t.Errorf("MinimumSize(0) of an empty MBR %d, want 512", got)
	}
	if _, err := Read(bytes.NewReader(d), int64(len(d)), 1024); !errors.Is(err, ErrUnsupported) {
		t.Errorf("sector size 1024: %v", err)
	}
	if _, err := Read(bytes.NewReader(d), 513, 512); !errors.Is(err, ErrNoTable) {
		t.Errorf("a 513-byte disk: %v", err)
	}
}

func FuzzRead(f *testing.F) {
	good := gptDisk()
	f.Add(good[:64<<10], int64(len(good)), false)
	f.Add(good[:64<<10], int64(64<<10), true)
	mbr := make([]byte, 4096)
	mbr[510], mbr[511] = 0x55, 0xAA
	mbr[mbrEntriesOffset+4] = 0x83
	binary.LittleEndian.PutUint32(mbr[mbrEntriesOffset+8:], 2048)
	binary.LittleEndian.PutUint32(mbr[mbrEntriesOffset+12:], 2048)
	f.Add(mbr, int64(8<<20), false)
	f.Fuzz(func(t *testing.T, b []byte, size int64, big bool) {
		ss := 512
		if big {
			ss = 4096
		}
		if size < 0 || size > 1<<50 {
			return
		}
		size -= size % int64(ss)
		// Reads past b see zeros, as a sparse disk would.
		r := readerFunc(func(p []byte, off int64) (int, error) {
			clear(p)
			if off < int64(len(b)) {
				copy(p, b[off:])
			}
			return len(p), nil
		})
		tab, err := Read(r, size, ss)
		if err != nil {
			return
		}
		min := tab.MinimumSize(int64(ss))
		if tab.End() > size || min < tab.End() {
			t.Fatalf("End %d, MinimumSize %d, disk %d", tab.End(), min, size)
		}
		if min <= size && len(tab.Partitions) > 0 {
			if err := tab.SetDiskSize(nopDisk{}, min); err != nil {
				t.Fatalf("SetDiskSize(MinimumSize): %v", err)
			}
		}
	})
}

type readerFunc func(p []byte, off int64) (int, error)

func (f readerFunc) ReadAt(p []byte, off int64) (int, error) { return f(p, off) }

type nopDisk struct{}

func (nopDisk) WriteAt(p []byte, off int64) (int, error) { return len(p), nil }
func (nopDisk) Flush() error                             { return nil }
