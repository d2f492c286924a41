#!/usr/bin/env bash
# What a running guest feels of checkpoints and live merges, in one run:
#
# 1. Stun per checkpoint type (BenchmarkMachineStun): the Debian guest of
#    .ci/debian-guest (systemd, the QEMU guest agent, a writer service busy
#    on ext4), 512 MiB, under vhdkit serve, takes BENCH_ROUNDS (default 5)
#    production, standard and crash checkpoints, each deleted again by a
#    live merge: the stun (guest frozen through the agent, paused while its
#    memory is saved, or its I/O held) and each merge's switch stall.
# 2. Guest writes during a live merge (BenchmarkMachineMergeWrites): a
#    busybox guest writing 1 MiB blocks (direct, synced) in a loop, its
#    rate from its console over BENCH_SECONDS (default 20) on a checkpoint
#    child holding 512 MiB of changed data, against the same workload
#    while that child merges live (paced to span the window).
#
# Guests run under TCG where KVM is unusable: the guest-side figures are
# slower than on hardware; the ratios and the stuns against each other are
# what compare. The published figures these answer: VMware's snapshot
# stun of 188 ms and its consolidation stuns of 385-438 ms.
#
# Usage: bench/machine.sh     (run .ci/guest-kit and .ci/debian-guest first)
set -euo pipefail
cd "$(dirname "$0")/.."

go test ./cmd/vhdkit -run '^$' -bench 'BenchmarkMachine' -benchtime 1x -timeout 30m -v |
	awk '/^Benchmark[^[:space:]]*[[:space:]]+[0-9]+[[:space:]]/ { print $1; for (i = 3; i < NF; i += 2) printf "    %-28s %s\n", $(i + 1), $i; next }
		/machine_bench_test|^(ok|FAIL|---)/ { print }'
