# medtl on GPUs: a CUDA runtime image (NVIDIA's CUDA + cuDNN base), medtl installed in a venv,
# running as an unprivileged user with `medtl` as the entrypoint. Weights are mounted read-only
# at /weights, data at /data, run folders go to /runs. See README.md ("Containers").
#   docker build -t medtl:gpu .
#   docker run --rm --gpus all -v "$PWD/data:/data:ro" -v "$HOME/.cache/medtl/weights:/weights:ro" \
#     -v "$PWD/runs:/runs" medtl:gpu train /opt/medtl/pipelines/cxr_2d_finetune.yaml --manifest /data/manifest.csv
# Not built on the project's machines (no Docker daemon there); linted by hadolint in the tests.

# Stage 1: the medtl wheel, built where git can see the checkout, so the installed package
# records its own commit (build_hooks.py) for the lineage tags.
FROM python:3.12-slim AS wheel
RUN apt-get update \
    && apt-get install -y --no-install-recommends git \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY . .
RUN git config --global --add safe.directory /src \
    && pip wheel --no-cache-dir --no-deps --wheel-dir /wheels .

# Stage 2: the runtime. PyPI's torch wheel brings its CUDA 12 libraries; the NVIDIA base
# image provides the driver hooks (NVIDIA_VISIBLE_DEVICES, NVIDIA_DRIVER_CAPABILITIES) and cuDNN.
FROM nvidia/cuda:12.8.1-cudnn-runtime-ubuntu24.04

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    MLFLOW_DISABLE_TELEMETRY=true \
    DO_NOT_TRACK=true \
    HF_HUB_OFFLINE=1 \
    MEDTL_WEIGHTS_DIR=/weights \
    PATH=/opt/venv/bin:$PATH

RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv \
    && rm -rf /var/lib/apt/lists/* \
    && python3 -m venv /opt/venv

COPY constraints.txt /tmp/constraints.txt
COPY --from=wheel /wheels /tmp/wheels
# The exact torch/torchvision builds the project tests (constraints.txt); PyPI's Linux wheels
# are CUDA builds. Then medtl itself with its dependencies.
RUN pip install --no-cache-dir -c /tmp/constraints.txt torch==2.14.1 torchvision==0.29.1 \
    && pip install --no-cache-dir -c /tmp/constraints.txt /tmp/wheels/medtl-*.whl \
    && rm -rf /tmp/wheels /tmp/constraints.txt

COPY pipelines /opt/medtl/pipelines

# An unprivileged user (medtl, uid 10001) owns the writable folders; /weights and /data are
# meant to be mounted read-only (-v ...:/weights:ro). Run folders, the default SQLite store and the feature cache
# go to the working directory /runs; pipelines are at /opt/medtl/pipelines.
RUN useradd --create-home --uid 10001 --user-group medtl \
    && mkdir -p /weights /data /runs \
    && chown 10001:10001 /runs
USER 10001:10001
VOLUME ["/runs"]
WORKDIR /runs

ENTRYPOINT ["medtl"]
CMD ["--help"]
