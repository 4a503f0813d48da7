# syntax=docker/dockerfile:1
# observer's agent image. Build from the repository root:
#   docker build -t registry.example.com/observer/observer:0.1.0 .
# (Not built on the project's own machines: they have no container engine. The steps are
# the ones `cargo xtask setup` runs there, see /work/shared/notes/toolchain.md.)

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
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked -p observer --bin observer \
 && install -D -m 0755 target/release/observer /out/observer

# --- runtime: glibc and CA certificates (https OTLP endpoints), nothing else: no shell,
# no package manager.
FROM gcr.io/distroless/cc-debian12
COPY --from=build /out/observer /usr/local/bin/observer
# The DaemonSet runs it as uid 0 with every capability dropped but BPF, PERFMON,
# NET_ADMIN and SYS_PTRACE (deploy/manifests/40-daemonset.yaml explains why uid 0 plus
# four capabilities is less privilege than a non-root uid, which would need file
# capabilities and allowPrivilegeEscalation).
# No file capabilities are set here on purpose: they would be ignored under
# allowPrivilegeEscalation: false anyway.
USER 0:0
EXPOSE 9464
ENTRYPOINT ["/usr/local/bin/observer"]
CMD ["run"]
