//! Rebuild the kernel programs when bpf-linker changes (it is the linker that makes the object).
fn main() {
    if let Some(path) = std::env::var_os("PATH") {
        for dir in std::env::split_paths(&path) {
            let candidate = dir.join("bpf-linker");
            if candidate.is_file() {
                println!("cargo:rerun-if-changed={}", candidate.display());
                break;
            }
        }
    }
}
