# syntax=docker/dockerfile:1
# The extproc sidecar image.
#
#   docker build -t extproc:dev .
#   docker run --rm -v "$PWD/deploy/compose/extproc.yaml:/etc/extproc/extproc.yaml:ro" extproc:dev
#
# Two stages: the build stage installs the package and its pinned dependencies
# (constraints.txt, the same pins `make install` uses) into a virtualenv; the runtime stage
# copies only that virtualenv onto a clean base and runs it as an unprivileged user.

ARG PYTHON_IMAGE=python:3.11-slim

# ---------------------------------------------------------------------------- build
FROM ${PYTHON_IMAGE} AS build
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1
RUN python -m venv /opt/extproc
ENV PATH=/opt/extproc/bin:$PATH
WORKDIR /src
# The venv is built here and copied whole into the runtime stage, so compilers or build
# caches of the install never reach the final image.
COPY constraints.txt pyproject.toml README.md ./
COPY extproc ./extproc
COPY plugins ./plugins
# The `otlp` extra: the compose stack exports spans to an OpenTelemetry collector.
RUN pip install -c constraints.txt ".[otlp]" \
 && extproc check --config /src/extproc/defaults/local.yaml

# ---------------------------------------------------------------------------- runtime
FROM ${PYTHON_IMAGE} AS runtime
LABEL org.opencontainers.image.title="extproc" \
      org.opencontainers.image.description="Python plugin sidecar for Envoy's ext_proc filter" \
      org.opencontainers.image.licenses="Apache-2.0"
RUN groupadd --system --gid 10001 extproc \
 && useradd --system --uid 10001 --gid extproc --no-create-home --home-dir /nonexistent \
        --shell /usr/sbin/nologin extproc
COPY --from=build /opt/extproc /opt/extproc
# The default configuration is the no-Docker local stack's (headers plugin, no Redis);
# deployments mount their own over it (docker-compose.yml, deploy/kubernetes/pod.yaml).
COPY --chown=root:root extproc/defaults/local.yaml /etc/extproc/extproc.yaml
ENV PATH=/opt/extproc/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    EXTPROC_ADMIN_PORT=9180
USER 10001:10001
WORKDIR /
# 50051: gRPC (ext_proc + grpc.health.v1), 9180: admin HTTP (/healthz /readyz /metrics /status)
EXPOSE 50051 9180
# Liveness only (/healthz): readiness (/readyz) is for orchestrators that route traffic.
# The admin address must listen on EXTPROC_ADMIN_PORT (127.0.0.1 or 0.0.0.0) for this to pass.
HEALTHCHECK --interval=10s --timeout=3s --start-period=15s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request as u; u.build_opener(u.ProxyHandler({})).open('http://127.0.0.1:%s/healthz' % os.environ.get('EXTPROC_ADMIN_PORT', '9180'), timeout=2).read()"]
# SIGTERM starts the graceful shutdown: NOT_SERVING -> drain_delay_s -> in-flight streams
# finish (up to shutdown_grace_s) -> plugins shut down. Give the container at least
# drain_delay_s + shutdown_grace_s + a few seconds before SIGKILL (compose: stop_grace_period).
STOPSIGNAL SIGTERM
ENTRYPOINT ["extproc"]
CMD ["serve", "--config", "/etc/extproc/extproc.yaml"]
