//! Symbolization from raw addresses: real programs with known functions
//! (C, C++, an inlined function) symbolized after they exited, and a
//! stripped binary whose gaps between exported symbols must stay unnamed.
use std::{collections::HashMap, process::Command, time::Duration};

use prof_bpf_tests::{Proc, build_workload};
use profiler::{
    output::{self, OutputArgs},
    profile::{Collector, Frame, Mapping, Profile, RawSample, SampleType, StackStatus},
};

const FLAGS: &[&str] = &["-O1", "-g", "-fno-omit-frame-pointer"];

/// Runs `program`, collects its `SITE name address` lines until `ready`.
fn sites(program: &std::path::Path) -> (Proc, HashMap<String, u64>) {
    let mut proc = Proc::spawn(&mut Command::new(program));
    let mut sites = HashMap::new();
    loop {
        let line = proc.read_line();
        if line == "ready" {
            break;
        }
        let mut parts = line.split_whitespace();
        assert_eq!(parts.next(), Some("SITE"), "unexpected line {line}");
        let name = parts.next().expect("site name").to_owned();
        let addr = parts.next().expect("site address").trim_start_matches("0x");
        sites.insert(name, u64::from_str_radix(addr, 16).expect("hex address"));
    }
    (proc, sites)
}

fn sample(pid: u32, user: Vec<u64>, leaf_is_pc: bool, value: i64) -> RawSample {
    RawSample {
        pid,
        tid: Some(pid),
        comm: "sym_known".to_owned(),
        user,
        leaf_is_pc,
        values: vec![value],
        ..RawSample::default()
    }
}

/// The frames of the single-location sample `i`.
fn frames(profile: &Profile, i: usize) -> &[Frame] {
    let s = &profile.samples[i];
    assert_eq!(s.locations.len(), 1, "sample {i}: {s:?}");
    &profile.locations[s.locations[0]].frames
}

fn names(frames: &[Frame]) -> Vec<(&str, bool)> {
    frames
        .iter()
        .map(|f| (f.function.as_str(), f.inlined))
        .collect()
}

#[test]
fn c_functions_and_inlined_frames_after_exit() {
    let program = build_workload("sym_known", FLAGS);
    let (mut proc, sites) = sites(&program);
    let pid = proc.pid();
    let mut collector = Collector::new(vec![SampleType::samples()], "samples");
    collector.note_process(pid);
    let order = ["site_outer", "site_middle", "site_leaf", "site_inlined"];
    for (i, site) in order.iter().enumerate() {
        collector.add(sample(pid, vec![sites[*site]], false, i as i64 + 1));
    }
    // A sampled pc is looked up as is (not minus one).
    collector.add(sample(pid, vec![sites["site_pc"]], true, 10));
    // A whole stack: leaf pc, then return addresses into its callers.
    collector.add(sample(
        pid,
        vec![sites["site_pc"], sites["site_middle"], sites["site_outer"]],
        true,
        7,
    ));
    // Symbolize only after the process is gone.
    proc.send_line("exit");
    let (_, code) = proc.wait_output(Duration::from_secs(10));
    assert_eq!(code, 0);
    let profile = collector.finish().expect("finish");

    assert_eq!(names(frames(&profile, 0)), [("outer_function", false)]);
    assert_eq!(names(frames(&profile, 1)), [("middle_function", false)]);
    assert_eq!(names(frames(&profile, 2)), [("leaf_function", false)]);
    assert_eq!(
        names(frames(&profile, 3)),
        [("inlined_helper", true), ("with_inlined_caller", false)]
    );
    assert_eq!(names(frames(&profile, 4)), [("leaf_function", false)]);
    for f in frames(&profile, 0).iter().chain(frames(&profile, 3)) {
        assert!(f.file.ends_with("sym_known.c"), "file of {f:?}");
        assert!(f.line > 0, "line of {f:?}");
    }
    let m = &profile.mappings[profile.locations[profile.samples[0].locations[0]]
        .mapping
        .unwrap()];
    assert_eq!(m.file, program.to_str().unwrap());
    assert_eq!(m.build_id.len(), 40, "gcc's default sha1 build-id: {m:?}");

    // The same names through the writers (folded: outermost first, with the
    // process root frame).
    let dir = std::env::temp_dir().join(format!("prof-bpf-sym-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let out = dir.join("p.folded");
    let args = OutputArgs {
        output: Some(out.clone()),
        ..OutputArgs::default()
    };
    output::write(&profile, &args).expect("write folded");
    let folded = std::fs::read_to_string(&out).unwrap();
    let root = format!("sym_known-{pid}");
    assert!(
        folded.contains(&format!(
            "{root};with_inlined_caller;inlined_helper_[i] 4\n"
        )),
        "{folded}"
    );
    assert!(
        folded.contains(&format!(
            "{root};outer_function;middle_function;leaf_function 7\n"
        )),
        "{folded}"
    );
    assert!(
        folded.contains(&format!("{root};leaf_function 13\n")),
        "{folded}"
    );
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn cpp_names_are_demangled() {
    let program = build_workload("sym_known_cc", FLAGS);
    let (mut proc, sites) = sites(&program);
    let pid = proc.pid();
    let mut collector = Collector::new(vec![SampleType::samples()], "samples");
    collector.note_process(pid);
    collector.add(sample(pid, vec![sites["site_method"]], false, 1));
    collector.add(sample(pid, vec![sites["site_template"]], false, 1));
    proc.send_line("exit");
    proc.wait_output(Duration::from_secs(10));
    let profile = collector.finish().expect("finish");
    let method = &frames(&profile, 0)[0].function;
    let template = &frames(&profile, 1)[0].function;
    assert!(method.starts_with("shapes::Widget::compute"), "{method}");
    assert!(
        template.starts_with("int shapes::scaled<int>")
            || template.starts_with("shapes::scaled<int>"),
        "{template}"
    );
}

#[test]
fn garbage_frames_end_the_stack_as_truncated() {
    let program = build_workload("sym_known", FLAGS);
    let (mut proc, sites) = sites(&program);
    let pid = proc.pid();
    let mut collector = Collector::new(vec![SampleType::samples()], "samples");
    collector.note_process(pid);
    // 0x10 is in no mapping: the walk went astray after middle_function.
    collector.add(sample(
        pid,
        vec![sites["site_middle"], 0x10, sites["site_outer"]],
        false,
        1,
    ));
    collector.add(RawSample {
        user_status: StackStatus::Missing,
        kernel: Vec::new(),
        ..sample(pid, Vec::new(), false, 1)
    });
    proc.send_line("exit");
    proc.wait_output(Duration::from_secs(10));
    let profile = collector.finish().expect("finish");
    let folded = |args: OutputArgs| {
        let out =
            std::env::temp_dir().join(format!("prof-bpf-trunc-{}.folded", std::process::id()));
        output::write(
            &profile,
            &OutputArgs {
                output: Some(out.clone()),
                ..args
            },
        )
        .unwrap();
        let text = std::fs::read_to_string(&out).unwrap();
        std::fs::remove_file(&out).ok();
        text
    };
    let text = folded(OutputArgs::default());
    assert!(
        text.contains(&format!("sym_known-{pid};[truncated];middle_function 1\n")),
        "{text}"
    );
    assert!(
        text.contains(&format!("sym_known-{pid};[missing user stack] 1\n")),
        "{text}"
    );
    assert!(!text.contains("outer_function"), "{text}");
}

/// Debian's python3.11 has only .dynsym: its static functions lie in gaps
/// between exported symbols. An address in such a gap must stay
/// `python3.11+0xOFFSET`, not take the preceding exported symbol's name.
#[test]
fn stripped_binary_gap_is_not_given_a_wrong_name() {
    let python = "/usr/bin/python3.11";
    let nm = Command::new("nm")
        .args(["-D", "--defined-only", "-S", python])
        .output()
        .expect("run nm");
    let mut syms: Vec<(u64, u64, String)> = String::from_utf8_lossy(&nm.stdout)
        .lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            if f.len() != 4 || !f[2].eq_ignore_ascii_case("t") {
                return None;
            }
            Some((
                u64::from_str_radix(f[0], 16).ok()?,
                u64::from_str_radix(f[1], 16).ok()?,
                f[3].to_owned(),
            ))
        })
        .collect();
    syms.sort();
    // A gap of at least 256 bytes after a sized symbol.
    let (before, gap_addr) = syms
        .windows(2)
        .find_map(|w| {
            let end = w[0].0 + w[0].1;
            (w[0].1 > 0 && w[1].0 > end + 256).then(|| (w[0].clone(), end + 128))
        })
        .expect("python3.11 has gaps between its exported functions");
    // Text segment: file offset = vaddr - 0x400000 for this non-PIE binary
    // (checked below through readelf).
    let readelf = Command::new("readelf")
        .args(["-lW", python])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&readelf.stdout);
    let load = text
        .lines()
        .filter(|l| l.trim_start().starts_with("LOAD") && l.contains(" R E "))
        .map(|l| {
            let f: Vec<u64> = l
                .split_whitespace()
                .skip(1)
                .take(2)
                .map(|x| u64::from_str_radix(x.trim_start_matches("0x"), 16).unwrap())
                .collect();
            (f[0], f[1])
        })
        .next()
        .expect("an executable LOAD segment");
    let to_offset = |vaddr: u64| vaddr - load.1 + load.0;
    let mut profile = Profile {
        sample_types: vec![SampleType::samples()],
        mappings: vec![Mapping {
            start: 0,
            limit: 1 << 40,
            offset: 0,
            file: python.to_owned(),
            local_path: Some(python.into()),
            ..Mapping::default()
        }],
        ..Profile::default()
    };
    for addr in [gap_addr, before.0 + before.1 / 2] {
        profile.locations.push(profiler::profile::Location {
            mapping: Some(0),
            address: to_offset(addr),
            ..Default::default()
        });
    }
    profiler::symbolize::symbolize(&mut profile);
    assert!(
        profile.locations[0].frames.is_empty(),
        "address {gap_addr:#x} after {} was named {:?}",
        before.2,
        profile.locations[0].frames
    );
    assert_eq!(
        profile.frame_names(&profile.locations[0]),
        [format!("python3.11+{:#x}", to_offset(gap_addr))]
    );
    assert_eq!(
        names(&profile.locations[1].frames),
        [(before.2.as_str(), false)]
    );
}
