//! Rebuild the programs when the bpf-linker binary changes: rustc does not
//! track the linker, and a new bpf-linker (for a new LLVM) must relink.
use std::env;

fn main() {
    println!("cargo:rerun-if-env-changed=PATH");
    if let Ok(path) = which::which("bpf-linker") {
        println!("cargo:rerun-if-changed={}", path.display());
    } else if env::var_os("CARGO_CFG_TARGET_ARCH").is_some_and(|a| a == "bpf") {
        println!("cargo:warning=bpf-linker not found on PATH: run `cargo xtask setup`");
    }
}
