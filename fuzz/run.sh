#!/usr/bin/env bash
# Runs every fuzz target for SECONDS each, one after another, one process at a time
# (`make fuzz FUZZ_SECONDS=N`; docs/fuzzing.md).
#
#   bash fuzz/run.sh SECONDS [TARGET...]     (from the repository root; default: every target)
#
# Needs the nightly toolchain and cargo-fuzz (`cargo install cargo-fuzz`). The corpus grows in
# $PEFTRT_FUZZ_CORPUS (default ~/.cache/peftrt-fuzz/corpus), seeded from the fixtures first;
# crashing, hanging and out-of-memory inputs land in fuzz/artifacts/TARGET/. libFuzzer's fork
# mode with one job keeps going past a finding, so every target gets its full time. Each run
# appends "date target seconds executions findings" to $PEFTRT_FUZZ_CORPUS/../runs.tsv.
set -euo pipefail
cd "$(dirname "$0")/.."
seconds=${1:?usage: fuzz/run.sh SECONDS [TARGET...]}
shift
corpus=${PEFTRT_FUZZ_CORPUS:-$HOME/.cache/peftrt-fuzz/corpus}
log_dir=$(dirname "$corpus")
targets=("$@")
if [ ${#targets[@]} -eq 0 ]; then
  targets=(safetensors gguf config adapter chat_template ffi_text batch openai_request)
fi

bash fuzz/seed.sh "$corpus" >/dev/null
# -a: debug assertions and overflow checks on, so arithmetic overflow is a finding too.
cargo +nightly fuzz build -a -O
mkdir -p "$log_dir"
for t in "${targets[@]}"; do
  mkdir -p "fuzz/artifacts/$t"
  out="$log_dir/$t.last.log"
  before=$(find "fuzz/artifacts/$t" -type f | wc -l)
  echo "fuzz: $t for ${seconds}s (log: $out)" >&2
  # The JSON targets get a dictionary of the keys their reader looks up and edge numbers.
  dict=()
  if [ -f "fuzz/dicts/$t.dict" ]; then dict=(-dict="fuzz/dicts/$t.dict"); fi
  # -max_len: the largest seeds (adapters, the tiny GGUF) are ~100 KB.
  cargo +nightly fuzz run -a -O "$t" "$corpus/$t" -- \
    -max_total_time="$seconds" -fork=1 -ignore_crashes=1 -ignore_timeouts=1 -ignore_ooms=1 \
    -timeout=10 -rss_limit_mb=2048 -max_len=131072 -print_final_stats=1 "${dict[@]}" \
    -artifact_prefix="fuzz/artifacts/$t/" >"$out" 2>&1 || true
  # Fork mode reports "#EXECS: cov: ..." lines; the last one holds the total.
  execs=$(grep -oE '^#[0-9]+' "$out" | tail -n 1 | tr -d '#')
  found=$(($(find "fuzz/artifacts/$t" -type f | wc -l) - before))
  printf '%s\t%s\t%s\t%s\t%s\n' "$(date -u +%FT%TZ)" "$t" "$seconds" "${execs:-0}" "$found" | tee -a "$log_dir/runs.tsv"
done
