// The kernel programs live in main.rs (built for bpfel-unknown-none). This empty library
// exists because the agent build-depends on this package, and cargo builds only a
// dependency's library: the host never compiles the kernel code.
#![no_std]
