//! `prof-bpf`: the command line front end. Parses arguments, runs one
//! session, and turns any error into one line on stderr and a non-zero exit.
use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// Heap and CPU profiling of running processes through eBPF.
#[derive(Debug, Parser)]
#[command(name = "prof-bpf", version, about, long_about = None)]
struct Cli {
    /// More log output (-v: info, -vv: debug including the eBPF programs' own logs).
    #[arg(short, long, action = clap::ArgAction::Count, global = true)]
    verbose: u8,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Count malloc and free calls of a running process (calls and bytes per second).
    Count(profiler::count::CountArgs),
    /// Heap profile or leak report of running processes (or of a command after `--`).
    Heap(Box<profiler::heap::HeapArgs>),
    /// Show a saved profile (pprof, gperftools heap or CPU profile) in any format.
    Report(profiler::report::ReportArgs),
    /// Sample where CPUs spend their time: whole host or some processes, user and kernel stacks.
    Cpu(profiler::cpu::CpuArgs),
    /// Profile heap and CPU of every process continuously, to Pyroscope, OTLP, Parca or files.
    Agent(Box<profiler::agent::AgentArgs>),
    /// Print every thread's Python stack of a running CPython, blocked threads included.
    PythonDump(profiler::python::dump_command::DumpArgs),
    /// Walk one process's user stacks and print them (unwinder diagnostics).
    #[command(hide = true)]
    DebugUnwind(profiler::unwind::debug::DebugArgs),
}

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(err) => return usage_error(&err),
    };
    let level = match cli.verbose {
        0 => "warn",
        1 => "info",
        _ => "debug",
    };
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or(level))
        .format_timestamp(None)
        .init();
    let success = |()| ExitCode::SUCCESS;
    let result = match cli.command {
        Command::Count(args) => profiler::count::run(args).map(success),
        // Launch mode returns the program's status.
        Command::Heap(args) => profiler::heap::run(*args),
        Command::Report(args) => profiler::report::run(args).map(success),
        Command::Cpu(args) => profiler::cpu::run(args),
        Command::Agent(args) => profiler::agent::run(*args),
        Command::PythonDump(args) => profiler::python::dump_command::run(&args).map(success),
        Command::DebugUnwind(args) => profiler::unwind::debug::run(args).map(success),
    };
    match result {
        Ok(code) => code,
        Err(err) => {
            // A closed pipe (`prof-bpf ... | head`) is not an error.
            if err.chain().any(|e| {
                e.downcast_ref::<std::io::Error>()
                    .is_some_and(|e| e.kind() == std::io::ErrorKind::BrokenPipe)
            }) {
                return ExitCode::SUCCESS;
            }
            eprintln!("prof-bpf: {err:#}");
            ExitCode::FAILURE
        }
    }
}

/// Prints `--help`/`--version` as clap does, and any usage error as one line.
fn usage_error(err: &clap::Error) -> ExitCode {
    use clap::error::ErrorKind;
    match err.kind() {
        ErrorKind::DisplayHelp | ErrorKind::DisplayVersion => {
            let _ = err.print();
            return ExitCode::SUCCESS;
        }
        ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand => {
            let _ = err.print();
            return ExitCode::from(2);
        }
        _ => {}
    }
    // clap's message runs until the usage block; fold it onto one line.
    let text = err.render().to_string();
    let message: Vec<&str> = text
        .lines()
        .map(str::trim)
        .take_while(|l| !l.starts_with("Usage:") && !l.starts_with("For more information"))
        .filter(|l| !l.is_empty())
        .collect();
    let message = message.join(" ");
    let message = message.strip_prefix("error: ").unwrap_or(&message);
    eprintln!("prof-bpf: {message} (see `prof-bpf --help`)");
    ExitCode::from(2)
}
