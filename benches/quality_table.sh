#!/usr/bin/env bash
# Prints the README's quality table: ppl on the first 20,480 tokens of tinystories_val.txt (ctx 256) of the default
# model under each method/setting, all 35 linears compressed, 128 calibration windows of 256 tokens.
# Usage: benches/quality_table.sh [path/to/whittle]   (default: target/release/whittle)
set -euo pipefail
cd "$(dirname "$0")/.."
W=${1:-target/release/whittle}
DATA=../shared/data/tinystories_val.txt
ppl() { "$W" eval --data "$DATA" --ctx 256 --max-tokens 20480 --json "$@" | sed -E 's/.*"ppl":([0-9.]+).*/\1/' | xargs printf '%.4f'; }
echo "| setting | RTN | GPTQ |"
echo "|---|---|---|"
for bits in 8 4 3 2; do
  for group in 32 128 -1; do
    g=$([ "$group" = -1 ] && echo "per-channel" || echo "g$group")
    echo "| ${bits}-bit $g | $(ppl --method rtn --bits $bits --group $group) | $(ppl --method gptq --bits $bits --group $group --asym --act-order --mse --damp 0.05) |"
  done
done
echo
echo "| sparsity | magnitude | SparseGPT |"
echo "|---|---|---|"
for s in 0.5 0.6; do
  echo "| $(awk "BEGIN{print $s*100}")% | $(ppl --method magnitude --sparsity $s) | $(ppl --method sparsegpt --sparsity $s --damp 0.05) |"
done
echo "| 2:4 | $(ppl --method magnitude --nm 2:4) | $(ppl --method sparsegpt --nm 2:4 --damp 0.05) |"
echo "| 2:4 + 4-bit g128 | $(ppl --method magnitude --nm 2:4 --bits 4 --group 128) | $(ppl --method sparsegpt --nm 2:4 --bits 4 --group 128 --damp 0.05) |"
