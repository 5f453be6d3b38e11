# Production image. Build the binaries first, then the image:
#   cargo xtask build-linux --arch amd64     # -> dist/linux-amd64/sandbox
#   cargo xtask image --arch amd64           # -> dify-sandbox:local
# A plain `docker build -f docker/sandbox.Dockerfile .` from the repository
# root works as well (BuildKit sets TARGETARCH).
ARG BASE_IMAGE=debian:bookworm-slim
FROM ${BASE_IMAGE}
ARG TARGETARCH

# Runtimes for the snippets: Python 3 with the libraries Dify's templates use,
# Node.js, and nftables for the network guard; pip and npm install the extra packages of
# dependencies/ (in their own jail). The binary is the portable one (static,
# libseccomp linked in), so it needs no library of the image.
RUN apt-get update \
 && apt-get install -y --no-install-recommends \
      ca-certificates nftables \
      python3 python3-jinja2 python3-requests python3-httpx python3-pip \
      nodejs npm \
 && rm -rf /var/lib/apt/lists/*

WORKDIR /app
COPY dist/linux-${TARGETARCH}/sandbox /usr/local/bin/sandbox
COPY conf/config.yaml /etc/sandbox/config.yaml
# The config names this file relative to the working directory.
COPY dependencies/ /app/dependencies/

# The state directory. Without namespaces (Docker's defaults) the server copies each
# interpreter's files there, thousands of them, and creating files on the image's
# overlayfs is slow (about 1 ms each on a busy disk): a volume is an ordinary filesystem,
# about twice as fast, and one kept across restarts (Compose keeps it when it recreates
# the container) is reused as long as the image's files are unchanged. After a
# `docker run` without --rm, `docker volume prune` removes what is left.
VOLUME /var/lib/sandbox

# Root is required: the server creates namespaces and cgroups and drops to an
# unprivileged uid for every snippet it runs.
USER root
EXPOSE 8194
ENTRYPOINT ["/usr/local/bin/sandbox"]
CMD ["serve", "--config", "/etc/sandbox/config.yaml"]
