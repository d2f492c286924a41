#!/usr/bin/env bash
# Compares "vhdkit nbd" with "qemu-nbd --cache=writeback" serving the same
# empty dynamic VHDX (made by vhdkit: 32 MiB blocks, 512-byte sectors; each
# server gets its own copy), in one run, over unix sockets:
#
#   fio --ioengine=nbd, 16 requests in flight, over SIZE (default 1 GiB):
#     sequential 1 MiB writes, first pass (allocating every block)
#     sequential 1 MiB writes, second pass (overwriting)
#     sequential 1 MiB reads
#     random 4 KiB writes and reads (BENCH_RANDOM_SECONDS, default 20 s,
#       or SIZE of I/O if that comes first; the same offsets for both)
#   nbdcopy of the whole export to null: (nbdcopy's defaults; it opens
#     several connections to a server that allows multi-conn, which
#     qemu-nbd does only for read-only exports)
#
# Write jobs end with a flush (fio --end_fsync=1), so their figures include
# making the data durable. The tests run in the order above, alternating
# which server goes first. Prints throughput (MiB/s or IOPS), the server
# process's CPU time (user+system) during each test, and ratio =
# vhdkit / qemu-nbd throughput: above 1, vhdkit is faster.
#
# Usage: bench/nbd.sh [SIZE]   (SIZE default 1G; K, M or G)
set -euo pipefail
cd "$(dirname "$0")/.."

size=${1:-1G}
rand_seconds=${BENCH_RANDOM_SECONDS:-20}

for tool in fio nbdcopy qemu-nbd python3; do
	command -v "$tool" >/dev/null || { echo "bench/nbd.sh: $tool is needed (apt-get install fio libnbd-bin qemu-utils python3)" >&2; exit 1; }
done
work=$(mktemp -d "${TMPDIR:-/tmp}/vhdkit-bench-XXXXXX")
pids=()
cleanup() {
	for p in "${pids[@]}"; do
		kill "$p" 2>/dev/null || true
		wait "$p" 2>/dev/null || true
	done
	rm -rf "$work"
}
trap cleanup EXIT

echo "building vhdkit"
CGO_ENABLED=0 go build -o "$work/vhdkit" ./cmd/vhdkit # static, as README builds it
vhdkit=$work/vhdkit
"$vhdkit" create --size "$size" "$work/empty.vhdx" >/dev/null
bytes=$("$vhdkit" info --json "$work/empty.vhdx" | python3 -c 'import json, sys; print(json.load(sys.stdin)["virtual_size"])')
cp --sparse=always "$work/empty.vhdx" "$work/vhdkit.vhdx"
cp --sparse=always "$work/empty.vhdx" "$work/qemu.vhdx"

"$vhdkit" nbd --socket "$work/vhdkit.sock" "$work/vhdkit.vhdx" >/dev/null &
vpid=$!
pids+=("$vpid")
qemu-nbd --cache=writeback --format=vhdx --persistent --shared=16 --socket="$work/qemu.sock" "$work/qemu.vhdx" &
qpid=$!
pids+=("$qpid")
for sock in "$work/vhdkit.sock" "$work/qemu.sock"; do
	for ((i = 0; i < 300; i++)); do
		[ -S "$sock" ] && break
		sleep 0.1
	done
	[ -S "$sock" ] || { echo "bench/nbd.sh: no server on $sock" >&2; exit 1; }
done
vuri="nbd+unix:///?socket=$work/vhdkit.sock"
quri="nbd+unix:///?socket=$work/qemu.sock"

ticks=$(getconf CLK_TCK)
# cpu PID prints the user+system CPU ticks of the process so far.
cpu() { awk '{ print $14 + $15 }' "/proc/$1/stat"; }

# measure PID CMD... runs CMD (which prints one number, the throughput) and
# sets result to that number and cpusec to PID's CPU seconds meanwhile.
measure() {
	local pid=$1
	shift
	sync
	local before after
	before=$(cpu "$pid")
	if ! result=$("$@" 2>"$work/stderr"); then
		echo "bench/nbd.sh: $* failed:" >&2
		cat "$work/stderr" >&2
		exit 1
	fi
	after=$(cpu "$pid")
	cpusec=$(awk -v a="$after" -v b="$before" -v t="$ticks" 'BEGIN { printf "%.2f", (a - b) / t }')
}

# fio_job URI RW BS [FIO ARGS...] prints MiB/s (1 MiB blocks) or IOPS. The
# nbd engine prints a line of its own before the JSON.
fio_job() {
	local uri=$1 rw=$2 bs=$3
	shift 3
	fio --name=bench --ioengine=nbd --uri="$uri" --rw="$rw" --bs="$bs" --iodepth=16 \
		--size="$bytes" --output-format=json "$@" >"$work/fio.json"
	python3 - "$work/fio.json" "$bs" <<-'EOF'
		import json, sys
		text = open(sys.argv[1]).read()
		job = json.loads(text[text.index("\n{") + 1:] if not text.startswith("{") else text)["jobs"][0]
		if job["error"]:
		    sys.exit("fio error %d" % job["error"])
		side = job["write"] if job["write"]["io_bytes"] else job["read"]
		print("%.0f" % (side["bw_bytes"] / 2**20 if sys.argv[2] == "1M" else side["iops"]))
	EOF
}

# copy_null URI prints the MiB/s of nbdcopy URI null:.
copy_null() {
	local start end
	start=$(date +%s.%N)
	nbdcopy "$1" null:
	end=$(date +%s.%N)
	awk -v s="$start" -v e="$end" -v b="$bytes" 'BEGIN { printf "%.0f\n", b / 2^20 / (e - s) }'
}

rows=()
n=0
# bench NAME UNIT CMD... runs CMD URI-less: "{}" in CMD is the server's URI.
bench() {
	local name=$1 unit=$2
	shift 2
	local vres vcpu qres qcpu order
	echo "$name"
	order="v q"
	if ((n % 2)); then order="q v"; fi
	n=$((n + 1))
	for who in $order; do
		local uri=$vuri pid=$vpid
		if [ "$who" = q ]; then uri=$quri pid=$qpid; fi
		local cmd=()
		for a in "$@"; do cmd+=("${a//\{\}/$uri}"); done
		measure "$pid" "${cmd[@]}"
		if [ "$who" = v ]; then vres=$result vcpu=$cpusec; else qres=$result qcpu=$cpusec; fi
	done
	rows+=("$name|$unit|$vres|$qres|$vcpu|$qcpu")
}

bench "seq write 1M, allocating" MiB/s fio_job {} write 1M --end_fsync=1
bench "seq write 1M, overwrite" MiB/s fio_job {} write 1M --end_fsync=1
bench "seq read 1M" MiB/s fio_job {} read 1M
bench "rand write 4K" IOPS fio_job {} randwrite 4k --end_fsync=1 --runtime="$rand_seconds"
bench "rand read 4K" IOPS fio_job {} randread 4k --runtime="$rand_seconds"
bench "nbdcopy to null:" MiB/s copy_null {}

# Both servers stop gracefully (flushing); the images must check clean.
for p in "$vpid" "$qpid"; do
	kill -TERM "$p"
	wait "$p" || true
done
pids=()
"$vhdkit" check "$work/vhdkit.vhdx" >/dev/null || { echo "bench/nbd.sh: vhdkit's image does not check clean" >&2; exit 1; }
qemu-img check -q -f vhdx "$work/vhdkit.vhdx" || { echo "bench/nbd.sh: qemu-img check fails on vhdkit's image" >&2; exit 1; }

echo
printf '%-26s %7s %12s %12s %7s   %10s %9s\n' "test ($size, 16 in flight)" unit vhdkit qemu-nbd ratio "cpu:vhdkit" qemu-nbd
for row in "${rows[@]}"; do
	IFS='|' read -r name unit v q vc qc <<<"$row"
	printf '%-26s %7s %12s %12s %7.2f   %9ss %8ss\n' "$name" "$unit" "$v" "$q" "$(awk -v v="$v" -v q="$q" 'BEGIN { print v / q }')" "$vc" "$qc"
done
echo "ratio = vhdkit / qemu-nbd throughput: above 1, vhdkit is faster. cpu: the server's"
echo "user+system CPU seconds during the test. One run each; $(nproc) CPUs; fio and nbdcopy"
echo "run on the same machine."
