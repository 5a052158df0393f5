#!/usr/bin/env bash
# The chaos run (issue 18): two replicas of the release binary on one database behind a TCP
# proxy, 20 simulated droplets, a steady producer and a resuming dashboard per replica, under
# a fault schedule drawn from the seed (kill -9, SIGSTOP past the timeouts, database cut,
# stall and latency, droplets frozen, refusing, completing twice, answering late). Exits 0
# only when every invariant holds. Prints the schedule, a CHAOS_SUMMARY JSON line and a
# CHAOS_ROW line for RELIABILITY.md; the log is kept in target/tmp/faults/.
# Usage: scripts/chaos.sh [--seed S] [--minutes M] [--rate TASKS_PER_SECOND]
set -euo pipefail
cd "$(dirname "$0")/.."

seed=18
minutes=10
rate=${CHAOS_RATE:-20}
usage() { sed -n '2,8p' "$0" | sed 's/^# \{0,1\}//'; }
while [ $# -gt 0 ]; do
  case "$1" in
    --seed) seed=${2:?--seed needs a value}; shift 2 ;;
    --seed=*) seed=${1#*=}; shift ;;
    --minutes) minutes=${2:?--minutes needs a value}; shift 2 ;;
    --minutes=*) minutes=${1#*=}; shift ;;
    --rate) rate=${2:?--rate needs a value}; shift 2 ;;
    --rate=*) rate=${1#*=}; shift ;;
    -h|--help) usage; exit 0 ;;
    *) echo "unknown argument: $1" >&2; usage >&2; exit 2 ;;
  esac
done
[[ $seed =~ ^[0-9]+$ ]] || { echo "--seed takes a whole number, got $seed" >&2; exit 2; }
[[ $minutes =~ ^[0-9]+([.][0-9]+)?$ ]] || { echo "--minutes takes a number, got $minutes" >&2; exit 2; }
[[ $rate =~ ^[0-9]+([.][0-9]+)?$ ]] || { echo "--rate takes a number, got $rate" >&2; exit 2; }

out=target/tmp/faults
mkdir -p "$out"
log="$out/chaos-seed$seed-${minutes}min.log"
echo "chaos: seed $seed, $minutes minutes, $rate tasks/s; log in $log"
# The release build of the binary and of the fault suite (cargo builds what is missing).
CHAOS_SEED=$seed CHAOS_MINUTES=$minutes CHAOS_RATE=$rate \
  cargo test --release --test faults -- --include-ignored --exact --nocapture --test-threads 1 \
  chaos::chaos_schedule_loses_and_duplicates_nothing 2>&1 | tee "$log"
