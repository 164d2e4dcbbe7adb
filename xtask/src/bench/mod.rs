//! `cargo xtask bench <name>`: benchmarks that run prof-bpf or profalloc and
//! the peers (Debian packages) in the same run and print ratios.
mod agent;
mod alloc;
mod alloc_workloads;
mod cpu;
mod heap;
mod measure;
mod preload;
mod python;
mod python_preload;
mod python_pymalloc;
mod symbolize;
mod unwind;
mod unwind_copy;

/// Benchmark names, in the order `cargo xtask help` lists them.
pub const NAMES: &[&str] = &[
    "agent",
    "alloc",
    "cpu",
    "heap",
    "preload",
    "python",
    "symbolize",
    "unwind",
];

#[allow(clippy::match_single_binding, reason = "each benchmark adds an arm")]
pub fn run(args: &[String]) -> anyhow::Result<()> {
    let Some(name) = args.first() else {
        anyhow::bail!("which benchmark? one of: {}", NAMES.join(", "));
    };
    crate::setup::run()?;
    match name.as_str() {
        "agent" => agent::run(),
        "alloc" => alloc::run(),
        "cpu" => cpu::run(),
        "heap" => heap::run(),
        "preload" => preload::run(),
        "python" => python::run(),
        "symbolize" => symbolize::run(),
        "unwind" if args.get(1).is_some_and(|a| a == "copies") => unwind_copy::run_alone(),
        "unwind" => unwind::run(),
        other => anyhow::bail!("unknown benchmark `{other}`; one of: {}", NAMES.join(", ")),
    }
}
