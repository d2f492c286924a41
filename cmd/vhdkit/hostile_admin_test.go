package main

import (
	"bytes"
	"context"
	"fmt"
	"math/rand/v2"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/vhdkit/vhdkit/internal/testenv"
	"github.com/vhdkit/vhdkit/nbd"
)

// TestHostileAdmin runs a daemon with two NBD writers on one machine's
// disk while an admin loop fires every command that could hurt it: an
// offline merge, resize and set-parent of its files, checkpoint apply and
// vm delete while the writers are connected, a second "vhdkit nbd" and a
// second daemon on the same files (a read-only server on a checkpoint's
// frozen parent is not hostile: readers share it, and a merge into it
// waits for them to leave), qemu-img and qemu-io, mixed with the
// legitimate checkpoint create and delete (live merges). For a bounded
// time every command must either succeed safely or fail cleanly (exit 1,
// one line), and at the end every flushed write must read back, through
// NBD and from the files after the daemon stops.
func TestHostileAdmin(t *testing.T) {
	qemuIO := testenv.Tool(t, "qemu-io")
	qemuImg := testenv.Tool(t, "qemu-img")
	dir := shortTempDir(t)
	d := startDaemon(t, filepath.Join(dir, "d"))
	const size = 32 << 20
	d.cli(t, "vm", "create", "web", "--disk", "32M")

	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()

	// Each writer owns half the disk and keeps what it flushed in a model.
	type writer struct {
		c      *nbd.Client
		base   int64
		model  []byte // the half as last flushed
		writes int
	}
	writers := make([]*writer, 2)
	for i := range writers {
		writers[i] = &writer{c: dialNBD(t, d.nbd, "web"), base: int64(i) * size / 2, model: make([]byte, size/2)}
	}
	var wg sync.WaitGroup
	errs := make(chan error, len(writers))
	for i, w := range writers {
		wg.Add(1)
		go func() {
			defer wg.Done()
			rng := rand.New(rand.NewPCG(uint64(i), 1))
			pending := make([]byte, len(w.model))
			copy(pending, w.model)
			buf := make([]byte, 64<<10)
			for ctx.Err() == nil {
				off := rng.Int64N(int64(len(w.model)-len(buf))) &^ 511
				for j := range buf {
					buf[j] = byte(rng.Uint32())
				}
				if _, err := w.c.WriteAt(buf, w.base+off); err != nil {
					errs <- fmt.Errorf("writer %d: write at %d: %w", i, w.base+off, err)
					return
				}
				copy(pending[off:], buf)
				if w.writes++; w.writes%8 == 0 {
					if err := w.c.Flush(); err != nil {
						errs <- fmt.Errorf("writer %d: flush: %w", i, err)
						return
					}
					copy(w.model, pending)
				}
			}
			if err := w.c.Flush(); err != nil {
				errs <- fmt.Errorf("writer %d: last flush: %w", i, err)
				return
			}
			copy(w.model, pending)
		}()
	}

	// The admin loop.
	d2data := filepath.Join(dir, "d2")
	d2 := startDaemon(t, d2data)
	attempts := map[string]int{}
	refused := map[string]int{}
	cp := 0
	for round := 0; ctx.Err() == nil; round++ {
		v := d.vm(t, "web")
		leaf := v.Disks[0].Path
		chain := v.Disks[0].Chain
		base := chain[len(chain)-1]
		commands := [][]string{
			{"merge", leaf},
			{"merge", "--into", base, leaf},
			{"resize", "--size", "64M", base},
			{"resize", "--size", "64M", leaf},
			{"set-parent", "--parent", base, leaf},
			{"nbd", "--socket", filepath.Join(dir, "x.sock"), leaf},
			{"vm", "delete", "web"},
			{"vm", "create", "thief", "--data", d2data, "--attach", leaf},
			{"vm", "create", "thief2", "--data", d2data, "--attach", base},
		}
		if len(chain) > 1 {
			commands = append(commands, []string{"checkpoint", "apply", "web", v.Current})
		}
		switch round % 3 {
		case 0:
			cp++
			commands = append(commands, []string{"checkpoint", "create", "web", "--name", fmt.Sprintf("c%d", cp)})
		case 2:
			if v.Current != "" {
				commands = append(commands, []string{"checkpoint", "delete", "web", v.Current})
			}
		}
		rand.Shuffle(len(commands), func(i, j int) { commands[i], commands[j] = commands[j], commands[i] })
		for _, args := range commands {
			if ctx.Err() != nil {
				break
			}
			name := commandName(args)
			attempts[name]++
			out, errOut, err := d.try(args...)
			switch {
			case err == nil:
				if !legitimate(name) {
					t.Errorf("vhdkit %s succeeded against a running disk:\n%s", strings.Join(args, " "), out)
				}
			case isExit1(err) && strings.Count(strings.TrimSpace(errOut), "\n") == 0 && strings.HasPrefix(errOut, "vhdkit: "):
				refused[name]++
			default:
				t.Errorf("vhdkit %s: %v (want success or a clean refusal)\nstdout: %s\nstderr: %s", strings.Join(args, " "), err, out, errOut)
			}
		}
		// QEMU's tools are refused too: reading the disk being written,
		// writing the base the chain reads (a reader may read the frozen
		// base of a checkpoint, as the daemon does).
		v = d.vm(t, "web")
		leaf, base = v.Disks[0].Path, v.Disks[0].Chain[len(v.Disks[0].Chain)-1]
		for _, args := range [][]string{{qemuIO, "-f", "vhdx", "-c", "read 0 4k", leaf}, {qemuIO, "-f", "vhdx", "-c", "write 0 4k", base}, {qemuImg, "check", "-f", "vhdx", leaf}} {
			out, err := exec.Command(args[0], args[1:]...).CombinedOutput()
			if bytes.Contains(out, []byte("No such file")) {
				continue // a live merge ended and removed the child between the two
			}
			if err == nil || !bytes.Contains(out, []byte("lock")) {
				t.Errorf("%s on a running disk: %v\n%s", strings.Join(args, " "), err, out)
			}
		}
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Error(err)
	}
	t.Logf("commands tried: %v; refused: %v", attempts, refused)
	d2.stop(t)

	// Every flushed write reads back through NBD...
	for i, w := range writers {
		got := make([]byte, len(w.model))
		if _, err := w.c.ReadAt(got, w.base); err != nil {
			t.Fatal(err)
		}
		if !bytes.Equal(got, w.model) {
			t.Errorf("writer %d: flushed data differs when read back through NBD", i)
		}
		w.c.Close()
	}
	// ...and from the files once the daemon is gone.
	leaf := d.vm(t, "web").Disks[0].Path
	d.stop(t)
	for i, w := range writers {
		if !bytes.Equal(readImage(t, leaf, w.base, int64(len(w.model))), w.model) {
			t.Errorf("writer %d: flushed data differs in %s", i, leaf)
		}
	}
	checkClean(t, leaf)
}

// commandName is the verb of an admin command, for the tally.
func commandName(args []string) string {
	switch args[0] {
	case "vm", "checkpoint":
		return args[0] + " " + args[1]
	}
	return args[0]
}

// legitimate commands may succeed while the machine runs: they are safe.
func legitimate(name string) bool {
	return name == "checkpoint create" || name == "checkpoint delete"
}

func isExit1(err error) bool {
	ee, ok := err.(*exec.ExitError)
	return ok && ee.ExitCode() == 1
}
