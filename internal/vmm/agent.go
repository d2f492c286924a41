package vmm

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"math/rand/v2"
	"net"
	"time"
)

// The QEMU guest agent (qemu-ga) runs inside the guest and reads JSON
// commands from a virtio-serial port named AgentPortName; QEMU connects
// that port to a unix socket in the run directory (RUN/qga.sock), which
// the daemon dials. The protocol is QMP's shape without a greeting:
//
//	-> 0xFF {"execute":"guest-sync-delimited","arguments":{"id":N}}
//	<- 0xFF {"return":N}\n
//	-> {"execute":"guest-fsfreeze-freeze"}
//	<- {"return":1}\n
//
// The channel keeps bytes across connections: a reply to a command whose
// client gave up may still come, and an agent that was mid-way through a
// request may hold half of one. So every exchange starts by resetting the
// agent's parser (the 0xFF byte) and syncing on a fresh id; lines before
// the delimited reply with that id are stale and skipped.

// AgentPortName is the virtio-serial port name qemu-ga listens on.
const AgentPortName = "org.qemu.guest_agent.0"

// ErrNoAgent is returned when nothing answers on the agent's channel in
// time: no agent runs in the guest, or the guest is too busy or paused.
var ErrNoAgent = errors.New("the guest agent did not answer")

// Agent is a client of one machine's guest agent. Each call dials the
// socket anew (QEMU's chardev takes one client at a time; the daemon holds
// none between calls).
type Agent struct {
	Socket string
	// SyncTimeout bounds the wait for the agent's answer to the sync that
	// opens every exchange: how long an agent may take to show it is there.
	SyncTimeout time.Duration
}

// AgentSyncTimeout is the default Agent.SyncTimeout.
const AgentSyncTimeout = 10 * time.Second

// AgentError is an error the agent answered a command with.
type AgentError struct {
	Command string
	Class   string
	Desc    string
}

func (e *AgentError) Error() string {
	return fmt.Sprintf("guest agent: %s: %s (%s)", e.Command, e.Desc, e.Class)
}

// Execute runs one command, waiting at most timeout for its answer once
// the agent has synced, and returns its "return" value. An agent that does
// not sync in SyncTimeout is ErrNoAgent.
func (a *Agent) Execute(ctx context.Context, command string, args any, timeout time.Duration) (json.RawMessage, error) {
	syncTimeout := a.SyncTimeout
	if syncTimeout <= 0 {
		syncTimeout = AgentSyncTimeout
	}
	var d net.Dialer
	dctx, cancel := context.WithTimeout(ctx, syncTimeout)
	conn, err := d.DialContext(dctx, "unix", a.Socket)
	cancel()
	if err != nil {
		return nil, fmt.Errorf("%w: %s: %v", ErrNoAgent, a.Socket, err)
	}
	defer conn.Close()
	// A canceled ctx ends the exchange under way.
	stop := context.AfterFunc(ctx, func() { conn.SetDeadline(time.Unix(1, 0)) })
	defer stop()
	r := bufio.NewReader(conn)

	// 1. Sync: reset the agent's parser, then a delimited sync on a fresh id.
	id := rand.Int64N(1 << 50)
	sync, _ := json.Marshal(map[string]any{"execute": "guest-sync-delimited", "arguments": map[string]any{"id": id}})
	conn.SetDeadline(time.Now().Add(syncTimeout))
	if _, err := conn.Write(append([]byte{0xFF}, sync...)); err != nil {
		return nil, fmt.Errorf("%w: %v", ErrNoAgent, err)
	}
	for {
		line, err := r.ReadBytes('\n')
		if err != nil {
			if ctx.Err() != nil {
				return nil, ctx.Err()
			}
			return nil, fmt.Errorf("%w in %v (sync)", ErrNoAgent, syncTimeout)
		}
		// The delimited reply starts with 0xFF; stale replies may not.
		i := bytes.LastIndexByte(line, 0xFF)
		if i < 0 {
			continue
		}
		var reply struct {
			Return *int64 `json:"return"`
		}
		if json.Unmarshal(line[i+1:], &reply) == nil && reply.Return != nil && *reply.Return == id {
			break
		}
	}

	// 2. The command, and its answer: the next line that is a reply.
	cmd, err := json.Marshal(map[string]any{"execute": command, "arguments": args})
	if args == nil {
		cmd, err = json.Marshal(map[string]any{"execute": command})
	}
	if err != nil {
		return nil, err
	}
	conn.SetDeadline(time.Now().Add(timeout))
	if _, err := conn.Write(cmd); err != nil {
		return nil, fmt.Errorf("guest agent: %s: %w", command, err)
	}
	for {
		line, err := r.ReadBytes('\n')
		if err != nil {
			if ctx.Err() != nil {
				return nil, ctx.Err()
			}
			return nil, fmt.Errorf("guest agent: %s: no answer in %v: %v", command, timeout, err)
		}
		line = bytes.TrimLeft(line, "\xff")
		var reply struct {
			Return json.RawMessage `json:"return"`
			Error  *struct {
				Class string `json:"class"`
				Desc  string `json:"desc"`
			} `json:"error"`
		}
		if json.Unmarshal(line, &reply) != nil {
			continue
		}
		if reply.Error != nil {
			return nil, &AgentError{Command: command, Class: reply.Error.Class, Desc: reply.Error.Desc}
		}
		if reply.Return != nil {
			return reply.Return, nil
		}
	}
}

// agentCommandTimeout bounds a command that does no real work in the
// guest (ping, status, thaw).
const agentCommandTimeout = 10 * time.Second

// Ping checks that the agent answers.
func (a *Agent) Ping(ctx context.Context) error {
	_, err := a.Execute(ctx, "guest-ping", nil, agentCommandTimeout)
	return err
}

// FreezeStatus is "frozen" or "thawed" (guest-fsfreeze-status).
func (a *Agent) FreezeStatus(ctx context.Context) (string, error) {
	out, err := a.Execute(ctx, "guest-fsfreeze-status", nil, agentCommandTimeout)
	if err != nil {
		return "", err
	}
	var s string
	if err := json.Unmarshal(out, &s); err != nil {
		return "", fmt.Errorf("guest agent: guest-fsfreeze-status: reply %s: %w", out, err)
	}
	return s, nil
}

// Freeze freezes the guest's file systems (guest-fsfreeze-freeze: each
// is synced and new writes to it wait) and returns how many. The guest
// flushes its caches first, so it may take a while: timeout bounds it.
// After any error the file systems may be frozen (the agent may carry on
// after the client gave up): the caller thaws whatever happens.
func (a *Agent) Freeze(ctx context.Context, timeout time.Duration) (int, error) {
	out, err := a.Execute(ctx, "guest-fsfreeze-freeze", nil, timeout)
	if err != nil {
		return 0, err
	}
	var n int
	if err := json.Unmarshal(out, &n); err != nil {
		return 0, fmt.Errorf("guest agent: guest-fsfreeze-freeze: reply %s: %w", out, err)
	}
	return n, nil
}

// Thaw thaws the guest's file systems and returns how many it thawed.
func (a *Agent) Thaw(ctx context.Context) (int, error) {
	out, err := a.Execute(ctx, "guest-fsfreeze-thaw", nil, agentCommandTimeout)
	if err != nil {
		return 0, err
	}
	var n int
	if err := json.Unmarshal(out, &n); err != nil {
		return 0, fmt.Errorf("guest agent: guest-fsfreeze-thaw: reply %s: %w", out, err)
	}
	return n, nil
}

// GuestAgent is the client of p's guest agent, or nil when p has no
// agent channel.
func (p *Process) GuestAgent() *Agent {
	if p == nil || p.Agent == "" {
		return nil
	}
	return &Agent{Socket: p.Agent}
}
