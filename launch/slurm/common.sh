# The body both sbatch scripts share (sourced, after they set STAGE, CONFIG and DEFAULTS). Rendezvous needs nothing here:
# each srun task finds its rank in SLURM_PROCID / SLURM_LOCALID, MASTER_ADDR is the first node of
# SLURM_JOB_NODELIST and the port is derived from the job id (megatron_p2t/parallel/launch_env.py).
set -uo pipefail
cd "${P2T_ROOT:-$SLURM_SUBMIT_DIR}"
PYTHON=${PYTHON:-python3}

# H100 clusters with InfiniBand (adjust to the fabric; `ibstat` lists the HCAs):
# export NCCL_IB_HCA=mlx5_0,mlx5_1,mlx5_2,mlx5_3,mlx5_4,mlx5_5,mlx5_6,mlx5_7   # the GPU-attached HCAs
# export NCCL_SOCKET_IFNAME=eth0       # the interface for bootstrap (not docker0 / lo)
# export NCCL_IB_GID_INDEX=3           # RoCE clusters
# export NCCL_NET_GDR_LEVEL=PHB        # GPUDirect RDMA when NICs and GPUs share a PCIe switch
# export NCCL_DEBUG=WARN               # INFO when diagnosing hangs
export TORCH_NCCL_ASYNC_ERROR_HANDLING=${TORCH_NCCL_ASYNC_ERROR_HANDLING:-1}  # a dead peer fails the step
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-${SLURM_CPUS_PER_TASK:-1}}

preempted=0
forward() {  # the batch shell got the pre-emption signal: tell the training tasks, requeue after they checkpoint
  preempted=1
  echo "p2t: $1 at $(date -u +%FT%TZ), passing it to the training tasks" >&2
  [ -n "${step_pid:-}" ] && kill -s "$1" "$step_pid" 2>/dev/null
}
trap 'forward USR1' USR1
trap 'forward TERM' TERM

echo "p2t: job ${SLURM_JOB_ID} restart ${SLURM_RESTART_COUNT:-0} on ${SLURM_JOB_NODELIST}: ${SLURM_NTASKS} tasks, $STAGE" >&2
# --kill-on-bad-exit: one dead task ends the step (srun names it) instead of leaving its peers waiting
srun --kill-on-bad-exit=1 "$PYTHON" -u -m megatron_p2t "$STAGE" --config "$CONFIG" --resume auto "${DEFAULTS[@]}" "$@" &
step_pid=$!
while :; do  # `wait` returns early on every trapped signal: wait again until srun itself has ended
  wait "$step_pid"; rc=$?
  kill -0 "$step_pid" 2>/dev/null || break
done
if [ "$preempted" = 1 ] && [ "$rc" = 0 ]; then
  echo "p2t: checkpoint written; requeueing job ${SLURM_JOB_ID}" >&2
  scontrol requeue "$SLURM_JOB_ID"
fi
exit "$rc"
