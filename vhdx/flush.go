package vhdx

import (
	"errors"
	"fmt"

	"github.com/vhdkit/vhdkit/storage"
)

// Flush makes every completed write durable, following the commit protocol
// in the package documentation.
func (im *Image) Flush() error {
	if im.readOnly || im.frozen.Load() {
		return nil
	}
	im.flushMu.Lock()
	defer im.flushMu.Unlock()
	_, err := im.flushLocked()
	return err
}

// flushLocked commits the dirty pages. applied reports that it wrote pages
// to their final places after its last sync (commit's step 3): until the
// next sync a crash is repaired by replaying the log, so the log must stay
// named. Otherwise everything written before it is durable.
func (im *Image) flushLocked() (applied bool, err error) {
	im.mu.Lock()
	if im.closed {
		im.mu.Unlock()
		return false, errClosed
	}
	pages := im.dirtyPages()
	// Space the pages release is free once they are durable, not before:
	// until then a crash leaves the old entries naming it.
	released := im.space.takePending()
	fileEnd := im.fileEnd
	// The file is extended to cover the allocated blocks here, under the
	// lock: once it is released, writes may allocate past fileEnd and put
	// data there, which extending to fileEnd later would cut off.
	err = im.coverBlocks(fileEnd)
	// Opening the log syncs after the file was extended and every write
	// before this flush completed: that is step 1 done.
	synced := false
	if err == nil && len(pages) > 0 && im.logw.guid.IsZero() {
		err = im.openLog()
		synced = err == nil
	}
	im.mu.Unlock()
	if err == nil {
		err = im.commit(pages, fileEnd, synced)
	}
	if err != nil {
		// Memory still holds the truth: log these pages again next time.
		im.mu.Lock()
		for _, p := range pages {
			im.dirty[p.off] = struct{}{}
		}
		im.space.release(released...)
		im.mu.Unlock()
		return false, fmt.Errorf("vhdx: flush %s: %w", im.path, err)
	}
	im.reclaim(released)
	return len(pages) > 0, nil
}

// openLog opens the log for the entries of this session, if it is not
// open: an empty entry with a new LogGuid is written to slot 0 and synced,
// then the header names that LogGuid. A crash before the header is synced
// leaves the header's LogGuid zero, which ignores the entry; after, the
// LogGuid names a valid entry, whose replay changes nothing. The caller
// holds flushMu and mu.
func (im *Image) openLog() error {
	if !im.logw.guid.IsZero() {
		return nil
	}
	size, err := im.f.Size()
	if err != nil {
		return err
	}
	if im.logLost != nil {
		return im.logLost
	}
	g := newGUID()
	im.logSeq++
	if _, err := im.f.WriteAt(marshalEntry(nil, im.logSeq, 0, g, size, size), im.logOff); err != nil {
		return err
	}
	if err := im.f.Sync(); err != nil {
		return err
	}
	h := im.hdr
	h.LogGUID = g
	if err := im.writeHeader(h); err != nil {
		// The header naming g may be on the disk, or reach it later: the
		// entry in slot 0 must stay, so no later Flush (nor Close) may
		// open the log again over it. Reopening replays it.
		im.logLost = fmt.Errorf("vhdx: updating header: %w (the image takes no more flushes: reopen it)", err)
		return im.logLost
	}
	im.logw = logWriter{guid: g, slot: 1}
	return nil
}

// closeLog makes the header name no log, once everything the log holds is
// applied and synced. The caller holds flushMu.
func (im *Image) closeLog() error {
	if im.hdr.LogGUID.IsZero() {
		return nil
	}
	h := im.hdr
	h.LogGUID = GUID{}
	if err := im.writeHeader(h); err != nil {
		return err
	}
	im.logw = logWriter{}
	return nil
}

// commit performs steps 1–3 of the commit protocol for pages (step 1
// only if not synced since every write before the flush completed). Each
// round writes one entry at the start of the log; when more pages remain
// than one entry holds, the applied pages are synced before the log is
// reused.
func (im *Image) commit(pages []page, fileEnd int64, synced bool) error {
	if len(pages) == 0 {
		return im.f.Sync()
	}
	if !synced {
		if err := im.syncPayload(fileEnd); err != nil {
			return err
		}
	}
	per := entryPages(im.logLen)
	for len(pages) > 0 {
		batch := pages[:min(per, len(pages))]
		pages = pages[len(batch):]
		if _, err := im.logAndApply(batch, fileEnd); err != nil {
			return err
		}
		if len(pages) > 0 {
			if err := im.f.Sync(); err != nil {
				return err
			}
		}
	}
	return nil
}

// syncPayload is step 1: the file covers every allocated block and all
// written so far is durable. The caller holds mu, or has covered the
// blocks under it (coverBlocks).
func (im *Image) syncPayload(fileEnd int64) error {
	if err := im.coverBlocks(fileEnd); err != nil {
		return err
	}
	return im.f.Sync()
}

// coverBlocks extends the file to fileEnd: allocated blocks are written
// only where data went, and readers such as 7-Zip expect the file to
// cover every block the BAT names. It never shrinks the file. It must run
// where no block can be allocated past fileEnd meanwhile (mu held), or a
// write's data there would be cut off.
func (im *Image) coverBlocks(fileEnd int64) error {
	size, err := im.f.Size()
	if err != nil || size >= fileEnd {
		return err
	}
	return im.f.Truncate(fileEnd)
}

// logAndApply is steps 2 and 3 for pages that fit one log entry (at most
// entryPages), written to the next slot of the log (see logWriter). logged
// reports that the entry was synced: from then on the pages are durable,
// whatever error applying them returns. An entry that failed is spoiled:
// it may have reached the disk, and a later sync would make it durable, so
// that replay would bring back what memory may no longer hold. The caller
// holds flushMu, and mu when the log may not be open yet (see openLog).
func (im *Image) logAndApply(batch []page, fileEnd int64) (logged bool, err error) {
	if len(batch) > entryPages(im.logLen) {
		return false, fmt.Errorf("vhdx: %d pages in one log entry, more than the %d-byte log holds", len(batch), im.logLen)
	}
	if err := im.openLog(); err != nil {
		return false, err
	}
	size, err := im.f.Size()
	if err != nil {
		return false, err
	}
	pos := int64(im.logw.slot) * slotLen(im.logLen)
	im.logSeq++
	entry := marshalEntry(batch, im.logSeq, pos, im.logw.guid, size, max(size, fileEnd))
	_, err = im.f.WriteAt(entry, im.logOff+pos)
	if err == nil {
		err = im.f.Sync()
	}
	if err != nil {
		im.f.WriteAt(make([]byte, logSectorSize), im.logOff+pos)
		return false, err
	}
	im.logw.slot = 1 - im.logw.slot
	return true, im.applyPages(batch)
}

// applyPages writes pages to their final places, joining adjacent ones.
func (im *Image) applyPages(pages []page) error {
	for i := 0; i < len(pages); {
		j := i + 1
		for j < len(pages) && pages[j].off == pages[j-1].off+pageSize {
			j++
		}
		buf := pages[i].data
		if j-i > 1 {
			buf = make([]byte, 0, (j-i)*pageSize)
			for _, p := range pages[i:j] {
				buf = append(buf, p.data...)
			}
		}
		if _, err := im.f.WriteAt(buf, pages[i].off); err != nil {
			return err
		}
		i = j
	}
	return nil
}

// Close flushes, marks the file clean (no log to replay) and closes it and
// its parents. The image is closed even when an error is returned.
func (im *Image) Close() error {
	var errs []error
	if !im.readOnly && !im.frozen.Load() {
		im.flushMu.Lock()
		applied, err := im.flushLocked()
		if err == nil && im.writing {
			// Everything applied must be durable before the log is
			// dropped (a flush with nothing to apply synced already).
			if applied {
				err = im.f.Sync()
			}
			if err == nil {
				im.mu.Lock()
				err = im.closeLog()
				im.mu.Unlock()
			}
		}
		if err != nil && !errors.Is(err, errClosed) {
			errs = append(errs, err)
		}
		im.flushMu.Unlock()
	}
	im.mu.Lock()
	if im.closed {
		im.mu.Unlock()
		return errClosed
	}
	im.closed = true
	im.mu.Unlock()
	errs = append(errs, im.f.Close())
	if im.parent != nil {
		errs = append(errs, im.parent.Close())
	}
	return errors.Join(errs...)
}

// Freeze flushes the image, closes its log (the file needs no replay) and
// makes the open image read-only: the state a checkpoint's parent is in.
func (im *Image) Freeze() error {
	if im.readOnly || im.frozen.Load() {
		return nil
	}
	im.flushMu.Lock()
	defer im.flushMu.Unlock()
	applied, err := im.flushLocked()
	if err != nil {
		return err
	}
	im.mu.Lock()
	defer im.mu.Unlock()
	if im.writing {
		// What the last entry applied must be durable before the log
		// is dropped.
		if applied {
			if err := im.f.Sync(); err != nil {
				return err
			}
		}
		if err := im.closeLog(); err != nil {
			return err
		}
		im.writing = false
	}
	im.frozen.Store(true)
	storage.StopWriting(im.f)
	return nil
}
