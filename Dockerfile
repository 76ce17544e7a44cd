# saat-dist image: the pinned stack (requirements.txt + requirements.lock,
# the same files `launch/setup.sh` installs from) and the package.
#
#   CPU:  docker build -t saat-dist:0.1.0-cpu .
#   CUDA: docker build --build-arg ACCELERATOR=cuda -t saat-dist:0.1.0-cuda .
#
# Both variants install the same wheels: torch 2.14.1 from pip is a CUDA build
# that carries the CUDA runtime in its nvidia-* wheels and needs them even on
# CPU. The GPU driver comes from the host through the NVIDIA container runtime
# (NVIDIA_* variables below). What differs is DeepSpeed's accelerator and, on
# CPU, the shared-memory comm extension DeepSpeed would otherwise compile on
# every fresh container (45-65 s): the CPU variant builds it here.
#
# Ports (all bound to loopback by saat-dist itself; KubeRay sets the Ray ones):
#   6379   Ray GCS (head)            8265  Ray dashboard + job API (head)
#   10001  Ray client (head)         8080  Ray's own Prometheus metrics
#   9500+  saat-dist worker metrics: metrics.port + local rank
#          (cluster configs set metrics.port=9500, metrics.bind=0.0.0.0)
ARG PYTHON_IMAGE=python:3.11-slim-bookworm
FROM ${PYTHON_IMAGE}

# cpu | cuda
ARG ACCELERATOR=cpu

SHELL ["/bin/bash", "-o", "pipefail", "-c"]

ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    DS_ACCELERATOR=${ACCELERATOR} \
    TORCH_EXTENSIONS_DIR=/opt/torch_extensions \
    NVIDIA_VISIBLE_DEVICES=all \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility

# g++: DeepSpeed JIT-compiles C++ ops; curl: WebDataset's http(s) and
# `pipe:curl ...` shard URLs (data.base_url). Pinned to Debian 12's upstream
# versions; the wildcard takes Debian's security revisions (an exact revision
# disappears from the mirror once superseded).
RUN case "${ACCELERATOR}" in cpu|cuda) ;; *) echo "ACCELERATOR must be cpu or cuda, got ${ACCELERATOR}" >&2; exit 1;; esac \
 && apt-get update \
 && apt-get install -y --no-install-recommends 'g++=4:12.2.0-*' 'curl=7.88.1-10+deb12u*' \
 && rm -rf /var/lib/apt/lists/*

# Non-root user with a fixed numeric uid/gid (the manifests run as 1000:1000).
RUN groupadd --gid 1000 saat \
 && useradd --create-home --uid 1000 --gid 1000 --shell /bin/bash saat

WORKDIR /app
COPY requirements.txt requirements.lock ./
RUN python -m pip install --no-cache-dir -r requirements.txt -c requirements.lock

COPY pyproject.toml README.md LICENSE ./
COPY saat_dist ./saat_dist
COPY configs ./configs
COPY launch ./launch
# TORCH_EXTENSIONS_DIR: where DeepSpeed's JIT ops (CPU Adam, offload) compile
# when a config asks for them; training builds none by default (not even the
# CPU accelerator's shared-memory comm op: saat_dist.distributed.deepspeed_setup).
RUN python -m pip install --no-cache-dir --no-deps --no-build-isolation /app \
 && mkdir -p "${TORCH_EXTENSIONS_DIR}" \
 && chown -R 1000:1000 "${TORCH_EXTENSIONS_DIR}" \
 && chown 1000:1000 /app  # the default command writes data/ and runs/ here

USER 1000:1000
EXPOSE 6379 8265 10001 8080 9500-9507
ENTRYPOINT ["saat-dist"]
CMD ["run", "--config", "configs/demo.yaml"]
