//! `prof-bpf python-dump --pid N`: every thread's Python stack, read once
//! from outside (as `py-spy dump` does), blocked threads included. The CPU
//! sampler only sees threads on a CPU; this shows the waiting ones.
use std::fmt::Write as _;

use super::{ThreadStack, stack::WalkEnd};

/// Options of `prof-bpf python-dump`.
#[derive(Debug, clap::Args)]
#[command(after_help = "EXAMPLES:\n  \
    sudo prof-bpf python-dump --pid 1234     # every thread's Python stack, innermost frame first")]
pub struct DumpArgs {
    /// The CPython process (3.11-3.13).
    #[arg(long, short, value_name = "PID")]
    pub pid: u32,
}

/// Prints the dump of `--pid` on stdout.
pub fn run(args: &DumpArgs) -> anyhow::Result<()> {
    crate::ebpf::require_root()?;
    crate::process::check_pid(args.pid)?;
    let (py, stacks) = super::dump_process(args.pid)?;
    let header = Header {
        pid: args.pid,
        command: command_line(args.pid),
        version: py.version.to_string(),
        object: py.object,
    };
    let states: Vec<char> = stacks
        .iter()
        .map(|s| thread_state(args.pid, s.tid))
        .collect();
    print!("{}", render(&header, &stacks, &states));
    Ok(())
}

/// What the dump says of the process.
pub struct Header {
    pub pid: u32,
    pub command: String,
    pub version: String,
    pub object: String,
}

/// py-spy's layout: the process, the interpreter, then per thread
/// `Thread TID (active|idle[+gil]): "NAME"` and its frames, innermost
/// first. A thread is active when the kernel has it running (state `R` in
/// `states`); `+gil` marks the one holding the GIL. A stack the walk could not finish ends in a line that says
/// why.
pub fn render(header: &Header, stacks: &[ThreadStack], states: &[char]) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "Process {}: {}", header.pid, header.command);
    let _ = writeln!(out, "Python v{} ({})\n", header.version, header.object);
    for (stack, &state) in stacks.iter().zip(states) {
        let activity = match (state == 'R', stack.holds_gil) {
            (true, true) => "active+gil",
            (true, false) => "active",
            (false, true) => "idle+gil",
            (false, false) => "idle",
        };
        let _ = writeln!(out, "Thread {} ({activity}): \"{}\"", stack.tid, stack.name);
        for frame in &stack.frames {
            let _ = writeln!(out, "    {frame}");
        }
        match stack.end {
            WalkEnd::Complete => {}
            WalkEnd::DepthLimit => out.push_str("    [python truncated]\n"),
            WalkEnd::ReadFailed(err) => {
                let _ = writeln!(out, "    [python truncated: {err}]");
            }
            WalkEnd::BadFrame { frame } => {
                let _ = writeln!(out, "    [python truncated: frame {frame:#x} is not valid]");
            }
        }
    }
    out
}

fn command_line(pid: u32) -> String {
    let raw = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
    let words: Vec<String> = raw
        .split(|&b| b == 0)
        .filter(|w| !w.is_empty())
        .map(|w| String::from_utf8_lossy(w).into_owned())
        .collect();
    words.join(" ")
}

/// The thread's scheduler state letter (`R` running, `S` sleeping...), `?`
/// when it exited.
fn thread_state(pid: u32, tid: u32) -> char {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/task/{tid}/stat")).unwrap_or_default();
    // The name in parentheses may hold anything: the state follows the last `)`.
    stat.rsplit_once(") ")
        .and_then(|(_, rest)| rest.chars().next())
        .unwrap_or('?')
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::python::{memory::ReadError, symbolize::PyFrame};

    fn frame(qualname: &str, line: u32) -> PyFrame {
        PyFrame {
            qualname: qualname.to_owned(),
            filename: "/srv/app.py".to_owned(),
            line: Some(line),
        }
    }

    fn thread(tid: u32, frames: Vec<PyFrame>, end: WalkEnd) -> ThreadStack {
        ThreadStack {
            holds_gil: tid == 8,
            tid,
            name: "python3.12".to_owned(),
            frames,
            cstack_frames: 0,
            incomplete_frames: 0,
            end,
        }
    }

    #[test]
    fn dump_reads_like_py_spy_and_says_where_a_walk_stopped() {
        let header = Header {
            pid: 7,
            command: "python3.12 app.py".to_owned(),
            version: "3.12.1".to_owned(),
            object: "/usr/lib/libpython3.12.so.1.0".to_owned(),
        };
        let stacks = [
            thread(
                7,
                vec![frame("wait", 3), frame("<module>", 9)],
                WalkEnd::Complete,
            ),
            thread(
                8,
                vec![frame("spin", 5)],
                WalkEnd::ReadFailed(ReadError::ProcessGone),
            ),
        ];
        let text = render(&header, &stacks, &['S', 'R']);
        assert_eq!(
            text,
            "Process 7: python3.12 app.py\n\
             Python v3.12.1 (/usr/lib/libpython3.12.so.1.0)\n\
             \n\
             Thread 7 (idle): \"python3.12\"\n    \
             wait (app.py:3)\n    \
             <module> (app.py:9)\n\
             Thread 8 (active+gil): \"python3.12\"\n    \
             spin (app.py:5)\n    \
             [python truncated: the process exited]\n"
        );
    }
}
