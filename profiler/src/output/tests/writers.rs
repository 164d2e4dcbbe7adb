//! Writers on a hand-built profile whose stacks and values are known.
use crate::output::*;
use crate::profile::{Frame, Label, Location, LocationKind, Mapping, SampleType};

/// Two processes; `app` (pid 10) has threads 11 and 12.
///   app/11: main -> work -> hot           5 (cpu 50)
///   app/12: main -> work -> (inlined) fast_[i], in work   3
///   app/12: main -> lib.so+0x1a2b (unresolved)            1
///   app/11: read_[k] <- main   (kernel frame under main)  2
///   db/20:  [truncated] -> query                          4
pub(super) fn profile() -> Profile {
    let loc = |mapping, address, kind, frames: Vec<Frame>| Location {
        mapping,
        address,
        kind,
        frames,
    };
    let f = Frame::named;
    let inlined = Frame {
        inlined: true,
        ..Frame::named("fast")
    };
    let locations = vec![
        loc(Some(0), 0x1100, LocationKind::User, vec![f("main")]),
        loc(Some(0), 0x1200, LocationKind::User, vec![f("work")]),
        loc(Some(0), 0x1300, LocationKind::User, vec![f("hot")]),
        loc(
            Some(0),
            0x1210,
            LocationKind::User,
            vec![inlined, f("work")],
        ),
        loc(Some(1), 0x7000 + 0x1a2b, LocationKind::User, vec![]),
        loc(
            Some(2),
            0xffff_ffff_8100_0000,
            LocationKind::Kernel,
            vec![f("read")],
        ),
        loc(
            None,
            0,
            LocationKind::Marker,
            vec![f(crate::profile::TRUNCATED)],
        ),
        loc(Some(0), 0x1400, LocationKind::User, vec![f("query")]),
    ];
    let labels = |comm: &str, pid: i64, tid: i64| {
        vec![
            Label::num("pid", pid, ""),
            Label::str("comm", comm),
            Label::num("tid", tid, ""),
        ]
    };
    let sample = |locations: Vec<usize>, v: i64, l| Sample {
        locations,
        values: vec![v, v * 10],
        labels: l,
    };
    Profile {
        sample_types: vec![SampleType::samples(), SampleType::cpu()],
        default_sample_type: "samples".to_owned(),
        mappings: vec![
            Mapping {
                start: 0x1000,
                limit: 0x2000,
                file: "/usr/bin/app".into(),
                ..Mapping::default()
            },
            Mapping {
                start: 0x7000,
                limit: 0x9000,
                file: "/usr/lib/lib.so".into(),
                ..Mapping::default()
            },
            Mapping {
                start: 0xffff_8000_0000_0000,
                limit: u64::MAX,
                file: Mapping::KERNEL.into(),
                ..Mapping::default()
            },
        ],
        locations,
        samples: vec![
            sample(vec![2, 1, 0], 5, labels("app", 10, 11)),
            sample(vec![3, 0], 3, labels("app", 10, 12)),
            sample(vec![4, 0], 1, labels("app", 10, 12)),
            sample(vec![5, 0], 2, labels("app", 10, 11)),
            sample(vec![7, 6], 4, labels("db", 20, 20)),
        ],
        ..Profile::default()
    }
}

fn filter(args: &OutputArgs) -> Filter {
    Filter::new(args.focus.as_deref(), args.ignore.as_deref()).unwrap()
}

/// The stacks of the first sample type.
fn view(p: &Profile, group_by: GroupBy) -> View {
    View {
        stacks: stacks(p, 0, group_by, &Filter::default()),
        sample_type: p.sample_types[0].clone(),
    }
}

fn stacks_of(p: &Profile, group_by: GroupBy, args: &OutputArgs) -> Vec<(String, i64)> {
    stacks(p, 0, group_by, &filter(args))
        .into_iter()
        .map(|s| (s.frames.join(";"), s.value))
        .collect()
}

#[test]
fn folded_stacks_follow_the_naming_rules() {
    let p = profile();
    let got = stacks_of(&p, GroupBy::Process, &OutputArgs::default());
    let want = [
        ("app-10;main;work;hot", 5),
        ("app-10;main;work;fast_[i]", 3),
        ("app-10;main;lib.so+0x1a2b", 1),
        ("app-10;main;read_[k]", 2),
        ("db-20;[truncated];query", 4),
    ];
    assert_eq!(got, want.map(|(s, v)| (s.to_owned(), v)));
    let threads = stacks_of(&p, GroupBy::Thread, &OutputArgs::default());
    assert_eq!(threads[0].0, "app-10/11;main;work;hot");
    assert_eq!(threads[1].0, "app-10/12;main;work;fast_[i]");
    let none = stacks_of(&p, GroupBy::None, &OutputArgs::default());
    assert_eq!(none[0].0, "main;work;hot");
    let view = view(&p, GroupBy::None);
    assert!(folded::render(&view).starts_with("main;work;hot 5\nmain;work;fast_[i] 3\n"));
}

#[test]
fn focus_and_ignore_filter_stacks() {
    let p = profile();
    let args = OutputArgs {
        focus: Some("^work$".into()),
        ..OutputArgs::default()
    };
    let got = stacks_of(&p, GroupBy::None, &args);
    assert_eq!(got.iter().map(|s| s.1).sum::<i64>(), 8);
    let args = OutputArgs {
        ignore: Some(r"_\[k\]$".into()),
        ..OutputArgs::default()
    };
    let got = stacks_of(&p, GroupBy::None, &args);
    assert_eq!(got.iter().map(|s| s.1).sum::<i64>(), 13);
}

#[test]
fn text_table_flat_and_cum() {
    let p = profile();
    let view = view(&p, GroupBy::None);
    let text = text::render(&p, &view, None);
    let rows: Vec<Vec<&str>> = text
        .lines()
        .skip(3)
        .map(|l| l.split_whitespace().collect())
        .collect();
    // name -> (flat, cum), total 15.
    let find = |name: &str| {
        let r = rows
            .iter()
            .find(|r| r.last() == Some(&name))
            .unwrap_or_else(|| panic!("{name} in\n{text}"));
        (r[0].parse::<i64>().unwrap(), r[3].parse::<i64>().unwrap())
    };
    assert_eq!(find("hot"), (5, 5));
    assert_eq!(find("query"), (4, 4));
    assert_eq!(find("fast_[i]"), (3, 3));
    assert_eq!(find("work"), (0, 8));
    assert_eq!(find("main"), (0, 11));
    assert_eq!(find("[truncated]"), (0, 4));
    assert!(text.contains("of 15 total"), "{text}");
    // Largest flat first.
    assert_eq!(rows[0].last(), Some(&"hot"));
    assert!(rows[0][1] == "33.33%", "{text}");
    let two = text::render(&p, &view, Some(2));
    assert!(
        two.contains("Showing 2 of 8 functions, accounting for 9, 60.00% of 15 total"),
        "{two}"
    );
}

#[test]
fn callgraph_nodes_and_edges() {
    let p = profile();
    let view = view(&p, GroupBy::None);
    let dot = callgraph::render(&p, &view, None);
    let node = |name: &str| {
        dot.lines()
            .find(|l| l.contains(&format!("label=\"{name}\\n")))
            .and_then(|l| l.split_whitespace().next())
            .unwrap_or_else(|| panic!("no node {name} in {dot}"))
            .to_owned()
    };
    let (main, work, hot) = (node("main"), node("work"), node("hot"));
    assert!(
        dot.contains(&format!("{main} -> {work} [label=\" 8\"")),
        "{dot}"
    );
    assert!(
        dot.contains(&format!("{work} -> {hot} [label=\" 5\"")),
        "{dot}"
    );
    // Pruning keeps the biggest nodes and says how many went.
    let small = callgraph::render(&p, &view, Some(2));
    assert!(small.contains("Dropped 6 nodes"), "{small}");
    assert!(!small.contains("label=\"hot\\n"), "{small}");
    // A pruned node between two kept ones leaves a dotted edge.
    let stack = |frames: &[&str], value| Stack {
        frames: frames.iter().map(|f| f.to_string()).collect(),
        value,
    };
    let skip = View {
        stacks: vec![stack(&["a", "b", "c"], 10), stack(&["c"], 100)],
        sample_type: SampleType::samples(),
    };
    let dot = callgraph::render(&p, &skip, Some(2));
    assert!(dot.contains("N1 -> N0 [label=\" 10\""), "{dot}");
    assert!(dot.contains("style=dotted"), "{dot}");
}

#[test]
fn pprof_round_trip() {
    let p = profile();
    let bytes = pprof::encode(&p).unwrap();
    let q = crate::profile::read::from_bytes(&bytes, 1 << 20).unwrap();
    assert_eq!(q.sample_types, p.sample_types);
    assert_eq!(q.default_sample_type, "samples");
    let none = OutputArgs::default();
    assert_eq!(
        stacks_of(&q, GroupBy::Thread, &none),
        stacks_of(&p, GroupBy::Thread, &none)
    );
    assert_eq!(q.samples[0].values, vec![5, 50]);
}

#[test]
fn values_with_units() {
    assert_eq!(format_value(1_000_000, "bytes"), "976.56KiB");
    assert_eq!(format_value(-2048, "bytes"), "-2.00KiB");
    assert_eq!(format_value(512, "bytes"), "512B");
    assert_eq!(format_value(1_500_000_000, "nanoseconds"), "1.50s");
    assert_eq!(format_value(42, "count"), "42");
}

#[test]
fn folded_lines_are_one_stack_each() {
    let stack = |frames: &[&str], value| Stack {
        frames: frames.iter().map(|f| f.to_string()).collect(),
        value,
    };
    let view = View {
        stacks: vec![
            stack(&["main", "f;g", "line\nbreak\r"], 3),
            stack(&["main", "a b"], 4),
        ],
        sample_type: SampleType::samples(),
    };
    assert_eq!(
        folded::render(&view),
        "main;f:g;line\\nbreak\\r 3\nmain;a b 4\n"
    );
}

#[test]
fn summed_values_saturate() {
    let mut p = profile();
    for s in &mut p.samples {
        s.values[0] = i64::MAX / 2 + 1;
    }
    // Every sample of `app` under one root: three stacks of main merge
    // with nothing, but all four app stacks share `main` in the table.
    let view = view(&p, GroupBy::None);
    let text = text::render(&p, &view, None);
    assert!(!text.contains("-"), "{text}");
    let merged = stacks(&p, 0, GroupBy::None, &Filter::default());
    let mut twice = p.clone();
    twice.samples.extend(p.samples.clone());
    let doubled = stacks(&twice, 0, GroupBy::None, &Filter::default());
    assert_eq!(merged.len(), doubled.len());
    assert!(doubled.iter().all(|s| s.value == i64::MAX), "{doubled:?}");
}

#[test]
fn flamegraph_root_bar_has_a_label() {
    let p = profile();
    let svg = String::from_utf8(flamegraph::render(&p, &view(&p, GroupBy::None)).unwrap()).unwrap();
    // The root bar: its tooltip, then its text, which names the sample
    // type and the total (15 samples).
    let root = svg.find("<title>all (15 count, 100%)</title>").expect(&svg);
    let text_start = root + svg[root..].find("<text").unwrap();
    let text_end = text_start + svg[text_start..].find("</text>").unwrap();
    let inner = &svg[text_start..text_end];
    assert!(inner.ends_with(">samples: 15 total"), "{inner}");
}

/// Relative luminance of `#rrggbb` (WCAG).
fn luminance(hex: &str) -> f64 {
    let channel = |i: usize| {
        let c = f64::from(u8::from_str_radix(&hex[i..i + 2], 16).unwrap()) / 255.0;
        if c <= 0.03928 {
            c / 12.92
        } else {
            ((c + 0.055) / 1.055).powf(2.4)
        }
    };
    0.2126 * channel(1) + 0.7152 * channel(3) + 0.0722 * channel(5)
}

/// The value of `key="..."` or `key=...` in a dot line.
fn attr<'a>(line: &'a str, key: &str) -> Option<&'a str> {
    let rest = &line[line.find(&format!(" {key}="))? + key.len() + 2..];
    Some(match rest.strip_prefix('"') {
        Some(quoted) => &quoted[..quoted.find('"')?],
        None => rest.split([' ', ']']).next()?,
    })
}

#[test]
fn callgraph_text_is_readable() {
    let mut p = profile();
    p.comments
        .push(format!("a long note: {}", "word ".repeat(60)));
    p.comments.push("x".repeat(200));
    let dot = callgraph::render(&p, &view(&p, GroupBy::None), None);
    assert!(dot.contains("fontcolor=\"#1a1a1a\""), "{dot}");
    let nodes: Vec<&str> = dot
        .lines()
        .filter(|l| l.starts_with('N') && !l.contains("->"))
        .collect();
    assert_eq!(nodes.len(), 8, "{dot}");
    for line in nodes {
        let fill = attr(line, "fillcolor").unwrap();
        // Contrast of the #1a1a1a text on the fill: at least 7:1 (WCAG AAA).
        let contrast = (luminance(fill) + 0.05) / (luminance("#1a1a1a") + 0.05);
        assert!(contrast >= 7.0, "{fill}: {contrast:.1} in {line}");
        let size: f64 = attr(line, "fontsize").unwrap().parse().unwrap();
        assert!(size >= 12.0, "{line}");
    }
    // Legend lines are wrapped: none longer than 80 characters.
    let legend = dot.lines().find(|l| l.contains("\"legend\"")).unwrap();
    let label = attr(legend, "label").unwrap();
    let lines: Vec<&str> = label.split("\\l").filter(|l| !l.is_empty()).collect();
    assert!(lines.iter().all(|l| l.chars().count() <= 80), "{lines:#?}");
    assert!(lines.len() >= 6, "{lines:#?}");
    assert!(lines.contains(&"x".repeat(80).as_str()), "{lines:#?}");
}

#[test]
fn text_table_drops_small_nodes_as_pprof_does() {
    // 1000 in `big`, 4 in `tiny` (0.4% of 1004, under pprof's 0.5%), 6 in
    // `small` (0.6%: kept).
    let stack = |frames: &[&str], value| Stack {
        frames: frames.iter().map(|f| f.to_string()).collect(),
        value,
    };
    let view = View {
        stacks: vec![
            stack(&["main", "big"], 1000),
            stack(&["main", "tiny"], 4),
            stack(&["main", "small"], 6),
        ],
        sample_type: SampleType::samples(),
    };
    let text = text::render(&profile(), &view, None);
    assert!(
        text.contains("Showing 3 of 4 functions, accounting for 1006"),
        "{text}"
    );
    // cutoff = floor(1010 * 0.005) = 5
    assert!(text.contains("Dropped 1 nodes (cum <= 5)\n"), "{text}");
    assert!(
        !text.contains(" tiny\n") && text.contains(" small\n"),
        "{text}"
    );
    let one = text::render(&profile(), &view, Some(1));
    assert!(one.contains("Showing 1 of 4 functions"), "{one}");
    assert!(one.contains(" big\n") && !one.contains(" small\n"), "{one}");
}
