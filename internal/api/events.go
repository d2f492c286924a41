package api

import (
	"context"
	"strconv"
	"time"
)

// Event is one thing the host did, from its log at level Info and above:
// a checkpoint made, applied or deleted, a merge's steps, a machine's
// power change, an error. GET /v1/events lists the most recent ones (a
// bounded ring: older events drop out); GET /v1/events/stream sends them
// as they happen, as server-sent events.
type Event struct {
	// Seq numbers events from 1 in the order they happened, per daemon
	// run; ?after=SEQ skips the ones seen. The stream's event IDs are
	// RUN-SEQ, so that a reconnect (Last-Event-ID) after a daemon restart
	// starts from the new run's first event.
	Seq     int64     `json:"seq"`
	Time    time.Time `json:"time"`
	Level   string    `json:"level"` // INFO, WARN or ERROR
	Message string    `json:"message"`
	VM      string    `json:"vm,omitempty"`
	Job     string    `json:"job,omitempty"`
	// Fields are the log record's other attributes, as text.
	Fields map[string]string `json:"fields,omitempty"`
}

// The stream's server-sent event types: "event" carries an Event, "jobs"
// every job as GET /v1/jobs lists them (sent first), "job" one job whose
// state or progress changed since it was last sent.
const (
	StreamEvent = "event"
	StreamJobs  = "jobs"
	StreamJob   = "job"
)

// Events lists the events after seq (0: all the host still keeps).
func (c *Client) Events(ctx context.Context, after int64) ([]Event, error) {
	var v []Event
	return v, c.do(ctx, "GET", "/v1/events?after="+strconv.FormatInt(after, 10), nil, &v)
}
