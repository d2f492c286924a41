package merge

import (
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"

	"github.com/vhdkit/vhdkit/storage"
	"github.com/vhdkit/vhdkit/vhdx"
)

// journal records the clean-up left once a merge's copy is durable: the
// children to point at the target (with its new DataWriteGuid) and the
// merged-away files to delete, TOP last. It sits beside TOP, so re-running
// the same merge finds it even after TOP is gone.
type journal struct {
	Top    string   `json:"top"`
	Target string   `json:"target"`
	GUID   string   `json:"target_data_write_guid"`
	Relink []string `json:"relink"`
	Remove []string `json:"remove"`
}

func journalPath(top string) string {
	return filepath.Join(filepath.Dir(top), ".vhdkit-merge-"+filepath.Base(top)+".json")
}

// Pending reports whether a merge of top copied everything and left its
// clean-up unfinished: running it again finishes it, even once top is gone.
func Pending(top string) bool {
	_, err := os.Stat(journalPath(top))
	return err == nil
}

func loadJournal(top string, fsys storage.FS) (*journal, error) {
	b, err := storage.ReadFileFrom(fsys, journalPath(top))
	if errors.Is(err, os.ErrNotExist) {
		return nil, nil
	}
	if err != nil {
		return nil, fmt.Errorf("merge: %w", err)
	}
	var j journal
	if err := json.Unmarshal(b, &j); err != nil {
		return nil, fmt.Errorf("merge: journal %s: %w", journalPath(top), err)
	}
	return &j, nil
}

// save writes the journal durably.
func (j *journal) save(fsys storage.FS) error {
	b, err := json.MarshalIndent(j, "", "  ")
	if err != nil {
		return err
	}
	if err := storage.WriteFileTo(fsys, journalPath(j.Top), b, 0o600); err != nil {
		return fmt.Errorf("merge: journal: %w", err)
	}
	return nil
}

// finish re-links, deletes and drops the journal; every step may already
// have been done by an interrupted run.
func (j *journal) finish(opts Options) error {
	fsys := storage.OrOS(opts.FS)
	g, err := vhdx.ParseGUID(j.GUID)
	if err != nil {
		return fmt.Errorf("merge: journal: %w", err)
	}
	for _, c := range j.Relink {
		if _, err := fsys.Stat(c); errors.Is(err, os.ErrNotExist) {
			continue
		}
		if err := setParent(c, j.Target, g, opts); err != nil {
			return err
		}
	}
	for _, p := range j.Remove {
		if err := fsys.Remove(p); err != nil && !errors.Is(err, os.ErrNotExist) {
			return fmt.Errorf("merge: removing %s: %w", p, err)
		}
	}
	if err := fsys.Remove(journalPath(j.Top)); err != nil {
		return fmt.Errorf("merge: journal: %w", err)
	}
	return fsys.SyncDir(filepath.Dir(j.Top))
}
