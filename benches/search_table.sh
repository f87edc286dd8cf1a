#!/usr/bin/env bash
# Prints the README's search table: ppl on the first 20,480 tokens of tinystories_val.txt (ctx 256) of the default
# model under the uniform, DP and EvoPress allocations at several budgets, plus the search's wall time.
# Usage: benches/search_table.sh [path/to/whittle] [out-dir]   (default: target/release/whittle, /tmp/whittle-search)
set -euo pipefail
cd "$(dirname "$0")/.."
W=${1:-target/release/whittle}
OUT=${2:-/tmp/whittle-search}
mkdir -p "$OUT"
DATA=../shared/data/tinystories_val.txt
# The tuned grid of the w4g32 preset: asymmetric, act-order, MSE clipping, damp 0.05.
GRID=(--group 32 --asym --act-order --mse --damp 0.05)
ppl() { "$W" eval --data "$DATA" --ctx 256 --max-tokens 20480 --json --plan "$1" | sed -E 's/.*"ppl":([0-9.]+).*/\1/' | xargs printf '%.4f'; }
row() { # label, budget flag, levels, extra search flags…
  local label=$1 budget=$2 levels=$3; shift 3
  local tag; tag=$(echo "$label" | tr -c 'a-z0-9' '_')
  local t0 t1; t0=$(date +%s.%N)
  "$W" search --levels "$levels" $budget --seed 0 --out "$OUT/evo_$tag.toml" --uniform-out "$OUT/uni_$tag.toml" \
    --dp-out "$OUT/dp_$tag.toml" --json "$@" > "$OUT/search_$tag.json"
  t1=$(date +%s.%N)
  local gens; gens=$(sed -E 's/.*"generations":([0-9]+).*/\1/' "$OUT/search_$tag.json")
  echo "| $label | $(ppl "$OUT/uni_$tag.toml") | $(ppl "$OUT/dp_$tag.toml") | $(ppl "$OUT/evo_$tag.toml") | $gens gens, $(awk "BEGIN{printf \"%.0f\", $t1-$t0}") s |"
}
echo "| budget | uniform | DP | EvoPress | search |"
echo "|---|---|---|---|---|"
for b in 2.5 3.0 3.5 4.0; do
  row "$b bits (gptq 2–6, g32)" "--target-bits $b" gptq:2,3,4,5,6 "${GRID[@]}"
done
for s in 0.5 0.6; do
  row "$(awk "BEGIN{print $s*100}")% sparsity (sparsegpt 0–90%)" "--target-sparsity $s" sparsegpt:0,10,20,30,40,50,60,70,80,90 --damp 0.05
done
