#!/usr/bin/env bash
# Times vhdkit convert against qemu-img convert on the same 1 GiB of
# deterministic, disk-like data (random runs, zero runs, holes, repeated
# patterns), in one run:
#
#   raw -> dynamic VHDX
#   VHDX (made by qemu-img) -> raw
#   VHDX (made by vhdkit)   -> raw
#   raw -> dynamic VHD      (qemu-img: -O vpc -o force_size=on)
#   VHD (made by vhdkit)    -> dynamic VHDX
#
# The VHD rows use $size rounded down to a size exact in CHS: qemu-img sizes
# a VHD made by vhdkit by its CHS geometry, so only such a size reads whole
# there. Both tools write 2 MiB VHD blocks (qemu-img has no other).
#
# Each conversion runs twice per tool (BENCH_RUNS=N for more) and the best
# time counts, elapsed and CPU (user+system) separately. Every
# output is verified (cmp, qemu-img compare). Both tools flush the target
# at the end: qemu-img runs with -t writeback, since its default cache
# mode for convert (unsafe) never syncs while vhdkit always does.
# Prints ratio = qemu-img time / vhdkit time: above 1, vhdkit is faster.
#
# Usage: bench/convert.sh [SIZE]   (SIZE default 1G; K, M or G)
set -euo pipefail
cd "$(dirname "$0")/.."

size=${1:-1G}
block=32M # the same block size for both tools (Hyper-V's default)

command -v qemu-img >/dev/null || { echo "bench/convert.sh: qemu-img is needed (apt-get install qemu-utils)" >&2; exit 1; }
work=$(mktemp -d "${TMPDIR:-/tmp}/vhdkit-bench-XXXXXX")
trap 'rm -rf "$work"' EXIT

echo "building vhdkit and the data generator"
CGO_ENABLED=0 go build -o "$work/vhdkit" ./cmd/vhdkit # static, as README builds it
go build -o "$work/gendata" ./bench/gendata
vhdkit=$work/vhdkit
src=$work/src.img
"$work/gendata" -size "$size" -seed 1 "$src"

runs=${BENCH_RUNS:-2}

# best VALUES... prints the smallest.
best() { printf '%s\n' "$@" | sort -g | head -n1; }

# timed OUT CMD... removes OUT, runs CMD and sets wall and cpu: elapsed
# seconds and user+system CPU seconds.
timed() {
	local out=$1
	shift
	rm -f "$out"
	sync # start each run with no dirty pages of earlier steps to write back
	local TIMEFORMAT='%R %U %S'
	if ! { time "$@" >/dev/null 2>"$work/stderr"; } 2>"$work/time"; then
		echo "bench/convert.sh: $* failed:" >&2
		cat "$work/stderr" >&2
		exit 1
	fi
	read -r wall cpu < <(awk '{ printf "%.3f %.3f\n", $1, $2 + $3 }' "$work/time")
}

rows=()

# bench NAME OUT VERIFY VHDKIT_CMD -- QEMU_CMD: $runs runs each, alternating.
bench() {
	local name=$1 out=$2 verify=$3
	shift 3
	local vcmd=() qcmd=()
	while [ "$1" != "--" ]; do vcmd+=("$1"); shift; done
	shift
	qcmd=("$@")
	local vw=() vc=() qw=() qc=()
	for ((run = 1; run <= runs; run++)); do
		timed "$out" "${vcmd[@]}"
		vw+=("$wall") vc+=("$cpu")
		$verify "$out" || { echo "bench/convert.sh: vhdkit output of '$name' is wrong" >&2; exit 1; }
		timed "$out" "${qcmd[@]}"
		qw+=("$wall") qc+=("$cpu")
		$verify "$out" || { echo "bench/convert.sh: qemu-img output of '$name' is wrong" >&2; exit 1; }
	done
	rm -f "$out"
	rows+=("$name|$(best "${vw[@]}")|$(best "${qw[@]}")|$(best "${vc[@]}")|$(best "${qc[@]}")")
}

same_as_src_raw() { cmp "$src" "$1"; }
same_as_src_vhdx() { qemu-img compare -q -f raw -F vhdx "$src" "$1"; }

# qemu_size FORMAT FILE prints the virtual size qemu-img reads for FILE.
qemu_size() { qemu-img info -f "$1" --output=json "$2" | sed -n 's/^ *"virtual-size": \([0-9]*\),$/\1/p'; }
# qemu-img compare passes a larger image whose tail is zeros: check sizes too.
same_as_vsrc_vhd() { [ "$(qemu_size vpc "$1")" = "$vsize" ] && qemu-img compare -q -f raw -F vpc "$vsrc" "$1"; }
same_as_vsrc_vhdx() { [ "$(qemu_size vhdx "$1")" = "$vsize" ] && qemu-img compare -q -f raw -F vhdx "$vsrc" "$1"; }

echo "raw -> vhdx"
bench "raw -> vhdx (dynamic)" "$work/out.vhdx" same_as_src_vhdx \
	"$vhdkit" convert --block-size "$block" "$src" "$work/out.vhdx" -- \
	qemu-img convert -t writeback -f raw -O vhdx -o subformat=dynamic,block_size=$block "$src" "$work/out.vhdx"

echo "vhdx (qemu-img) -> raw"
qemu-img convert -f raw -O vhdx -o subformat=dynamic,block_size=$block "$src" "$work/qemu.vhdx"
bench "vhdx (by qemu-img) -> raw" "$work/out.img" same_as_src_raw \
	"$vhdkit" convert "$work/qemu.vhdx" "$work/out.img" -- \
	qemu-img convert -t writeback -f vhdx -O raw "$work/qemu.vhdx" "$work/out.img"

echo "vhdx (vhdkit) -> raw"
"$vhdkit" convert --block-size "$block" "$src" "$work/vhdkit.vhdx"
bench "vhdx (by vhdkit) -> raw" "$work/out.img" same_as_src_raw \
	"$vhdkit" convert "$work/vhdkit.vhdx" "$work/out.img" -- \
	qemu-img convert -t writeback -f vhdx -O raw "$work/vhdkit.vhdx" "$work/out.img"

# The VHD rows' source: as much of the same kind of data as is exact in
# CHS, which is what qemu-img reads as the size of a VHD made by vhdkit.
"$vhdkit" create --size "$size" "$work/probe.vhd" >/dev/null
vsize=$(qemu_size vpc "$work/probe.vhd")
vsrc=$work/src-vhd.img
"$work/gendata" -size "$vsize" -seed 1 "$vsrc"
"$vhdkit" convert "$vsrc" "$work/vhdkit.vhd"
same_as_vsrc_vhd "$work/vhdkit.vhd" || { echo "bench/convert.sh: qemu-img does not read vhdkit's VHD as its source" >&2; exit 1; }

echo "raw -> vhd"
bench "raw -> vhd (dynamic)" "$work/out.vhd" same_as_vsrc_vhd \
	"$vhdkit" convert "$vsrc" "$work/out.vhd" -- \
	qemu-img convert -t writeback -f raw -O vpc -o subformat=dynamic,force_size=on "$vsrc" "$work/out.vhd"

echo "vhd (vhdkit) -> vhdx"
bench "vhd (by vhdkit) -> vhdx" "$work/out.vhdx" same_as_vsrc_vhdx \
	"$vhdkit" convert --block-size "$block" "$work/vhdkit.vhd" "$work/out.vhdx" -- \
	qemu-img convert -t writeback -f vpc -O vhdx -o subformat=dynamic,block_size=$block "$work/vhdkit.vhd" "$work/out.vhdx"

echo
printf '%-27s %8s %9s %6s   %8s %9s %6s\n' "conversion ($size)" vhdkit qemu-img ratio "cpu:vhdkit" qemu-img ratio
for row in "${rows[@]}"; do
	IFS='|' read -r name vw qw vc qc <<<"$row"
	printf '%-27s %7.2fs %8.2fs %6.2f   %9.2fs %8.2fs %6.2f\n' "$name" "$vw" "$qw" "$(awk -v q="$qw" -v v="$vw" 'BEGIN { print q / v }')" \
		"$vc" "$qc" "$(awk -v q="$qc" -v v="$vc" 'BEGIN { print (v > 0 ? q / v : 0) }')"
done
echo "ratio = qemu-img time / vhdkit time: above 1, vhdkit is faster. Elapsed (left) and"
echo "user+system CPU (right) seconds, best of $runs runs each; $(nproc) CPUs. VHD rows:"
echo "$vsize bytes ($size rounded down to be exact in CHS)."
