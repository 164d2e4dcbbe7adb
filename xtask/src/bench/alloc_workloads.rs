//! The workloads of `cargo xtask bench alloc`: the synthetic ones of
//! `tests/workloads/alloc_bench.c` (each stressing one thing an allocator
//! does) and real programs. Each synthetic workload runs about 0.15-0.3 s
//! under profalloc (the slowest peers up to 2 s): shorter runs (10-50 ms)
//! swung by ±25-45% on a busy 2-core machine, since a few scheduler
//! preemptions are a large part of them, which hid differences of a few
//! percent. The whole bench stays near 10 minutes.
use std::{fmt::Write as _, path::Path};

use anyhow::Context as _;

pub struct Workload {
    pub name: &'static str,
    /// Program and arguments.
    pub argv: Vec<String>,
    /// Extra environment of every run.
    pub env: Vec<(&'static str, &'static str)>,
    /// Whether the program prints `ops N seconds S` (else wall time counts).
    pub reports_time: bool,
    /// A real program: a run counts only if it ran on the preloaded
    /// allocator (checked for ours through its exit statistics).
    pub real: bool,
    /// Runs one thread at a time (a real program's children run after
    /// one another): its CPU time is its work, without the time it waited
    /// for a CPU, and is reported beside the wall time.
    pub single_threaded: bool,
}

const PYTHON_WORKLOAD: &str = r#"
import collections, json, re
d = {}
for i in range(40000):
    d[str(i)] = [i] * (i % 7)
words = collections.Counter(re.findall(r"\w+", json.dumps(d)[:400000]))
s = sorted(d.items(), key=lambda kv: (len(kv[1]), kv[0]))
print(len(d), len(words), s[0][0])
"#;

const SQLITE_WORKLOAD: &str = "\
create table t(id integer primary key, name text, v real);
with recursive c(x) as (select 1 union all select x + 1 from c where x < 100000)
insert into t select x, hex(x * 7919), x * 0.5 from c;
create index t_name on t(name);
select count(*), sum(v), min(name), max(name) from t;
select substr(name, 1, 2), count(*) from t group by 1 order by 2 desc limit 3;";

/// A C file of many functions with loops, switches and string tables,
/// which gcc's optimiser allocates heavily on.
fn large_c_source(functions: usize) -> String {
    let mut s = String::from("#include <string.h>\n");
    for f in 0..functions {
        let _ = write!(
            s,
            "static const char *names_{f}[] = {{\"a{f}\", \"b{f}\", \"c{f}\", \"d{f}\"}};\n\
             int fn_{f}(int x, const char *k) {{\n  int acc = {f};\n  \
             for (int i = 0; i < x; i++) {{\n    switch ((i + x) % 5) {{\n    \
             case 0: acc += i * {f}; break;\n    case 1: acc ^= (int)strlen(names_{f}[i & 3]); break;\n    \
             case 2: acc -= strcmp(k, names_{f}[(i + 1) & 3]); break;\n    \
             default: acc = acc * 31 + i;\n    }}\n  }}\n  return acc;\n}}\n"
        );
    }
    s
}

/// The interpreter `python3` runs: on a pyenv machine `python3` is a shell
/// script that starts about 36 processes (bash, readlink) before the
/// interpreter, which would be most of what the workload measured.
fn python_interpreter() -> anyhow::Result<String> {
    let out = std::process::Command::new("python3")
        .args(["-c", "import sys; print(sys.executable)"])
        .output()
        .context("running python3")?;
    anyhow::ensure!(out.status.success(), "python3 failed: {:?}", out.status);
    let path = String::from_utf8_lossy(&out.stdout).trim().to_owned();
    anyhow::ensure!(!path.is_empty(), "python3 names no interpreter");
    Ok(path)
}

/// Whether `alloc_bench ARGS` runs one thread at a time.
fn single_threaded(args: &[&str]) -> bool {
    matches!(args, ["realloc", ..] | ["frag", ..] | ["churn", "1", ..])
}

/// Every workload; `bench` is the alloc_bench binary, `scratch` a directory
/// for generated inputs, `repo` a git repository to read.
pub fn all(bench: &str, scratch: &Path, repo: &Path) -> anyhow::Result<Vec<Workload>> {
    let synthetic = |name, args: &[&str]| Workload {
        name,
        argv: std::iter::once(bench.to_owned())
            .chain(args.iter().map(|s| s.to_string()))
            .collect(),
        env: Vec::new(),
        reports_time: true,
        real: false,
        single_threaded: single_threaded(args),
    };
    let real = |name, argv: Vec<String>, env| Workload {
        name,
        argv,
        env,
        reports_time: false,
        real: true,
        single_threaded: true,
    };
    std::fs::create_dir_all(scratch).with_context(|| format!("creating {}", scratch.display()))?;
    let big_c = scratch.join("large.c");
    std::fs::write(&big_c, large_c_source(25))
        .with_context(|| format!("writing {}", big_c.display()))?;
    let interpreter = python_interpreter()?;
    let python = || vec![interpreter.clone(), "-c".into(), PYTHON_WORKLOAD.into()];
    Ok(vec![
        synthetic("small churn", &["churn", "1", "10000000"]),
        synthetic("churn 2 threads", &["churn", "2", "6000000"]),
        synthetic("larson", &["larson", "30", "200000"]),
        synthetic("producer/consumer", &["prodcons", "4000000"]),
        synthetic("xmalloc 4 threads", &["xmalloc", "4", "8000000"]),
        synthetic("cache-scratch", &["scratch", "2", "100000000"]),
        synthetic("short threads", &["threads", "600", "2000"]),
        synthetic("realloc growth", &["realloc", "2"]),
        synthetic("fragmentation", &["frag", "32"]),
        real("python3", python(), Vec::new()),
        real(
            "python3 (malloc)",
            python(),
            vec![("PYTHONMALLOC", "malloc")],
        ),
        real(
            "sqlite3",
            vec!["sqlite3".into(), ":memory:".into(), SQLITE_WORKLOAD.into()],
            Vec::new(),
        ),
        real(
            "git log -p",
            vec![
                "git".into(),
                "-C".into(),
                repo.to_string_lossy().into_owned(),
                "log".into(),
                "-p".into(),
                "-n".into(),
                "150".into(),
            ],
            Vec::new(),
        ),
        real(
            "gcc -O1 large.c",
            vec![
                "gcc".into(),
                "-O1".into(),
                "-c".into(),
                big_c.to_string_lossy().into_owned(),
                "-o".into(),
                "/dev/null".into(),
            ],
            Vec::new(),
        ),
    ])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn single_threaded_modes_are_told_apart() {
        assert!(single_threaded(&["churn", "1", "5"]));
        assert!(!single_threaded(&["churn", "2", "5"]));
        assert!(single_threaded(&["frag", "8"]));
        assert!(!single_threaded(&["scratch", "2", "8"]));
    }

    #[test]
    fn the_large_c_file_has_the_functions_asked_for() {
        let s = large_c_source(7);
        assert_eq!(s.matches("int fn_").count(), 7);
        assert!(s.contains("int fn_6(int x"));
    }
}
