# The team's MLflow tracking server: PostgreSQL backend store, S3-compatible artifact store
# (MinIO in docker/compose.yaml), artifacts proxied through the server (--serve-artifacts).
# Built by `docker compose -f docker/compose.yaml up`; not built on the project's machines.
FROM python:3.12-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    MLFLOW_DISABLE_TELEMETRY=true \
    DO_NOT_TRACK=true

COPY docker/mlflow-requirements.txt /tmp/requirements.txt
RUN pip install --no-cache-dir -r /tmp/requirements.txt && rm /tmp/requirements.txt \
    && useradd --create-home --uid 10001 --user-group mlflow

USER 10001:10001
WORKDIR /home/mlflow
EXPOSE 5000
ENTRYPOINT ["mlflow"]
CMD ["server", "--help"]
