package host

import (
	"bufio"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"net/http"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/vhdkit/vhdkit/internal/api"
)

// TestEventRing: the ring keeps the newest eventCapacity events, numbered
// on, and since skips those seen.
func TestEventRing(t *testing.T) {
	var e eventLog
	for i := range eventCapacity + 10 {
		e.add(api.Event{Message: fmt.Sprint(i)})
	}
	all, _ := e.since(0)
	if len(all) != eventCapacity || all[0].Seq != 11 || all[0].Message != "10" || all[len(all)-1].Seq != eventCapacity+10 {
		t.Fatalf("ring: %d events, first %+v, last %+v", len(all), all[0], all[len(all)-1])
	}
	if after, _ := e.since(eventCapacity + 5); len(after) != 5 || after[0].Seq != eventCapacity+6 {
		t.Fatalf("since %d: %+v", eventCapacity+5, after)
	}
}

// sseEvent is one server-sent event as read off the stream.
type sseEvent struct {
	id, kind, data string
}

// readSSE reads the stream's events into a channel until it ends.
func readSSE(body io.Reader) <-chan sseEvent {
	out := make(chan sseEvent, 100)
	go func() {
		defer close(out)
		sc := bufio.NewScanner(body)
		sc.Buffer(make([]byte, 1<<20), 1<<20)
		var ev sseEvent
		for sc.Scan() {
			line := sc.Text()
			switch {
			case line == "":
				if ev.kind != "" {
					out <- ev
				}
				ev = sseEvent{}
			case strings.HasPrefix(line, "id: "):
				ev.id = line[4:]
			case strings.HasPrefix(line, "event: "):
				ev.kind = line[7:]
			case strings.HasPrefix(line, "data: "):
				ev.data = line[6:]
			}
		}
	}()
	return out
}

// streamClient dials the host's API socket.
func streamClient(dir string) *http.Client {
	return &http.Client{Transport: &http.Transport{DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
		var d net.Dialer
		return d.DialContext(ctx, "unix", filepath.Join(dir, api.SocketName))
	}}}
}

// TestEventStream: what the host does reaches GET /v1/events and the
// stream as events with their machine and fields; a live merge's progress
// reaches the stream as job updates that only go forward, ending done; a
// reconnect with Last-Event-ID gets only what it missed; StopStreams ends
// the stream.
func TestEventStream(t *testing.T) {
	dir := shortDir(t)
	th := startHost(t, dir, Options{})
	defer th.stop(t)
	ctx := context.Background()
	if _, err := th.api.CreateVM(ctx, api.CreateVM{Name: "web", Disks: []int64{64 << 20}}); err != nil {
		t.Fatal(err)
	}
	c := th.dial(t, "web")
	w := newWorkload(c, 1)
	w.fill(t, 200)

	hc := streamClient(dir)
	resp, err := hc.Get("http://vhdkit/v1/events/stream")
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	if ct := resp.Header.Get("Content-Type"); ct != "text/event-stream" {
		t.Fatalf("stream content type %q", ct)
	}
	stream := readSSE(resp.Body)
	next := func(kind string, match func(sseEvent) bool) sseEvent {
		t.Helper()
		timeout := time.After(2 * time.Minute)
		for {
			select {
			case ev, ok := <-stream:
				if !ok {
					t.Fatalf("the stream ended waiting for %s", kind)
				}
				if ev.kind == kind && (match == nil || match(ev)) {
					return ev
				}
			case <-timeout:
				t.Fatalf("no %s event", kind)
			}
		}
	}
	next(api.StreamJobs, nil)
	next(api.StreamEvent, func(ev sseEvent) bool { return strings.Contains(ev.data, `"machine created"`) })

	if _, err := th.api.CreateCheckpoint(ctx, "web", api.CreateCheckpoint{Name: "before"}); err != nil {
		t.Fatal(err)
	}
	ev := next(api.StreamEvent, func(ev sseEvent) bool { return strings.Contains(ev.data, `"checkpoint created"`) })
	var created api.Event
	if err := json.Unmarshal([]byte(ev.data), &created); err != nil {
		t.Fatal(err)
	}
	if created.VM != "web" || created.Fields["checkpoint"] != "before" || created.Level != "INFO" || !strings.HasSuffix(ev.id, fmt.Sprintf("-%d", created.Seq)) {
		t.Fatalf("checkpoint created event: id %s %+v", ev.id, created)
	}
	w.fill(t, 400)

	job, err := th.api.DeleteCheckpoint(ctx, "web", "before", false, 16<<20)
	if err != nil {
		t.Fatal(err)
	}
	var last int64 = -1
	updates := 0
	for {
		ev := next(api.StreamJob, func(ev sseEvent) bool { return strings.Contains(ev.data, `"`+job.ID+`"`) })
		var j api.Job
		if err := json.Unmarshal([]byte(ev.data), &j); err != nil {
			t.Fatal(err)
		}
		if j.Done < last {
			t.Fatalf("job progress went back: %d then %d", last, j.Done)
		}
		last = j.Done
		updates++
		if j.Finished() {
			if j.State != api.JobDone || j.Done != j.Total {
				t.Fatalf("job ended %+v", j)
			}
			break
		}
	}
	if updates < 3 {
		t.Errorf("the stream sent %d updates of a merge of several MiB at 16 MiB/s", updates)
	}
	w.verify(t, c, "after the merge")

	// GET /v1/events and a reconnect after the checkpoint's event.
	events, err := th.api.Events(ctx, 0)
	if err != nil {
		t.Fatal(err)
	}
	var msgs []string
	for _, e := range events {
		msgs = append(msgs, e.Message)
	}
	for _, want := range []string{"machine created", "checkpoint created", "checkpoint delete started", "disk switched to merged file", "checkpoint merged", "job finished"} {
		if !strings.Contains(strings.Join(msgs, "|"), want) {
			t.Errorf("events lack %q: %v", want, msgs)
		}
	}
	reconnect := func(lastID string) <-chan sseEvent {
		t.Helper()
		req, _ := http.NewRequest("GET", "http://vhdkit/v1/events/stream", nil)
		req.Header.Set("Last-Event-ID", lastID)
		resp, err := hc.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { resp.Body.Close() })
		s := readSSE(resp.Body)
		<-s // jobs
		return s
	}
	recv := func(s <-chan sseEvent) sseEvent {
		t.Helper()
		select {
		case ev := <-s:
			return ev
		case <-time.After(time.Minute):
			t.Fatal("no event within a minute of reconnecting")
			return sseEvent{}
		}
	}
	run, _, _ := strings.Cut(ev.id, "-")
	again := reconnect(ev.id)
	if ev := recv(again); ev.kind != api.StreamEvent || ev.id != fmt.Sprintf("%s-%d", run, created.Seq+1) {
		t.Fatalf("after a reconnect from %d: %+v", created.Seq, ev)
	}
	// An ID from an earlier daemon run (a browser reconnecting after a
	// restart) gets this run's events from the first.
	earlier := reconnect("k0-999999")
	if ev := recv(earlier); ev.kind != api.StreamEvent || ev.id != run+"-1" {
		t.Fatalf("after a reconnect with an earlier run's ID: %+v", ev)
	}

	th.StopStreams()
	for _, s := range []<-chan sseEvent{stream, again, earlier} {
		for range s {
		}
	}
}
