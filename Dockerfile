# saat-dist image (first version). Build: docker build -t saat-dist .
# The CPU/CUDA build argument, hadolint checks and the KubeRay wiring come
# with the Kubernetes issue (#4); this image already runs every command.
FROM python:3.11-slim

ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    DS_ACCELERATOR=cpu

# g++ and ninja: DeepSpeed's CPU accelerator compiles a small extension.
RUN apt-get update \
 && apt-get install -y --no-install-recommends g++ \
 && rm -rf /var/lib/apt/lists/*

RUN useradd --create-home --uid 1000 saat
WORKDIR /app
COPY requirements.txt requirements.lock ./
RUN pip install -r requirements.txt -c requirements.lock
COPY pyproject.toml README.md ./
COPY saat_dist ./saat_dist
COPY configs ./configs
COPY launch ./launch
RUN pip install --no-deps --no-build-isolation .

USER saat
# Ray: 6379 (GCS), 8265 (dashboard / job API), 10001 (client). Metrics: 8080+.
EXPOSE 6379 8265 10001 8080
ENTRYPOINT ["saat-dist"]
CMD ["run", "--config", "configs/demo.yaml"]
