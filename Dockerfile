# synthtools in a container: synthstrip, synthseg, synthmorph, synthgen and the
# BIDS App synthtools-bids (with pybids, the [bids] extra) on PATH, the shipped
# weights (models/) installed as the synthtools.models package.
#
#   docker build -t synthtools --build-arg TORCH_INDEX=<PyTorch's CPU-only wheel index> .
#   docker build -t synthtools:cuda --build-arg TORCH_VARIANT=cuda .
#   docker run --rm -u "$(id -u):$(id -g)" -v "$PWD":/data synthtools /data/ds /data/derivatives participant
#   docker run --rm -u "$(id -u):$(id -g)" -v "$PWD":/data synthtools synthstrip /data/in.nii.gz /data/out.nii.gz
#
# Entry point: container/entrypoint.sh, the BIDS App as BIDS Apps are run
# (IMAGE BIDS_DIR OUTPUT_DIR LEVEL ...), and any command of the image when the
# first argument is one (synthstrip, synthseg, synthmorph, sh...).
#
# torch: TORCH_VARIANT=cpu (default) must end up with a CPU-only torch build and
# TORCH_VARIANT=cuda with a CUDA one; the build stops otherwise. No index host
# is written here: torch comes from the index TORCH_INDEX names, or from a
# folder of wheels that TORCH_FIND_LINKS names (mounted into the build, as
# .ci/container does), else from pip's own configuration (PIP_INDEX_URL,
# pip.conf). See README.md, "Containers".
#
# BASE_IMAGE: both stages start from it. The default is the official Python
# slim image; any Debian-like image with python3 and its venv module works
# (.ci/container passes a Debian bookworm image made with debootstrap).

ARG PYTHON_VERSION=3.11
ARG BASE_IMAGE=python:${PYTHON_VERSION}-slim

# --- build stage: a compiler for dependencies published as source only,
# everything installed into /opt/venv. (Since surfa became a test-only
# dependency no runtime dependency needs it: pip's report for ".[bids]" lists
# one source package, docopt, pure Python. Kept until CI's image build shows
# the stage works without it.)
FROM ${BASE_IMAGE} AS build
ARG TORCH_VARIANT=cpu
ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX=
ARG TORCH_FIND_LINKS=
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PYTHONDONTWRITEBYTECODE=1
# Pinning apt versions breaks on every Debian point release: build tools float.
# The official image ships Python's headers; Debian's python3 needs python3-dev.
# hadolint ignore=DL3008
RUN headers=$(python3 -c 'import sysconfig; print(sysconfig.get_paths()["include"])') \
    && set -- build-essential \
    && if [ ! -f "$headers/Python.h" ]; then set -- "$@" python3-dev; fi \
    && apt-get update \
    && apt-get install -y --no-install-recommends "$@" \
    && rm -rf /var/lib/apt/lists/*
RUN python3 -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH

# torch first, on its own layer, so the project's dependencies never pull a
# different (multi-GB CUDA) build and code changes do not reinstall torch.
RUN if [ -n "$TORCH_INDEX" ]; then export PIP_INDEX_URL="$TORCH_INDEX"; fi \
    && if [ -n "$TORCH_FIND_LINKS" ]; then export PIP_FIND_LINKS="$TORCH_FIND_LINKS"; fi \
    && python -m pip install --no-cache-dir "torch==${TORCH_VERSION}" \
    && python -c "import sys, torch; cuda = torch.version.cuda is not None; sys.exit(0 if cuda == (sys.argv[1] == 'cuda') else f'torch {torch.__version__} is a {\"CUDA\" if cuda else \"CPU-only\"} build but TORCH_VARIANT={sys.argv[1]}: for cpu pass --build-arg TORCH_INDEX=<the CPU-only wheel index>')" "$TORCH_VARIANT"

WORKDIR /src
COPY pyproject.toml README.md ./
COPY synthtools synthtools
COPY training training
COPY models models
# The project itself (with the BIDS App's pybids), pinned by this source tree.
# hadolint ignore=DL3013
RUN python -m pip install --no-cache-dir ".[bids]" \
    && synthstrip --help > /dev/null && synthgen --help > /dev/null \
    && synthtools-bids --help > /dev/null && python -c "import bids"

# --- runtime stage: the venv only, no compiler, no sources.
FROM ${BASE_IMAGE}
LABEL org.opencontainers.image.title="synthtools" \
      org.opencontainers.image.description="Domain-randomized neuroimaging models: synthstrip, synthseg, synthmorph, synthgen" \
      org.opencontainers.image.licenses="Apache-2.0"
COPY --from=build /opt/venv /opt/venv
COPY container/entrypoint.sh /usr/local/bin/synthtools-entrypoint
ENV PATH=/opt/venv/bin:$PATH PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1
RUN useradd --create-home --uid 1000 synth
USER 1000:1000
WORKDIR /data
ENTRYPOINT ["synthtools-entrypoint"]
CMD ["synthtools-bids", "--help"]
