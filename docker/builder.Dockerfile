# Builder image for `cargo xtask build-linux`: a Rust toolchain plus what the
# sandbox links against. xtask builds it through the engine API and passes
# RUST_IMAGE (its --base-image option); the base is pulled only if missing.
ARG RUST_IMAGE=rust:1-bookworm
FROM ${RUST_IMAGE}

RUN apt-get update \
 && apt-get install -y --no-install-recommends libseccomp-dev pkg-config gcc libc6-dev \
 && rm -rf /var/lib/apt/lists/*

# The cargo registry and the target directory are mounted as volumes per
# architecture by xtask; the source is uploaded into /src for each build.
WORKDIR /src
LABEL org.opencontainers.image.title="sandbox builder" \
      org.opencontainers.image.description="Rust toolchain with libseccomp-dev for building the sandbox"
