package hostile

import (
	"encoding/binary"
	"fmt"
)

// vhdxLog adds images whose log is pending (the header names a LogGuid),
// with the active entry damaged and its CRC-32C recomputed, and cut
// through the log.
func vhdxLog(c *corpus) error {
	seed, err := vhdxPendingSeed()
	if err != nil {
		return err
	}
	l, err := parseVHDX(seed)
	if err != nil {
		return err
	}
	le := binary.LittleEndian
	// The active entry: the one with the highest sequence number that
	// carries the header's LogGuid.
	guid := seed[l.header+hdrLogGUID : l.header+hdrLogGUID+16]
	var at, length int64 = -1, 0
	var best uint64
	for off := l.logOff; off < l.logOff+l.logLen; off += vhdxLogSector {
		e := seed[off:]
		if string(e[:4]) == "loge" && string(e[leGUID:leGUID+16]) == string(guid) && le.Uint64(e[leSeq:]) >= best {
			at, length, best = off, int64(le.Uint32(e[leLength:])), le.Uint64(e[leSeq:])
		}
	}
	if at < 0 || le.Uint32(seed[at+leDescCount:]) == 0 {
		return fmt.Errorf("hostile: the pending seed has no log entry with a descriptor")
	}
	desc := at + vhdxLogEntryHead // its first descriptor, a data descriptor
	dataSector := at + vhdxLogSector
	// entry edits the active entry and reseals it over n bytes (0: its
	// own length).
	entry := func(n int64, edit func(e []byte)) func([]byte) {
		return func(b []byte) {
			edit(b[at:])
			if n == 0 {
				n = length
			}
			sealCRC32C(b[at : at+n])
		}
	}
	slotEnd := l.logOff + l.logLen - at
	ms := []struct {
		name, note string
		edit       func([]byte)
	}{
		{"entry-length-slot", "entry length to the end of the log, CRC over it", entry(slotEnd, func(e []byte) { le.PutUint32(e[leLength:], uint32(slotEnd)) })},
		{"entry-length-max", "entry length 2^32 - 4 KiB (CRC left as it was)", func(b []byte) { le.PutUint32(b[at+leLength:], 0xFFFFF000) }},
		{"entry-length-0", "entry length 0", entry(0, func(e []byte) { le.PutUint32(e[leLength:], 0) })},
		{"entry-length-odd", "entry length not a multiple of 4 KiB", entry(0, func(e []byte) { le.PutUint32(e[leLength:], uint32(length-100)) })},
		{"desc-count-max", "descriptor count 2^32 - 1", entry(0, func(e []byte) { le.PutUint32(e[leDescCount:], ^uint32(0)) })},
		{"desc-count-127", "127 descriptors in an entry of one", entry(0, func(e []byte) { le.PutUint32(e[leDescCount:], 127) })},
		{"desc-offset-eof", "a data descriptor for offset 2^50", entry(0, func(e []byte) { le.PutUint64(e[desc-at+16:], 1<<50) })},
		{"desc-offset-max", "a data descriptor for offset 2^64 - 4 KiB", entry(0, func(e []byte) { le.PutUint64(e[desc-at+16:], ^uint64(4095)) })},
		{"desc-offset-header", "a data descriptor over header 1", entry(0, func(e []byte) { le.PutUint64(e[desc-at+16:], vhdxHeader1) })},
		{"desc-offset-log", "a data descriptor over the log itself", entry(0, func(e []byte) { le.PutUint64(e[desc-at+16:], uint64(at)) })},
		{"desc-offset-odd", "a data descriptor at an unaligned offset", entry(0, func(e []byte) { le.PutUint64(e[desc-at+16:], uint64(l.batOff+1)) })},
		{"desc-seq", "a data descriptor with another sequence number", entry(0, func(e []byte) { le.PutUint64(e[desc-at+24:], 99) })},
		{"sector-seq", "a data sector with another sequence number", entry(0, func(e []byte) { le.PutUint32(e[dataSector-at+4:], 7) })},
		{"zero-desc-huge", "a zero descriptor of 1 TiB over the BAT", entry(0, func(e []byte) {
			copy(e[desc-at:], "zero")
			le.PutUint64(e[desc-at+8:], 1<<40)
		})},
		{"zero-desc-max", "a zero descriptor of 2^64 - 4 KiB", entry(0, func(e []byte) {
			copy(e[desc-at:], "zero")
			le.PutUint64(e[desc-at+8:], ^uint64(4095))
		})},
		{"last-offset-huge", "LastFileOffset 2^50", entry(0, func(e []byte) { le.PutUint64(e[leLast:], 1<<50) })},
		{"flushed-offset-huge", "FlushedFileOffset 2^50, past the end of the file", entry(0, func(e []byte) { le.PutUint64(e[leFlushed:], 1<<50) })},
		{"tail-outside", "tail outside the log", entry(0, func(e []byte) { le.PutUint32(e[leTail:], 0xFFFFF000) })},
		{"seq-0", "sequence number 0", entry(0, func(e []byte) { le.PutUint64(e[leSeq:], 0) })},
		{"guid-other", "the entry carries another LogGuid", entry(0, func(e []byte) { copy(e[leGUID:], "hostile-log-guid") })},
	}
	for _, m := range ms {
		if err := c.single("vhdx-log", m.name, m.note, "disk.vhdx", patched(seed, m.edit)); err != nil {
			return err
		}
	}
	for _, n := range truncations(int64(len(seed)), []int64{at, at + vhdxLogSector, at + length}, c.opts.Dense) {
		if n <= at-4096 && !c.opts.Dense {
			continue
		}
		if err := c.single("vhdx-log", fmt.Sprintf("cut-%d", n), fmt.Sprintf("pending log, file cut to %d bytes", n), "disk.vhdx", seed[:n]); err != nil {
			return err
		}
	}
	return nil
}
