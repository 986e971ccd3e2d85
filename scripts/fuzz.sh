#!/usr/bin/env bash
# Runs every fuzz target of every crate (crates/*/fuzz/fuzz_targets/*.rs) for
# SECONDS_PER_TARGET seconds each (default 60), starting from the crate's committed seeds
# (crates/X/fuzz/seeds/TARGET) plus what earlier runs found (crates/X/fuzz/corpus/TARGET,
# not committed). Needs the nightly toolchain and cargo-fuzz. A crash stops the run: its
# input is in crates/X/fuzz/artifacts/TARGET/ and becomes a regression test of the crate.
#
#   scripts/fuzz.sh [SECONDS_PER_TARGET] [TARGET_NAME_FILTER]
set -euo pipefail
seconds=${1:-60}
filter=${2:-}
cd "$(dirname "$0")/.."
status=0
for dir in crates/*/fuzz; do
    [ -d "$dir/fuzz_targets" ] || continue
    for src in "$dir"/fuzz_targets/*.rs; do
        target=$(basename "$src" .rs)
        [[ -z $filter || $target == *$filter* ]] || continue
        mkdir -p "$dir/corpus/$target"
        seeds=()
        [ -d "$dir/seeds/$target" ] && seeds=("seeds/$target")
        echo "== $dir $target: ${seconds}s"
        if ! (cd "$dir/.." && cargo +nightly fuzz run --fuzz-dir fuzz -O "$target" "fuzz/corpus/$target" \
            "${seeds[@]/#/fuzz/}" -- -max_total_time="$seconds" -print_final_stats=1 2>&1 | grep -E "^(Done|stat::number_of_executed_units|==[0-9]+==|SUMMARY|thread .* panicked)|artifact"); then
            :
        fi
        if [ -n "$(ls -A "$dir/artifacts/$target" 2>/dev/null)" ]; then
            echo "!! $target: crash inputs in $dir/artifacts/$target"
            status=1
        fi
    done
done
exit $status
