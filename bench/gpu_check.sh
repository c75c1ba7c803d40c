#!/usr/bin/env bash
# One GPU check of everything that needs a GPU, on one H100/H200 in at most 8 minutes, into one results file:
#
#   bash bench/gpu_check.sh [RESULTS_DIR]     # default: $OUT if set, else out/gpu_check; writes RESULTS_DIR/gpu_check.md
#   bash bench/gpu_check.sh --stage           # here, before: copy what the check reads into cache/gpu_stage
#
# Stage first: the GPU box may be offline. --stage copies WikiText-2's test split, two text files, LaMini and
# SmolLM2's tokenizer into cache/gpu_stage (about 8 MB, git-ignored: carry it). SmolLM2's weights (538 MB)
# are used from the cache ($SPARSELLAMA_CACHE, default ~/.cache/sparsellama) when they are there, else the checks run
# on random weights in its shape and say so. Each step runs under `timeout` with its own limit and never past the
# whole budget (GPU_CHECK_BUDGET, 480 s); a step the budget can't start is listed as not run. Runs and logs go to
# GPU_CHECK_WORK (default /tmp/gpu_check); only gpu_check.md goes to RESULTS_DIR. CI can't run this (no GPU):
# tests/test_training.py checks that every flag used below exists.
#
# Steps (limit in s): env 20 | stage 60 | GPU tests 90 | AST bf16 100 | eval CUDA vs CPU 60 | to_sparse 60 |
# SDPA backends 40 | FSDP 1 process + resume 150 | PAT 75 | kernels24.bench 120 | bench_ast 60.
set -u
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD"
python() { command "${PYTHON:-python3}" "$@"; }  # the GPU image's Python is python3
export -f python

if [ "${1:-}" = "--stage" ]; then
    src=${DATA_DIR:-../shared/data} d=cache/gpu_stage
    mkdir -p $d/data/wikitext-2-raw $d/data/text $d/data/instruct $d/tokenizer
    cp "$src/wikitext-2-raw/wiki.test.raw" $d/data/wikitext-2-raw/
    cp "$src/text/tinyshakespeare.txt" "$src/text/redpajama-wiki1.jsonl" $d/data/text/
    cp "$src/instruct/lamini-10k.jsonl" $d/data/instruct/
    python -c "import checkpoint; checkpoint.load('smollm2-135m', tokenizer=False)"  # fills the cache (network)
    conv="${SPARSELLAMA_CACHE:-$HOME/.cache/sparsellama}/smollm2-135m/converted"
    cp "$conv"/params.json "$conv"/tokenizer.tiktoken "$conv"/tokenizer_config.json $d/tokenizer/
    du -sh $d
    echo "staged: carry $d (SmolLM2's weights stay in $conv: too big to carry)"
    exit 0
fi

RESULTS=${1:-${OUT:-out/gpu_check}}
WORK=${GPU_CHECK_WORK:-/tmp/gpu_check}
BUDGET=${GPU_CHECK_BUDGET:-480}
DATA=${DATA_DIR:-$(for d in cache/gpu_stage/data data ../shared/data; do [ -d $d ] && echo $d && break; done)}
CKPT=$WORK/model
mkdir -p "$RESULTS" "$WORK"
MD=$RESULTS/gpu_check.md
START=$(date +%s)
SUMMARY=()
NOT_RUN=()
export WORK DATA CKPT
# the short AST run: SmolLM2 in bf16, 20 steps of 8 x 512 tokens, masks every 5 steps, eval and checkpoint at 10
AST_FLAGS="--ckpt $CKPT --data-dir $DATA --device cuda --autocast bfloat16 --max-steps 20 --batch-size 8 \
--seq-len 512 --warmup-steps 2 --lr 1e-4 --mask-interval 5 --eval-interval 10 --ckpt-interval 10 --ppl-windows 8 \
--ppl-seq-len 512 --log-interval 5 --overwrite"
FSDP_FLAGS="--ckpt $CKPT --data-dir $DATA --device cuda --fsdp --max-steps 6 --batch-size 4 --seq-len 256 \
--warmup-steps 1 --lr 1e-4 --mask-interval 2 --eval-interval 3 --ckpt-interval 3 --ppl-windows 4 --ppl-seq-len 256 \
--log-interval 1 --grad-accum 2 --overwrite"
export AST_FLAGS FSDP_FLAGS

step_env() { python bench/gpu_check.py env; }
step_stage() {
    python bench/gpu_check.py stage --out "$CKPT" --tokenizer cache/gpu_stage/tokenizer || return 1
    [ -f "$DATA/wikitext-2-raw/wiki.test.raw" ] || { echo "no WikiText-2 under $DATA: run --stage first"; return 1; }
}
step_tests() { python -m pytest -m "not slow" -q -rs -k gpu -p no:cacheprovider tests; }
step_ast() { python train_ast.py $AST_FLAGS --out "$WORK/ast"; }
ast_model() { [ -f "$WORK/ast/final/model.safetensors" ] && echo "$WORK/ast/final" || echo "$CKPT"; }  # AST's, else the base
step_eval() { python bench/gpu_check.py eval --ckpt "$(ast_model)" --data-dir "$DATA" --windows 8 --seq-len 512; }
step_sparse() { python bench/gpu_check.py sparse --ckpt "$(ast_model)" --prompt 8 --new-tokens 32; }
step_sdpa() { python bench/gpu_check.py sdpa --ckpt "$(ast_model)"; }
step_fsdp() {
    hook=$WORK/hook && mkdir -p "$hook"
    printf '%s\n' "import os, signal, training" "real, calls = training.StopRequest.requested, []" \
        "def requested(self, device):" "    calls.append(1)" \
        "    if len(calls) == 4: os.kill(os.getpid(), signal.SIGTERM)" "    return real(self, device)" \
        "training.StopRequest.requested = requested" > "$hook/sitecustomize.py"
    python -m torch.distributed.run --nproc_per_node 1 --master_port 29651 train_ast.py $FSDP_FLAGS --out "$WORK/fsdp_calm" || return 1
    PYTHONPATH="$hook:$PWD" python -m torch.distributed.run --nproc_per_node 1 --master_port 29652 train_ast.py $FSDP_FLAGS \
        --out "$WORK/fsdp_resumed" && { echo "the SIGTERM after step 4 did not stop the run"; return 1; }
    python -m torch.distributed.run --nproc_per_node 1 --master_port 29653 train_ast.py $FSDP_FLAGS --out "$WORK/fsdp_resumed" --resume \
        || return 1
    python bench/gpu_check.py compare "$WORK/fsdp_calm" "$WORK/fsdp_resumed"
}
step_pat() {
    python train_pat.py --ckpt "$CKPT" --data-dir "$DATA" --out "$WORK/pat" --overwrite --device cuda \
        --autocast bfloat16 --max-steps 12 --batch-size 8 --seq-len 256 --ppl-windows 4 --ppl-seq-len 512 --log-interval 4
}
step_kernels() {
    python -m kernels24.bench --smollm2 "$CKPT" --tokens 16,128,4096 --runs 20 --model-runs 3 \
        --models smollm2-135m,llama2-7b-random --prefill 128,4096 --decode-batch 1,16 --decode-steps 8 --out "$WORK/kernels"
}
step_bench_ast() { python bench/bench_ast.py --ckpt "$CKPT" --steps 5 --warmup 1 --mask-interval 5 --batch-size 4 --seq-len 512; }
export -f ast_model step_env step_stage step_tests step_ast step_eval step_sparse step_sdpa step_fsdp step_pat step_kernels \
    step_bench_ast

run() {  # run NAME LIMIT TITLE: step_NAME under timeout, capped by what is left of the budget
    local name=$1 limit=$2 title=$3 left t0 rc status seconds
    left=$((BUDGET - ($(date +%s) - START)))
    if [ "$left" -lt 20 ]; then
        NOT_RUN+=("$title")
        SUMMARY+=("| $title | not run: ${left}s of the ${BUDGET}s budget left | - |")
        return
    fi
    [ "$limit" -gt "$left" ] && limit=$left
    t0=$(date +%s)
    timeout -k 10 "$limit" bash -c "step_$name" > "$WORK/$name.log" 2>&1
    rc=$?
    seconds=$(($(date +%s) - t0))
    case $rc in 0) status=ok ;; 124 | 137) status="TIMEOUT after ${limit}s" ;; *) status="FAIL (exit $rc)" ;; esac
    SUMMARY+=("| $title | $status | $seconds |")
    {
        echo "### $title: $status, ${seconds}s"
        echo
        if grep -q '^|' "$WORK/$name.log" || grep -q '^- ' "$WORK/$name.log"; then  # a helper's Markdown
            grep -E '^(\||- |[A-Za-z`].*:)' "$WORK/$name.log" | grep -v -E 'Warning|warn\(' | tail -n 40
        else
            echo '```'
            grep -v -E 'Warning|warnings.warn|^\s*$' "$WORK/$name.log" | tr '\r' '\n' | tail -n 25
            echo '```'
        fi
        echo
    } >> "$WORK/details.md"
}

: > "$WORK/details.md"
run env 20 "environment"
run stage 60 "stage the model and data"
run tests 90 "GPU tests (pytest -m 'not slow' -k gpu)"
run ast 100 "AST on SmolLM2, bf16, 20 steps"
run eval 60 "eval: CUDA fp32 / bf16 vs CPU"
run sparse 60 "kernels24.sparse.to_sparse on the AST model"
run sdpa 40 "SDPA backends per attention path"
run fsdp 150 "FSDP, 1 process: run, SIGTERM, resume"
run pat 75 "PAT, 12 steps"
run kernels 120 "kernels24.bench per-linear and whole-model"
run bench_ast 60 "bench_ast: AST vs dense step on CUDA"

{
    echo "# GPU check ($(date -u +%Y-%m-%dT%H:%MZ), $(($(date +%s) - START)) s of a ${BUDGET} s budget)"
    echo
    echo "Commit $(git rev-parse --short HEAD 2>/dev/null || echo '?')$(git diff --quiet 2>/dev/null || echo ' + local changes'); \`bash bench/gpu_check.sh\`."
    echo
    echo "| step | result | seconds |"
    echo "|---|---|---|"
    printf '%s\n' "${SUMMARY[@]}"
    echo
    if [ ${#NOT_RUN[@]} -gt 0 ]; then echo "Not run (budget): ${NOT_RUN[*]}."; echo; fi
    cat "$WORK/details.md"
} > "$MD"
echo "wrote $MD"
