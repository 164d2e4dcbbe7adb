//! Builds the eBPF programs (crate `profiler-ebpf`) with the nightly toolchain
//! through aya-build and leaves the object in OUT_DIR for `include_bytes!`.
//!
//! `PROF_SKIP_EBPF=1` writes an empty object instead, so that `cargo check`,
//! clippy and work on other crates need no bpf-linker; a binary built that way
//! refuses to load with a message saying how to rebuild it.
use std::{env, fs, path::PathBuf};

use anyhow::Context as _;

const OBJECT: &str = "profiler";

fn main() -> anyhow::Result<()> {
    println!("cargo:rerun-if-env-changed=PROF_SKIP_EBPF");
    let out_dir = PathBuf::from(env::var_os("OUT_DIR").context("OUT_DIR not set")?);
    if env::var_os("PROF_SKIP_EBPF").is_some_and(|v| v == "1") {
        fs::write(out_dir.join(OBJECT), []).context("writing the stub eBPF object")?;
        return Ok(());
    }
    let manifest_dir = env::var("CARGO_MANIFEST_DIR").context("CARGO_MANIFEST_DIR not set")?;
    let ebpf_dir = PathBuf::from(manifest_dir).join("../profiler-ebpf");
    let ebpf_dir = ebpf_dir.to_str().context("non-UTF-8 path")?;
    aya_build::build_ebpf(
        [aya_build::Package {
            name: "profiler-ebpf",
            root_dir: ebpf_dir,
            ..Default::default()
        }],
        aya_build::Toolchain::Custom("nightly"),
    )
    .context("building the eBPF programs failed; run `cargo xtask setup` (nightly rust-src and bpf-linker), or set PROF_SKIP_EBPF=1 to build without them")
}
