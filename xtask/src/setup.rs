//! `cargo xtask setup`: everything the build and the tests need, installed by
//! the project itself and idempotently (a second run only checks).
//!
//! Steps, each failing with what to do:
//! 1. the `nightly` toolchain with `rust-src` (the eBPF crate builds `core`);
//! 2. bpf-linker, built against the nightly's own libLLVM (no prebuilt binary
//!    can be downloaded, and its LLVM major must match the nightly's), rebuilt
//!    only when that libLLVM file changes;
//! 3. Debian packages the tests and benchmarks run (root only);
//! 4. kernel facilities: BTF, the uprobe PMU, tracefs (root only);
//! 5. py-spy, the Python tests' oracle, in a virtualenv of the project's own
//!    (root only: the Python tests need root anyway).
use std::{
    fs,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, bail};

use crate::util;

/// bpf-linker release known to work with aya 0.14 and LLVM 22 here.
const BPF_LINKER_VERSION: &str = "0.13.0";

/// Debian packages used by tests (compilers, peers read by tests, graphviz for
/// call graphs, Go's pprof) and benchmarks (the peers).
const PACKAGES: &[&str] = &[
    "gcc",
    "g++",
    "binutils",
    "graphviz",
    "golang-go",
    "python3.11",
    "libpython3.11-testsuite",
    "sqlite3",
    "git",
    "google-perftools",
    "libgoogle-perftools-dev",
    "libjemalloc2",
    "libmimalloc2.0",
    "heaptrack",
    "hyperfine",
    "linux-perf",
    "bpftrace",
    // <sys/sdt.h>, for the C test allocator's USDT probes.
    "systemtap-sdt-dev",
    "bpfcc-tools",
    "linux-headers-amd64",
];

/// The virtualenv that holds py-spy; `tests/tests/python.rs` runs
/// `PY_SPY_VENV/bin/py-spy`.
const PY_SPY_VENV: &str = "/var/cache/prof-bpf-tools/venv";
/// py-spy release the Python tests are checked against.
const PY_SPY_VERSION: &str = "0.4.3";

/// What setup found out, for the commands that run after it.
pub struct Setup {
    /// Whether root-only steps ran (packages, kernel checks).
    pub root: bool,
}

pub fn run() -> anyhow::Result<Setup> {
    let nightly = nightly().context("step 1/5 (nightly toolchain)")?;
    rust_src().context("step 1/5 (rust-src)")?;
    bpf_linker(&nightly).context("step 2/5 (bpf-linker)")?;
    let root = util::is_root();
    if root {
        packages().context("step 3/5 (Debian packages)")?;
        kernel().context("step 4/5 (kernel)")?;
        py_spy().context("step 5/5 (py-spy)")?;
    } else {
        eprintln!(
            "xtask: warning: not root: skipping Debian packages and kernel setup; \
             building, linting and unit tests still work, BPF tests will be skipped"
        );
    }
    python_tools().context("Python tools")?;
    Ok(Setup { root })
}

/// PyPI packages in `target/tools/venv`: `opentelemetry-proto` decodes what
/// the OTLP sink sends, as an independent generator of the same messages
/// (1.45.2 has the v1development profiles of OTLP 1.10, as the Rust crate).
const PYTHON_TOOLS: &[&str] = &["opentelemetry-proto==1.45.2"];

/// The virtual environment of [`PYTHON_TOOLS`].
fn tools_venv() -> PathBuf {
    util::target_dir().join("tools/venv")
}

fn python_tools() -> anyhow::Result<()> {
    let venv = tools_venv();
    let python = venv.join("bin/python");
    let stamp = venv.join("prof-bpf-tools.txt");
    let wanted = PYTHON_TOOLS.join("\n");
    if fs::read_to_string(&stamp).is_ok_and(|s| s == wanted) && python.exists() {
        return Ok(());
    }
    eprintln!(
        "xtask: installing {} into {}",
        PYTHON_TOOLS.join(" "),
        venv.display()
    );
    util::run(
        Command::new("python3").args(["-m", "venv"]).arg(&venv),
        "python3 -m venv",
    )
    .context("python3 with its venv module is needed")?;
    util::run(
        Command::new(&python)
            .args([
                "-m",
                "pip",
                "install",
                "--quiet",
                "--disable-pip-version-check",
            ])
            .args(PYTHON_TOOLS),
        "pip install",
    )
    .context("the Python tools could not be installed; pip needs PyPI")?;
    fs::write(&stamp, wanted).with_context(|| format!("writing {}", stamp.display()))?;
    Ok(())
}

struct Nightly {
    llvm_major: u32,
    /// The libLLVM shared library that ships inside the nightly toolchain.
    libllvm: PathBuf,
}

fn nightly() -> anyhow::Result<Nightly> {
    let vv = util::output(
        Command::new("rustup").args(["run", "nightly", "rustc", "-vV"]),
        "rustc +nightly -vV",
    )
    .context("the nightly toolchain is missing: `rustup toolchain install nightly`")?;
    let llvm = vv
        .lines()
        .find_map(|l| l.strip_prefix("LLVM version: "))
        .context("`rustc +nightly -vV` printed no LLVM version")?;
    let llvm_major = llvm
        .split('.')
        .next()
        .and_then(|m| m.parse().ok())
        .with_context(|| format!("unexpected LLVM version `{llvm}`"))?;
    let sysroot = util::output(
        Command::new("rustup").args(["run", "nightly", "rustc", "--print", "sysroot"]),
        "rustc +nightly --print sysroot",
    )?;
    let lib = Path::new(sysroot.trim()).join("lib");
    let libllvm = fs::read_dir(&lib)
        .with_context(|| format!("reading {}", lib.display()))?
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                // The real library (`libLLVM.so.22.1-rust-...`); the toolchain
                // also ships a `libLLVM-22-...so` linker script naming it.
                .is_some_and(|n| n.starts_with("libLLVM.so."))
        })
        .min()
        .with_context(|| format!("no libLLVM shared library in {}", lib.display()))?;
    Ok(Nightly {
        llvm_major,
        libllvm,
    })
}

fn rust_src() -> anyhow::Result<()> {
    let installed = util::output(
        Command::new("rustup").args(["component", "list", "--toolchain", "nightly", "--installed"]),
        "rustup component list",
    )?;
    if installed.lines().any(|l| l.starts_with("rust-src")) {
        return Ok(());
    }
    eprintln!("xtask: installing rust-src for the nightly toolchain");
    util::run(
        Command::new("rustup").args(["component", "add", "rust-src", "--toolchain", "nightly"]),
        "rustup component add rust-src --toolchain nightly",
    )
    .context("rust-src could not be installed; the eBPF crate needs it for -Z build-std=core")
}

fn cargo_home() -> anyhow::Result<PathBuf> {
    if let Some(home) = std::env::var_os("CARGO_HOME") {
        return Ok(home.into());
    }
    let home = std::env::var_os("HOME").context("neither CARGO_HOME nor HOME is set")?;
    Ok(Path::new(&home).join(".cargo"))
}

fn bpf_linker(nightly: &Nightly) -> anyhow::Result<()> {
    let cargo_home = cargo_home()?;
    let binary = cargo_home.join("bin/bpf-linker");
    let stamp_path = cargo_home.join("bin/.bpf-linker.prof-bpf-stamp");
    // The identity of the libLLVM it was linked against: a toolchain update
    // replaces the file (new name or size), which calls for a rebuild.
    let meta = fs::metadata(&nightly.libllvm)
        .with_context(|| format!("reading {}", nightly.libllvm.display()))?;
    let stamp = format!(
        "bpf-linker {BPF_LINKER_VERSION} llvm-{} {} {}\n",
        nightly.llvm_major,
        nightly.libllvm.display(),
        meta.len()
    );
    let runs = || {
        Command::new(&binary)
            .arg("--version")
            .output()
            .is_ok_and(|o| o.status.success())
    };
    if fs::read_to_string(&stamp_path).is_ok_and(|s| s == stamp) && runs() {
        return Ok(());
    }
    eprintln!(
        "xtask: building bpf-linker {BPF_LINKER_VERSION} against {} (about two minutes, once)",
        nightly.libllvm.display()
    );
    // llvm-sys looks for `lib/libLLVM.so` under LLVM_PREFIX; point it at the
    // nightly's library through a symlink in a private prefix.
    let home = std::env::var_os("HOME").context("HOME is not set")?;
    let prefix = Path::new(&home).join(".cache/prof-bpf/llvm");
    let lib_dir = prefix.join("lib");
    fs::create_dir_all(&lib_dir).with_context(|| format!("creating {}", lib_dir.display()))?;
    let link = lib_dir.join("libLLVM.so");
    let _ = fs::remove_file(&link);
    std::os::unix::fs::symlink(&nightly.libllvm, &link)
        .with_context(|| format!("linking {}", link.display()))?;
    let toolchain_lib = nightly
        .libllvm
        .parent()
        .context("libLLVM has no parent directory")?;
    let mut cmd = Command::new("cargo");
    cmd.args([
        "install",
        "bpf-linker",
        "--locked",
        "--force",
        "--version",
        BPF_LINKER_VERSION,
        "--no-default-features",
        "--features",
        &format!("llvm-{}", nightly.llvm_major),
        "--root",
    ])
    .arg(&cargo_home)
    .env("LLVM_PREFIX", &prefix)
    // Run-time search path to the nightly's lib directory, so that bpf-linker
    // finds libLLVM however it is started.
    .env(
        "RUSTFLAGS",
        format!("-C link-arg=-Wl,-rpath,{}", toolchain_lib.display()),
    )
    .env_remove("CARGO_TARGET_DIR");
    util::run(&mut cmd, "cargo install bpf-linker")
        .context("bpf-linker could not be built; it needs crates.io and the nightly's libLLVM")?;
    let version = util::output(
        Command::new(&binary).arg("--version"),
        "bpf-linker --version",
    )
    .context("the freshly built bpf-linker does not run")?;
    eprintln!("xtask: installed {}", version.trim());
    fs::write(&stamp_path, stamp).with_context(|| format!("writing {}", stamp_path.display()))?;
    Ok(())
}

fn packages() -> anyhow::Result<()> {
    let missing: Vec<&str> = PACKAGES
        .iter()
        .copied()
        .filter(|p| !package_installed(p))
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    eprintln!("xtask: installing Debian packages: {}", missing.join(" "));
    util::run(
        Command::new("apt-get").args(["update", "-q"]),
        "apt-get update",
    )?;
    util::run(
        Command::new("apt-get")
            .args(["install", "-y", "-q", "--no-install-recommends"])
            .args(&missing)
            .env("DEBIAN_FRONTEND", "noninteractive"),
        "apt-get install",
    )
}

fn package_installed(name: &str) -> bool {
    Command::new("dpkg-query")
        .args(["-W", "-f=${Status}", name])
        .output()
        .is_ok_and(|o| {
            o.status.success() && String::from_utf8_lossy(&o.stdout).contains("ok installed")
        })
}

fn kernel() -> anyhow::Result<()> {
    if !Path::new("/sys/kernel/btf/vmlinux").exists() {
        bail!("no BTF at /sys/kernel/btf/vmlinux: the kernel needs CONFIG_DEBUG_INFO_BTF=y");
    }
    if !Path::new("/sys/bus/event_source/devices/uprobe").exists() {
        bail!("the kernel has no uprobe PMU: it needs CONFIG_UPROBE_EVENTS=y");
    }
    // Tracepoints (sched, syscalls) are attached through tracefs.
    let tracefs = Path::new("/sys/kernel/tracing");
    if !tracefs.join("events").exists() {
        util::run(
            Command::new("mount")
                .args(["-t", "tracefs", "tracefs"])
                .arg(tracefs),
            "mount -t tracefs tracefs /sys/kernel/tracing",
        )?;
    }
    Ok(())
}

/// Installs py-spy from PyPI into [`PY_SPY_VENV`] unless it is there at the
/// expected version.
fn py_spy() -> anyhow::Result<()> {
    let binary = Path::new(PY_SPY_VENV).join("bin/py-spy");
    let installed = Command::new(&binary)
        .arg("--version")
        .output()
        .is_ok_and(|o| {
            String::from_utf8_lossy(&o.stdout).trim() == format!("py-spy {PY_SPY_VERSION}")
        });
    if installed {
        return Ok(());
    }
    eprintln!("xtask: installing py-spy {PY_SPY_VERSION} into {PY_SPY_VENV}");
    let pip = Path::new(PY_SPY_VENV).join("bin/pip");
    if !pip.exists() {
        util::run(
            Command::new("python3").args(["-m", "venv", PY_SPY_VENV]),
            "python3 -m venv",
        )
        .context(
            "creating the py-spy virtualenv needs python3-venv (`apt-get install python3-venv`)",
        )?;
    }
    util::run(
        Command::new(&pip).args(["install", "-q", &format!("py-spy=={PY_SPY_VERSION}")]),
        "pip install py-spy",
    )
    .context("py-spy could not be installed; it needs PyPI")
}
