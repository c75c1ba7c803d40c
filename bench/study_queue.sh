#!/usr/bin/env bash
# The seed and budget runs of the AST and PAT studies, one arm at a time in a fixed order, all at two threads:
# AST and a fixed mask + distillation at 200 steps for seeds 1, 2, 0; PAT (our start, --mask-init rms) and
# prune-then-LoRA at 3x the PAT study's tokens; AST and fixed + KD at 600 steps (3x), seed 0; PAT and
# prune-then-LoRA at the PAT study's own budget (the trend's first point, on the same code).
# A finished arm is skipped (each study records it), a stopped one continues from its state.pt, so the same
# command resumes the queue; a failed arm stops it.
#
#   bench/study_queue.sh OUT              # run (or resume) the queue into OUT/ast_study and OUT/pat_quality
#   bench/study_queue.sh OUT --report     # print both studies' tables; write their trend plots (budget.png)
set -euo pipefail
out=$(realpath -m "${1:?usage: bench/study_queue.sh OUT [--report]}")  # before the cd: OUT is the caller's
cd "$(dirname "$0")/.."
export OMP_NUM_THREADS=2
ast() { python bench/ast_study.py --out "$out/ast_study" --threads 2 "$@"; }
pat() { python bench/pat_quality.py --out "$out/pat_quality" "$@"; }

if [ "${2:-}" = "--report" ]; then
    set +e  # one study with no finished arm yet still leaves the other's report
    ast --report
    pat --report
    exit
fi
# Linux shares the CPU between sessions (autogroups) before nice applies inside one: a queue started with setsid
# takes half the machine whatever its nice value, unless its whole session is niced.
[ -w /proc/self/autogroup ] && echo 19 > /proc/self/autogroup 2>/dev/null || true
step() { echo "=== $(date -u +%FT%TZ) $*"; "$@"; }
for seed in 1 2 0; do
    for arm in ast fixed_kd; do step ast --seed "$seed" --arms "$arm"; done
done
for arm in pat_rms prune_lora; do step pat --budget 3 --arms "$arm"; done
for arm in ast fixed_kd; do step ast --max-steps 600 --arms "$arm"; done
for arm in pat_rms prune_lora; do step pat --budget 1 --arms "$arm"; done
echo "=== $(date -u +%FT%TZ) queue finished"
