# medtl runtime image. CPU by default; for GPUs build FROM an NVIDIA CUDA/PyTorch base and
# drop the torch pin (pyproject keeps torch's range open for your own CUDA build).
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    MLFLOW_DISABLE_TELEMETRY=true \
    DO_NOT_TRACK=true \
    HF_HUB_OFFLINE=1 \
    MEDTL_WEIGHTS_DIR=/weights

RUN apt-get update && apt-get install -y --no-install-recommends make git \
    && rm -rf /var/lib/apt/lists/*

WORKDIR /opt/medtl
COPY pyproject.toml constraints.txt README.md ./
COPY medtl ./medtl
COPY pipelines ./pipelines
RUN pip install --no-cache-dir -c constraints.txt torch==2.14.1 torchvision==0.29.1 \
    && pip install --no-cache-dir -c constraints.txt .

# Weights (RadImageNet, MedicalNet, ...) are mounted read-only at /weights; data at /data.
VOLUME ["/weights", "/data", "/runs"]
WORKDIR /runs
ENTRYPOINT ["medtl"]
CMD ["--help"]
