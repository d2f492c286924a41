package host

import (
	"context"
	"encoding/json"
	"fmt"
	"log/slog"
	"net/http"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/vhdkit/vhdkit/internal/api"
)

// The event log is what the host's log says at level Info and above,
// kept as structured events: every record the host logs passes through
// eventHandler on its way to the daemon's own log handler. The log
// already names each thing the host does (checkpoints, merges, power
// changes, errors), so the events need no second set of calls.
//
// Watchers (the server-sent event stream) wait on changed, which is
// closed and replaced on every event and on every step of a job's
// progress: they sleep until something happened, and nothing polls.
const (
	// eventCapacity bounds the ring: older events drop out.
	eventCapacity = 1000
	// streamInterval is the least time between two sends of job
	// progress on one stream: a merge copies many chunks a second, and a
	// browser needs a few frames a second.
	streamInterval = 250 * time.Millisecond
	// streamKeepalive is how often an idle stream sends a comment, so a
	// connection that died is noticed.
	streamKeepalive = 25 * time.Second
)

// eventLog is the ring of recent events. Its zero value is ready.
type eventLog struct {
	mu   sync.Mutex
	ring []api.Event // oldest first, at most eventCapacity
	seq  int64       // Seq of the newest event
	// run tells this daemon run's stream IDs ("RUN-SEQ") from an
	// earlier run's: a browser reconnecting after a restart sends the
	// old run's last ID, and must get the new run's events from the
	// start, not from that number on.
	run     string
	changed chan struct{}
	stopped chan struct{} // closed by stopStreams
}

// changedLocked returns the channel the next change closes; the caller
// holds mu.
func (e *eventLog) changedLocked() chan struct{} {
	if e.changed == nil {
		e.changed = make(chan struct{})
	}
	return e.changed
}

// runID returns the run's stream ID prefix.
func (e *eventLog) runID() string {
	e.mu.Lock()
	defer e.mu.Unlock()
	if e.run == "" {
		e.run = strconv.FormatInt(time.Now().UnixNano(), 36)
	}
	return e.run
}

func (e *eventLog) stoppedLocked() chan struct{} {
	if e.stopped == nil {
		e.stopped = make(chan struct{})
	}
	return e.stopped
}

// touch wakes the watchers: an event was added or a job progressed.
func (e *eventLog) touch() {
	e.mu.Lock()
	defer e.mu.Unlock()
	e.touchLocked()
}

func (e *eventLog) touchLocked() {
	if e.changed != nil {
		close(e.changed)
		e.changed = nil
	}
}

func (e *eventLog) add(ev api.Event) {
	e.mu.Lock()
	defer e.mu.Unlock()
	e.seq++
	ev.Seq = e.seq
	if len(e.ring) == eventCapacity {
		e.ring = e.ring[:copy(e.ring, e.ring[1:])]
	}
	e.ring = append(e.ring, ev)
	e.touchLocked()
}

// since returns the events after seq, and the channel the next change
// closes.
func (e *eventLog) since(seq int64) ([]api.Event, <-chan struct{}) {
	e.mu.Lock()
	defer e.mu.Unlock()
	out := []api.Event{}
	for _, ev := range e.ring {
		if ev.Seq > seq {
			out = append(out, ev)
		}
	}
	return out, e.changedLocked()
}

// StopStreams ends every event stream, now and later: http.Server's
// Shutdown waits for requests to end, and a stream would not.
func (h *Host) StopStreams() {
	h.events.mu.Lock()
	defer h.events.mu.Unlock()
	select {
	case <-h.events.stoppedLocked():
	default:
		close(h.events.stopped)
	}
}

// eventHandler records what the host logs at Info and above as events,
// then passes every record on to the daemon's handler.
type eventHandler struct {
	next  slog.Handler
	log   *eventLog
	attrs []slog.Attr // from WithAttrs
}

// withEvents returns a logger that records into e what it logs.
func withEvents(l *slog.Logger, e *eventLog) *slog.Logger {
	return slog.New(&eventHandler{next: l.Handler(), log: e})
}

func (eh *eventHandler) Enabled(ctx context.Context, l slog.Level) bool {
	return l >= slog.LevelInfo || eh.next.Enabled(ctx, l)
}

func (eh *eventHandler) Handle(ctx context.Context, r slog.Record) error {
	if r.Level >= slog.LevelInfo {
		ev := api.Event{Time: r.Time.UTC(), Level: r.Level.String(), Message: r.Message}
		field := func(a slog.Attr) bool {
			v := a.Value.Resolve().String()
			switch a.Key {
			case "vm":
				ev.VM = v
			case "job":
				ev.Job = v
			default:
				if v == "" {
					return true
				}
				if ev.Fields == nil {
					ev.Fields = map[string]string{}
				}
				ev.Fields[a.Key] = v
			}
			return true
		}
		for _, a := range eh.attrs {
			field(a)
		}
		r.Attrs(field)
		eh.log.add(ev)
	}
	if eh.next.Enabled(ctx, r.Level) {
		return eh.next.Handle(ctx, r)
	}
	return nil
}

func (eh *eventHandler) WithAttrs(attrs []slog.Attr) slog.Handler {
	return &eventHandler{next: eh.next.WithAttrs(attrs), log: eh.log, attrs: append(eh.attrs[:len(eh.attrs):len(eh.attrs)], attrs...)}
}

// WithGroup passes the group on; the events keep their attributes flat.
func (eh *eventHandler) WithGroup(name string) slog.Handler {
	return &eventHandler{next: eh.next.WithGroup(name), log: eh.log, attrs: eh.attrs}
}

// Events lists the events after seq that the ring still holds.
func (h *Host) Events(after int64) []api.Event {
	out, _ := h.events.since(after)
	return out
}

// streamEvents is GET /v1/events/stream: the events after Last-Event-ID
// (or ?after=), then each as it happens; every job first, then each job
// whose state or progress changed, at most every streamInterval. It ends
// when the client goes or the daemon shuts down.
func (h *Host) streamEvents(w http.ResponseWriter, r *http.Request) {
	after, err := h.eventCursor(r)
	if err != nil {
		h.reply(w, r, nil, err)
		return
	}
	run := h.events.runID()
	rc := http.NewResponseController(w)
	w.Header().Set("Content-Type", "text/event-stream")
	w.Header().Set("Cache-Control", "no-store")
	w.WriteHeader(http.StatusOK)
	h.events.mu.Lock()
	stopped := h.events.stoppedLocked()
	h.events.mu.Unlock()

	send := func(kind string, id int64, v any) error {
		b, err := json.Marshal(v)
		if err != nil {
			return err
		}
		if id > 0 {
			_, err = fmt.Fprintf(w, "id: %s-%d\n", run, id)
		}
		if err == nil {
			_, err = fmt.Fprintf(w, "event: %s\ndata: %s\n\n", kind, b)
		}
		return err
	}
	jobs := h.Jobs()
	if send(api.StreamJobs, 0, jobs) != nil {
		return
	}
	sent := map[string]api.Job{}
	for _, j := range jobs {
		sent[j.ID] = j
	}
	keepalive := time.NewTicker(streamKeepalive)
	defer keepalive.Stop()
	for {
		events, changed := h.events.since(after)
		for _, ev := range events {
			if send(api.StreamEvent, ev.Seq, ev) != nil {
				return
			}
			after = ev.Seq
		}
		for _, j := range h.Jobs() {
			if old, ok := sent[j.ID]; ok && sameProgress(old, j) {
				continue
			}
			sent[j.ID] = j
			if send(api.StreamJob, 0, j) != nil {
				return
			}
		}
		if rc.Flush() != nil {
			return
		}
		select {
		case <-changed:
		case <-keepalive.C:
			if _, err := fmt.Fprint(w, ": keepalive\n\n"); err != nil || rc.Flush() != nil {
				return
			}
			continue
		case <-r.Context().Done():
			return
		case <-stopped:
			return
		}
		// Let a burst of progress gather into one send.
		select {
		case <-time.After(streamInterval):
		case <-r.Context().Done():
			return
		case <-stopped:
			return
		}
	}
}

// sameProgress reports whether a job has nothing new to show; the time
// left alone changing is not news.
func sameProgress(a, b api.Job) bool {
	a.ETA, b.ETA = 0, 0
	return a == b
}

// eventCursor reads the last event a client has seen: the stream's
// Last-Event-ID header (EventSource sends it when it reconnects: "RUN-SEQ",
// from this run or an earlier one), else ?after=SEQ.
func (h *Host) eventCursor(r *http.Request) (int64, error) {
	s := r.Header.Get("Last-Event-ID")
	if run, seq, ok := strings.Cut(s, "-"); ok {
		if run != h.events.runID() {
			return 0, nil
		}
		s = seq
	}
	if s == "" {
		s = r.URL.Query().Get("after")
	}
	if s == "" {
		return 0, nil
	}
	n, err := strconv.ParseInt(s, 10, 64)
	if err != nil || n < 0 {
		return 0, errorf(statusBadRequest, "event cursor %q is not an event number", s)
	}
	return n, nil
}
