//! Symbolization of code that is not a plain ELF function: JIT code named
//! by a perf map, the vDSO, and debug info found through a debuglink.
use std::{process::Command, time::Duration};

use prof_bpf_tests::build_workload;
use profiler::profile::{Collector, SampleType};
use symbolize_support::*;

mod symbolize_support;

/// JIT code is named from the process's perf map; other anonymous code is
/// `[anon]+0xOFFSET`.
#[test]
fn jit_code_from_perf_map() {
    let program = build_workload("sym_jit", FLAGS);
    let (mut proc, sites) = sites(&program);
    let pid = proc.pid();
    let mut collector = Collector::new(vec![SampleType::samples()], "samples");
    collector.note_process(pid);
    collector.add(sample(pid, vec![sites["site_jit"]], true, 1));
    collector.add(sample(pid, vec![sites["site_anon"]], true, 1));
    proc.send_line("exit");
    proc.wait_output(Duration::from_secs(10));
    let profile = collector.finish().unwrap();
    let name = |i: usize| profile.frame_names(&profile.locations[profile.samples[i].locations[0]]);
    assert_eq!(name(0), ["jit_compiled_fn"]);
    assert_eq!(name(1), ["[anon]+0x800"]);
}

/// Addresses in the vDSO are symbolized (it is no file on disk).
#[test]
fn vdso_functions_are_named() {
    use std::io::{Read as _, Seek as _, SeekFrom};
    // Our own vDSO image (the same kernel maps the same one everywhere) and
    // the offset of clock_gettime in it, from nm.
    let range = |pid: &str| {
        let maps = std::fs::read_to_string(format!("/proc/{pid}/maps")).unwrap();
        let line = maps
            .lines()
            .find(|l| l.ends_with("[vdso]"))
            .expect("a [vdso] mapping")
            .to_owned();
        let (a, b) = line
            .split_whitespace()
            .next()
            .unwrap()
            .split_once('-')
            .unwrap();
        (
            u64::from_str_radix(a, 16).unwrap(),
            u64::from_str_radix(b, 16).unwrap(),
        )
    };
    let (start, end) = range("self");
    let mut image = vec![0; (end - start) as usize];
    let mut mem = std::fs::File::open("/proc/self/mem").unwrap();
    mem.seek(SeekFrom::Start(start)).unwrap();
    mem.read_exact(&mut image).unwrap();
    let dump = std::env::temp_dir().join(format!("prof-bpf-test-vdso-{}.so", std::process::id()));
    std::fs::write(&dump, &image).unwrap();
    let nm = Command::new("nm").arg("-D").arg(&dump).output().unwrap();
    std::fs::remove_file(&dump).ok();
    let nm = String::from_utf8_lossy(&nm.stdout);
    let offset = nm
        .lines()
        .find(|l| l.contains(" __vdso_clock_gettime@"))
        .and_then(|l| u64::from_str_radix(l.split_whitespace().next()?, 16).ok())
        .unwrap_or_else(|| panic!("no __vdso_clock_gettime in {nm}"));

    let program = build_workload("sym_known", FLAGS);
    let (mut proc, _) = sites(&program);
    let pid = proc.pid();
    let (target_start, _) = range(&pid.to_string());
    let mut collector = Collector::new(vec![SampleType::samples()], "samples");
    collector.note_process(pid);
    collector.add(sample(pid, vec![target_start + offset + 4], true, 1));
    proc.send_line("exit");
    proc.wait_output(Duration::from_secs(10));
    let profile = collector.finish().unwrap();
    let names = profile.frame_names(&profile.locations[profile.samples[0].locations[0]]);
    assert_eq!(names.len(), 1);
    assert!(names[0].contains("clock_gettime"), "{names:?}");
}

/// Debug info split off with objcopy and found through `.gnu_debuglink`
/// (next to the binary, as Debian's -dbgsym files are found under
/// /usr/lib/debug): names, file:line and inlined frames come from it.
#[test]
fn debuglink_debug_info() {
    let program = build_workload("sym_known", FLAGS);
    let dir = std::env::temp_dir().join(format!("prof-bpf-debuglink-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let stripped = dir.join("sym_stripped");
    let debug = dir.join("sym_stripped.debug");
    let run = |cmd: &mut Command| assert!(cmd.status().unwrap().success(), "{cmd:?}");
    run(Command::new("objcopy")
        .arg("--only-keep-debug")
        .arg(&program)
        .arg(&debug));
    run(Command::new("objcopy")
        .arg("--strip-all")
        .arg(format!("--add-gnu-debuglink={}", debug.display()))
        .arg(&program)
        .arg(&stripped));
    let (mut proc, sites) = sites(&stripped);
    let pid = proc.pid();
    let mut collector = Collector::new(vec![SampleType::samples()], "samples");
    collector.note_process(pid);
    collector.add(sample(pid, vec![sites["site_middle"]], false, 1));
    collector.add(sample(pid, vec![sites["site_inlined"]], false, 1));
    proc.send_line("exit");
    proc.wait_output(Duration::from_secs(10));
    let profile = collector.finish().unwrap();
    assert_eq!(names(frames(&profile, 0)), [("middle_function", false)]);
    assert!(frames(&profile, 0)[0].line > 0);
    assert_eq!(
        names(frames(&profile, 1)),
        [("inlined_helper", true), ("with_inlined_caller", false)]
    );
    std::fs::remove_dir_all(&dir).ok();
}
