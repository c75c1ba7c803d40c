#!/usr/bin/env bash
# One GPU check of everything that needs a GPU, on one H100/H200 in at most 330 s of steps, rehearsed on CPU:
#
#   bash bench/gpu_check.sh --stage           # here, before: what the steps read into cache/gpu_stage (carry it)
#   bash bench/gpu_check.sh [RESULTS_DIR]     # on the GPU; default RESULTS_DIR: $OUT if set, else out/gpu_check
#   bash bench/gpu_check.sh --rehearse DIR    # the same steps on CPU with tiny shapes (CUDA-only steps: skipped)
#   bash bench/gpu_check.sh --list            # the steps: name, limit s, kill grace s, needs, title
#   GPU_CHECK_STEPS=memory,kernels bash bench/gpu_check.sh   # a subset, e.g. a second call
#
# --stage fails on any missing file, stamps the commit (the tree that travels has no .git) and stages only what a
# step reads: WikiText-2's test split, two text files, SmolLM2's tokenizer. The weights stay behind (538 MB): the
# steps run on random weights in SmolLM2's shape and say so. After every step RESULTS_DIR/gpu_check.md is rewritten
# (environment, one row per step, each log's tail) and RESULTS_DIR/gpu_check_logs.tar.gz holds every log: a call
# cut short still returns what it did. Each step runs under `timeout` with its limit, never past the budget
# (GPU_CHECK_BUDGET, default the sum of the limits; GPU_CHECK_LIMIT_SCALE=k multiplies both, for a rehearsal on a
# slow CPU); steps that prove most come first. Work files go to GPU_CHECK_WORK (default /tmp/gpu_check).
# docs/gpu_check.md says what each step proves and what passes.
set -u
cd "$(dirname "$0")/.."
ROOT=$PWD
export PYTHONUNBUFFERED=1 PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"  # prepended: a carried wheel's dir stays
python() {  # the GPU image's Python is python3; GPU_CHECK_DRY_RUN=FILE only records each command line in FILE
    if [ -n "${GPU_CHECK_DRY_RUN:-}" ]; then printf '%q ' "$@" >> "$GPU_CHECK_DRY_RUN"; echo >> "$GPU_CHECK_DRY_RUN"; return 0; fi
    command "${PYTHON:-python3}" "$@"
}
export -f python
STAGE=${GPU_CHECK_STAGE:-cache/gpu_stage}
STAGED_FILES="data/wikitext-2-raw/wiki.test.raw data/text/tinyshakespeare.txt data/text/redpajama-wiki1.jsonl"
TOKENIZER_FILES="params.json tokenizer.tiktoken tokenizer_config.json"

# name limit(s) kill-grace(s) needs title; most proof first. fsdp's grace outlasts torchrun's own 30 s for its
# workers (they run in their own session: killing the agent early leaves them holding the GPU).
STEPS="env 45 10 any environment: GPU, driver, torch, CUDA, cuDNN, cuSPARSELt, NCCL
stage 15 10 any the model the steps run (random weights in SmolLM2's shape)
tests 25 10 cuda GPU tests: the 2:4 kernels against dense
sparse 20 10 cuda kernels24.sparse.to_sparse: teacher-forced logits vs dense per backend
ast 35 10 any AST on SmolLM2's shape, bf16, 20 steps: masks, eval, checkpoint, export
fsdp 55 45 any FSDP, 1 process: run; SIGTERM after step 4; resume at step 4; equal to the uninterrupted run
memory 30 10 any memory: AST under FSDP on a Llama-3.2-1B shape vs the README's formula
eval 20 10 any eval: CUDA fp32 / bf16 vs CPU fp32 on WikiText-2
sdpa 15 10 any SDPA backend per attention path, by aten op; prefill must not fall back to math
kernels 30 10 cuda kernels24.bench: per-linear (SmolLM2 + 7B linears) and SmolLM2 whole model
bench_ast 20 10 any bench_ast: AST vs dense step time and peak memory
pat 20 10 any PAT, 12 steps, no LoRA baseline"

stage() {
    local src=${DATA_DIR:-../shared/data} tmp="$STAGE.tmp" conv f kb
    for f in $STAGED_FILES; do
        [ -f "$src/${f#data/}" ] || { echo "error: --stage: $src/${f#data/} is missing; set DATA_DIR to the data folder (README 'Data')" >&2; return 1; }
    done
    python -c "import checkpoint; checkpoint.load('smollm2-135m', tokenizer=False)" > /dev/null \
        || { echo "error: --stage: SmolLM2-135M could not be fetched or converted (see above)" >&2; return 1; }
    conv="${SPARSELLAMA_CACHE:-$HOME/.cache/sparsellama}/smollm2-135m/converted"
    for f in $TOKENIZER_FILES; do
        [ -f "$conv/$f" ] || { echo "error: --stage: $conv/$f is missing; delete $conv and stage again" >&2; return 1; }
    done
    rm -rf "$tmp" && mkdir -p "$tmp/tokenizer" || return 1
    for f in $STAGED_FILES; do
        mkdir -p "$tmp/$(dirname "$f")" && cp "$src/${f#data/}" "$tmp/$f" || { echo "error: --stage: cannot copy $src/${f#data/}" >&2; return 1; }
    done
    for f in $TOKENIZER_FILES; do cp "$conv/$f" "$tmp/tokenizer/" || { echo "error: --stage: cannot copy $conv/$f" >&2; return 1; }; done
    { git rev-parse --short HEAD && git diff --quiet HEAD || echo "+ local changes"; } 2>/dev/null | paste -sd' ' > "$tmp/COMMIT"
    [ -s "$tmp/COMMIT" ] || { echo "error: --stage: not a git checkout, no commit to stamp" >&2; return 1; }
    rm -rf "$STAGE" && mv "$tmp" "$STAGE" || return 1
    kb=$(( $(du -sk "$STAGE" | cut -f1) + $(git ls-files -z | xargs -0 du -ck 2>/dev/null | tail -n1 | cut -f1) ))
    [ "$kb" -le 20480 ] || { echo "error: --stage: the stage and the repository take ${kb} KB, over 20 MB" >&2; return 1; }
    echo "staged $STAGE (commit $(cat "$STAGE/COMMIT")); stage + repository ${kb} KB; carry $STAGE"
}

case "${1:-}" in
    --stage) stage; exit $? ;;
    --list) echo "$STEPS"; exit 0 ;;
    --rehearse) REHEARSE=1 RESULTS=${2:?--rehearse needs a results folder} ;;
    -*) echo "error: unknown option $1; use --stage, --rehearse DIR, --list or a results folder" >&2; exit 1 ;;
    *) REHEARSE=0 RESULTS=${1:-${OUT:-out/gpu_check}} ;;
esac
if [ ! -f "$STAGE/COMMIT" ] || [ ! -f "$STAGE/data/wikitext-2-raw/wiki.test.raw" ]; then
    echo "error: no staged data in $STAGE: run 'bash bench/gpu_check.sh --stage' where ../shared/data is, and carry $STAGE" >&2
    exit 1
fi
WORK=${GPU_CHECK_WORK:-/tmp/gpu_check}
DATA=$STAGE/data TOKENIZER=$STAGE/tokenizer CKPT=$WORK/model
if [ "$REHEARSE" = 1 ]; then  # CPU, tiny shapes: the same commands, smaller numbers
    DEVICE=cpu AUTOCAST=float32 SHAPE=tiny MEMORY_SHAPE=tiny B=2 T=64 AST_STEPS=6 FSDP_B=2 FSDP_T=32 MEM_B=1 MEM_T=32
    PPL_T=64 PAT_STEPS=3 BENCH_T=32
else
    DEVICE=cuda AUTOCAST=bfloat16 SHAPE=smollm2 MEMORY_SHAPE=llama3.2-1b B=8 T=512 AST_STEPS=20 FSDP_B=4 FSDP_T=256
    MEM_B=2 MEM_T=2048 PPL_T=512 PAT_STEPS=12 BENCH_T=512
fi
export WORK DATA TOKENIZER CKPT DEVICE AUTOCAST SHAPE MEMORY_SHAPE B T AST_STEPS FSDP_B FSDP_T MEM_B MEM_T PPL_T PAT_STEPS BENCH_T

step_env() { python bench/gpu_check.py env --device "$DEVICE"; }
step_stage() { python bench/gpu_check.py stage --out "$CKPT" --tokenizer "$TOKENIZER" --shape "$SHAPE"; }
step_tests() { python -m pytest -q -rs -p no:cacheprovider tests/test_kernels24_sparse.py; }
step_sparse() { python bench/gpu_check.py sparse --ckpt "$CKPT" --prompt 8 --new-tokens 32; }
step_ast() {
    python train_ast.py --ckpt "$CKPT" --data-dir "$DATA" --out "$WORK/ast" --overwrite --device "$DEVICE" \
        --autocast "$AUTOCAST" --max-steps "$AST_STEPS" --batch-size "$B" --seq-len "$T" --warmup-steps 2 --lr 1e-4 \
        --mask-interval 5 --eval-interval 10 --ckpt-interval 10 --ppl-windows 4 --ppl-seq-len "$PPL_T" --log-interval 5
}
fsdp_run() {  # fsdp_run OUT [torchrun's script and its first arguments]: one torchrun process, the same flags each time
    local out=$1 && shift
    python -m torch.distributed.run --nproc_per_node 1 --master_port "${GPU_CHECK_PORT:-29651}" "${@:-train_ast.py}" \
        --ckpt "$CKPT" --data-dir "$DATA" --out "$out" --device "$DEVICE" --autocast "$AUTOCAST" --fsdp --max-steps 6 \
        --batch-size "$FSDP_B" --seq-len "$FSDP_T" --grad-accum 2 --warmup-steps 1 --lr 1e-4 --mask-interval 2 \
        --eval-interval 3 --ckpt-interval 3 --ppl-windows 2 --ppl-seq-len "$FSDP_T" --log-interval 1
}
step_fsdp() {
    local rc
    rm -rf "$WORK/fsdp_calm" "$WORK/fsdp_resumed"
    fsdp_run "$WORK/fsdp_calm" || { echo "result: FAIL: the uninterrupted run failed"; return 1; }
    fsdp_run "$WORK/fsdp_resumed" bench/gpu_check.py stop-after 4 "${GPU_CHECK_STOP_SIGNAL:-SIGTERM}" \
        train_ast.py 2>&1 | tee "$WORK/fsdp_stopped.out"
    rc=${PIPESTATUS[0]}
    [ "$rc" -ne 0 ] || { echo "result: FAIL: the SIGTERM after step 4 did not stop the run"; return 1; }
    grep -q "stopped by SIGTERM after step 4; " "$WORK/fsdp_stopped.out" \
        || { echo "result: FAIL: exit $rc without 'stopped by SIGTERM after step 4': a crash, not the stop"; return 1; }
    fsdp_run "$WORK/fsdp_resumed" train_ast.py --resume 2>&1 | tee "$WORK/fsdp_resume.out"
    rc=${PIPESTATUS[0]}
    [ "$rc" -eq 0 ] || { echo "result: FAIL: the resumed run failed (exit $rc)"; return 1; }
    grep -qE "^resuming from .*/fsdp_resumed/state\.pt at step 4\$" "$WORK/fsdp_resume.out" \
        || { echo "result: FAIL: no 'resuming from .../state.pt at step 4': it did not start where the stop left it"; return 1; }
    python bench/gpu_check.py compare "$WORK/fsdp_calm" "$WORK/fsdp_resumed"
}
step_memory() {
    python bench/gpu_check.py memory --shape "$MEMORY_SHAPE" --device "$DEVICE" --batch-size "$MEM_B" --seq-len "$MEM_T" \
        --grad-accum 2 --steps 3
}
step_eval() { python bench/gpu_check.py eval --ckpt "$CKPT" --device "$DEVICE" --data-dir "$DATA" --windows 8 --seq-len "$PPL_T"; }
step_sdpa() { python bench/gpu_check.py sdpa --ckpt "$CKPT" --device "$DEVICE"; }
step_kernels() {
    python -m kernels24.bench --smollm2 "$CKPT" --tokens 16,128,4096 --runs 10 --model-runs 3 --models smollm2-135m \
        --prefill 128,4096 --decode-batch 1,16 --decode-steps 8 --out "$WORK/kernels"
}
step_bench_ast() {
    python bench/bench_ast.py --ckpt "$CKPT" --device "$DEVICE" --autocast "$AUTOCAST" --steps 3 --warmup 1 \
        --mask-interval 3 --batch-size 4 --seq-len "$BENCH_T"
}
step_pat() {
    python train_pat.py --ckpt "$CKPT" --data-dir "$DATA" --out "$WORK/pat" --overwrite --device "$DEVICE" \
        --autocast "$AUTOCAST" --max-steps "$PAT_STEPS" --batch-size "$B" --seq-len 256 --ppl-windows 4 \
        --ppl-seq-len "$PPL_T" --log-interval 4 --baseline none
}
export -f fsdp_run step_env step_stage step_tests step_sparse step_ast step_fsdp step_memory step_eval step_sdpa \
    step_kernels step_bench_ast step_pat

mkdir -p "$RESULTS" "$WORK" || exit 1
RESULTS=$(cd "$RESULTS" && pwd)
MD=$RESULTS/gpu_check.md ARCHIVE=$RESULTS/gpu_check_logs.tar.gz
SCALE=${GPU_CHECK_LIMIT_SCALE:-1}  # every limit times this: for a rehearsal on a slow or shared CPU only
BUDGET=${GPU_CHECK_BUDGET:-$(echo "$STEPS" | awk -v k="$SCALE" '{s += $2 * k} END {print s}')}
START=$(date +%s)
declare -A ROW
rm -f "$WORK"/*.log

write_results() {  # the whole results file and the archive, rewritten (atomically) after every step
    local name limit grace needs title
    {
        echo "# GPU check$([ "$REHEARSE" = 1 ] && echo ': CPU rehearsal') ($(date -u +%Y-%m-%dT%H:%MZ), $(($(date +%s) - START)) s of a ${BUDGET} s budget)"
        echo
        echo "Commit $(cat "$STAGE/COMMIT") (stamped by --stage); \`bash bench/gpu_check.sh$([ "$REHEARSE" = 1 ] && echo " --rehearse $RESULTS")\`${GPU_CHECK_STEPS:+, GPU_CHECK_STEPS=$GPU_CHECK_STEPS}."
        echo
        echo "| step | result | seconds | limit |"
        echo "|---|---|---|---|"
        while read -r name limit grace needs title; do
            echo "${ROW[$name]:-| $title | not run yet | - | $((limit * SCALE)) |}"
        done <<< "$STEPS"
        echo
        while read -r name limit grace needs title; do
            [ -f "$WORK/$name.log" ] || continue
            echo "### $name: $title"
            echo
            echo '```text'
            tr '\r' '\n' < "$WORK/$name.log" | grep -v '^\s*$' | tail -n 40  # verbatim: tracebacks and errors stay
            echo '```'
            echo
        done <<< "$STEPS"
    } > "$MD.tmp" && mv "$MD.tmp" "$MD"
    (cd "$WORK" && tar czf "$ARCHIVE.tmp" --ignore-failed-read ./*.log ./*.out kernels/*.json 2>/dev/null)
    mv "$ARCHIVE.tmp" "$ARCHIVE" 2>/dev/null
}

run_step() {  # run_step NAME LIMIT GRACE NEEDS TITLE: step_NAME under timeout, capped by what is left of the budget
    local name=$1 limit=$(($2 * SCALE)) grace=$3 needs=$4 title=$5 left t0 rc status seconds verdict
    left=$((BUDGET - ($(date +%s) - START)))
    if [ -n "${GPU_CHECK_STEPS:-}" ] && [[ ",$GPU_CHECK_STEPS," != *",$name,"* ]] \
        && ! { [ "$name" = stage ] && [ ! -f "$CKPT/params.json" ]; }; then  # a fresh machine's subset needs the model
        status="not selected (GPU_CHECK_STEPS)"
    elif [ "$REHEARSE" = 1 ] && [ "$needs" = cuda ]; then
        status="skipped: needs CUDA"
    elif [ "$left" -lt 5 ]; then
        status="not run: ${left} s of the ${BUDGET} s budget left"
    else
        [ "$limit" -gt "$left" ] && limit=$left
        t0=$(date +%s)
        timeout -k "$grace" "$limit" bash -c "step_$name" < /dev/null > "$WORK/$name.log" 2>&1
        rc=$?
        seconds=$(($(date +%s) - t0))
        verdict=$(grep -a '^result: ' "$WORK/$name.log" | tail -n1 | cut -c9- | cut -c1-150 | tr '|' '/')
        case $rc in
            0) status="ok${verdict:+: $verdict}" ;;
            124 | 137) status="TIMEOUT after ${limit} s" ;;
            *) status="FAIL (exit $rc)${verdict:+: $verdict}" ;;
        esac
    fi
    ROW[$name]="| $title | $status | ${seconds:--} | $limit |"
    write_results  # before the status line: whoever reads that line finds the row written
    echo "gpu_check: $name: $status${seconds:+ (${seconds} s)}"
}

write_results
while read -r name limit grace needs title; do
    run_step "$name" "$limit" "$grace" "$needs" "$title"
done <<< "$STEPS"
echo "gpu_check: wrote $MD and $ARCHIVE ($(($(date +%s) - START)) s)"
