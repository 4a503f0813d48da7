# syntax=docker/dockerfile:1
# observer's agent image, for machines with Docker. Build from the repository root:
#   docker build --build-arg OBSERVER_GIT_COMMIT=$(git rev-parse --short=12 HEAD) \
#     -t registry.example.com/observer/observer:0.1.0 .
# It lays out the same files as `cargo xtask image` (which needs no daemon and pulls
# nothing, and is the build the test suite runs): the stripped agent, the shared libraries
# it loads and the CA certificates, on an empty base. The build steps are the ones
# `cargo xtask setup` runs.

# --- build: stable Rust for the agent, nightly + rust-src + bpf-linker (LLVM 22) for the
# kernel programs, which observer's build.rs builds through aya-build.
FROM rust:1.95-bookworm AS build
ARG NIGHTLY=nightly-2026-05-19
# LLVM 22 is in Debian's bookworm-security suite; bpf-linker links against it and must use
# the same LLVM major as the nightly toolchain.
RUN apt-get update \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
      llvm-22-dev libpolly-22-dev libzstd-dev zlib1g-dev \
 && rm -rf /var/lib/apt/lists/*
# aya-build runs `rustup run nightly ...`: the pinned nightly is linked under that name.
RUN rustup toolchain install "$NIGHTLY" --profile minimal --component rust-src \
 && rustup toolchain link nightly "$(rustup run "$NIGHTLY" rustc --print sysroot)"
RUN LLVM_PREFIX=/usr/lib/llvm-22 cargo install bpf-linker --locked \
      --no-default-features --features llvm-22
WORKDIR /src
COPY . .
# .dockerignore leaves .git out: the commit `observer --version` reports comes from here
# ("unknown" when not given).
ARG OBSERVER_GIT_COMMIT=
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    OBSERVER_GIT_COMMIT="$OBSERVER_GIT_COMMIT" \
    cargo build --release --locked -p observer --bin observer \
 && install -d /rootfs/usr/local/bin /rootfs/etc/ssl/certs \
 && strip --strip-all -o /rootfs/usr/local/bin/observer target/release/observer \
 && cp /etc/ssl/certs/ca-certificates.crt /rootfs/etc/ssl/certs/ \
 && for lib in $(ldd target/release/observer | grep -o '/[^ ]*'); do \
      install -D "$lib" "/rootfs$lib"; \
    done

# --- runtime: the agent, glibc and CA certificates (https OTLP endpoints), nothing else:
# no shell, no package manager.
FROM scratch
COPY --from=build /rootfs/ /
# The DaemonSet runs it as uid 0 with every capability dropped but BPF, PERFMON,
# NET_ADMIN and SYS_PTRACE (deploy/manifests/40-daemonset.yaml explains why uid 0 plus
# four capabilities is less privilege than a non-root uid, which would need file
# capabilities and allowPrivilegeEscalation).
# No file capabilities are set here on purpose: they would be ignored under
# allowPrivilegeEscalation: false anyway.
USER 0:0
EXPOSE 9464
ARG OBSERVER_GIT_COMMIT=unknown
LABEL org.opencontainers.image.title=observer \
      org.opencontainers.image.revision="$OBSERVER_GIT_COMMIT" \
      org.opencontainers.image.licenses="MIT OR Apache-2.0"
ENTRYPOINT ["/usr/local/bin/observer"]
CMD ["run"]
