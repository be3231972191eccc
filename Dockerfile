# syntax=docker/dockerfile:1
# breakfix: one image for every daemon (entrypoint `breakfix`): collector, node agent, fleet collector,
# correlator, fleet stage, remediator, and the CLI. Multi-stage: the build stage makes a venv with
# breakfix and its dependencies; the runtime stage copies only that venv and runs as uid 65532.
#
#   make image                          # buildah, offline: base = localhost/debian-min:bookworm
#   docker build -t breakfix:0.1.0 .    # or any builder: base = the pinned python image below
#
# BASE is pinned by digest (refresh: `skopeo inspect docker://python:3.11-slim-bookworm`). The offline
# build passes --build-arg BASE=localhost/debian-min:bookworm, a debootstrap'd Debian 12 minbase
# (deploy/image/debian-base.sh), whose python3 is Debian's 3.11; the RUN steps install it there.
#
# What the node agent runs is NOT in this image; it comes from NVIDIA at run time:
# - nvidia-smi (GPU reset, persistence mode): the host's driver, mounted into the container by the
#   NVIDIA container toolkit (runtimeClassName: nvidia, NVIDIA_DRIVER_CAPABILITIES=utility). On bare
#   metal (deploy/systemd) it is the host's /usr/bin/nvidia-smi.
# - dcgmi (DCGM diagnostics): NVIDIA's DCGM image (nvcr.io/nvidia/cloud-native/dcgm) -- the agent pod's
#   init container copies dcgmi into /opt/dcgm and runs that image's nv-hostengine as a sidecar
#   (deploy/base/agent.yaml). On bare metal: the datacenter-gpu-manager package's dcgmi.
# - nsenter (util-linux, in this image) enters the host's PID 1 namespaces for `systemctl reboot`.
ARG BASE=python:3.11-slim-bookworm@sha256:2e32f7d302adc1c37428355c1e646897c0c53f4fd60b6a551245fb90ee129f91

FROM ${BASE} AS build
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
# hadolint ignore=DL3008
RUN if ! python3 -c 'import ensurepip, venv' 2>/dev/null; then \
      apt-get update && apt-get install -y --no-install-recommends python3 python3-venv ca-certificates \
      && rm -rf /var/lib/apt/lists/*; fi
WORKDIR /src
COPY pyproject.toml README.md ./
COPY breakfix ./breakfix
# Behind a TLS-intercepting proxy, hand its CA in as a build secret (never a layer):
#   --secret id=pip_ca,src=/etc/ssl/certs/ca-certificates.crt   (deploy/image/build.sh does)
RUN --mount=type=secret,id=pip_ca \
    if [ -s /run/secrets/pip_ca ]; then export PIP_CERT=/run/secrets/pip_ca; fi \
    && python3 -m venv /opt/breakfix \
    && /opt/breakfix/bin/pip install --no-cache-dir --disable-pip-version-check . \
    && /opt/breakfix/bin/breakfix --help >/dev/null

FROM ${BASE} AS runtime
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
# hadolint ignore=DL3008
RUN if ! command -v python3 >/dev/null; then \
      apt-get update && apt-get install -y --no-install-recommends python3 ca-certificates \
      && rm -rf /var/lib/apt/lists/*; fi \
    && command -v nsenter >/dev/null
COPY --from=build /opt/breakfix /opt/breakfix
ENV PATH=/opt/breakfix/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1
LABEL org.opencontainers.image.title="breakfix" \
      org.opencontainers.image.description="GPU health and break-fix: collectors, correlator, remediator over NATS" \
      org.opencontainers.image.licenses="Apache-2.0"
WORKDIR /var/lib/breakfix
# non-root by default; only the node agent's pod overrides it (runAsUser: 0, see deploy/base/agent.yaml)
USER 65532:65532
ENTRYPOINT ["breakfix"]
CMD ["--help"]
