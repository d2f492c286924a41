package storage

import (
	"errors"
	"fmt"
	"io/fs"
	"math/rand/v2"
	"os"
	"path/filepath"
	"slices"
	"sync"
	"time"
)

// FS is the file-system seam: what an operation does to names, besides
// its files' own I/O. Every operation that creates, removes or renames a
// file goes through one, so a test can run it on a MemFS: one fault
// schedule over every file and name it touches, and a power cut of all of
// them at once.
type FS interface {
	// OpenFile opens the named file with os.OpenFile's flag and perm;
	// OS's files carry the image locks (see OpenFile).
	OpenFile(name string, flag int, perm os.FileMode) (File, error)
	Remove(name string) error
	Rename(oldname, newname string) error
	// Link makes newname a second name of oldname's file; it fails if
	// newname exists (unlike Rename, which replaces it).
	Link(oldname, newname string) error
	// SyncDir makes the entries of a directory durable: a file created,
	// renamed or removed in it survives a crash once SyncDir returns.
	SyncDir(dir string) error
	Stat(name string) (fs.FileInfo, error)
}

// OS is the operating system's file system.
var OS FS = osFS{}

type osFS struct{}

func (osFS) OpenFile(name string, flag int, perm os.FileMode) (File, error) {
	return OpenFile(name, flag, perm)
}
func (osFS) Remove(name string) error              { return os.Remove(name) }
func (osFS) Rename(oldname, newname string) error  { return os.Rename(oldname, newname) }
func (osFS) Link(oldname, newname string) error    { return os.Link(oldname, newname) }
func (osFS) SyncDir(dir string) error              { return SyncDir(dir) }
func (osFS) Stat(name string) (fs.FileInfo, error) { return os.Stat(name) }

// OSForceShare is the operating system's file system with every file
// opened read-only without refusing anyone (see OpenForceShare): for
// peeking at files other programs may be writing.
var OSForceShare FS = osForceShareFS{}

type osForceShareFS struct{ osFS }

func (osForceShareFS) OpenFile(name string, _ int, _ os.FileMode) (File, error) {
	return OpenForceShare(name)
}

// OrOS is fsys, or OS when fsys is nil (an option left unset).
func OrOS(fsys FS) FS {
	if fsys == nil {
		return OS
	}
	return fsys
}

// WriteFileTo replaces the file at path in fsys with data durably and
// atomically: a crash leaves the old content or the new, never a mix. The
// data goes to path+".tmp", which is synced and renamed over path, and
// then the directory is synced.
func WriteFileTo(fsys FS, path string, data []byte, perm os.FileMode) error {
	tmp := path + ".tmp"
	f, err := fsys.OpenFile(tmp, os.O_RDWR|os.O_CREATE|os.O_TRUNC, perm)
	if err != nil {
		return err
	}
	_, err = f.WriteAt(data, 0)
	if err == nil {
		err = f.Sync()
	}
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	if err == nil {
		err = fsys.Rename(tmp, path)
	}
	if err == nil {
		err = fsys.SyncDir(filepath.Dir(path))
	}
	if err != nil {
		fsys.Remove(tmp)
	}
	return err
}

// ReadFileFrom returns the content of the named file of fsys.
func ReadFileFrom(fsys FS, name string) ([]byte, error) {
	f, err := fsys.OpenFile(name, os.O_RDONLY, 0)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	size, err := f.Size()
	if err != nil {
		return nil, err
	}
	b := make([]byte, size)
	if _, err := f.ReadAt(b, 0); err != nil {
		return nil, err
	}
	return b, nil
}

// MemFS is a file system in memory for fault and crash sweeps: its files
// are MemFiles, every file operation and name operation goes through one
// fault schedule (Faults), and CrashClone gives what a power cut would
// leave of all of them at once.
//
// Names are modelled as a journaling file system (ext4, XFS) keeps them:
// a create, remove or rename is in effect at once and durable from the
// next SyncDir of any directory on, which commits every earlier name
// change too (POSIX asks only for the synced directory's; a missing sync
// of a second directory goes unseen). Until then a crash keeps a prefix of
// the pending changes, in order. A file's content survives per its
// MemFile's CrashClone.
//
// Paths are cleaned, not resolved: no directories, links or permissions
// are modelled (a file's perm is kept and reported by Stat). Handles
// opened read-only refuse writes. The methods are safe for concurrent use.
type MemFS struct {
	mu      sync.Mutex
	files   map[string]*memEntry // the names in effect
	durable map[string]*memEntry // the names a crash would keep for sure
	pending []nameChange         // changes since durable, in order
	faults  *FaultFile           // the schedule; nil: no faults
	cloned  int64                // bytes moved by CopyRangeFrom into a file of this FS
	clones  int                  // CopyRangeFrom calls that moved bytes
}

type memEntry struct {
	file *MemFile
	perm os.FileMode
}

// nameChange is a name operation not yet durable: each name now refers
// to its entry (nil: removed). A rename is one change of two names, so a
// crash keeps it whole or not at all.
type nameChange []struct {
	name string
	e    *memEntry
}

// apply makes the change in names.
func (c nameChange) apply(names map[string]*memEntry) {
	for _, n := range c {
		if n.e == nil {
			delete(names, n.name)
		} else {
			names[n.name] = n.e
		}
	}
}

// NewMemFS holds a copy of files (name to content), all durable.
func NewMemFS(files map[string][]byte) *MemFS {
	m := &MemFS{files: map[string]*memEntry{}, durable: map[string]*memEntry{}}
	for name, b := range files {
		e := &memEntry{file: NewMemFile(b), perm: 0o644}
		m.files[filepath.Clean(name)] = e
		m.durable[filepath.Clean(name)] = e
	}
	return m
}

// SetFaults makes every operation from now on, on the files of m (open
// handles included) and its names, count and fail by the schedule ff (its
// File is unused); nil makes m work without faults.
func (m *MemFS) SetFaults(ff *FaultFile) {
	m.mu.Lock()
	m.faults = ff
	m.mu.Unlock()
}

// Faults is the schedule set by SetFaults, or nil.
func (m *MemFS) Faults() *FaultFile {
	m.mu.Lock()
	defer m.mu.Unlock()
	return m.faults
}

// fault counts one name operation of kind k on the schedule.
func (m *MemFS) fault(k OpKind) error {
	m.mu.Lock()
	ff := m.faults
	m.mu.Unlock()
	if ff == nil {
		return nil
	}
	return ff.Fault(k)
}

func notExist(op, name string) error {
	return &fs.PathError{Op: op, Path: name, Err: fs.ErrNotExist}
}

// OpenFile opens or creates a file. Opening counts as an OpOpen, creating
// a file as an OpCreate, O_TRUNC as an OpTruncate.
func (m *MemFS) OpenFile(name string, flag int, perm os.FileMode) (File, error) {
	name = filepath.Clean(name)
	m.mu.Lock()
	e, ok := m.files[name]
	m.mu.Unlock()
	switch {
	case ok && flag&(os.O_CREATE|os.O_EXCL) == os.O_CREATE|os.O_EXCL:
		return nil, &fs.PathError{Op: "open", Path: name, Err: fs.ErrExist}
	case !ok && flag&os.O_CREATE == 0:
		return nil, notExist("open", name)
	case !ok:
		if err := m.fault(OpCreate); err != nil {
			return nil, &fs.PathError{Op: "create", Path: name, Err: err}
		}
		e = &memEntry{file: NewMemFile(nil), perm: perm.Perm()}
		m.mu.Lock()
		m.change(nameChange{{name, e}})
		m.mu.Unlock()
	default:
		if err := m.fault(OpOpen); err != nil {
			return nil, &fs.PathError{Op: "open", Path: name, Err: err}
		}
	}
	h := &memHandle{file: e.file, fsys: m, readOnly: flag&(os.O_WRONLY|os.O_RDWR) == 0}
	if ok && flag&os.O_TRUNC != 0 && !h.readOnly {
		if err := h.Truncate(0); err != nil {
			return nil, &fs.PathError{Op: "open", Path: name, Err: err}
		}
	}
	return h, nil
}

// change makes c, pending until a SyncDir. m.mu is held.
func (m *MemFS) change(c nameChange) {
	c.apply(m.files)
	m.pending = append(m.pending, c)
}

// Remove counts an OpRemove.
func (m *MemFS) Remove(name string) error {
	name = filepath.Clean(name)
	if err := m.fault(OpRemove); err != nil {
		return &fs.PathError{Op: "remove", Path: name, Err: err}
	}
	m.mu.Lock()
	defer m.mu.Unlock()
	if _, ok := m.files[name]; !ok {
		return notExist("remove", name)
	}
	m.change(nameChange{{name, nil}})
	return nil
}

// Rename counts an OpRename. It replaces newname atomically, as rename(2).
func (m *MemFS) Rename(oldname, newname string) error {
	oldname, newname = filepath.Clean(oldname), filepath.Clean(newname)
	if err := m.fault(OpRename); err != nil {
		return &os.LinkError{Op: "rename", Old: oldname, New: newname, Err: err}
	}
	m.mu.Lock()
	defer m.mu.Unlock()
	e, ok := m.files[oldname]
	if !ok {
		return &os.LinkError{Op: "rename", Old: oldname, New: newname, Err: fs.ErrNotExist}
	}
	if oldname == newname {
		return nil
	}
	m.change(nameChange{{newname, e}, {oldname, nil}})
	return nil
}

// Link counts an OpLink.
func (m *MemFS) Link(oldname, newname string) error {
	oldname, newname = filepath.Clean(oldname), filepath.Clean(newname)
	if err := m.fault(OpLink); err != nil {
		return &os.LinkError{Op: "link", Old: oldname, New: newname, Err: err}
	}
	m.mu.Lock()
	defer m.mu.Unlock()
	e, ok := m.files[oldname]
	if !ok {
		return &os.LinkError{Op: "link", Old: oldname, New: newname, Err: fs.ErrNotExist}
	}
	if _, ok := m.files[newname]; ok {
		return &os.LinkError{Op: "link", Old: oldname, New: newname, Err: fs.ErrExist}
	}
	m.change(nameChange{{newname, e}})
	return nil
}

// SyncDir counts an OpSyncDir and makes every name change so far durable.
func (m *MemFS) SyncDir(dir string) error {
	if err := m.fault(OpSyncDir); err != nil {
		return &fs.PathError{Op: "sync", Path: dir, Err: err}
	}
	m.mu.Lock()
	defer m.mu.Unlock()
	for _, c := range m.pending {
		c.apply(m.durable)
	}
	m.pending = nil
	return nil
}

// Stat reports a file's size and perm; it is not counted.
func (m *MemFS) Stat(name string) (fs.FileInfo, error) {
	name = filepath.Clean(name)
	m.mu.Lock()
	e, ok := m.files[name]
	m.mu.Unlock()
	if !ok {
		return nil, notExist("stat", name)
	}
	size, _ := e.file.Size()
	return memInfo{name: filepath.Base(name), size: size, perm: e.perm}, nil
}

// Names are the files in effect, sorted.
func (m *MemFS) Names() []string {
	m.mu.Lock()
	defer m.mu.Unlock()
	names := make([]string, 0, len(m.files))
	for n := range m.files {
		names = append(names, n)
	}
	slices.Sort(names)
	return names
}

// Bytes returns a copy of a file's current content, or nil and false if
// there is no such file.
func (m *MemFS) Bytes(name string) ([]byte, bool) {
	m.mu.Lock()
	e, ok := m.files[filepath.Clean(name)]
	m.mu.Unlock()
	if !ok {
		return nil, false
	}
	return e.file.Bytes(), true
}

// Contents returns a copy of every file's current content, by name.
func (m *MemFS) Contents() map[string][]byte {
	out := map[string][]byte{}
	for _, n := range m.Names() {
		if b, ok := m.Bytes(n); ok {
			out[n] = b
		}
	}
	return out
}

// Cloned is how many bytes CopyRangeFrom moved into files of m (a
// MemFile stands in for a file system that clones).
func (m *MemFS) Cloned() int64 {
	m.mu.Lock()
	defer m.mu.Unlock()
	return m.cloned
}

// Clones is how many calls of CopyRangeFrom moved bytes into files of m:
// on a file system that clones, each is a clone, whose cost is mostly
// the call's.
func (m *MemFS) Clones() int {
	m.mu.Lock()
	defer m.mu.Unlock()
	return m.clones
}

// CrashClone returns a new MemFS, without faults, holding what a power
// cut now could leave: the durable names and a random prefix of the name
// changes since, each file as its MemFile.CrashClone. A file under two
// names (a rename not yet durable) is one file in the clone too. For a
// given history and rng state it is deterministic.
func (m *MemFS) CrashClone(rng *rand.Rand) *MemFS {
	m.mu.Lock()
	defer m.mu.Unlock()
	names := map[string]*memEntry{}
	for n, e := range m.durable {
		names[n] = e
	}
	for _, c := range m.pending[:rng.IntN(len(m.pending)+1)] {
		c.apply(names)
	}
	sorted := make([]string, 0, len(names))
	for n := range names {
		sorted = append(sorted, n)
	}
	slices.Sort(sorted) // so that the use of rng does not depend on map order
	c := &MemFS{files: map[string]*memEntry{}, durable: map[string]*memEntry{}}
	clones := map[*memEntry]*memEntry{}
	for _, n := range sorted {
		e := names[n]
		ce, ok := clones[e]
		if !ok {
			ce = &memEntry{file: e.file.CrashClone(rng), perm: e.perm}
			clones[e] = ce
		}
		c.files[n], c.durable[n] = ce, ce
	}
	return c
}

// memHandle is an open file of a MemFS. Each operation counts on the
// schedule the FS has at that moment, so SetFaults reaches handles
// already open. Closing it leaves the MemFile open for other handles.
type memHandle struct {
	file     *MemFile
	fsys     *MemFS
	readOnly bool
	closed   bool
}

var errReadOnly = errors.New("storage: file opened read-only")

// faulty is h's file behind the FS's current schedule.
func (h *memHandle) faulty() *FaultFile {
	ff := &FaultFile{File: h.file, FailAt: -1}
	h.fsys.mu.Lock()
	ff.Shared = h.fsys.faults
	h.fsys.mu.Unlock()
	return ff
}

func (h *memHandle) ReadAt(p []byte, off int64) (int, error) { return h.faulty().ReadAt(p, off) }
func (h *memHandle) Sync() error                             { return h.faulty().Sync() }
func (h *memHandle) Size() (int64, error)                    { return h.file.Size() }

func (h *memHandle) WriteAt(p []byte, off int64) (int, error) {
	if h.readOnly {
		return 0, errReadOnly
	}
	return h.faulty().WriteAt(p, off)
}

func (h *memHandle) Truncate(size int64) error {
	if h.readOnly {
		return errReadOnly
	}
	return h.faulty().Truncate(size)
}

// CopyRangeFrom counts as a write; a MemFile copies, and a crash keeps or
// loses the range per sector, as a clone not yet synced.
func (h *memHandle) CopyRangeFrom(src File, srcOff, dstOff, n int64) (Moved, error) {
	if h.readOnly {
		return Moved{}, errReadOnly
	}
	mv, err := h.faulty().CopyRangeFrom(src, srcOff, dstOff, n)
	h.fsys.mu.Lock()
	h.fsys.cloned += mv.Cloned
	if mv.Cloned > 0 {
		h.fsys.clones++
	}
	h.fsys.mu.Unlock()
	return mv, err
}

func (h *memHandle) Close() error {
	if h.closed {
		return fmt.Errorf("close: %w", ErrClosed)
	}
	h.closed = true
	return nil
}

type memInfo struct {
	name string
	size int64
	perm os.FileMode
}

func (i memInfo) Name() string       { return i.name }
func (i memInfo) Size() int64        { return i.size }
func (i memInfo) Mode() os.FileMode  { return i.perm }
func (i memInfo) ModTime() time.Time { return time.Time{} }
func (i memInfo) IsDir() bool        { return false }
func (i memInfo) Sys() any           { return nil }
