#!/usr/bin/env bash
# The GPU figures in one call of at most 9 minutes on one H100 / H200: every step has its own time cap,
# prints JSON lines, and a step that runs out of time says so in a line of its own.
#
#   bash benchmarks/gpu.sh [GLAS_RAW] [OUT]      GLAS_RAW: the raw GlaS folder (default carry/glas;
#                                                copy ../shared/data/glas there, it is git-ignored)
#   SMOKE=1 bash benchmarks/gpu.sh               tiny CPU versions of every step (checks the script)
#
# Steps (caps in seconds; 510 in all):
#   1. training throughput, stage 1 and 2, batch 16 and 256 at 256 px, eager        (90)
#   2. the same, torch.compile default mode and mode=reduce-overhead (CUDA graphs)  (150 + 150)
#   3. benchmarks/wsi.py on the GPU: its 20480 px slide, today's path and large tiles  (120)
#   4. the paper's GlaS schedule (256 px, 30 + 10 + 450 epochs); when it runs out of time, the
#      epochs done and seconds per epoch, from which the full schedule's time follows  (remaining)
# Peak GPU memory is in every throughput and wsi line.
set -u
here="$(cd "$(dirname "$0")" && pwd)"
glas="${1:-carry/glas}"
out="${2:-${OUT:-benchmarks-gpu-out}}"
mkdir -p "$out"
log="$out/gpu.jsonl"
py="${PYTHON:-python}"
start=$(date +%s)

if [ "${SMOKE:-0}" = "1" ]; then
  tp_args=(--device cpu --size 32 --batches 2 --images 8 --steps 1 --warmup 0)
  wsi_args=(--smoke --device cpu)
  glas_args=(--teacher-epochs 1 --fusion-epochs 1 --distill-epochs 1 --swap-every 1 --input-size 32)
  caps=(600 600 600 600 600)  # a shared 2-core CPU is slow; the caps only guard
else
  tp_args=(--device cuda --size 256 --batches 16 256 --images 4096)
  wsi_args=(--device cuda --work "$out/wsi" --configs torch,torch-large-tiles)
  glas_args=(--paper --device cuda)
  caps=(90 150 150 120 0)
fi

step() {  # step NAME CAP CMD...: run CMD under a cap, keep its JSON lines, note a timeout or failure
  local name=$1 cap=$2
  shift 2
  timeout --kill-after=10 "$cap" "$@" > "$out/$name.stdout" 2> "$out/$name.stderr"
  local rc=$?
  grep '^{' "$out/$name.stdout" | sed "s/^{/{\"step\": \"$name\", /" | tee -a "$log"
  if [ $rc -ne 0 ]; then
    echo "{\"step\": \"$name\", \"rc\": $rc, \"timed_out\": $([ $rc -eq 124 ] || [ $rc -eq 137 ] && echo true || echo false), \"cap_s\": $cap, \"stderr_tail\": $(tail -c 400 "$out/$name.stderr" | "$py" -c 'import json,sys; print(json.dumps(sys.stdin.read()))')}" | tee -a "$log"
  fi
}

"$py" -c "import json, torch; print(json.dumps({'step': 'machine', 'torch': torch.__version__, 'cuda': torch.cuda.is_available(), 'gpu': torch.cuda.get_device_name() if torch.cuda.is_available() else None}))" | tee -a "$log"
step throughput-eager "${caps[0]}" "$py" "$here/throughput.py" "${tp_args[@]}"
step throughput-compile "${caps[1]}" "$py" "$here/throughput.py" "${tp_args[@]}" --compile
step throughput-cudagraphs "${caps[2]}" "$py" "$here/throughput.py" "${tp_args[@]}" --compile \
  --compile-mode reduce-overhead
step wsi "${caps[3]}" "$py" "$here/wsi.py" "${wsi_args[@]}"

left=$(( 510 - ($(date +%s) - start) ))
cap="${caps[4]}"
[ "$cap" = "0" ] && cap=$(( left > 60 ? left : 60 ))
if [ -d "$glas" ]; then
  step glas-paper "$cap" "$py" "$here/glas.py" --glas "$glas" --out "$out/glas" "${glas_args[@]}"
  if [ -f "$out/glas/run/metrics.csv" ] && ! grep -q '"benchmark": "glas"' "$out/glas-paper.stdout"; then
    "$py" - "$out/glas/run/metrics.csv" <<'EOF' | tee -a "$log"
import csv, json, sys
rows = list(csv.DictReader(open(sys.argv[1])))
per = {}
for r in rows:
    per.setdefault(r["phase"], []).append(float(r["seconds"]))
print(json.dumps({"step": "glas-paper-partial", "epochs_done": {k: len(v) for k, v in per.items()},
                  "s_per_epoch": {k: round(sum(v) / len(v), 2) for k, v in per.items()}}))
EOF
  fi
else
  echo "{\"step\": \"glas-paper\", \"skipped\": \"no GlaS folder at $glas\"}" | tee -a "$log"
fi
echo "{\"step\": \"done\", \"wall_s\": $(( $(date +%s) - start ))}" | tee -a "$log"
