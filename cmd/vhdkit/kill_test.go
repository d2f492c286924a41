package main

import (
	"context"
	"fmt"
	"math/rand/v2"
	"os"
	"path/filepath"
	"strconv"
	"sync"
	"testing"
	"time"

	"github.com/vhdkit/vhdkit/internal/api"
	"github.com/vhdkit/vhdkit/nbd"
	"github.com/vhdkit/vhdkit/storage/faulttest"
)

// killWriter writes through NBD and knows, through its byte model, what a
// crash may leave: every write followed by an acknowledged flush must
// survive; writes not yet flushed may survive whole, in part (sector by
// sector), or not at all.
type killWriter struct {
	rng     *rand.Rand
	model   *faulttest.Model
	writes  int // issued since the last flush
	flushed int // writes acknowledged by a Flush, all rounds
}

// run writes and flushes through c until an error (the daemon died).
func (w *killWriter) run(c *nbd.Client) {
	size := int64(len(w.model.Acked()))
	for i := 0; ; i++ {
		n := (w.rng.Int64N(16) + 1) * 4096
		off := w.rng.Int64N((size-n)/4096+1) * 4096
		data := make([]byte, n)
		for k := range data {
			data[k] = byte(w.rng.Uint32())
		}
		w.model.Write(off, data)
		w.writes++
		if _, err := c.WriteAt(data, off); err != nil {
			return
		}
		if i%4 == 3 {
			if err := c.Flush(); err != nil {
				return
			}
			w.model.Flushed()
			w.flushed += w.writes
			w.writes = 0
		}
	}
}

// settle checks the disk's content got after a crash against what may
// have survived, and takes it as the new acknowledged state.
func (w *killWriter) settle(t *testing.T, got []byte, what string) {
	t.Helper()
	if err := w.model.Check(got); err != nil {
		t.Fatalf("%s: %v", what, err)
	}
	w.model.Settle(got)
	w.writes = 0
}

// TestServeKill kills the daemon with SIGKILL at random moments while a
// client writes to a two-disk machine and checkpoints are created and
// deleted (live merges of the running disk, offline merges of older
// checkpoints) under it. After each restart every flushed write must
// read back, interrupted jobs must resume and finish, and every
// checkpoint's files must be there. VHDKIT_KILL_ROUNDS sets the number
// of kills (a long soak); CI runs a short loop.
func TestServeKill(t *testing.T) {
	if testing.Short() {
		t.Skip("kills a real daemon many times")
	}
	rounds := 8
	if s := os.Getenv("VHDKIT_KILL_ROUNDS"); s != "" {
		n, err := strconv.Atoi(s)
		if err != nil {
			t.Fatalf("VHDKIT_KILL_ROUNDS=%q", s)
		}
		rounds = n
	}
	dir := shortTempDir(t)
	data := filepath.Join(dir, "d")
	d := startDaemon(t, data)
	d.cli(t, "vm", "create", "k", "--disk", "24M", "--disk", "8M")
	rng := rand.New(rand.NewPCG(7, uint64(time.Now().UnixNano())))
	seed := rng.Uint64()
	t.Logf("seed %d", seed)
	rng = rand.New(rand.NewPCG(seed, 1))
	writers := []*killWriter{
		{rng: rand.New(rand.NewPCG(seed, 2)), model: faulttest.NewModel(make([]byte, 24<<20), 512)},
		{rng: rand.New(rand.NewPCG(seed, 3)), model: faulttest.NewModel(make([]byte, 8<<20), 512)},
	}
	exports := []string{"k", "k/1"}
	ctx := context.Background()
	cl := &api.Client{DataDir: data}
	made, merges := 0, 0
	for round := 0; round < rounds; round++ {
		var wg sync.WaitGroup
		var clients []*nbd.Client
		for i, w := range writers {
			c, err := nbd.Dial(ctx, "unix", d.nbd, &nbd.ClientOptions{Export: exports[i]})
			if err != nil {
				t.Fatal(err)
			}
			clients = append(clients, c)
			wg.Add(1)
			go func() { defer wg.Done(); w.run(c) }()
		}
		// Change the tree while the writers write, then kill at a
		// random moment of it.
		tree, err := cl.Checkpoints(ctx, "k")
		if err != nil {
			t.Fatal(err)
		}
		time.Sleep(time.Duration(rng.IntN(200)) * time.Millisecond)
		switch n := len(tree.Checkpoints); {
		case n == 0 || n < 3 && rng.IntN(2) == 0:
			made++
			cl.CreateCheckpoint(ctx, "k", api.CreateCheckpoint{Name: fmt.Sprintf("cp%d", made)})
		default:
			// The one the machine runs from (a live merge) or any other
			// (an offline merge, or a drop); slow enough to be cut.
			c := tree.Checkpoints[rng.IntN(n)]
			if _, err := cl.DeleteCheckpoint(ctx, "k", c.ID, false, 8<<20); err == nil {
				merges++
			}
		}
		time.Sleep(time.Duration(rng.IntN(1000)) * time.Millisecond)
		d.kill()
		wg.Wait()
		for _, c := range clients {
			c.Close()
		}

		d = startDaemon(t, data)
		for i, w := range writers {
			c, err := nbd.Dial(ctx, "unix", d.nbd, &nbd.ClientOptions{Export: exports[i]})
			if err != nil {
				t.Fatalf("round %d: %v", round, err)
			}
			got := make([]byte, len(w.model.Acked()))
			if _, err := c.ReadAt(got, 0); err != nil {
				t.Fatalf("round %d: %v", round, err)
			}
			c.Close()
			w.settle(t, got, fmt.Sprintf("round %d, disk %d", round, i))
		}
		finishJobs(t, cl, round)
		if err := checkTree(cl); err != nil {
			state, _ := os.ReadFile(filepath.Join(data, "state.json"))
			t.Fatalf("round %d: %v\nstate:\n%s\ndaemon log:\n%s", round, err, state, d.stderr)
		}
	}
	// The merged result, reread after a clean stop.
	v := d.vm(t, "k")
	d.stop(t)
	for i, disk := range v.Disks {
		acked := writers[i].model.Acked()
		if got := readImage(t, disk.Path, 0, int64(len(acked))); string(got) != string(acked) {
			t.Fatalf("disk %d (%s) differs after the last stop", i, disk.Path)
		}
		checkClean(t, disk.Path)
	}
	// settle fails the test at the first acknowledged sector missing:
	// reaching here, none was lost.
	t.Logf("%d kills; %d checkpoints created, %d deletions started; %d flushed writes, 0 lost", rounds, made, merges, writers[0].flushed+writers[1].flushed)
}

// finishJobs lets every unfinished job run at full speed to its end.
func finishJobs(t *testing.T, cl *api.Client, round int) {
	t.Helper()
	ctx := context.Background()
	zero := int64(0)
	for deadline := time.Now().Add(2 * time.Minute); time.Now().Before(deadline); time.Sleep(20 * time.Millisecond) {
		jobs, err := cl.Jobs(ctx)
		if err != nil {
			t.Fatal(err)
		}
		busy := false
		for _, j := range jobs {
			if j.Finished() {
				continue
			}
			if j.State == api.JobPaused {
				t.Fatalf("round %d: job %s paused after the restart: %s", round, j.ID, j.Reason)
			}
			busy = true
			if j.Bandwidth != 0 {
				cl.SetJob(ctx, j.ID, api.SetJob{Bandwidth: &zero})
			}
		}
		if !busy {
			return
		}
	}
	t.Fatalf("round %d: jobs did not finish", round)
}

// checkTree checks that every checkpoint's files and every disk's chain
// are there.
func checkTree(cl *api.Client) error {
	ctx := context.Background()
	tree, err := cl.Checkpoints(ctx, "k")
	if err != nil {
		return err
	}
	for _, c := range tree.Checkpoints {
		for _, f := range c.Files {
			if _, err := os.Stat(f); err != nil {
				return fmt.Errorf("checkpoint %s: %v", c.Name, err)
			}
		}
	}
	v, err := cl.VM(ctx, "k")
	if err != nil {
		return err
	}
	for _, disk := range v.Disks {
		for _, f := range disk.Chain {
			if _, err := os.Stat(f); err != nil {
				return fmt.Errorf("disk chain %v: %v", disk.Chain, err)
			}
		}
	}
	return nil
}
