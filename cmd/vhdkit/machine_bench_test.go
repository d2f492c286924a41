package main

import (
	"context"
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/vhdkit/vhdkit/internal/api"
	"github.com/vhdkit/vhdkit/internal/guest"
)

// The machine benchmarks measure what a running guest feels of
// checkpoints and live merges (bench/machine.sh runs them and prints the
// table). They boot real guests under QEMU (TCG on machines without KVM,
// which makes every guest-side figure slower than on hardware: compare
// the ratios, and the stuns with each other).

// benchRounds is $BENCH_ROUNDS, or def.
func benchRounds(def int) int {
	if n, err := strconv.Atoi(os.Getenv("BENCH_ROUNDS")); err == nil && n > 0 {
		return n
	}
	return def
}

// BenchmarkMachineStun: the Debian guest (systemd, the guest agent, its
// writer service busy on ext4), 512 MiB, takes BENCH_ROUNDS (default 5)
// checkpoints of each type, each deleted again by a live merge after the
// guest wrote into it for a second. Reported per type: the stun (how long
// the guest was frozen, paused, or its I/O held) median and max, and the
// merges' switch stall (the I/O hold when a disk moves back to its
// parent) median and max.
func BenchmarkMachineStun(b *testing.B) {
	dir := shortTempDir(b)
	d := startDaemon(b, filepath.Join(dir, "d"))
	defer d.stop(b)
	_, v, console := bootDebian(b, d, dir)
	defer syscall.Kill(v.Runtime.Pid, syscall.SIGKILL)
	waitConsole(b, console, "started its writer", func(c string) bool { return lastCount(c) >= 20 })

	rounds := benchRounds(5)
	b.ResetTimer()
	for _, kind := range []string{api.CheckpointProduction, api.CheckpointStandard, api.CheckpointCrash} {
		var stuns, stalls []float64
		for i := range rounds {
			var cp api.Checkpoint
			out := d.cli(b, "checkpoint", "create", "deb", "--name", fmt.Sprintf("%s-%d", kind, i), "--type", kind, "--json")
			if err := json.Unmarshal([]byte(out), &cp); err != nil {
				b.Fatalf("checkpoint create: %v\n%s", err, out)
			}
			if cp.Type != kind {
				b.Fatalf("asked for a %s checkpoint, got %s (%s)", kind, cp.Type, cp.Note)
			}
			stuns = append(stuns, cp.StunMS)
			time.Sleep(time.Second)
			d.cli(b, "checkpoint", "delete", "deb", cp.ID, "--wait")
			stalls = append(stalls, lastJob(b, d).StallMS)
		}
		b.Logf("%-10s stun ms %v, switch stall ms %v", kind, stuns, stalls)
		b.ReportMetric(median(stuns), kind+"-stun-ms")
		b.ReportMetric(slices.Max(stuns), kind+"-stun-max-ms")
		b.ReportMetric(median(stalls), kind+"-merge-stall-ms")
		b.ReportMetric(slices.Max(stalls), kind+"-merge-stall-max-ms")
	}
	b.StopTimer()
	d.cli(b, "vm", "stop", "deb", "--turn-off")
}

// BenchmarkMachineMergeWrites: a busybox guest writes 1 MiB blocks
// (direct, each synced) in a loop over 64 MiB of its 1 GiB disk. Its
// write rate is counted from its console over BENCH_SECONDS (default 20)
// on a checkpoint's child holding 512 MiB of other changed data (written
// through NBD), then during the live merge of that child, paced (--bandwidth
// 512 MiB / BENCH_SECONDS) so the copy spans the window. Reported: guest
// MiB/s without and during the merge, their ratio, the merge's stall.
func BenchmarkMachineMergeWrites(b *testing.B) {
	env := guest.Require(b)
	seconds := 20
	if n, err := strconv.Atoi(os.Getenv("BENCH_SECONDS")); err == nil && n > 0 {
		seconds = n
	}
	dir := shortTempDir(b)
	block := make([]byte, 1<<20)
	fillPattern(block, 0, 0x6b)
	boot, err := env.WriteBoot(dir, guest.Options{
		Disks: []guest.Disk{{}},
		Files: map[string]guest.File{"/block": {Data: block}},
		Script: `i=0
while true; do
  dd if=/block of=/dev/vda bs=1M seek=$(( i % 64 )) oflag=direct conv=fsync,notrunc status=none || echo GUEST-IO-ERROR
  echo W
  i=$(( i + 1 ))
done
`,
	})
	if err != nil {
		b.Fatal(err)
	}
	d := startDaemon(b, filepath.Join(dir, "d"))
	defer d.stop(b)
	d.cli(b, "vm", "create", "g", "--disk", "1G", "--memory", "256M", "--accel", "tcg",
		"--kernel", boot.Kernel, "--initrd", boot.Initrd, "--append", boot.Append)
	d.cli(b, "vm", "start", "g")
	v := d.vm(b, "g")
	defer syscall.Kill(v.Runtime.Pid, syscall.SIGKILL)
	console := func() string { c, _ := os.ReadFile(v.Runtime.Console); return string(c) }
	writes := func() int { return strings.Count(console(), "W\r\n") }
	waitConsole(b, console, "started writing", func(string) bool { return writes() >= 10 })

	// The child: a checkpoint, then 512 MiB of changed data beside the
	// guest's 64 MiB.
	d.cli(b, "checkpoint", "create", "g", "--name", "bench", "--type", "crash")
	c := dialNBD(b, d.nbd, "g")
	chunk := make([]byte, 4<<20)
	for off := int64(256 << 20); off < 768<<20; off += int64(len(chunk)) {
		fillPattern(chunk, off, 0x21)
		if _, err := c.WriteAt(chunk, off); err != nil {
			b.Fatal(err)
		}
	}
	if err := c.Flush(); err != nil {
		b.Fatal(err)
	}
	c.Close()

	rate := func(window func()) (mibps, secs float64) {
		n0, t0 := writes(), time.Now()
		window()
		secs = time.Since(t0).Seconds()
		return float64(writes()-n0) / secs, secs
	}
	b.ResetTimer()
	idle, _ := rate(func() { time.Sleep(time.Duration(seconds) * time.Second) })
	bandwidth := fmt.Sprintf("%dM", max(1, 512/seconds))
	during, mergeSecs := rate(func() { d.cli(b, "checkpoint", "delete", "g", "bench", "--wait", "--bandwidth", bandwidth) })
	b.StopTimer()
	if strings.Contains(console(), "GUEST-IO-ERROR") {
		b.Fatalf("the guest saw an I/O error:\n%s", console())
	}
	job := lastJob(b, d)
	b.Logf("guest writes: %.2f MiB/s on the child, %.2f MiB/s during the %.1f s merge (%s merged at --bandwidth %s), stall %.1f ms",
		idle, during, mergeSecs, humanBytes(job.Done), bandwidth, job.StallMS)
	b.ReportMetric(idle, "idle-MiB/s")
	b.ReportMetric(during, "merging-MiB/s")
	b.ReportMetric(during/idle, "merging/idle")
	b.ReportMetric(job.StallMS, "merge-stall-ms")
	d.cli(b, "vm", "stop", "g", "--turn-off")
}

// lastJob is the daemon's newest job.
func lastJob(t testing.TB, d *daemon) api.Job {
	t.Helper()
	jobs, err := (&api.Client{DataDir: d.data}).Jobs(context.Background())
	if err != nil || len(jobs) == 0 {
		t.Fatalf("listing jobs: %v", err)
	}
	return jobs[len(jobs)-1]
}

// median of xs (not empty).
func median(xs []float64) float64 {
	s := slices.Clone(xs)
	slices.Sort(s)
	if len(s)%2 == 1 {
		return s[len(s)/2]
	}
	return (s[len(s)/2-1] + s[len(s)/2]) / 2
}
