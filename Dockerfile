# Picads backend: the locked production dependencies in a virtualenv, on a slim image, as a non-root user.
#   docker build -t picads-backend .
#   docker run --read-only -p 8000:8000 --env-file prod.env picads-backend
# (prod.env: production settings, no quotes and no inline comments; see the README's Docker section.)
ARG PYTHON_IMAGE=python:3.11-slim

# --- build: resolve nothing, install exactly poetry.lock's main group (hash-checked): no dev tools, and no
# embedded PostgreSQL (the `embedded` group), which production never starts ---------------------------------
FROM ${PYTHON_IMAGE} AS build
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    PYTHONDONTWRITEBYTECODE=1
RUN python -m venv /opt/poetry \
 && /opt/poetry/bin/pip install --quiet "poetry>=2.1,<3" "poetry-plugin-export>=1.9"
WORKDIR /src
# poetry reads the README named in pyproject.toml even to export.
COPY pyproject.toml poetry.lock README.md ./
RUN /opt/poetry/bin/poetry check --lock \
 && /opt/poetry/bin/poetry export --only main --format requirements.txt --output requirements.txt \
 && python -m venv /opt/venv \
 && /opt/venv/bin/pip install --quiet --no-deps --require-hashes -r requirements.txt

# --- runtime: the virtualenv and the code, nothing else ----------------------------------------------------
FROM ${PYTHON_IMAGE} AS runtime
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    ENVIRONMENT=production \
    PORT=8000
RUN groupadd --system --gid 10001 picads \
 && useradd --system --uid 10001 --gid picads --create-home --home-dir /home/picads --shell /usr/sbin/nologin picads
WORKDIR /app
COPY --from=build /opt/venv /opt/venv
# Owned by root and read-only to the service user: the running app cannot change its own code.
COPY main.py create_tables.py ./
COPY app ./app
USER picads
EXPOSE 8000
# The slim image has no curl; Python is there. /health answers 503 while the database is unreachable.
HEALTHCHECK --interval=30s --timeout=5s --start-period=60s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:' + os.environ.get('PORT', '8000') + '/health', timeout=3)"]
# Migrate (never drops) and apply RLS, then become gunicorn (PID 1, so it gets SIGTERM and stops gracefully).
# Workers: gunicorn reads WEB_CONCURRENCY itself. Nothing is written outside /dev/shm (a tmpfs in every
# container), so `docker run --read-only` works: no control socket (it would live in the home folder), and the
# workers' heartbeat files in /dev/shm instead of /tmp, and so are the metrics' files (app/gunicorn_conf.py).
CMD ["sh", "-c", "python create_tables.py --enable-rls --wait 30 && exec gunicorn main:app --config python:app.gunicorn_conf --worker-class uvicorn_worker.UvicornWorker --bind 0.0.0.0:${PORT:-8000} --no-control-socket --worker-tmp-dir /dev/shm"]
