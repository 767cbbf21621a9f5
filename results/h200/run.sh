#!/bin/bash
# The project's first GPU session (#22: what more compute buys the base), one call on one H200.
# Run from the repository root with OUT set to a folder for the results:
#   OUT=/tmp/h200 bash results/h200/run.sh
# 1. The speed of the eager training step (one row of README's speed table each): the tiny model
#    at batch 256 (8x the CPU base's batch), and the `small` preset (384 wide, 12 layers).
# 2. Both trained at once on the one GPU, their step counts sized from those rows so training
#    ends in about TRAIN_S seconds; a small eval every fifth of the run draws the learning curve.
# 3. The full eval of each final checkpoint, val then test_ood, on the GPU.
# Every run folder (logs, curves, evals; no checkpoints) is packed into $OUT/runs.tgz every 15 s,
# so a call cut at its time limit still returns what was done.
export PYTHONUNBUFFERED=1
TRAIN_S=${TRAIN_S:-220}
R=/tmp/runs
mkdir -p $R "$OUT"
T0=$(date +%s)
say() { echo "[$(( $(date +%s) - T0 )) s] $*" | tee -a $R/timeline.txt; }

nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv > $R/gpu.txt
python3 -c "import sys, torch, triton; print(sys.version.split()[0], torch.__version__, triton.__version__, torch.cuda.get_device_name())" >> $R/gpu.txt 2>&1
cat $R/gpu.txt

pack() { tar czf "$OUT/part.tgz" -C $R --exclude='step_*' . && mv "$OUT/part.tgz" "$OUT/runs.tgz"; }
( while sleep 15; do pack; done ) &
PACKER=$!

# 1. speed rows; each prints README's row and the ms/step the sizing below divides by
bench() {
    python3 -c "import sys, train; r = train.bench(train.parse_args(sys.argv[1:])); print('MS', r['ms_per_step'])" "$@" \
        >> $R/bench.txt 2>&1
    grep '^MS' $R/bench.txt | tail -1 | cut -d' ' -f2
}
TINY="--batch_size=256 --micro_batch=256 --num_workers=4 --compile=0 --flex=0"
SMALL="--preset=small --compile=0 --flex=0"
say "bench tiny"; ms_tiny=$(bench --bench=30 $TINY)
say "bench small"; ms_small=$(bench --bench=20 $SMALL)
say "ms/step tiny=$ms_tiny small=$ms_small"
grep "^|" $R/bench.txt

# 2. both runs at once: each gets about half the GPU, so the step time is doubled in the sizing
steps() { python3 -c "import sys; ms = float(sys.argv[1] or 1e9); print(max(500, min(int(sys.argv[2]), int(float(sys.argv[3]) * 1000 / (2 * ms)) // 100 * 100)))" "$1" "$2" "$TRAIN_S"; }
n_tiny=$(steps "$ms_tiny" 12000)
n_small=$(steps "$ms_small" 6000)
say "steps tiny=$n_tiny small=$n_small"

run() {  # run NAME STEPS ARGS...: train, then the full eval of the final checkpoint
    local name=$1 n=$2; shift 2
    python3 train.py --name=$name --out_dir=$R --max_steps=$n --eval_every=$(( n / 5 )) \
        --save_every=$n --log_every=50 "$@" > $R/$name.train.txt 2>&1
    say "$name trained ($?)"
    local ckpt=$R/$name/$(printf 'step_%06d' $n)
    for split in val test_ood; do
        python3 eval.py --ckpt $ckpt --split $split --out $R/$name/eval_$split.json \
            > $R/$name.eval_$split.txt 2>&1
        say "$name eval $split ($?)"
    done
}
run tiny_b256 $n_tiny $TINY & P1=$!
run small $n_small $SMALL & P2=$!
wait $P1 $P2
say "all done"
kill $PACKER; pack
