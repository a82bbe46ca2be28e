# GPU image for H100 clusters.
#
# Base: NVIDIA's NGC PyTorch image, pinned. It already carries what cannot be pip-installed sensibly on a
# cluster: a CUDA build of torch with NCCL and cuDNN, NVIDIA apex (not on PyPI), Transformer Engine and
# flash-attn built for Hopper, and an OpenMPI that mpi4py compiles against. 25.12 ships Python 3.12, which
# the newest megatron-core requires. Bump the tag deliberately, and rerun the GPU checks when you do.
ARG BASE_IMAGE=nvcr.io/nvidia/pytorch:25.12-py3
FROM ${BASE_IMAGE}

# MMseqs2 for the homology-aware split (data_tools build) and both for evaluate's nearest-neighbour baselines.
RUN apt-get update \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends mmseqs2 ncbi-blast+ \
 && rm -rf /var/lib/apt/lists/*

WORKDIR /opt/megatron_p2t
COPY pyproject.toml README.md ./
COPY megatron_p2t ./megatron_p2t
COPY data_tools ./data_tools
COPY configs ./configs
COPY launch ./launch

# Pin the image's own torch / Transformer Engine / flash-attn / apex so pip never swaps them for PyPI wheels,
# then install the project with its real dependencies (pyproject.toml).
RUN pip list --format=freeze 2>/dev/null \
      | grep -iE '^(torch|transformer[-_]engine|flash[-_]attn|apex)==' > /tmp/image-pins.txt \
 && pip install --no-cache-dir -c /tmp/image-pins.txt -e . \
 && python -c "import megatron_p2t, data_tools, megatron.core, deepspeed, webdataset, mpi4py"

ENV PYTHONUNBUFFERED=1
ENTRYPOINT []
CMD ["megatron-p2t", "--help"]
