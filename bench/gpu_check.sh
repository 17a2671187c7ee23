#!/usr/bin/env bash
# Everything detoxrl checks on a GPU, in one call of about 8 minutes:
#   1. bench/ppo_step.py at the flan-t5-base shape (roberta-large-shaped classifier) and at
#      the gpt2 shape: detoxrl, tutorial-style and the floor (bare batched generate and
#      forward passes), bf16, batch 16, 64 new tokens;
#   2. bench/gpu_profile.py at the gpt2 shape: torch.profiler on each phase of a detoxrl step,
#      and bench/sampling.py at both shapes: sampling against the cached greedy floor;
#   3. the offline demo (`detoxrl demo --fresh`), for its time, beside
#   4. DeepSpeed ZeRO-2 and ZeRO-3, one process each, through `accelerate launch` with the
#      repository's configs: a few steps of the tiny T5 and tiny GPT-2.
#
#   bash bench/gpu_check.sh                 # on the GPU machine
#   GPU_CHECK_DRY=1 bash bench/gpu_check.sh # here, on the CPU: tiny shapes, --quick demo
#
# Packages the machine lacks travel as wheels in .whl/ (installed into /tmp/site); the data
# travels in .gpu/data when ../shared/data is absent. Every stage has its own time limit
# inside GPU_CHECK_BUDGET_S; the log goes to $OUT/gpu_check.log as it runs and the results
# to $OUT/gpu-results.tar.gz at the end (unpack into bench/results/).
set -u -o pipefail
declare -A LIMITS
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/gpu-check-out}
DRY=${GPU_CHECK_DRY:-0}
BUDGET=${GPU_CHECK_BUDGET_S:-560}
RES=$(mktemp -d)/gpu
mkdir -p "$OUT" "$RES"
LOG=$OUT/gpu_check.log
END=$(( $(date +%s) + BUDGET - 25 ))   # 25 s kept for packing the results
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false DS_ACCELERATOR=${DS_ACCELERATOR:-cuda}

say() { echo "[gpu_check $(date +%H:%M:%S)] $*" | tee -a "$LOG"; }

# stage NAME LIMIT_S COMMAND...: run with the smaller of LIMIT_S and the time left; record
# rc and wall seconds in stages.tsv; output to the log and to NAME.log.
stage() {
    local name=$1 limit=$2; shift 2
    local left=$(( END - $(date +%s) ))
    (( left < limit )) && limit=$left
    if (( limit < 20 )); then say "$name: skipped, ${left}s left"; echo -e "$name\tskipped\t0" >>"$RES/stages.tsv"; return; fi
    say "$name: start (limit ${limit}s): $*"
    local t0=$(date +%s)
    timeout --kill-after=10 "$limit" "$@" > >(tee -a "$RES/$name.log" >>"$LOG") 2>&1
    local rc=$?
    local t=$(( $(date +%s) - t0 ))
    echo -e "$name\t$rc\t$t" >>"$RES/stages.tsv"
    say "$name: rc=$rc in ${t}s"
}

# ---------------------------------------------------------------- environment
if [[ -d .whl ]] && [[ $DRY == 0 ]]; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site .whl/*.whl >>"$LOG" 2>&1 || say "wheel install failed"
    export PYTHONPATH=/tmp/site
fi
export PYTHONPATH=$PWD/src${PYTHONPATH:+:$PYTHONPATH}
DATA=../shared/data
[[ -d $DATA ]] || DATA=.gpu/data
if [[ ! -d ../shared/data && -d .gpu/data ]]; then   # ppo_step reads ../shared/data itself
    mkdir -p ../shared && ln -sfn "$PWD/.gpu/data" ../shared/data
fi
{
    date -u; nvidia-smi 2>&1 || true
    python3 - <<'EOF'
import importlib.metadata as md, sys, torch
print("python", sys.version.split()[0], "torch", torch.__version__, "cuda", torch.version.cuda,
      "gpu", torch.cuda.get_device_name(0) if torch.cuda.is_available() else None)
for p in ("transformers", "peft", "accelerate", "datasets", "deepspeed", "scikit-learn",
          "alt-profanity-check"):
    try:
        print(p, md.version(p))
    except md.PackageNotFoundError:
        print(p, "missing")
for m in ("detoxrl.run", "detoxrl.evaluation.runner", "profanity_check", "deepspeed"):
    try:
        __import__(m)
        print("import", m, "ok")
    except Exception as exc:  # the log says what is missing before the stages fail on it
        print("import", m, "FAILED:", type(exc).__name__, exc)
EOF
} >"$RES/env.txt" 2>&1
cat "$RES/env.txt" >>"$LOG"

if [[ $DRY == 1 ]]; then SHAPES="tiny"; DEMO=(--quick); else SHAPES="flan-t5-base gpt2"; DEMO=(); fi

# ---------------------------------------------------------------- 1-2. step benchmark, profile
# On the H200 (bench/results/gpu-h200.md) the first full-size step of every mode cost 3-10x
# a later one, so the warm-up is a full step; building the flan-t5-base shape took ~50 s and
# a tutorial-style step ~30 s there, hence one measured step and these limits.
LIMITS=([tiny]=120 [flan-t5-base]=210 [gpt2]=130)
for shape in $SHAPES; do
    stage "ppo_step-$shape" "${LIMITS[$shape]}" python3 bench/ppo_step.py --shape "$shape" \
        --steps 1 --warmup step --batch 16 --new-tokens 64 --data "$DATA/dialogsum/train.jsonl" \
        --out "$RES"
done
# The flan-t5-base profile did not finish in 60 s there; the gpt2 one took 43 s.
stage "gpu_profile-${SHAPES##* }" 60 python3 bench/gpu_profile.py --shape "${SHAPES##* }" --out "$RES"
# Sampling against the cached greedy floor (bench/sampling.py), both shapes in one process.
if [[ $DRY == 1 ]]; then SAMPLING=(--shape tiny-causal --shape tiny-seq2seq); else
    SAMPLING=(--shape gpt2 --shape flan-t5-base); fi
stage "sampling" 90 python3 bench/sampling.py "${SAMPLING[@]}" --device "$([[ $DRY == 1 ]] \
    && echo cpu || echo cuda)" --prompts 8 --samples 25 --new-tokens 64 --repeats 2 \
    --static --data "$DATA/dialogsum/train.jsonl" --out "$RES"

# ---------------------------------------------------------------- 3-4. demo beside DeepSpeed
say "demo: start"
demo_t0=$(date +%s)
( timeout --kill-after=10 $(( END - $(date +%s) )) python3 -m detoxrl demo --fresh --quiet \
    --data-dir "$DATA" --output-dir "$RES/../demo" "${DEMO[@]}" >"$RES/demo.log" 2>&1
  echo -e "demo\t$?\t$(( $(date +%s) - demo_t0 ))" >>"$RES/stages.tsv" ) &
demo_pid=$!
LAUNCH=(python3 -m accelerate.commands.launch --num_processes 1)
for zero in 2 3; do
    for model in tiny:t5 tiny:gpt2; do
        stage "zero$zero-${model#tiny:}" 90 "${LAUNCH[@]}" \
            --config_file "configs/accelerate/deepspeed-zero$zero.yaml" -m detoxrl train \
            --config configs/tiny.yaml --model.name_or_path "$model" --steps 3 --save_every 0 \
            --output-dir "$RES/../zero$zero-${model#tiny:}" --quiet
        [[ -f $RES/../zero$zero-${model#tiny:}/metrics.jsonl ]] && \
            cp "$RES/../zero$zero-${model#tiny:}/metrics.jsonl" "$RES/zero$zero-${model#tiny:}-metrics.jsonl"
    done
done
wait "$demo_pid"
say "demo: done after $(( $(date +%s) - demo_t0 ))s"
tail -40 "$RES/demo.log" >>"$LOG"
for f in demo_summary.json report.html; do
    [[ -f $RES/../demo/$f ]] && cp "$RES/../demo/$f" "$RES/demo-$f"
done
for s in "$RES"/../demo/*/stage.json; do
    [[ -f $s ]] && cp "$s" "$RES/demo-$(basename "$(dirname "$s")")-stage.json"
done

# ---------------------------------------------------------------- results
tar -C "$RES/.." -czf "$OUT/gpu-results.tar.gz" gpu
say "packed $(tar -tzf "$OUT/gpu-results.tar.gz" | wc -l) files"
tee -a "$LOG" <"$RES/stages.tsv"
for f in "$RES"/ppo_step-*.md; do [[ -f $f ]] && sed -n '/^|/p' "$f"; done
