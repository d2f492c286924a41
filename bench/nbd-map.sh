#!/usr/bin/env bash
# Compares "qemu-img map" (and "qemu-img convert" to a raw file) through
# "vhdkit nbd" with the same through qemu-nbd serving the same fragmented
# images, in one run, over unix sockets, read-only:
#
#   raw:  a sparse raw file of SIZE (default 1 GiB) in which every other
#         STRIDE (default 64 KiB) holds data: SIZE/STRIDE extents, each a
#         BLOCK_STATUS request from QEMU (which always sets REQ_ONE)
#   vhdx: the same contents converted to a dynamic VHDX with 1 MiB blocks
#         and data in every other block (qemu-nbd reads VHDX, but QEMU's
#         VHDX driver reports no allocation, so its map is one extent)
#
# Both maps of the raw file must list the same data and hole ranges, and
# every copy must equal its source. Prints seconds per map or copy and
# ratio = vhdkit / qemu-nbd time: above 1, vhdkit is slower.
#
# Usage: bench/nbd-map.sh [SIZE [STRIDE]]   (K, M or G; VHDKIT=path to use
# a built binary instead of building one)
set -euo pipefail
cd "$(dirname "$0")/.."

size=${1:-1G}
stride=${2:-64K}

for tool in qemu-nbd qemu-img python3; do
	command -v "$tool" >/dev/null || { echo "bench/nbd-map.sh: $tool is needed (apt-get install qemu-utils python3)" >&2; exit 1; }
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

vhdkit=${VHDKIT:-}
if [ -z "$vhdkit" ]; then
	echo "building vhdkit"
	CGO_ENABLED=0 go build -o "$work/vhdkit" ./cmd/vhdkit # static, as README builds it
	vhdkit=$work/vhdkit
fi
bytes() { numfmt --from=iec "${1%iB}"; }
python3 - "$work/frag.raw" "$(bytes "$size")" "$(bytes "$stride")" <<-'EOF2'
	import sys
	path, size, stride = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
	with open(path, "wb") as f:
	    f.truncate(size)
	    data = b"\x5a" * stride
	    for off in range(0, size, 2 * stride):
	        f.seek(off)
	        f.write(data[:min(stride, size - off)])
EOF2
python3 - "$work/frag1m.raw" "$(bytes "$size")" $((1 << 20)) <<-'EOF2'
	import sys
	path, size, stride = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
	with open(path, "wb") as f:
	    f.truncate(size)
	    for off in range(0, size, 2 * stride):
	        f.seek(off)
	        f.write(b"\x5a" * min(stride, size - off))
EOF2
"$vhdkit" convert --block-size 1M "$work/frag1m.raw" "$work/frag.vhdx" >/dev/null

# serve WHO FILE starts a server and sets uri.
serve() {
	local who=$1 file=$2 sock=$work/$1.sock
	rm -f "$sock"
	if [ "$who" = vhdkit ]; then
		"$vhdkit" nbd --read-only --socket "$sock" "$file" >/dev/null &
	else
		qemu-nbd --read-only --persistent --shared=4 --cache=writeback --socket="$sock" \
			--format="$([ "${file##*.}" = vhdx ] && echo vhdx || echo raw)" "$file" &
	fi
	pids+=("$!")
	for ((i = 0; i < 300; i++)); do
		[ -S "$sock" ] && break
		sleep 0.1
	done
	[ -S "$sock" ] || { echo "bench/nbd-map.sh: no $who server on $sock" >&2; exit 1; }
	uri="nbd+unix:///?socket=$sock"
}

stop() {
	kill -TERM "${pids[-1]}"
	wait "${pids[-1]}" || true
	unset 'pids[-1]'
}

# map_time WHO FILE OUT prints the seconds qemu-img map took; the map goes to OUT.
map_time() {
	serve "$1" "$2"
	local start end
	start=$(date +%s.%N)
	qemu-img map --output=json -f raw "$uri" >"$3"
	end=$(date +%s.%N)
	stop
	awk -v s="$start" -v e="$end" 'BEGIN { printf "%.3f\n", e - s }'
}

# convert_time WHO FILE prints the seconds qemu-img convert of the export
# to a raw file took, and checks the copy against the raw contents.
convert_time() {
	serve "$1" "$2"
	local start end
	rm -f "$work/copy.raw"
	start=$(date +%s.%N)
	qemu-img convert -f raw -O raw "$uri" "$work/copy.raw"
	end=$(date +%s.%N)
	stop
	local src=$work/frag.raw
	[ "${2##*.}" = vhdx ] && src=$work/frag1m.raw
	cmp -s "$src" "$work/copy.raw" || { echo "bench/nbd-map.sh: the copy through $1 differs" >&2; exit 1; }
	awk -v s="$start" -v e="$end" 'BEGIN { printf "%.3f\n", e - s }'
}

# ranges MAP prints the map as start length data lines, neighbours merged.
ranges() {
	python3 - "$1" <<-'EOF2'
		import json, sys
		out = []
		for e in json.load(open(sys.argv[1])):
		    if out and out[-1][2] == e["data"] and out[-1][0] + out[-1][1] == e["start"]:
		        out[-1][1] += e["length"]
		    else:
		        out.append([e["start"], e["length"], e["data"]])
		for r in out:
		    print(*r)
	EOF2
}

rows=()
for kind in raw vhdx; do
	file=$work/frag.$kind
	v=$(map_time vhdkit "$file" "$work/v.$kind.json")
	q=$(map_time qemu "$file" "$work/q.$kind.json")
	n=$(ranges "$work/v.$kind.json" | wc -l)
	if [ "$kind" = raw ] && ! diff <(ranges "$work/v.$kind.json") <(ranges "$work/q.$kind.json") >/dev/null; then
		echo "bench/nbd-map.sh: the maps of the raw file differ" >&2
		exit 1
	fi
	rows+=("map $kind|$n|$v|$q")
	v=$(convert_time vhdkit "$file")
	q=$(convert_time qemu "$file")
	rows+=("convert $kind|$n|$v|$q")
done

echo
printf '%-48s %8s %11s %11s %8s\n' "qemu-img ($size)" ranges vhdkit qemu-nbd ratio
for row in "${rows[@]}"; do
	IFS='|' read -r kind n v q <<<"$row"
	case $kind in
	*raw) name="${kind% *}: raw, data every other $stride" ;;
	*vhdx) name="${kind% *}: vhdx 1M blocks, every other block" ;;
	esac
	printf '%-48s %8s %10ss %10ss %8.1f\n' "$name" "$n" "$v" "$q" "$(awk -v v="$v" -v q="$q" 'BEGIN { print v / q }')"
done
echo "ranges: data and hole ranges in vhdkit's map. ratio = vhdkit / qemu-nbd time:"
echo "above 1, vhdkit is slower. One run each; $(nproc) CPUs."
