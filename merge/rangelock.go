package merge

import "sync"

// rangeLocks serialises writes to overlapping ranges.
type rangeLocks struct {
	mu     sync.Mutex
	cond   *sync.Cond
	active []span
}

type span struct{ off, end int64 }

func (r *rangeLocks) lock(off, end int64) {
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.cond == nil {
		r.cond = sync.NewCond(&r.mu)
	}
	for r.overlaps(off, end) {
		r.cond.Wait()
	}
	r.active = append(r.active, span{off, end})
}

func (r *rangeLocks) overlaps(off, end int64) bool {
	for _, s := range r.active {
		if s.off < end && off < s.end {
			return true
		}
	}
	return false
}

func (r *rangeLocks) unlock(off, end int64) {
	r.mu.Lock()
	defer r.mu.Unlock()
	for i, s := range r.active {
		if s == (span{off, end}) {
			r.active = append(r.active[:i], r.active[i+1:]...)
			break
		}
	}
	r.cond.Broadcast()
}
