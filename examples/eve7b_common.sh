# Shared settings of the EVE-7B launch scripts (sourced, not run).
# Usage of every stage script, as the reference's: bash examples/eve7b_<stage>.sh ${node_rank} ${master_addr}
# Paths come from the environment; the defaults follow the reference's playground layout.
NODE_RANK=${1:-0}
MASTER_ADDR=${2:-127.0.0.1}
NNODES=${NNODES:-4}
GPUS_PER_NODE=${GPUS_PER_NODE:-8}
MASTER_PORT=${MASTER_PORT:-6000}
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)

TOKENIZER=${TOKENIZER:-lmsys/vicuna-7b-v1.5}                    # local HF folder with tokenizer.model
TEACHER=${TEACHER:-openai/clip-vit-large-patch14-336}          # local HF folder (CLIPVisionModel)
DATA=${DATA:-playground/data/megatron}                          # tools/preprocess_data.py outputs
CHECKPOINTS=${CHECKPOINTS:-checkpoints}

LAUNCH=(torchrun --nnodes "$NNODES" --nproc-per-node "$GPUS_PER_NODE" --node-rank "$NODE_RANK"
        --master-addr "$MASTER_ADDR" --master-port "$MASTER_PORT")
# On SIGTERM torchrun forwards the signal, then SIGKILLs its workers after --shutdown-timeout,
# 30 s by default: too soon for --exit-signal-handler to write a 7B checkpoint. slurm_eve7b.sbatch
# signals 600 s before the time limit, so the workers get 570 s, less than that lead, which leaves
# torchrun time to reap them before SLURM kills the job. torch 2.13's torchrun has the flag; older
# ones, which setup.py still allows (>= 2.6), lack it and keep the 30 s: a warning, not a failed launch.
SHUTDOWN_TIMEOUT=${SHUTDOWN_TIMEOUT:-570}
if torchrun --help 2>/dev/null | grep -q -- "--shutdown-timeout"; then
    LAUNCH+=(--shutdown-timeout "$SHUTDOWN_TIMEOUT")
else
    echo "warning: this torchrun has no --shutdown-timeout: it kills the workers 30 s after a SIGTERM," \
         "likely before --exit-signal-handler's checkpoint is written (a newer torch has the flag)" >&2
fi
# train ARGS...: torchrun pretrain_eve.py ARGS. Under SLURM the SIGTERM before the time limit reaches
# every process of the job step, this shell too: killed by it, the shell would end its task while
# torchrun's workers are still writing --exit-signal-handler's checkpoint (and srun's
# --kill-on-bad-exit would then kill the step), so the shell waits for torchrun instead. torchrun
# re-raises a SIGTERM it forwarded (status 1) even when every worker saved and exited 0: a stop that
# wrote a checkpoint (the --save tracker moved) is reported as the clean stop it is, status 0.
train() {
    local save="" previous="" arg status=0 before after
    for arg in "$@"; do [ "$previous" = "--save" ] && save=$arg; previous=$arg; done
    before=$(cat "$save/latest_checkpointed_iteration.txt" 2>/dev/null || true)
    SIGNALLED=0
    trap 'SIGNALLED=1' TERM
    "${LAUNCH[@]}" "$ROOT/pretrain_eve.py" "$@" || status=$?
    trap - TERM
    after=$(cat "$save/latest_checkpointed_iteration.txt" 2>/dev/null || true)
    if [ "$status" -ne 0 ] && [ "$SIGNALLED" = 1 ] && [ -n "$after" ] && [ "$after" != "$before" ]; then
        echo "stopped by SIGTERM after saving iteration $after in $save (torchrun's status $status: the" \
             "signal it forwarded)" >&2
        return 0
    fi
    return "$status"
}
# As Megatron-LM's scripts: with sequence parallelism one hardware queue keeps each gradient's
# reduce-scatter launched ahead of the weight-gradient GEMM it overlaps (megatron-core warns otherwise).
export CUDA_DEVICE_MAX_CONNECTIONS=${CUDA_DEVICE_MAX_CONNECTIONS:-1}

# The reference (HF Trainer + ZeRO-3): bf16, tf32, gradient checkpointing, AdamW (0.9, 0.999, 1e-8),
# weight decay 0, cosine schedule, one epoch, the CLIP aligner on in every stage, no gradient clipping.
# Here: TP=2 with sequence parallelism and the distributed optimizer over 16-way data parallelism,
# packed sequences, full recompute.
COMMON=(--preset eve-7b --bf16 --tensor-model-parallel-size 2 --sequence-parallel
        --use-distributed-optimizer --overlap-grad-reduce --overlap-param-gather
        --recompute-granularity full --recompute-method uniform --recompute-num-layers 1
        --micro-batch-size 1 --weight-decay 0.0 --adam-beta1 0.9 --adam-beta2 0.999 --adam-eps 1e-8
        --clip-grad 0 --lr-decay-style cosine --min-lr 0
        --tokenizer-model "$TOKENIZER" --vision-teacher-path "$TEACHER" --align-loss-weight 1.0
        --num-workers 4 --log-interval 10 --exit-signal-handler --seed 42)

# Batch sizes count packed sequences, a multiple of the 16 data-parallel ranks. The reference counts
# samples: at seq-length 4096 a caption sample (601 image + ~30 text positions) packs ~6.5 to a
# sequence, an SFT sample (~800) ~5, an HD one (2353 + text) ~3 to 8192. So prealign / pretrain's 80
# sequences ≈ 520 samples (the reference's 512), SFT's 32 ≈ 160 (its 128: +25%, as 25.6 is no multiple
# of 16) and HD's 48 ≈ 144 (its 128: +12%). --train-samples counts sequences too: one epoch of the
# data each stage names, estimated at those ratios; each dataset's start-up line says how many epochs
# the run takes of it. The SFT stages hold 0.2% out for validation (--split 998,2,0), where the
# reference trains on all of it.
