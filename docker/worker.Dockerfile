# bigmodel worker image (also runs every other `bigmodel` command: db upgrade, models, submit...).
#
# Build from the repository root (docker/compose.yaml does this):
#   docker build -f docker/worker.Dockerfile -t bigmodel-worker:local .
# BuildKit reads docker/worker.Dockerfile.dockerignore, which limits the context to the package.
#
# CUDA: the PyPI torch==2.14.1 wheel for x86_64 brings its CUDA libraries as nvidia-* wheels, so
# the base image needs none; the NVIDIA Container Toolkit on the host provides the driver
# (`docker run --gpus all`, or the GPU reservation in compose.yaml). Without a GPU the same image
# runs on the CPU (`--device auto` falls back to cpu).
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_ROOT_USER_ACTION=ignore

WORKDIR /src

# The dependencies first, read from pyproject.toml, in their own layer: editing the code does not
# download torch again.
COPY pyproject.toml README.md ./
RUN python -c "import tomllib; p = tomllib.load(open('pyproject.toml', 'rb'))['project']; \
print('\n'.join(p['dependencies'] + p['optional-dependencies']['worker']))" > /tmp/requirements.txt \
 && pip install --no-cache-dir -r /tmp/requirements.txt \
 && rm /tmp/requirements.txt

# Then the project itself (bigmodel/, producer/, workers/, migrations/, bench/ when present: the
# .dockerignore lets nothing else in). A regular install into site-packages; the source folder is
# removed so that nothing shadows it.
COPY . .
# hadolint ignore=DL3013
RUN pip install --no-cache-dir '.[worker]' \
 && rm -rf /src
WORKDIR /

# Non-root (user bigmodel, uid 1000). /models-cache holds the Hugging Face and torch caches and
# BIGMODEL_HOME, where models registered from s3:// prefixes are downloaded (and where
# `bigmodel demo` builds its tiny models): mount a volume there (compose.yaml does) so that they
# survive the container.
RUN useradd --create-home --uid 1000 --user-group --shell /usr/sbin/nologin bigmodel \
 && mkdir -p /models-cache /models \
 && chown bigmodel:bigmodel /models-cache
ENV HF_HOME=/models-cache/huggingface \
    TORCH_HOME=/models-cache/torch \
    BIGMODEL_HOME=/models-cache/bigmodel

USER 1000:1000
WORKDIR /home/bigmodel

# `bigmodel worker ...` execs `python -m workers`, which stays PID 1 and handles SIGTERM itself
# (finishes the current batch, then stops).
ENTRYPOINT ["bigmodel"]
CMD ["worker", "--help"]
