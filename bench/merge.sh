#!/usr/bin/env bash
# Times vhdkit merge on 1 GiB of changed data against the same bytes
# copied with cp, and against qemu-img commit of an equivalent qcow2 chain,
# in one run. Each step starts with the page cache's dirty data written back
# and ends with its output synced. Prints throughputs and ratios: above 1,
# vhdkit is faster.
#
# Usage: bench/merge.sh [SIZE]   (SIZE default 1G; K, M or G)
set -euo pipefail
cd "$(dirname "$0")/.."

size=${1:-1G}
command -v qemu-img >/dev/null || { echo "bench/merge.sh: qemu-img is needed (apt-get install qemu-utils)" >&2; exit 1; }
work=$(mktemp -d "${TMPDIR:-/tmp}/vhdkit-merge-bench-XXXXXX")
trap 'rm -rf "$work"' EXIT

echo "building vhdkit and the data generator"
CGO_ENABLED=0 go build -o "$work/vhdkit" ./cmd/vhdkit # static, as README builds it
go build -o "$work/gendata" ./bench/gendata
vhdkit=$work/vhdkit
"$work/gendata" -size "$size" -seed 7 "$work/new.img"
bytes=$(stat -c %s "$work/new.img")

# secs CMD... runs CMD after a sync and prints its elapsed seconds, sync
# included.
secs() {
	sync
	local s e
	s=$(date +%s.%N)
	"$@" >/dev/null
	sync
	e=$(date +%s.%N)
	echo "$e - $s" | bc -l
}

runs=${BENCH_RUNS:-2}
best() { printf '%s\n' "$@" | sort -g | head -n1; }
vt=() ct=() qt=()
for ((run = 1; run <= runs; run++)); do
	rm -f "$work"/base.* "$work"/top.* "$work/copy.img"
	# vhdkit: an empty dynamic base and a child holding the new data.
	"$vhdkit" create --size "$bytes" --block-size 2M "$work/base.vhdx" >/dev/null
	"$vhdkit" convert --parent "$work/base.vhdx" "$work/new.img" "$work/top.avhdx" >/dev/null
	vt+=("$(secs "$vhdkit" merge "$work/top.avhdx")")
	qemu-img compare -q -f raw -F vhdx "$work/new.img" "$work/base.vhdx"
	# The same bytes copied.
	ct+=("$(secs cp "$work/new.img" "$work/copy.img")")
	# qemu: an empty qcow2 base and an overlay holding the same data.
	qemu-img create -q -f qcow2 "$work/base.qcow2" "$bytes"
	qemu-img convert -q -f raw -O qcow2 -B "$work/base.qcow2" -F qcow2 "$work/new.img" "$work/top.qcow2"
	qt+=("$(secs qemu-img commit -q -t writeback "$work/top.qcow2")")
	qemu-img compare -q -f raw -F qcow2 "$work/new.img" "$work/base.qcow2"
done
v=$(best "${vt[@]}") c=$(best "${ct[@]}") q=$(best "${qt[@]}")
mib=$(echo "$bytes / 1048576" | bc -l)
printf '\nmerge of %s of changed data, best of %d runs (seconds incl. sync):\n' "$size" "$runs"
printf '%-26s %8.2f s %8.0f MiB/s\n' "vhdkit merge" "$v" "$(echo "$mib / $v" | bc -l)"
printf '%-26s %8.2f s %8.0f MiB/s\n' "cp (same bytes)" "$c" "$(echo "$mib / $c" | bc -l)"
printf '%-26s %8.2f s %8.0f MiB/s\n' "qemu-img commit (qcow2)" "$q" "$(echo "$mib / $q" | bc -l)"
printf '\nvhdkit vs cp:              %.2f (throughput ratio; aim >= 0.8)\n' "$(echo "$c / $v" | bc -l)"
printf 'vhdkit vs qemu-img commit: %.2f (above 1: vhdkit faster)\n' "$(echo "$q / $v" | bc -l)"
