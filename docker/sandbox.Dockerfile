# Production image. Build the binaries first, then the image:
#   cargo xtask build-linux --arch amd64     # -> dist/linux-amd64/sandbox
#   cargo xtask image --arch amd64           # -> dify-sandbox:local
# A plain `docker build -f docker/sandbox.Dockerfile .` from the repository
# root works as well (BuildKit sets TARGETARCH).
ARG BASE_IMAGE=debian:bookworm-slim
FROM ${BASE_IMAGE}
ARG TARGETARCH

# Runtimes for the snippets: Python 3 with the libraries Dify's templates use,
# Node.js, libseccomp for the sandbox itself and nftables for its network guard.
RUN apt-get update \
 && apt-get install -y --no-install-recommends \
      ca-certificates libseccomp2 nftables \
      python3 python3-jinja2 python3-requests python3-httpx \
      nodejs \
 && rm -rf /var/lib/apt/lists/*

WORKDIR /app
COPY dist/linux-${TARGETARCH}/sandbox /usr/local/bin/sandbox
COPY conf/config.yaml /etc/sandbox/config.yaml
# The config names this file relative to the working directory.
COPY dependencies/ /app/dependencies/

# Root is required: the server creates namespaces and cgroups and drops to an
# unprivileged uid for every snippet it runs.
USER root
EXPOSE 8194
ENTRYPOINT ["/usr/local/bin/sandbox"]
CMD ["serve", "--config", "/etc/sandbox/config.yaml"]
