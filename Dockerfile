# memshadow container image: a slim Python runtime, non-root, tini as PID 1.
#
#   docker build -t memshadow .
#   docker run --rm -p 11311:11311 -p 9180:9180 \
#       -v "$PWD/my.yaml:/etc/memshadow/memshadow.yaml:ro" memshadow
#
# Config: /etc/memshadow/memshadow.yaml (deploy/docker/memshadow.yaml is the default; every
# option is documented in config/memshadow.yaml). Flags after the image name replace CMD.
# Ports: 11311 (Memcached clients), 9180 (admin: console, /api, /metrics, /healthz).

ARG PYTHON_IMAGE=python:3.11-slim-bookworm

# --- build: the package and its dependencies into a virtualenv -------------------------------
FROM ${PYTHON_IMAGE} AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
RUN python -m venv /opt/memshadow
COPY pyproject.toml README.md ./
COPY proxy ./proxy
RUN /opt/memshadow/bin/pip install .

# --- runtime ---------------------------------------------------------------------------------
FROM ${PYTHON_IMAGE}
# tini reaps zombies and passes SIGTERM (graceful drain) and SIGHUP (config reload) on.
RUN apt-get update \
    && apt-get install -y --no-install-recommends tini=0.19.* \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --system --uid 10001 --user-group --no-create-home \
        --home-dir /nonexistent --shell /usr/sbin/nologin memshadow
COPY --from=build /opt/memshadow /opt/memshadow
COPY deploy/docker/memshadow.yaml /etc/memshadow/memshadow.yaml
ENV PATH=/opt/memshadow/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    MEMSHADOW_HEALTHZ=http://127.0.0.1:9180/healthz
USER 10001:10001
EXPOSE 11311 9180
# No curl in a slim image: Python asks /healthz (change MEMSHADOW_HEALTHZ with admin.listen).
HEALTHCHECK --interval=10s --timeout=3s --start-period=5s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen(os.environ['MEMSHADOW_HEALTHZ'], timeout=2)"]
ENTRYPOINT ["tini", "--", "memshadow"]
CMD ["--config", "/etc/memshadow/memshadow.yaml"]
