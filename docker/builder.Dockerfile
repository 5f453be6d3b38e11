# Builder image for `cargo xtask build-linux`: a Rust toolchain, and what the
# sandbox links against. xtask builds it through the engine API and passes
# RUST_IMAGE (its --base-image option); the base is pulled only if missing.
#
# Two kinds of build come out of it:
# - portable (the default): the musl targets for amd64 and arm64, with libseccomp
#   linked statically, so the binary has no dynamic dependency at all. Both are
#   built from this one image, whatever the engine's architecture: the other
#   architecture is cross-compiled (Debian's cross gcc with musl's specs file),
#   never emulated.
# - glibc (`--libc gnu`): the native target against Debian's libseccomp-dev.
ARG RUST_IMAGE=rust:1-bookworm
FROM ${RUST_IMAGE}

# gcc-<arch>-linux-gnu is only the compiler driver and binutils: the C library
# headers and startup files come from musl-dev of that architecture, through the
# musl-gcc.specs file it ships (what Debian's musl-gcc wrapper does natively).
# That file hides /usr/include, so the kernel's headers (linux-libc-dev of each
# architecture) are linked into musl's include directories.
RUN set -eux; \
    native="$(dpkg --print-architecture)"; \
    case "$native" in \
      amd64) other=arm64; cross=gcc-aarch64-linux-gnu ;; \
      arm64) other=amd64; cross=gcc-x86-64-linux-gnu ;; \
      *) echo "no musl cross toolchain for $native" >&2; exit 1 ;; \
    esac; \
    dpkg --add-architecture "$other"; \
    apt-get update; \
    apt-get install -y --no-install-recommends \
      ca-certificates pkg-config make gperf dpkg-dev \
      gcc libc6-dev libseccomp-dev \
      musl-tools "musl-dev:$native" "musl-dev:$other" "$cross" \
      "linux-libc-dev:$native" "linux-libc-dev:$other"; \
    for arch in x86_64 aarch64; do \
      inc="/usr/include/$arch-linux-musl"; \
      ln -s /usr/include/linux "$inc/linux"; \
      ln -s /usr/include/asm-generic "$inc/asm-generic"; \
      ln -s "/usr/include/$arch-linux-gnu/asm" "$inc/asm"; \
      printf '#!/bin/sh\nexec %s-linux-gnu-gcc "$@" -specs /usr/lib/%s-linux-musl/musl-gcc.specs\n' \
        "$arch" "$arch" > "/usr/local/bin/$arch-linux-musl-gcc"; \
      chmod +x "/usr/local/bin/$arch-linux-musl-gcc"; \
    done; \
    rm -rf /var/lib/apt/lists/*

# libseccomp for musl, static, from Debian's source package (its patches and
# security fixes included; apt checks it against the signed archive). Installed
# as /opt/musl/<rust target>/lib/libseccomp.a, where xtask points
# LIBSECCOMP_LIB_PATH.
RUN set -eux; \
    if [ -f /etc/apt/sources.list.d/debian.sources ]; then \
      sed -i 's/^Types: deb$/Types: deb deb-src/' /etc/apt/sources.list.d/debian.sources; \
    fi; \
    if [ -f /etc/apt/sources.list ]; then \
      sed -n 's/^deb /deb-src /p' /etc/apt/sources.list > /etc/apt/sources.list.d/deb-src.list; \
    fi; \
    apt-get update; \
    mkdir /tmp/seccomp; cd /tmp/seccomp; \
    apt-get source --only-source libseccomp; \
    src="$(find . -mindepth 1 -maxdepth 1 -type d -name 'libseccomp-*')"; \
    for arch in x86_64 aarch64; do \
      mkdir "build-$arch"; \
      (cd "build-$arch" && "../$src/configure" --quiet \
         --host="$arch-linux-musl" --prefix="/opt/musl/$arch-unknown-linux-musl" \
         --enable-static --disable-shared \
         CC="$arch-linux-musl-gcc" AR="$arch-linux-gnu-ar" RANLIB="$arch-linux-gnu-ranlib" \
         CFLAGS="-O2 -fPIE" \
       && make -j"$(nproc)" install >/dev/null); \
    done; \
    cd /; rm -rf /tmp/seccomp /var/lib/apt/lists/*; \
    ls -l /opt/musl/*/lib/libseccomp.a

# The Rust side of the musl targets. rustup is absent from a base that carries
# a bare toolchain; there the standard libraries must already be installed.
RUN set -eux; \
    if command -v rustup >/dev/null; then \
      rustup target add x86_64-unknown-linux-musl aarch64-unknown-linux-musl; \
    fi; \
    for t in x86_64-unknown-linux-musl aarch64-unknown-linux-musl; do \
      test -d "$(rustc --print sysroot)/lib/rustlib/$t/lib" \
        || { echo "the Rust standard library for $t is missing" >&2; exit 1; }; \
    done

# Cargo's C compiler, archiver and linker per target (the cc crate reads
# CC_<target>, AR_<target>). Rust's musl targets bring their own crt objects and
# libc.a, so the gnu driver of the right architecture links them.
ENV CC_x86_64_unknown_linux_musl=x86_64-linux-musl-gcc \
    AR_x86_64_unknown_linux_musl=x86_64-linux-gnu-ar \
    CARGO_TARGET_X86_64_UNKNOWN_LINUX_MUSL_LINKER=x86_64-linux-gnu-gcc \
    CC_aarch64_unknown_linux_musl=aarch64-linux-musl-gcc \
    AR_aarch64_unknown_linux_musl=aarch64-linux-gnu-ar \
    CARGO_TARGET_AARCH64_UNKNOWN_LINUX_MUSL_LINKER=aarch64-linux-gnu-gcc

# The cargo registry and the target directory are mounted as volumes by xtask;
# the source is uploaded into /src for each build.
WORKDIR /src
LABEL org.opencontainers.image.title="sandbox builder" \
      org.opencontainers.image.description="Rust toolchain with static libseccomp for musl (amd64, arm64) and libseccomp-dev"
