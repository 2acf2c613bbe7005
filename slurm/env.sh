# Settings every dlm-pretrain job sources before launching (cluster.env_file=slurm/env.sh
# for `dlm slurm submit`; the static recipes source $DLM_ENV_FILE when set). Copy it,
# keep what your cluster needs; the values below are common starting points, not defaults.

# export NCCL_DEBUG=WARN                 # INFO to see the rings/trees NCCL builds
# export NCCL_IB_HCA=mlx5                # InfiniBand adapters to use
# export NCCL_SOCKET_IFNAME=^lo,docker   # interfaces for NCCL's bootstrap (not loopback)
# export NCCL_NVLS_ENABLE=0              # if NVLink SHARP misbehaves on your fabric
export TORCH_NCCL_ASYNC_ERROR_HANDLING=1  # a failed collective ends the rank instead of hanging
export CUDA_DEVICE_MAX_CONNECTIONS=1      # megatron-core's TP comm/compute overlap wants this
# module load cuda/12.4                  # or your site's environment modules
# source /path/to/venv/bin/activate      # the Python environment with dlm-pretrain installed
