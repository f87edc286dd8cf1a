#!/bin/bash
# The GEMV table of benches/RESULTS.md: median (and range) of 5 runs of each configuration, one line per row.
B=${1:-target/release/whittle}  # usage: benches/gemv_table.sh [path to whittle]
for sh in 4096x11008 11008x4096; do
  for cfg in "--bits 4 --group 128" "--bits 4 --group 128 --q8" "--bits 4 --group 128 --sparse24" "--bits 4 --group 128 --sparse24 --q8" "--bits 16"; do
    for i in 1 2 3 4 5; do $B bench gemv --shape $sh $cfg --threads 2 --json; done | python3 -c "
import sys,json,statistics
rs=[json.loads(l) for l in sys.stdin if l.startswith('{')]
s=statistics.median(r['seconds'] for r in rs); f=statistics.median(r['fraction_of_bandwidth'] for r in rs)
print(f'$sh | $cfg | {s*1e6:.0f} us | {min(r[\"seconds\"] for r in rs)*1e6:.0f}-{max(r[\"seconds\"] for r in rs)*1e6:.0f} us | frac median {f:.2f} range {min(r[\"fraction_of_bandwidth\"] for r in rs):.2f}-{max(r[\"fraction_of_bandwidth\"] for r in rs):.2f} | stream {statistics.median(r[\"stream_gbps\"] for r in rs):.1f}')
"
  done
done
