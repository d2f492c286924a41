package merge

import (
	"context"
	"os"
	"path/filepath"
	"sync"
	"testing"

	"github.com/vhdkit/vhdkit/storage"
)

// countingFS is the operating system's file system, counting the opens of
// each file by name.
type countingFS struct {
	storage.FS
	mu    sync.Mutex
	opens map[string]int
}

func (c *countingFS) OpenFile(name string, flag int, perm os.FileMode) (storage.File, error) {
	c.mu.Lock()
	c.opens[filepath.Base(name)]++
	c.mu.Unlock()
	return c.FS.OpenFile(name, flag, perm)
}

// TestMergeOpensEachFileFewTimes: a merge of a child into its parent opens
// the chain once to learn it (and, from the same open, the identities
// step 1 compares), the child once more to record the parent's new
// identity, and the copy opens the chain and the target again; the folder
// scan for other children reads neither. Every open reads headers, region
// table and metadata again, and a command pays them all before the copy
// starts.
func TestMergeOpensEachFileFewTimes(t *testing.T) {
	dir := t.TempDir()
	paths, contents := buildChain(t, dir, 1)
	fsys := &countingFS{FS: storage.OS, opens: map[string]int{}}
	if _, err := Merge(context.Background(), paths[1], Options{FS: fsys}); err != nil {
		t.Fatal(err)
	}
	t.Logf("opens through the seam: %v", fsys.opens)
	if n := fsys.opens["level1.avhdx"]; n > 3 {
		t.Errorf("the child was opened %d times, want at most 3 (the chain, recording the linkage, the copy)", n)
	}
	if n := fsys.opens["base.vhdx"]; n > 3 {
		t.Errorf("the target was opened %d times, want at most 3 (the chain; the copy: its source chain and its target)", n)
	}
	if got := content(t, paths[0]); string(got) != string(contents[1]) {
		t.Fatal("the merged base does not read the child's content")
	}
}
