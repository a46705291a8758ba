#!/usr/bin/env bash
# The GPU checks of one device call (~9.5 minutes on an H100), most important first: QLoRA training,
# reload, peak memory and merge on the 1B shape, the memory estimate against peft train's measured
# peak, the fused/varlen kernels, the 8B merge, then peft bench next to both baselines on the 1B
# standard workload. From the project root on the device, with .gpu/ carried (../shared/gpu/GUIDE.md):
#
#     source .gpu/prelude.sh && bash tests/gpu_verify.sh
#
# Each step has its own time limit and a failure does not stop the next; $OUT/steps.log says how each ended.
set -u
OUT=${OUT:-/tmp/peftcli-gpu}
DEADLINE=$(( $(date +%s) + ${GPU_BUDGET_S:-560} ))
shm_kib=$(df --output=avail -k /dev/shm 2> /dev/null | tail -n 1 | tr -d ' ')
[ "${shm_kib:-0}" -gt 40000000 ] 2> /dev/null && export PEFTCLI_CACHE=/dev/shm/peftcli-cache  # 8B written in memory

step() {  # step NAME LIMIT COMMAND...: run with a limit, log to $OUT/NAME.log, keep a JSON result line
  local name=$1 limit=$2 left start rc
  shift 2
  left=$(( DEADLINE - $(date +%s) ))
  (( left < 30 )) && { echo "$name: skipped, ${left}s left" >> "$OUT/steps.log"; return; }
  (( limit > left )) && limit=$left
  start=$(date +%s)
  timeout -k 10 "$limit" "$@" >> "$OUT/$name.log" 2>&1
  rc=$?
  grep '^{' "$OUT/$name.log" | tail -n 1 | sed "s/^{/{\"step\": \"$name\", /" >> "$OUT/bench.jsonl"
  echo "$name: exit $rc after $(( $(date +%s) - start ))s (limit ${limit}s)" >> "$OUT/steps.log"
}

nvidia-smi --query-gpu=name,memory.total --format=csv,noheader > "$OUT/steps.log"
T=tests
step gpu-1b 210 python3 -m pytest -m gpu -q -s -rA -p no:cacheprovider \
  "$T/test_gpu_qlora.py::test_qlora_trains_a_4bit_llama_and_the_loss_falls[default]" \
  "$T/test_gpu_qlora.py::test_the_qlora_adapter_reloads_onto_a_4bit_base_with_the_same_logits[default]" \
  "$T/test_gpu_qlora.py::test_qlora_peak_memory_is_below_bf16_lora[1b]" \
  "$T/test_gpu_merge.py::test_a_qlora_adapter_merges_both_ways_and_both_gaps_are_measured" \
  "$T/test_gpu_memory.py::test_the_estimate_is_within_15_percent_of_the_measured_peak[1b-lora]" \
  "$T/test_gpu_memory.py::test_the_estimate_is_within_15_percent_of_the_measured_peak[1b-qlora]" \
  "$T/test_gpu_speed.py::test_varlen_attention_equals_per_sequence_sdpa_forward_and_backward" \
  "$T/test_gpu_speed.py::test_fused_lora_matches_peft_in_bf16" \
  "$T/test_gpu_speed.py::test_fused_lora_matches_peft_on_a_4bit_base"
step gpu-8b 150 python3 -m pytest -m gpu -q -s -rA -p no:cacheprovider \
  "$T/test_gpu_merge.py::test_an_8b_merge_in_bf16_time_and_peak_memory"
step bench 75 python3 -m peftcli bench --json --size 1b
step bench 90 python3 .gpu/trl_baseline.py --size 1b
step bench 70 python3 .gpu/naive_baseline.py --size 1b
step gpu-many 150 python3 -m pytest -m gpu -q -s -rA -p no:cacheprovider "$T/test_gpu_many.py"
cat "$OUT/steps.log"
