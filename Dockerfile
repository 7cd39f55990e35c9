# memshadow container image: the compiled build (mypyc C extensions of the hot modules, built
# in the build stage with gcc) on a slim Python runtime without a compiler, non-root, tini as
# PID 1. `docker run --rm memshadow --version` says which build runs.
#
#   docker build -t memshadow .
#   docker run --rm -p 11311:11311 -p 9180:9180 \
#       -v "$PWD/my.yaml:/etc/memshadow/memshadow.yaml:ro" memshadow
#
# Config: /etc/memshadow/memshadow.yaml (deploy/docker/memshadow.yaml is the default; every
# option is documented in config/memshadow.yaml). Flags after the image name replace CMD.
# Ports: 11311 (Memcached clients), 9180 (admin: console, /api, /metrics, /healthz).

ARG PYTHON_IMAGE=python:3.11-slim-bookworm

# --- build: the package, compiled, and its dependencies into a virtualenv --------------------
FROM ${PYTHON_IMAGE} AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
# gcc and libc's headers compile the C that mypyc writes (Python's headers are in the image);
# none of it reaches the runtime stage.
RUN apt-get update \
    && apt-get install -y --no-install-recommends gcc=4:12.2.* libc6-dev=2.36-* \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /src
RUN python -m venv /opt/memshadow
COPY pyproject.toml setup.py README.md ./
COPY proxy ./proxy
# setup.py compiles proxy/buildinfo.py's COMPILED_MODULES; the image must not silently fall
# back to pure Python, so the build fails unless every one of them loads compiled.
RUN /opt/memshadow/bin/pip install . \
    && /opt/memshadow/bin/python -c "from proxy import buildinfo as b; \
assert b.is_compiled(), b.describe(); print(b.version_line())"

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
