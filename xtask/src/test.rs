//! `cargo xtask test`: rustfmt check, clippy, unit tests, and the integration
//! tests that drive the real kernel. When this runs as root on a kernel with
//! BPF, the integration tests are told so (PROF_BPF_TESTS_REQUIRE_BPF=1) and
//! treat a would-be skip as a failure: CI cannot pass by skipping.
use std::{
    io::{BufRead as _, BufReader},
    process::Stdio,
};

use anyhow::{Context as _, bail};

use crate::{setup, util};

/// Totals over every `cargo test` run, printed as the closing line.
#[derive(Default)]
struct Totals {
    passed: u64,
    failed: u64,
    ignored: u64,
}

pub fn run(args: &[String]) -> anyhow::Result<()> {
    let quick = args.iter().any(|a| a == "--no-lint");
    setup::run()?;
    if !quick {
        util::run(
            util::cargo().args(["fmt", "--all", "--", "--check"]),
            "cargo fmt --check",
        )
        .context("run `cargo fmt --all` to fix the formatting")?;
        util::run(
            util::cargo().args([
                "clippy",
                "--workspace",
                "--exclude",
                "profiler-ebpf",
                "--all-targets",
                "--",
                "-D",
                "warnings",
            ]),
            "cargo clippy",
        )?;
    }
    // The integration tests run the prof-bpf binary and load libprofalloc.so.
    util::run(
        util::cargo().args([
            "build",
            "-p",
            "profiler",
            "-p",
            "profalloc",
            "-p",
            "profalloc-preload",
        ]),
        "building prof-bpf",
    )?;
    let require_bpf = match util::bpf_unavailable_reason() {
        None => true,
        Some(reason) => {
            eprintln!("xtask: warning: BPF integration tests will be skipped: {reason}");
            false
        }
    };
    let mut totals = Totals::default();
    let unit = cargo_test(
        &[
            "--workspace",
            "--exclude",
            "profiler-ebpf",
            "--exclude",
            "prof-bpf-tests",
        ],
        &[],
        require_bpf,
        &mut totals,
    );
    // Integration tests share kernel state (probes, perf events): one at a time.
    let integration = cargo_test(
        &["-p", "prof-bpf-tests"],
        &["--test-threads=1"],
        require_bpf,
        &mut totals,
    );
    println!(
        "xtask: {} passed, {} failed, {} skipped",
        totals.passed, totals.failed, totals.ignored
    );
    unit.and(integration)
}

fn cargo_test(
    packages: &[&str],
    test_args: &[&str],
    require_bpf: bool,
    totals: &mut Totals,
) -> anyhow::Result<()> {
    let mut cmd = util::cargo();
    cmd.arg("test")
        .args(packages)
        .arg("--")
        .args(test_args)
        .env("PROF_BPF_BIN", util::target_dir().join("debug/prof-bpf"))
        .env(
            "PROFALLOC_LIB",
            util::target_dir().join("debug/libprofalloc.so"),
        )
        .stdout(Stdio::piped());
    if require_bpf {
        cmd.env("PROF_BPF_TESTS_REQUIRE_BPF", "1");
    }
    let mut child = cmd.spawn().context("starting cargo test")?;
    let stdout = child.stdout.take().context("cargo test stdout")?;
    for line in BufReader::new(stdout).lines() {
        let line = line.context("reading cargo test output")?;
        println!("{line}");
        if let Some(rest) = line.strip_prefix("test result: ") {
            add_result(rest, totals);
        }
    }
    let status = child.wait().context("waiting for cargo test")?;
    if !status.success() {
        bail!("cargo test {} failed ({status})", packages.join(" "));
    }
    Ok(())
}

/// Adds one `test result: ok. 3 passed; 0 failed; 1 ignored; ...` line.
fn add_result(rest: &str, totals: &mut Totals) {
    for part in rest.split(';') {
        let mut words = part.split_whitespace().rev();
        let (Some(kind), Some(n)) = (words.next(), words.next()) else {
            continue;
        };
        let Ok(n) = n.parse::<u64>() else { continue };
        match kind {
            "passed" => totals.passed += n,
            "failed" => totals.failed += n,
            "ignored" => totals.ignored += n,
            _ => {}
        }
    }
}
