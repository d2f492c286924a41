package storage

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"

	"golang.org/x/sys/unix"
)

// # Image locking
//
// Every image file opened through OpenFile is locked the way QEMU locks
// its images (block/file-posix.c), so that vhdkit, qemu-img, qemu-io,
// qemu-nbd and QEMU itself refuse each other's conflicting opens. QEMU
// describes a user of a file by the permissions it takes and the ones it
// refuses to share, four of each:
//
//	bit 0  consistent read
//	bit 1  write
//	bit 2  write of unchanged data
//	bit 3  resize
//
// and publishes them as open file description (OFD) read locks on single
// bytes: byte 100+i while it holds permission i, byte 200+i while it
// refuses to share permission i. Every lock is a read lock, so locks never
// wait on each other; a conflict is found by testing (F_OFD_GETLK with a
// write lock) the other kind of byte: each permission taken against the
// others' refusals, each refusal against the others' permissions. Publish
// first, test second: of two openers racing, at least one sees the other.
//
// vhdkit uses three of QEMU's combinations:
//
//	write        takes read, write, resize; refuses write, resize  (QEMU's writer)
//	read         takes read;                refuses write, resize  (QEMU's reader)
//	force-share  takes read;                refuses nothing         (qemu-img -U)
//
// Within one process all opens of a file share one set of locks, kept on a
// descriptor of their own, publishing the strongest mode any open needs.
// A process coordinates its own readers with its own writer (a live merge
// writes the file its running chain reads through), so inside a process
// only a second writer is refused.

const (
	lockPermBase   = 100 // byte 100+i: permission i is held
	lockSharedBase = 200 // byte 200+i: permission i is not shared
)

// Permission bits, as QEMU numbers them.
const (
	permRead   = 1 << 0 // consistent read
	permWrite  = 1 << 1
	permResize = 1 << 3
	permCount  = 4
)

// lockMode is how an open shares its file, weakest first.
type lockMode int

const (
	lockNone lockMode = iota - 1 // a holder publishing nothing yet
	lockForceShare
	lockRead
	lockWrite
	lockModes
)

// take and refuse are a mode's permission bits.
func (m lockMode) take() int {
	if m == lockWrite {
		return permRead | permWrite | permResize
	}
	return permRead
}

func (m lockMode) refuse() int {
	if m == lockForceShare {
		return 0
	}
	return permWrite | permResize
}

// bytes lists the lock bytes a mode publishes.
func (m lockMode) bytes() []int64 {
	var b []int64
	for i := range permCount {
		if m.take()&(1<<i) != 0 {
			b = append(b, lockPermBase+int64(i))
		}
		if m.refuse()&(1<<i) != 0 {
			b = append(b, lockSharedBase+int64(i))
		}
	}
	return b
}

// ErrInUse is wrapped by the LockError of an open refused because another
// user of the file holds it in a conflicting way.
var ErrInUse = errors.New("file in use")

// A LockError is an open refused by image locking.
type LockError struct {
	Path    string
	Write   bool     // the refused open was for writing
	Holders []Holder // the processes seen holding the file; empty when none is visible
}

// A Holder is a process holding locks on a file.
type Holder struct {
	PID     int
	Command string // its name (/proc/PID/comm)
	Writing bool   // it holds the write permission
}

func (h Holder) String() string {
	s := fmt.Sprintf("process %d", h.PID)
	if h.Command != "" {
		s += " (" + h.Command + ")"
	}
	if h.PID == os.Getpid() {
		s += ", this one"
	}
	return s
}

func (e *LockError) Error() string {
	what := "open"
	if e.Write {
		what = "open for writing"
	}
	who := "another process"
	if len(e.Holders) > 0 {
		var names []string
		for _, h := range e.Holders {
			names = append(names, h.String())
		}
		who = strings.Join(names, " and ")
	}
	how := "uses it"
	switch {
	case e.anyWriting():
		how = "is writing it"
	case e.Write:
		how = "is reading it"
	}
	return fmt.Sprintf("cannot %s %s: %s %s", what, e.Path, who, how)
}

func (e *LockError) anyWriting() bool {
	for _, h := range e.Holders {
		if h.Writing {
			return true
		}
	}
	return false
}

func (e *LockError) Unwrap() error { return ErrInUse }

// fileID names an inode.
type fileID struct{ dev, ino uint64 }

// inodeLocks is this process's hold on one file.
type inodeLocks struct {
	holder *os.File       // a descriptor of its own, carrying the OFD locks
	opens  [lockModes]int // open files per mode
	mode   lockMode       // what holder publishes
}

var (
	locksMu sync.Mutex
	locks   = map[fileID]*inodeLocks{}
)

// strongest is the mode the process's opens need, false when none is left.
func (l *inodeLocks) strongest() (lockMode, bool) {
	for m := lockModes - 1; m >= 0; m-- {
		if l.opens[m] > 0 {
			return m, true
		}
	}
	return 0, false
}

// An openLock is one open's share of its file's locks.
type openLock struct {
	id       fileID
	l        *inodeLocks
	mode     lockMode
	released bool
}

// lock takes mode on f's file until the returned openLock is released.
func lock(f *os.File, path string, mode lockMode) (*openLock, error) {
	var st unix.Stat_t
	if err := unix.Fstat(int(f.Fd()), &st); err != nil {
		return nil, &os.PathError{Op: "stat", Path: path, Err: err}
	}
	id := fileID{uint64(st.Dev), st.Ino}

	locksMu.Lock()
	defer locksMu.Unlock()
	l := locks[id]
	if l == nil {
		fd, err := unix.FcntlInt(f.Fd(), unix.F_DUPFD_CLOEXEC, 0)
		if err != nil {
			return nil, &os.PathError{Op: "dup", Path: path, Err: err}
		}
		l = &inodeLocks{holder: os.NewFile(uintptr(fd), path), mode: lockNone}
	}
	if mode == lockWrite && l.opens[lockWrite] > 0 {
		if l.mode == lockNone {
			l.holder.Close()
		}
		return nil, &LockError{Path: path, Write: true, Holders: []Holder{self(true)}}
	}
	if mode > l.mode {
		if err := l.publish(path, mode); err != nil {
			if l.mode == lockNone {
				l.holder.Close()
			}
			return nil, err
		}
	}
	locks[id] = l
	l.opens[mode]++
	return &openLock{id: id, l: l, mode: mode}, nil
}

// release ends the open's share; the last open of a file drops its locks.
func (o *openLock) release() {
	locksMu.Lock()
	defer locksMu.Unlock()
	if o.released {
		return
	}
	o.released = true
	o.l.opens[o.mode]--
	o.l.settle(o.id)
}

// downgrade turns a writer's share into a reader's.
func (o *openLock) downgrade() {
	locksMu.Lock()
	defer locksMu.Unlock()
	if o.released || o.mode != lockWrite {
		return
	}
	o.l.opens[lockWrite]--
	o.l.opens[lockRead]++
	o.mode = lockRead
	o.l.settle(o.id)
}

// settle lowers the published locks to what the remaining opens need.
func (l *inodeLocks) settle(id fileID) {
	m, ok := l.strongest()
	if !ok {
		// Unlocked before the close: a child forked a moment ago shares
		// the description until it execs, and closing would leave the
		// locks with it, for a reopen here or a qemu-img run by this
		// process to trip over.
		for _, b := range l.mode.bytes() {
			setLock(l.holder, unix.F_UNLCK, b)
		}
		l.holder.Close()
		delete(locks, id)
		return
	}
	if m < l.mode {
		// A weaker mode's bytes are a subset: unlock the rest.
		keep := map[int64]bool{}
		for _, b := range m.bytes() {
			keep[b] = true
		}
		for _, b := range l.mode.bytes() {
			if !keep[b] {
				setLock(l.holder, unix.F_UNLCK, b)
			}
		}
		l.mode = m
	}
}

// publish raises the holder's locks to mode, or leaves them as they were
// and returns a LockError when another user of the file conflicts.
func (l *inodeLocks) publish(path string, mode lockMode) error {
	had := map[int64]bool{}
	if l.mode != lockNone {
		for _, b := range l.mode.bytes() {
			had[b] = true
		}
	}
	var added []int64
	undo := func() {
		for _, b := range added {
			setLock(l.holder, unix.F_UNLCK, b)
		}
	}
	conflict := func() error {
		undo()
		return &LockError{Path: path, Write: mode == lockWrite, Holders: holders(l.holder)}
	}
	for _, b := range mode.bytes() {
		if had[b] {
			continue
		}
		if err := setLock(l.holder, unix.F_RDLCK, b); err != nil {
			if errors.Is(err, unix.EAGAIN) || errors.Is(err, unix.EACCES) {
				return conflict() // someone holds a write lock on it
			}
			undo()
			return &os.PathError{Op: "lock", Path: path, Err: err}
		}
		added = append(added, b)
	}
	for i := range permCount {
		var tests []int64
		if mode.take()&(1<<i) != 0 {
			tests = append(tests, lockSharedBase+int64(i)) // does anyone refuse what we take?
		}
		if mode.refuse()&(1<<i) != 0 {
			tests = append(tests, lockPermBase+int64(i)) // does anyone take what we refuse?
		}
		for _, b := range tests {
			busy, err := lockedByOther(l.holder, b)
			if err != nil {
				undo()
				return &os.PathError{Op: "lock", Path: path, Err: err}
			}
			if busy {
				return conflict()
			}
		}
	}
	l.mode = mode
	return nil
}

// setLock sets (F_RDLCK) or clears (F_UNLCK) the OFD lock on byte b.
func setLock(f *os.File, typ int16, b int64) error {
	fl := unix.Flock_t{Type: typ, Whence: 0, Start: b, Len: 1}
	for {
		err := unix.FcntlFlock(f.Fd(), unix.F_OFD_SETLK, &fl)
		if err != unix.EINTR {
			return err
		}
	}
}

// lockedByOther reports whether another open file description holds a
// lock on byte b.
func lockedByOther(f *os.File, b int64) (bool, error) {
	fl := unix.Flock_t{Type: unix.F_WRLCK, Whence: 0, Start: b, Len: 1}
	if err := unix.FcntlFlock(f.Fd(), unix.F_OFD_GETLK, &fl); err != nil {
		return false, err
	}
	return fl.Type != unix.F_UNLCK, nil
}

// HasWriter reports whether some user of the file at path, in this process
// or another, holds it for writing: what a force-share reader may see
// changing under it.
func HasWriter(path string) (bool, error) {
	f, err := os.Open(path)
	if err != nil {
		return false, err
	}
	defer f.Close()
	return lockedByOther(f, lockPermBase+1)
}

// self is this process as a holder.
func self(writing bool) Holder {
	return Holder{PID: os.Getpid(), Command: comm(os.Getpid()), Writing: writing}
}

// holders finds the processes holding image locks on f's file, by the
// "lock:" lines of every process's /proc/PID/fdinfo (OFD locks have no
// owner process; /proc/locks shows -1). Processes this one may not look
// into are missed. This process is left out: its opens of a file share
// one holder, and conflicts among them are found before any lock is set.
func holders(f *os.File) []Holder {
	var st unix.Stat_t
	if err := unix.Fstat(int(f.Fd()), &st); err != nil {
		return nil
	}
	procs, err := os.ReadDir("/proc")
	if err != nil {
		return nil
	}
	var hs []Holder
	for _, p := range procs {
		pid, err := strconv.Atoi(p.Name())
		if err != nil || pid == os.Getpid() {
			continue // this process's locks are all its holders'
		}
		found, writing := false, false
		fdinfo := filepath.Join("/proc", p.Name(), "fdinfo")
		fds, err := os.ReadDir(fdinfo)
		if err != nil {
			continue
		}
		for _, fd := range fds {
			b, err := os.ReadFile(filepath.Join(fdinfo, fd.Name()))
			if err != nil || !strings.Contains(string(b), "lock:") {
				continue
			}
			for _, line := range strings.Split(string(b), "\n") {
				start, end, ok := parseLockLine(line, st)
				if !ok {
					continue
				}
				if end < lockPermBase || start > lockSharedBase+permCount-1 {
					continue
				}
				found = true
				if start <= lockPermBase+1 && end >= lockPermBase+1 {
					writing = true
				}
			}
		}
		if found {
			hs = append(hs, Holder{PID: pid, Command: comm(pid), Writing: writing})
		}
	}
	return hs
}

// parseLockLine reads a fdinfo lock line, "lock:\t1: OFDLCK ADVISORY
// READ -1 fe:00:9978886 100 101", returning the locked byte range if it
// is on the file st describes.
func parseLockLine(line string, st unix.Stat_t) (start, end int64, ok bool) {
	rest, ok := strings.CutPrefix(line, "lock:")
	if !ok {
		return 0, 0, false
	}
	fields := strings.Fields(rest)
	if len(fields) < 8 {
		return 0, 0, false
	}
	id := strings.Split(fields[5], ":")
	if len(id) != 3 {
		return 0, 0, false
	}
	maj, err1 := strconv.ParseUint(id[0], 16, 32)
	min, err2 := strconv.ParseUint(id[1], 16, 32)
	ino, err3 := strconv.ParseUint(id[2], 10, 64)
	if err1 != nil || err2 != nil || err3 != nil {
		return 0, 0, false
	}
	if uint32(maj) != unix.Major(uint64(st.Dev)) || uint32(min) != unix.Minor(uint64(st.Dev)) || ino != st.Ino {
		return 0, 0, false
	}
	start, err1 = strconv.ParseInt(fields[6], 10, 64)
	if fields[7] == "EOF" {
		end = 1<<63 - 1
	} else {
		end, err2 = strconv.ParseInt(fields[7], 10, 64)
	}
	if err1 != nil || err2 != nil {
		return 0, 0, false
	}
	return start, end, true
}

// comm is a process's command name, empty if unknown.
func comm(pid int) string {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/comm", pid))
	if err != nil {
		return ""
	}
	return strings.TrimSpace(string(b))
}
