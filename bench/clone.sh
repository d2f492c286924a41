#!/usr/bin/env bash
# Times vhdkit's copies where the file system can clone and where it
# cannot, against the tools that do the same work, on the same bytes in
# one run per file system:
#
#   vhdkit merge of a child holding SIZE of changed data into its base
#   cp --reflink=auto and cp --reflink=never of the same bytes
#   qemu-img commit of an equivalent qcow2 chain
#   vhdkit convert raw -> dynamic VHDX against qemu-img convert
#
# on loop-mounted XFS (mkfs.xfs -m reflink=1), btrfs and ext4 (which
# cannot clone; default mount options, so no discard), made in a
# temporary folder and unmounted after (as root; skipped otherwise), and
# on the file system of ${TMPDIR:-/tmp} as it is mounted (this machine's
# work disk has discard, where deleting the merged child costs most of a
# merge). Each step starts after a sync and
# ends with its output synced (qemu-img with -t writeback); every output is
# compared with the data (qemu-img compare). Best of BENCH_RUNS (default
# 2). Prints seconds and ratios: merge/cp is vhdkit's time over cp's (at
# most 3 is the aim on XFS and btrfs, at most 1 elsewhere against cp
# --reflink=never), qemu/vhdkit above 1 means vhdkit is faster.
#
# Usage: bench/clone.sh [SIZE]   (SIZE default 1G; K, M or G)
set -euo pipefail
cd "$(dirname "$0")/.."

size=${1:-1G}
for tool in qemu-img bc; do
	command -v $tool >/dev/null || { echo "bench/clone.sh: $tool is needed" >&2; exit 1; }
done
work=$(mktemp -d "${TMPDIR:-/tmp}/vhdkit-clone-bench-XXXXXX")
mounts=()
cleanup() {
	for m in "${mounts[@]}"; do umount "$m" || true; done
	rm -rf "$work"
}
trap cleanup EXIT

echo "building vhdkit and the data generator"
CGO_ENABLED=0 go build -o "$work/vhdkit" ./cmd/vhdkit # static, as README builds it
go build -o "$work/gendata" ./bench/gendata
vhdkit=$work/vhdkit
"$work/gendata" -size "$size" -seed 7 "$work/data.img"
bytes=$(stat -c %s "$work/data.img")

# The folders to run in: loop-mounted XFS, btrfs and ext4, and the work
# folder.
dirs=() names=()
if [ "$(id -u)" = 0 ]; then
	for fs in xfs btrfs ext4; do
		mkfs=$(command -v mkfs.$fs || true)
		if [ -z "$mkfs" ]; then
			echo "mkfs.$fs is missing: no $fs row" >&2
			continue
		fi
		img=$work/$fs.fs
		truncate -s $((bytes * 10 + (1 << 30))) "$img"
		case $fs in
		xfs) args=(-q -f -m reflink=1) name="xfs (loop, reflink)" ;;
		btrfs) args=(-q -f) name="btrfs (loop, reflink)" ;;
		ext4) args=(-q -F -E lazy_itable_init=0,lazy_journal_init=0) name="ext4 (loop)" ;; # no background init during the runs
		esac
		"$mkfs" "${args[@]}" "$img" >/dev/null
		mkdir "$work/$fs"
		mount -o loop "$img" "$work/$fs"
		mounts+=("$work/$fs")
		dirs+=("$work/$fs") names+=("$name")
	done
else
	echo "not root: no loop-mounted XFS, btrfs and ext4 rows" >&2
fi
mkdir "$work/plain"
opts=$(findmnt -n -o OPTIONS -T "$work")
case ",$opts," in *,discard,* | *,discard=*) discard=", discard" ;; *) discard="" ;; esac
dirs+=("$work/plain") names+=("$(findmnt -n -o FSTYPE -T "$work") (work folder$discard)")

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
best() { printf '%s\n' "$@" | sort -g | head -n1; }
runs=${BENCH_RUNS:-2}

rows=()
for i in "${!dirs[@]}"; do
	d=${dirs[$i]}
	echo "${names[$i]}: $d"
	cp --reflink=never "$work/data.img" "$d/new.img"
	mt=() rt=() at=() nt=() qt=() vct=() qct=() moved=""
	for ((run = 1; run <= runs; run++)); do
		rm -f "$d"/base.* "$d"/top.* "$d"/copy.* "$d"/out.*
		# vhdkit: an empty dynamic base and a child holding the new data.
		"$vhdkit" create --size "$bytes" "$d/base.vhdx" >/dev/null
		"$vhdkit" convert --parent "$d/base.vhdx" "$d/new.img" "$d/top.avhdx" >/dev/null
		mt+=("$(secs "$vhdkit" merge "$d/top.avhdx")")
		qemu-img compare -q -f raw -F vhdx "$d/new.img" "$d/base.vhdx"
		at+=("$(secs cp --reflink=auto "$d/new.img" "$d/copy.auto")")
		nt+=("$(secs cp --reflink=never "$d/new.img" "$d/copy.never")")
		rm -f "$d"/base.* "$d"/copy.*
		# The merge ends by deleting the child: what that costs alone, on
		# a child made the same way (a file system mounted with discard
		# frees slowly). Made afresh, not copied from the merged one:
		# reading a file fills the page cache, and deleting a file with
		# cached pages evicts them first (on btrfs 600 MiB of them cost
		# the merge's delete 40 ms, measured), which the merge then paid.
		"$vhdkit" create --size "$bytes" "$d/base.vhdx" >/dev/null
		"$vhdkit" convert --parent "$d/base.vhdx" "$d/new.img" "$d/rmtest.avhdx" >/dev/null
		rt+=("$(secs rm "$d/rmtest.avhdx")")
		rm -f "$d"/base.*
		# qemu: an empty qcow2 base and an overlay holding the same data.
		qemu-img create -q -f qcow2 "$d/base.qcow2" "$bytes"
		qemu-img convert -q -f raw -O qcow2 -B "$d/base.qcow2" -F qcow2 "$d/new.img" "$d/top.qcow2"
		qt+=("$(secs qemu-img commit -q -t writeback "$d/top.qcow2")")
		qemu-img compare -q -f raw -F qcow2 "$d/new.img" "$d/base.qcow2"
		rm -f "$d"/base.* "$d"/top.*
		# convert raw -> dynamic VHDX, 32 MiB blocks for both.
		vct+=("$(secs "$vhdkit" convert "$d/new.img" "$d/out.vhdx")")
		qemu-img compare -q -f raw -F vhdx "$d/new.img" "$d/out.vhdx"
		qct+=("$(secs qemu-img convert -t writeback -f raw -O vhdx -o subformat=dynamic,block_size=32M "$d/new.img" "$d/out.q.vhdx")")
		qemu-img compare -q -f raw -F vhdx "$d/new.img" "$d/out.q.vhdx"
		rm -f "$d"/out.*
	done
	# What the merge's copy did, once more for the record.
	"$vhdkit" create --size "$bytes" "$d/base.vhdx" >/dev/null
	"$vhdkit" convert --parent "$d/base.vhdx" "$d/new.img" "$d/top.avhdx" >/dev/null
	moved=$("$vhdkit" merge "$d/top.avhdx" | grep -o "([^)]*cloned[^)]*)" || true)
	rm -f "$d"/base.* "$d"/top.* "$d/new.img"
	m=$(best "${mt[@]}") r=$(best "${rt[@]}") a=$(best "${at[@]}") n=$(best "${nt[@]}") q=$(best "${qt[@]}")
	vc=$(best "${vct[@]}") qc=$(best "${qct[@]}")
	rows+=("$(printf '| %-22s | %6.3f | %6.3f | %6.3f | %6.3f | %6.3f | %5.2f | %5.2f | %5.2f | %6.3f | %6.3f | %5.2f |' \
		"${names[$i]}" "$m" "$r" "$a" "$n" "$q" \
		"$(echo "$m / $a" | bc -l)" "$(echo "$m / $n" | bc -l)" "$(echo "$q / $m" | bc -l)" \
		"$vc" "$qc" "$(echo "$qc / $vc" | bc -l)")")
	[ -n "$moved" ] && rows+=("|   merge moved: $moved |")
done

printf '\n%s of changed data (merge) and of disk-like data (convert), best of %d runs, seconds incl. sync:\n\n' "$size" "$runs"
echo '| file system            | merge  | (rm child) | cp auto | cp never | qemu-img commit | merge/cp auto | merge/cp never | commit/merge | convert | qemu-img convert | qemu/vhdkit |'
echo '|------------------------|--------|--------|--------|--------|--------|-------|-------|-------|--------|--------|-------|'
printf '%s\n' "${rows[@]}"
