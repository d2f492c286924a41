package vmm

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"net"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

// fakeAgent serves one connection at a time on a unix socket the way
// qemu-ga does on its channel: replies end with a newline, the reply to
// guest-sync-delimited starts with 0xFF. stale is written first, as bytes
// left in the channel by an earlier client.
func fakeAgent(t *testing.T, stale string, answer func(cmd string) string) string {
	t.Helper()
	sock := filepath.Join(t.TempDir(), "qga.sock")
	l, err := net.Listen("unix", sock)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { l.Close() })
	go func() {
		for {
			c, err := l.Accept()
			if err != nil {
				return
			}
			c.Write([]byte(stale))
			r := bufio.NewReader(c)
			dec := json.NewDecoder(r)
			for {
				// The 0xFF reset byte is not JSON: skip it.
				if b, err := r.Peek(1); err == nil && b[0] == 0xFF {
					r.ReadByte()
					dec = json.NewDecoder(r)
				}
				var req struct {
					Execute   string `json:"execute"`
					Arguments struct {
						ID int64 `json:"id"`
					} `json:"arguments"`
				}
				if err := dec.Decode(&req); err != nil {
					c.Close()
					break
				}
				if req.Execute == "guest-sync-delimited" {
					b, _ := json.Marshal(map[string]int64{"return": req.Arguments.ID})
					c.Write(append(append([]byte{0xFF}, b...), '\n'))
					continue
				}
				if a := answer(req.Execute); a != "" {
					c.Write([]byte(a + "\n"))
				}
			}
		}
	}()
	return sock
}

// TestAgentProtocol: stale replies left in the channel (an old sync's,
// a command's) are skipped; the command's own reply is returned; an
// error reply carries the agent's class and description; an agent that
// never syncs is ErrNoAgent once SyncTimeout passes.
func TestAgentProtocol(t *testing.T) {
	stale := "\xff{\"return\": 12345}\n{\"return\": \"frozen\"}\n"
	sock := fakeAgent(t, stale, func(cmd string) string {
		switch cmd {
		case "guest-fsfreeze-status":
			return `{"return": "thawed"}`
		case "guest-fsfreeze-freeze":
			return `{"return": 2}`
		case "guest-fsfreeze-thaw":
			return `{"error": {"class": "GenericError", "desc": "nothing is frozen"}}`
		}
		return ""
	})
	a := &Agent{Socket: sock, SyncTimeout: 5 * time.Second}
	ctx := context.Background()
	if s, err := a.FreezeStatus(ctx); err != nil || s != "thawed" {
		t.Fatalf("status: %q, %v", s, err)
	}
	if n, err := a.Freeze(ctx, 5*time.Second); err != nil || n != 2 {
		t.Fatalf("freeze: %d, %v", n, err)
	}
	var ae *AgentError
	if _, err := a.Thaw(ctx); !errors.As(err, &ae) || ae.Class != "GenericError" || !strings.Contains(err.Error(), "nothing is frozen") {
		t.Fatalf("thaw: %v", err)
	}

	silent := fakeAgent(t, "", func(string) string { return "" })
	// A listener that never answers the sync.
	l, err := net.Listen("unix", silent+".mute")
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	go func() {
		for {
			c, err := l.Accept()
			if err != nil {
				return
			}
			defer c.Close()
		}
	}()
	a = &Agent{Socket: silent + ".mute", SyncTimeout: 300 * time.Millisecond}
	if err := a.Ping(ctx); !errors.Is(err, ErrNoAgent) {
		t.Fatalf("ping of a silent channel: %v", err)
	}
	a = &Agent{Socket: filepath.Join(t.TempDir(), "none.sock"), SyncTimeout: 300 * time.Millisecond}
	if err := a.Ping(ctx); !errors.Is(err, ErrNoAgent) {
		t.Fatalf("ping of no socket: %v", err)
	}
	// A command that gets no answer is not taken for a missing agent.
	if _, err := (&Agent{Socket: sock}).Execute(ctx, "guest-unknown", nil, 300*time.Millisecond); err == nil || errors.Is(err, ErrNoAgent) || !strings.Contains(err.Error(), "no answer") {
		t.Fatalf("unanswered command: %v", err)
	}
}
