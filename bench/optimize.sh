#!/usr/bin/env bash
# Compacts a dynamic VHDX half of whose data was trimmed or zeroed, with
# vhdkit optimize (in place) and with qemu-img convert to a new VHDX (the
# usual way to compact with QEMU's tools), in one run, from identical
# copies. Both results are compared byte for byte with the disk's content
# before; prints times, their ratio and the file sizes (apparent and
# allocated) before and after.
#
# Usage: bench/optimize.sh [SIZE]   (SIZE default 1G; K, M or G)
set -euo pipefail
cd "$(dirname "$0")/.."

size=${1:-1G}
for t in qemu-img qemu-io; do
	command -v $t >/dev/null || { echo "bench/optimize.sh: $t is needed (apt-get install qemu-utils)" >&2; exit 1; }
done
work=$(mktemp -d "${TMPDIR:-/tmp}/vhdkit-optimize-bench-XXXXXX")
server=
cleanup() {
	[ -n "$server" ] && kill "$server" 2>/dev/null && wait "$server" 2>/dev/null
	rm -rf "$work"
}
trap cleanup EXIT

echo "building vhdkit and the data generator"
CGO_ENABLED=0 go build -o "$work/vhdkit" ./cmd/vhdkit # static, as README builds it
go build -o "$work/gendata" ./bench/gendata
vhdkit=$work/vhdkit
"$work/gendata" -size "$size" -seed 11 "$work/data.img"
bytes=$(stat -c %s "$work/data.img")
"$vhdkit" convert "$work/data.img" "$work/disk.vhdx" >/dev/null
rm "$work/data.img"

# Through NBD, as a guest would: of every four 32 MiB blocks, the first
# is discarded (TRIM), the second overwritten with zeros, the others kept.
block=$((32 << 20))
"$vhdkit" nbd --socket "$work/nbd.sock" "$work/disk.vhdx" >/dev/null &
server=$!
for _ in $(seq 100); do [ -S "$work/nbd.sock" ] && break; sleep 0.05; done
cmds=()
for ((off = 0; off < bytes; off += 4 * block)); do
	cmds+=(-c "discard $off $(( off + block <= bytes ? block : bytes - off ))")
	z=$((off + block))
	if ((z < bytes)); then
		cmds+=(-c "write -z $z $(( z + block <= bytes ? block : bytes - z ))")
	fi
done
qemu-io -f raw "${cmds[@]}" "nbd+unix:///?socket=$work/nbd.sock" >/dev/null
kill "$server"
wait "$server" 2>/dev/null || true
server=

qemu-img convert -f vhdx -O raw "$work/disk.vhdx" "$work/want.img"
cp --sparse=always "$work/disk.vhdx" "$work/a.vhdx"
cp --sparse=always "$work/disk.vhdx" "$work/b.vhdx"

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
sizes() { printf '%6d MiB apparent, %6d MiB allocated' $(($(stat -c %s "$1") >> 20)) $(($(stat -c '%b * %B' "$1") >> 20)); }

before=$(sizes "$work/a.vhdx")
v=$(secs "$vhdkit" optimize --full "$work/a.vhdx")
q=$(secs qemu-img convert -f vhdx -O vhdx "$work/b.vhdx" "$work/c.vhdx")
qemu-img compare -q -f raw -F vhdx "$work/want.img" "$work/a.vhdx"
qemu-img compare -q -f raw -F vhdx "$work/want.img" "$work/c.vhdx"
qemu-img check -q -f vhdx "$work/a.vhdx"

printf '\ncompacting a %s dynamic VHDX, a quarter trimmed and a quarter zeroed (seconds incl. sync):\n' "$size"
printf '%-34s %s\n' "before" "$before"
printf '%-34s %s  %6.2f s\n' "vhdkit optimize --full (in place)" "$(sizes "$work/a.vhdx")" "$v"
printf '%-34s %s  %6.2f s\n' "qemu-img convert -O vhdx (copy)" "$(sizes "$work/c.vhdx")" "$q"
printf '\nvhdkit vs qemu-img convert: %.2f (time ratio; above 1: vhdkit faster); both read back identical\n' "$(echo "$q / $v" | bc -l)"
