#!/usr/bin/env bash
# Measures live merge under "vhdkit serve", in one run:
#
# 1. What a guest sees while a checkpoint is merged live under it.
#    A machine with a 4 GiB disk gets SIZE (default 1 GiB) of random data
#    at offset 0 (nbdcopy from a file), is checkpointed, and gets SIZE of
#    other random data over the same range, so the child (.avhdx) holds
#    SIZE of changed data. Then the same fio job (random 4 KiB writes, 8 in
#    flight, BENCH_SECONDS (default 10) time-based, ending with a flush,
#    the same offsets both times) runs twice against the export:
#      (a) baseline: nothing else running;
#      (b) live: started just after "vhdkit checkpoint delete --bandwidth
#          RATE", the live merge of that child back into the .vhdx.
#    Making (a) and (b) comparable: the job writes only within the first
#    SIZE, which is allocated in both the child (fully written, so the
#    baseline allocates nothing and the child's allocation, hence what the
#    merge copies, stays the same; the script checks the child's file size
#    does not change) and the parent (so the writes mirrored into it during
#    the merge allocate nothing either). The baseline runs on the child,
#    before the merge, and the live run on the same child with the same
#    offsets; the difference is what the merge adds: every guest write
#    also written into the parent (mirroring) under a range lock shared
#    with the copier, the copy itself (1 MiB steps) and the parent's flush
#    once a second. Dirty data is written back (sync) before each run.
#    RATE defaults to SIZE / (BENCH_SECONDS + 2), so the copy outlasts fio
#    and the whole fio run overlaps it (BENCH_RATE=N[K|M|G] overrides); the
#    script reports, from the job's progress when fio ends and its finish
#    time, whether the merge still ran then or how early it ended. The
#    switch to the parent then happens after fio ends: its stall is the
#    job's stall_ms, printed separately. The same pair then runs with one
#    write in flight (latency; a second checkpoint with SIZE of changed
#    data and its own merge; BENCH_QD1=0 skips it).
#    Printed per run: write IOPS and MiB/s, completion latency (fio's
#    clat) p50, p99, p99.9 and max, the daemon's CPU time, and the ratios
#    live / baseline (throughput: below 1 is slower; latency: above 1 is
#    slower). Every merge must end "done" with done == total == SIZE and
#    the disk running on the checkpoint's .vhdx again (vm show --json).
#
# 2. Merge throughput against a plain copy of the same bytes. A fresh
#    machine as above (SIZE of data, a checkpoint, SIZE of changed data in
#    the child), no guest load: the unthrottled "checkpoint delete --wait"
#    (which flushes the merged file and syncs the directory itself; the
#    polling of --wait adds up to 0.1 s; the job's own duration, from its
#    timestamps, is printed too) against cp of a SIZE file holding the same
#    bytes (the merge overwrites blocks the .vhdx holds; cp writes a new
#    file). Each starts after a sync and ends with one. The merged disk is
#    compared with the data through NBD once. Best of BENCH_RUNS (default
#    2) runs; prints MiB/s and the ratio merge / cp (above 1: faster).
#
# The daemon, fio and the kernel's writeback share this machine's CPUs,
# so anything else running skews the figures: run it on an otherwise idle
# machine. The load average at the start and, per fio run, the share of
# CPU time left idle are printed to help judge that.
#
# Usage: bench/live.sh [SIZE]   (SIZE default 1G; K, M or G)
#   BENCH_SECONDS=10 BENCH_RATE=SIZE/(BENCH_SECONDS+2) BENCH_QD1=1 BENCH_RUNS=2
set -Eeuo pipefail
cd "$(dirname "$0")/.."

size=${1:-1G}
seconds=${BENCH_SECONDS:-10}
runs=${BENCH_RUNS:-2}
qd1=${BENCH_QD1:-1}

die() {
	echo "bench/live.sh: $*" >&2
	exit 1
}
for tool in fio nbdcopy python3; do
	command -v "$tool" >/dev/null || die "$tool is needed (apt-get install fio libnbd-bin python3)"
done
fio --enghelp=nbd >/dev/null 2>&1 || die "fio has no nbd engine"

# bytes_of SIZE prints SIZE (N, NK, NM, NG or NT; powers of 1024) in bytes.
bytes_of() {
	python3 - "$1" <<-'EOF'
		import re, sys
		m = re.fullmatch(r"(\d+)([KMGT]?)(i?B)?", sys.argv[1])
		if not m or int(m.group(1)) <= 0:
		    sys.exit("bench/live.sh: invalid size %r" % sys.argv[1])
		print(int(m.group(1)) << (10 * " KMGT".index(m.group(2) or " ")))
	EOF
}
[[ $seconds =~ ^[1-9][0-9]*$ ]] || die "BENCH_SECONDS must be a whole number of seconds"
[[ $runs =~ ^[1-9][0-9]*$ ]] || die "BENCH_RUNS must be a positive number"
bytes=$(bytes_of "$size")
disk=$((4 << 30))
((bytes <= disk)) || die "SIZE must be at most 4G (the disk's size)"
((bytes % (1 << 20) == 0)) || die "SIZE must be a multiple of 1M"
if [ -n "${BENCH_RATE:-}" ]; then
	rate=$(bytes_of "$BENCH_RATE")
else
	rate=$((bytes / (seconds + 2)))
fi
mib() { awk -v b="$1" 'BEGIN { printf "%.0f", b / 2^20 }'; }

work=$(mktemp -d "${TMPDIR:-/tmp}/vhdkit-live-bench-XXXXXX")
pids=()
failed=1
cleanup() {
	for p in "${pids[@]}"; do
		kill -TERM "$p" 2>/dev/null || true
		wait "$p" 2>/dev/null || true
	done
	if ((failed)) && [ -s "$work/serve.err" ]; then
		echo "bench/live.sh: the daemon's last log lines:" >&2
		tail -n 20 "$work/serve.err" >&2
	fi
	rm -rf "$work"
}
trap cleanup EXIT
trap 'echo "bench/live.sh: line $LINENO failed: $BASH_COMMAND" >&2' ERR

load=$(cut -d' ' -f1-3 /proc/loadavg)
echo "building vhdkit"
CGO_ENABLED=0 go build -o "$work/vhdkit" ./cmd/vhdkit # static, as README builds it
vhdkit=$work/vhdkit
export VHDKIT_DATA=$work/data

echo "making 2 x $size of random data"
head -c "$bytes" /dev/urandom >"$work/a.img"
head -c "$bytes" /dev/urandom >"$work/b.img"

"$vhdkit" serve >"$work/serve.out" 2>"$work/serve.err" &
dpid=$!
pids+=("$dpid")
for ((i = 0; i < 100; i++)); do
	grep -q '^vhdkit serving' "$work/serve.out" && break
	kill -0 "$dpid" 2>/dev/null || die "vhdkit serve exited: $(cat "$work/serve.err")"
	sleep 0.1
done
grep -q '^vhdkit serving' "$work/serve.out" || die "vhdkit serve did not start"
uri_of() { echo "nbd+unix:///$1?socket=$VHDKIT_DATA/nbd.sock"; }

# json FILE EXPR prints the Python expression EXPR of the JSON document d
# in FILE.
json() {
	python3 - "$1" "$2" <<-'EOF'
		import json, sys
		d = json.load(open(sys.argv[1]))
		print(eval(sys.argv[2]))
	EOF
}
# epoch TIME prints an RFC 3339 time (as Go writes it) in Unix seconds.
epoch() {
	python3 - "$1" <<-'EOF'
		import datetime, re, sys
		m = re.fullmatch(r"(.*T\d\d:\d\d:\d\d)(\.\d+)?Z", sys.argv[1])
		t = datetime.datetime.fromisoformat(m.group(1)).replace(tzinfo=datetime.timezone.utc)
		print("%.6f" % (t.timestamp() + float(m.group(2) or 0)))
	EOF
}
now() { date +%s.%N; }
ticks=$(getconf CLK_TCK)
cpu() { awk '{ print $14 + $15 }' "/proc/$1/stat"; }
# idle prints the machine's idle (and iowait) ticks and all its ticks.
idle() { awk '/^cpu / { print $5 + $6, $2 + $3 + $4 + $5 + $6 + $7 + $8 + $9 }' /proc/stat; }

# disk_path VM prints the file VM's first disk runs on.
disk_path() {
	"$vhdkit" vm show "$1" --json >"$work/vm.json"
	json "$work/vm.json" 'd["disks"][0]["path"]'
}

# wait_job ID polls the job until it ends; it must end done, with done ==
# total == SIZE. Leaves the job in $work/job-end.json.
wait_job() {
	local id=$1 state
	for ((i = 0; ; i++)); do
		"$vhdkit" job show "$id" --json >"$work/job-end.json"
		state=$(json "$work/job-end.json" 'd["state"]')
		case $state in
		done) break ;;
		failed | canceled | paused) die "job $id $state: $(json "$work/job-end.json" 'd.get("reason", "")')" ;;
		esac
		((i < 6000)) || die "job $id still $state after 20 minutes"
		sleep 0.2
	done
	[ "$(json "$work/job-end.json" 'd["done"] == d["total"] == '"$bytes")" = True ] ||
		die "job $id merged $(json "$work/job-end.json" 'd["done"], d["total"]') bytes (done, total), not $bytes"
}

# check_merged VM FILE CHILD fails unless VM's disk runs on FILE (the
# checkpoint's .vhdx) alone again and the merged CHILD is gone.
check_merged() {
	local path
	path=$(disk_path "$1")
	[ "$path" = "$2" ] && [[ $path == *.vhdx ]] || die "after the merge $1 runs on $path, not $2"
	[ "$(json "$work/vm.json" 'len(d["disks"][0]["chain"])')" = 1 ] || die "after the merge $1's chain is $(json "$work/vm.json" 'd["disks"][0]["chain"]')"
	[ ! -e "$3" ] || die "the merged file $3 is still there"
}

# fio_run QD NAME runs the random-write job with QD in flight against the
# export of machine m (after the caller's sync) and records, under NAME, IOPS, MiB/s, clat p50,
# p99, p99.9 (µs) and max (ms), the daemon's CPU seconds and the share of
# the machine's CPU time left idle.
declare -A R
fio_run() {
	local qd=$1 name=$2 before after vals i0 t0 i1 t1
	before=$(cpu "$dpid")
	read -r i0 t0 < <(idle)
	fio_start=$(now)
	fio --name=live --ioengine=nbd --uri="$(uri_of m)" --rw=randwrite --bs=4k --iodepth="$qd" \
		--size="$bytes" --time_based --runtime="$seconds" --end_fsync=1 \
		--percentile_list=50:99:99.9 --output-format=json >"$work/fio-$name.json"
	fio_end=$(now)
	after=$(cpu "$dpid")
	read -r i1 t1 < <(idle)
	vals=$(python3 - "$work/fio-$name.json" <<-'EOF'
		import json, sys
		text = open(sys.argv[1]).read()
		# The nbd engine prints a line of its own before the JSON.
		job = json.loads(text[text.index("\n{") + 1:] if not text.startswith("{") else text)["jobs"][0]
		if job["error"]:
		    sys.exit("fio error %d" % job["error"])
		w = job["write"]
		p = w["clat_ns"]["percentile"]
		print("%.0f %.1f %.0f %.0f %.0f %.2f" % (w["iops"], w["bw_bytes"] / 2**20, p["50.000000"] / 1e3,
		    p["99.000000"] / 1e3, p["99.900000"] / 1e3, w["clat_ns"]["max"] / 1e6))
	EOF
	)
	R[$name]="$vals $(awk -v a="$after" -v b="$before" -v t="$ticks" 'BEGIN { printf "%.1f", (a - b) / t }')"
	R[$name]+=" $(awk -v i0="$i0" -v i1="$i1" -v t0="$t0" -v t1="$t1" 'BEGIN { printf "%.0f", 100 * (i1 - i0) / (t1 - t0) }')"
}

# live_pair QD CHECKPOINT DATA: checkpoint m, write DATA (SIZE of changed
# data) into the child, run the baseline, then the live run under the
# merge of the child, and record what happened under qdQD.
live_pair() {
	local qd=$1 cp=$2 data=$3 frozen child s0 s1 id at_end
	"$vhdkit" checkpoint create m --name "$cp" --json >"$work/cp.json"
	frozen=$(json "$work/cp.json" 'd["files"][0]')
	child=$(disk_path m)
	[[ $child == *.avhdx ]] || die "after checkpoint $cp, m runs on $child, not an .avhdx"
	nbdcopy --flush "$data" "$(uri_of m)"
	sync
	s0=$(stat -c %s "$child")
	echo "  qd$qd baseline: fio on the child, no merge"
	fio_run "$qd" "qd$qd.base"
	s1=$(stat -c %s "$child")
	((s0 == s1)) || echo "  warning: the baseline grew the child from $s0 to $s1 bytes" >&2
	echo "  qd$qd live: fio under checkpoint delete --bandwidth $(mib "$rate")M"
	sync
	"$vhdkit" checkpoint delete m "$cp" --bandwidth "$rate" --json >"$work/job.json"
	id=$(json "$work/job.json" 'd["id"]')
	fio_run "$qd" "qd$qd.live"
	"$vhdkit" job show "$id" --json >"$work/job-at-end.json"
	wait_job "$id"
	check_merged m "$frozen" "$child"
	m_disk=$frozen
	local created finished
	created=$(epoch "$(json "$work/job-end.json" 'd["created"]')")
	finished=$(epoch "$(json "$work/job-end.json" 'd["updated"]')")
	at_end=$(json "$work/job-at-end.json" '"%s %d" % (d["state"], d["done"])')
	R[qd$qd.merge]="$id $created $finished $fio_start $fio_end $at_end $(json "$work/job-end.json" 'd.get("stall_ms", 0)') $(basename "$frozen")"
}

"$vhdkit" vm create m --disk 4G >/dev/null
echo "part 1: writing $size into machine m's 4 GiB disk"
nbdcopy --flush "$work/a.img" "$(uri_of m)"
live_pair 8 cp-qd8 "$work/b.img"
if ((qd1)); then
	live_pair 1 cp-qd1 "$work/a.img"
fi

# secs CMD... runs CMD after a sync and prints its elapsed seconds, sync
# included.
secs() {
	sync
	local s e
	s=$(now)
	"$@" >"$work/secs.out"
	sync
	e=$(now)
	awk -v s="$s" -v e="$e" 'BEGIN { printf "%.3f\n", e - s }'
}
best() { printf '%s\n' "$@" | sort -g | head -n1; }
echo "part 2: unthrottled merge of $size against cp, $runs runs"
mt=() ct=() jt=()
for ((run = 1; run <= runs; run++)); do
	vm=copy$run
	"$vhdkit" vm create "$vm" --disk 4G >/dev/null
	nbdcopy --flush "$work/a.img" "$(uri_of "$vm")"
	"$vhdkit" checkpoint create "$vm" --name cp --json >"$work/cp.json"
	frozen=$(json "$work/cp.json" 'd["files"][0]')
	child=$(disk_path "$vm")
	nbdcopy --flush "$work/b.img" "$(uri_of "$vm")"
	mt+=("$(secs "$vhdkit" checkpoint delete "$vm" cp --wait --json)")
	cp "$work/secs.out" "$work/job-end.json"
	[ "$(json "$work/job-end.json" 'd["state"] == "done" and d["done"] == d["total"] == '"$bytes")" = True ] ||
		die "merge of $vm: $(cat "$work/job-end.json")"
	jt+=("$(awk -v s="$(epoch "$(json "$work/job-end.json" 'd["created"]')")" -v e="$(epoch "$(json "$work/job-end.json" 'd["updated"]')")" 'BEGIN { printf "%.3f", e - s }')")
	check_merged "$vm" "$frozen" "$child"
	if ((run == 1)); then
		# The merged disk holds the changed data (and zeros after it).
		nbdcopy "$(uri_of "$vm")" "$work/check.img"
		cmp -n "$bytes" "$work/check.img" "$work/b.img" || die "$vm does not read back the data merged into it"
		[ "$(stat -c %s "$work/check.img")" = "$disk" ] || die "$vm's export is not 4 GiB"
		rm -f "$work/check.img"
	fi
	"$vhdkit" vm delete --delete-disks "$vm" >/dev/null
	ct+=("$(secs cp "$work/b.img" "$work/copy.img")")
	rm -f "$work/copy.img"
done

# The daemon stops cleanly; m's disk checks clean.
kill -TERM "$dpid"
wait "$dpid" || die "vhdkit serve exited with status $? on SIGTERM"
pids=()
"$vhdkit" check "$m_disk" >/dev/null || die "m's disk $m_disk does not check clean"

# report QD prints the table of one live_pair.
report() {
	local qd=$1 b l
	read -r -a b <<<"${R[qd$qd.base]}"
	read -r -a l <<<"${R[qd$qd.live]}"
	echo
	printf 'random 4 KiB writes, %d in flight, %d s each, within the first %s of a 4 GiB disk:\n' "$qd" "$seconds" "$size"
	printf '%-22s %8s %8s %9s %9s %9s %9s %9s %7s\n' "" IOPS MiB/s "p50 µs" "p99 µs" "p99.9 µs" "max ms" "cpu s" "idle %"
	printf '%-22s %8s %8s %9s %9s %9s %9s %9s %7s\n' "baseline (no merge)" "${b[@]}"
	printf '%-22s %8s %8s %9s %9s %9s %9s %9s %7s\n' "during live merge" "${l[@]}"
	python3 - "${b[@]}" "${l[@]}" <<-'EOF'
		import sys
		v = [float(x) for x in sys.argv[1:]]
		b, l = v[:7], v[8:15]
		r = ["%.2f" % (y / x) if x else "-" for x, y in zip(b, l)]
		print("%-22s %8s %8s %9s %9s %9s %9s %9s" % ("ratio live/baseline", *r))
	EOF
	local m
	read -r -a m <<<"${R[qd$qd.merge]}"
	# m: id created finished fio_start fio_end state-at-fio-end done-at-fio-end stall_ms file
	python3 - "$rate" "$bytes" "${m[@]}" <<-'EOF'
		import sys
		rate, total = int(sys.argv[1]), int(sys.argv[2])
		jid, created, finished, fstart, fend, state, done, stall, file = sys.argv[3:]
		created, finished, fstart, fend = map(float, (created, finished, fstart, fend))
		done, stall = int(done), float(stall)
		print("merge (job %s, --bandwidth %.1f MiB/s): ran %.1f s (%.1f MiB/s), fio started %.2f s after it;"
		      % (jid, rate / 2**20, finished - created, total / 2**20 / (finished - created), fstart - created))
		if state in ("running", "completing") and finished > fend:
		    print("  still %s when fio ended (%.0f of %.0f MiB copied), finished %.1f s later: fio ran wholly under the merge."
		          % (state, done / 2**20, total / 2**20, finished - fend))
		else:
		    print("  NOT running when fio ended: it finished %.1f s before (state %s); fio's last %.0f%% ran without it."
		          % (fend - finished, state, 100 * (fend - finished) / (fend - fstart)))
		print("  switch stall (stall_ms): %.1f ms; the disk runs on %s again (vm show)." % (stall, file))
	EOF
}

echo
echo "vhdkit live merge, SIZE $size, $(nproc) CPUs, fio --ioengine=nbd over a unix socket on the same machine"
echo "(cpu s: the daemon's user+system CPU seconds during the run; idle %: the share of the"
echo "machine's CPU time left idle meanwhile; load average when the script started: $load)"
report 8
if ((qd1)); then report 1; fi

m=$(best "${mt[@]}") c=$(best "${ct[@]}") j=$(best "${jt[@]}")
echo
printf 'merge of %s of changed data, no guest load, best of %d runs (seconds incl. sync):\n' "$size" "$runs"
printf '%-34s %8.2f s %8.0f MiB/s   (the job itself: %.2f s, %.0f MiB/s)\n' "checkpoint delete --wait (live)" "$m" "$(awk -v b="$bytes" -v t="$m" 'BEGIN { print b / 2^20 / t }')" \
	"$j" "$(awk -v b="$bytes" -v t="$j" 'BEGIN { print b / 2^20 / t }')"
printf '%-34s %8.2f s %8.0f MiB/s\n' "cp (same bytes)" "$c" "$(awk -v b="$bytes" -v t="$c" 'BEGIN { print b / 2^20 / t }')"
printf 'merge vs cp: %.2f (throughput ratio; above 1: the merge is faster)\n' "$(awk -v m="$m" -v c="$c" 'BEGIN { print c / m }')"
failed=0
