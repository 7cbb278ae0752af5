# syntax=docker/dockerfile:1
# The platform's one image: Ray heads and workers of the serving and tuning clusters, and RayJob
# submitters. Built on the official Ray image (CUDA, Python 3.11), so Ray itself is never reinstalled:
# its version here, `rayVersion` in k8s/ and the image tag must agree (tests/k8s checks all three).
#
#   docker build -t REGISTRY/ct2i-platform:0.1.0-ray2.60.0-py311-gpu .
#
# Models are not baked in: CT2I_BASE_MODEL names a hub id (downloaded into HF_HOME at start-up) or a
# folder on a mounted model volume (k8s/overlays/prod: /models/sdxl).
ARG RAY_VERSION=2.60.0
ARG PYTHON_TAG=py311
FROM rayproject/ray:${RAY_VERSION}-${PYTHON_TAG}-gpu

# The Ray image's unprivileged user; numeric, so that Kubernetes' runAsNonRoot can verify it.
USER 1000:100
WORKDIR /home/ray/app

ENV PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    HF_HOME=/home/ray/.cache/huggingface \
    HF_HUB_DISABLE_TELEMETRY=1 \
    TORCH_EXTENSIONS_DIR=/home/ray/.cache/torch_extensions \
    CT2I_HOME=/home/ray/.ct2i

# Dependencies first, in their own layer: it is rebuilt only when pyproject.toml or the pins change.
# k8s/image/constraints.txt pins every package to the versions the test suite passed with; ray is
# pinned to the version already in the base image, so pip leaves it alone.
COPY --chown=1000:100 pyproject.toml k8s/image/constraints.txt ./
RUN python -c "import tomllib; p = tomllib.load(open('pyproject.toml', 'rb'))['project']; \
print('\n'.join(p['dependencies'] + p['optional-dependencies']['postgres'] + p['optional-dependencies']['search']))" \
        > /tmp/requirements.txt \
    && pip install --no-cache-dir -r /tmp/requirements.txt -c constraints.txt \
    && python -c "import ray, sys; v = ray.__version__; sys.exit(0 if v == '${RAY_VERSION}' else f'ray {v} != ${RAY_VERSION}')"

# The project itself (no dependency resolution: they are all above). The source stays in WORKDIR too,
# so `serve deploy serve/config.yaml` and `python -m ct2i.job` work from here as from a checkout.
COPY --chown=1000:100 README.md ./
COPY --chown=1000:100 causalt2i ./causalt2i
COPY --chown=1000:100 cluster ./cluster
COPY --chown=1000:100 serve ./serve
COPY --chown=1000:100 tune ./tune
RUN pip install --no-cache-dir --no-deps . \
    && mkdir -p "$HF_HOME" "$TORCH_EXTENSIONS_DIR" "$CT2I_HOME" \
    && python -c "import causalt2i, cluster, serve, tune"

# KubeRay supplies the command (`ray start ...`); this is what a bare `docker run` gets.
CMD ["ray", "--version"]
