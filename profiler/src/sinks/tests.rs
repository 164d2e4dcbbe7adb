//! Unit tests of the message preparation and the OTLP mapping.
use std::{
    sync::Arc,
    time::{Duration, SystemTime},
};

use super::*;
use crate::profile::{Frame, Location, LocationKind, Mapping, Sample, SampleType};

/// Two stacks over three locations (one kernel, one unsymbolized), two
/// sample types, and labels of both kinds.
pub(super) fn sample_profile() -> Profile {
    let frame = |name: &str| Frame::named(name);
    Profile {
        sample_types: vec![
            SampleType::new("alloc_space", "bytes"),
            SampleType::new("inuse_space", "bytes"),
        ],
        default_sample_type: "inuse_space".into(),
        mappings: vec![Mapping {
            start: 0x1000,
            limit: 0x9000,
            offset: 0,
            file: "/usr/bin/app".into(),
            build_id: "abcd".into(),
            local_path: None,
        }],
        locations: vec![
            Location {
                mapping: Some(0),
                address: 0x1100,
                kind: LocationKind::User,
                frames: vec![frame("leaf"), frame("main")],
            },
            Location {
                mapping: None,
                address: 0xffff_0000,
                kind: LocationKind::Kernel,
                frames: vec![frame("do_sys")],
            },
            Location {
                mapping: Some(0),
                address: 0x2345,
                kind: LocationKind::User,
                frames: vec![],
            },
        ],
        samples: vec![
            Sample {
                locations: vec![1, 0],
                values: vec![100, 0],
                labels: vec![
                    Label::str("comm", "app"),
                    Label::num("pid", 999, ""),
                    Label::num("tid", 7, ""),
                ],
            },
            Sample {
                locations: vec![2, 0],
                values: vec![30, 20],
                labels: vec![Label::str("thread_comm", "worker")],
            },
        ],
        ..Profile::default()
    }
}

fn message() -> ProfileMessage {
    ProfileMessage {
        kind: ProfileKind::Heap,
        profile: sample_profile(),
        source: Arc::new(Source {
            service_name: "svc".into(),
            hostname: "host1".into(),
            pid: 4242,
            executable: "/usr/bin/app".into(),
            container_id: Some("c0ffee".into()),
            labels: vec![
                ("team".into(), "a".into()),
                ("hostname".into(), "dup".into()),
            ],
        }),
        start: SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000),
        duration: Duration::from_secs(15),
    }
}

#[test]
fn prepared_profiles_carry_the_interval_and_only_numeric_labels() {
    let prepared = Prepared::new(message()).unwrap();
    let decoded = crate::profile::read::from_bytes(&prepared.pprof, 1 << 30).unwrap();
    assert_eq!(decoded.time_nanos, 1_700_000_000_000_000_000);
    assert_eq!(decoded.duration_nanos, 15_000_000_000);
    let labels: Vec<Vec<Label>> = decoded.samples.iter().map(|s| s.labels.clone()).collect();
    assert_eq!(
        labels,
        [
            vec![Label::num("pid", 4242, ""), Label::num("tid", 7, "")],
            vec![Label::num("pid", 4242, "")],
        ]
    );
}

#[test]
fn series_labels_name_the_kind_and_never_the_pid() {
    let labels = message().source.series_labels(ProfileKind::Heap);
    let pairs: Vec<(&str, &str)> = labels
        .iter()
        .map(|(k, v)| (k.as_str(), v.as_str()))
        .collect();
    assert_eq!(
        pairs,
        [
            ("__name__", "memory"),
            ("service_name", "svc"),
            ("hostname", "host1"),
            ("executable", "/usr/bin/app"),
            ("container_id", "c0ffee"),
            ("team", "a"),
        ]
    );
    assert_eq!(ProfileKind::Cpu.series_name(), "process_cpu");
}

#[test]
fn label_arguments_are_checked() {
    assert_eq!(
        parse_label("team=a=b").unwrap(),
        ("team".into(), "a=b".into())
    );
    assert_eq!(parse_label("_x9=").unwrap(), ("_x9".into(), String::new()));
    for bad in ["team", "9x=1", "a-b=1", "__name__=x", "=v"] {
        assert!(parse_label(bad).is_err(), "{bad}");
    }
    assert_eq!(
        parse_label("a-b=1").unwrap_err().to_string(),
        "label key `a-b` must match [a-zA-Z_][a-zA-Z0-9_]* and not start with `__`"
    );
}

#[test]
fn otlp_request_has_one_profile_per_sample_type_over_one_dictionary() {
    use opentelemetry_proto::tonic::common::v1::any_value::Value;
    let prepared = Prepared::new(message()).unwrap();
    let request = otlp_map::export_request(&prepared);
    let dict = request.dictionary.as_ref().unwrap();
    let s = |i: i32| dict.string_table[i as usize].as_str();
    // Zero values first in every table.
    assert_eq!(s(0), "");
    assert_eq!(dict.mapping_table[0], Default::default());
    assert_eq!(dict.location_table[0], Default::default());
    assert_eq!(dict.function_table[0], Default::default());
    assert_eq!(dict.stack_table[0], Default::default());
    assert_eq!(dict.attribute_table[0], Default::default());

    let resource = request.resource_profiles[0].resource.as_ref().unwrap();
    let attr = |k: &str| {
        resource
            .attributes
            .iter()
            .find(|a| a.key == k)
            .and_then(|a| a.value.as_ref()?.value.clone())
    };
    assert_eq!(attr("service.name"), Some(Value::StringValue("svc".into())));
    assert_eq!(attr("process.pid"), Some(Value::IntValue(4242)));
    assert_eq!(attr("host.name"), Some(Value::StringValue("host1".into())));
    assert_eq!(
        attr("container.id"),
        Some(Value::StringValue("c0ffee".into()))
    );
    assert_eq!(
        attr("process.executable.path"),
        Some(Value::StringValue("/usr/bin/app".into()))
    );

    let profiles = &request.resource_profiles[0].scope_profiles[0].profiles;
    assert_eq!(profiles.len(), 2);
    let stacks = |p: &opentelemetry_proto::tonic::profiles::v1development::Profile| {
        p.samples
            .iter()
            .map(|sample| {
                let stack = &dict.stack_table[sample.stack_index as usize];
                let names: Vec<&str> = stack
                    .location_indices
                    .iter()
                    .flat_map(|&l| &dict.location_table[l as usize].lines)
                    .map(|line| s(dict.function_table[line.function_index as usize].name_strindex))
                    .collect();
                (names.join(";"), sample.values.clone())
            })
            .collect::<Vec<_>>()
    };
    let alloc = &profiles[0];
    let t = alloc.sample_type.unwrap();
    assert_eq!(
        (s(t.type_strindex), s(t.unit_strindex)),
        ("alloc_space", "bytes")
    );
    assert_eq!(
        stacks(alloc),
        [
            ("do_sys;leaf;main".to_owned(), vec![100]),
            ("app+0x1345;leaf;main".to_owned(), vec![30]),
        ]
    );
    // The zero value of the first sample is left out of inuse_space.
    assert_eq!(
        stacks(&profiles[1]),
        [("app+0x1345;leaf;main".to_owned(), vec![20])]
    );
    assert_eq!(alloc.time_unix_nano, 1_700_000_000_000_000_000);
    assert_eq!(alloc.duration_nano, 15_000_000_000);
    // tid became thread.id; pid stays on the resource only.
    let first = &alloc.samples[0];
    let attrs: Vec<(&str, Option<Value>)> = first
        .attribute_indices
        .iter()
        .map(|&i| {
            let a = &dict.attribute_table[i as usize];
            (
                s(a.key_strindex),
                a.value.as_ref().and_then(|v| v.value.clone()),
            )
        })
        .collect();
    assert_eq!(attrs, [("thread.id", Some(Value::IntValue(7)))]);
    // The kernel location is marked as such, the mapping has its build id.
    let kernel = &dict.location_table
        [dict.stack_table[first.stack_index as usize].location_indices[0] as usize];
    let frame_type = &dict.attribute_table[kernel.attribute_indices[0] as usize];
    assert_eq!(s(frame_type.key_strindex), "profile.frame.type");
    assert_eq!(
        frame_type.value.as_ref().and_then(|v| v.value.clone()),
        Some(Value::StringValue("kernel".into()))
    );
    let mapping = &dict.mapping_table[1];
    assert_eq!(
        (mapping.memory_start, s(mapping.filename_strindex)),
        (0x1000, "/usr/bin/app")
    );
    let build_id = &dict.attribute_table[mapping.attribute_indices[0] as usize];
    assert_eq!(s(build_id.key_strindex), "process.executable.build_id.gnu");
}
