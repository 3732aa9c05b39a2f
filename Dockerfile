# syntax=docker/dockerfile:1
# The extproc-router image: the router (`extproc-router serve`, the default) and, with another
# command, the simulated vLLM pod (`extproc-router sim ...`) or the Envoy config renderer.
#
#   docker build -t extproc-router:local .
#   docker run --rm -v "$PWD/gateway.yaml:/etc/extproc-router/gateway.yaml:ro" -p 50052:50052 -p 8080:8080 extproc-router:local
#   docker run --rm -p 8000:8000 extproc-router:local sim --host 0.0.0.0 --model demo-model

ARG PYTHON_IMAGE=python:3.11-slim

# ---- build: a virtualenv with the package and its dependencies (all of them ship wheels: no compiler)
FROM ${PYTHON_IMAGE} AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python -m venv /opt/extproc-router
WORKDIR /src
# Dependencies first, from pyproject.toml alone: this layer is rebuilt only when they change.
COPY pyproject.toml ./
RUN python -c "import tomllib; print('\n'.join(tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies']))" \
        > /tmp/requirements.txt \
    && /opt/extproc-router/bin/pip install -r /tmp/requirements.txt
# Then the source (.dockerignore keeps tests, benchmarks and local state out).
COPY . .
RUN /opt/extproc-router/bin/pip install --no-deps . \
    && /opt/extproc-router/bin/extproc-router --help > /dev/null

# ---- runtime
FROM ${PYTHON_IMAGE}
ENV PATH=/opt/extproc-router/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    # In a container the router must be reachable from Envoy, not only from loopback.
    EXTPROC_ROUTER_GRPC_LISTEN=0.0.0.0:50052 \
    EXTPROC_ROUTER_HTTP_LISTEN=0.0.0.0:8080 \
    # What HEALTHCHECK polls; the simulator sets http://127.0.0.1:8000/health.
    HEALTHCHECK_URL=http://127.0.0.1:8080/ready
# A fixed numeric UID, so Kubernetes' runAsNonRoot can verify it without a passwd lookup.
RUN useradd --system --uid 10001 --user-group --no-create-home --home-dir /nonexistent \
        --shell /usr/sbin/nologin extproc
COPY --from=build /opt/extproc-router /opt/extproc-router
USER 10001:10001
WORKDIR /tmp
EXPOSE 50052 8080
# /ready is 503 until pods are discovered and again as soon as a shutdown starts.
HEALTHCHECK --interval=10s --timeout=3s --start-period=20s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request as u; u.urlopen(os.environ['HEALTHCHECK_URL'], timeout=2)"]
# SIGTERM starts the graceful shutdown (readiness false, drain, GOAWAY, wait for open streams).
STOPSIGNAL SIGTERM
ENTRYPOINT ["extproc-router"]
CMD ["serve", "--config", "/etc/extproc-router/gateway.yaml"]
