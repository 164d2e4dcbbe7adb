//! prof-bpf automation: `cargo xtask <command>`.
//!
//! Every command first runs `setup` (idempotent, fast when nothing is missing),
//! so a fresh machine needs nothing but `cargo xtask test` or `cargo xtask demo`.
mod bench;
mod demo;
mod fast_path;
mod install;
mod setup;
mod test;
mod util;

use std::process::ExitCode;

const USAGE: &str = "\
usage: cargo xtask <command>

commands:
  setup            install what the build and tests need (idempotent)
  build            setup, then build prof-bpf and libprofalloc.so (release)
  test             rustfmt check, clippy, unit tests, root/BPF integration tests
  demo             profile a bundled demo workload with prof-bpf
  bench <name>     benchmarks against the peers; names: {BENCHES}
  check-fast-path  compare malloc/free fast-path instruction counts with the golden file
  install          install prof-bpf and its agent's systemd unit [--root DIR] [--bin FILE]
";

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let result = match args.first().map(String::as_str) {
        Some("setup") => setup::run().map(|_| ()),
        Some("build") => setup::run().and_then(|_| util::build_release()),
        Some("test") => test::run(&args[1..]),
        Some("demo") => demo::run(),
        Some("bench") => bench::run(&args[1..]),
        Some("check-fast-path") => fast_path::run(&args[1..]),
        Some("install") => install::run(&args[1..]),
        Some("-h" | "--help" | "help") | None => {
            print!("{}", USAGE.replace("{BENCHES}", &bench::NAMES.join(", ")));
            return ExitCode::SUCCESS;
        }
        Some(other) => Err(anyhow::anyhow!(
            "unknown command `{other}`; run `cargo xtask help`"
        )),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("xtask: error: {err:#}");
            ExitCode::FAILURE
        }
    }
}
