//! Builds the eBPF programs (crate `profiler-ebpf`) with the nightly toolchain
//! through aya-build and leaves the object in OUT_DIR for `include_bytes!`.
//!
//! `PROF_SKIP_EBPF=1` writes an empty object instead, so that `cargo check`,
//! clippy and work on other crates need no bpf-linker; a binary built that way
//! refuses to load with a message saying how to rebuild it.
//!
//! aya-build forwards every line of the nested cargo's output as a
//! `cargo:warning`, which cargo then repeats on every later build. To keep
//! builds quiet, this script runs aya-build in a child copy of itself and
//! passes on only the `cargo:` directives that matter, plus all of the
//! output when the eBPF build fails.
use std::{
    env, fs,
    path::PathBuf,
    process::{Command, Stdio},
};

use anyhow::{Context as _, bail};

const OBJECT: &str = "profiler";
const CHILD: &str = "PROF_BUILD_EBPF_CHILD";

fn main() -> anyhow::Result<()> {
    if env::var_os(CHILD).is_some() {
        return build_ebpf();
    }
    println!("cargo:rerun-if-env-changed=PROF_SKIP_EBPF");
    let out_dir = PathBuf::from(env::var_os("OUT_DIR").context("OUT_DIR not set")?);
    if env::var_os("PROF_SKIP_EBPF").is_some_and(|v| v == "1") {
        fs::write(out_dir.join(OBJECT), []).context("writing the stub eBPF object")?;
        return Ok(());
    }
    let me = env::current_exe().context("locating the build script")?;
    let output = Command::new(me)
        .env(CHILD, "1")
        .stderr(Stdio::inherit())
        .output()
        .context("running the eBPF build")?;
    let stdout = String::from_utf8_lossy(&output.stdout);
    let ok = output.status.success();
    for line in stdout.lines() {
        if !ok || !line.starts_with("cargo:warning=") {
            println!("{line}");
        }
    }
    if !ok {
        bail!(
            "building the eBPF programs failed (see the warnings above); run `cargo xtask setup` \
             (nightly rust-src and bpf-linker), or set PROF_SKIP_EBPF=1 to build without them"
        );
    }
    Ok(())
}

fn build_ebpf() -> anyhow::Result<()> {
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
}
