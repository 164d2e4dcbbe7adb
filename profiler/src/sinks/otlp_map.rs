//! Our profile model as an OTLP `ExportProfilesServiceRequest` (profiles
//! signal, `v1development`). Every OTLP-specific choice lives here, since
//! that format still changes:
//! - one OTLP `Profile` per pprof sample type (OTLP has one per profile),
//!   sharing one `ProfilesDictionary`; samples whose value for that type is
//!   0 are left out;
//! - every dictionary table starts with its zero value, so index 0 means
//!   "none";
//! - the process is the `Resource` (OTel semantic conventions: `service.name`,
//!   `host.name`, `process.pid`, `process.executable.path`, `container.id`,
//!   plus the user's labels); a sample keeps its numeric labels as attributes
//!   (`tid` as `thread.id`), `pid` being the resource's already;
//! - a mapping's GNU build id is `process.executable.build_id.gnu`, a
//!   location's kind `profile.frame.type` (`kernel` or `native`).
use std::collections::HashMap;

use opentelemetry_proto::tonic::{
    collector::profiles::v1development::ExportProfilesServiceRequest,
    common::v1::{AnyValue, InstrumentationScope, KeyValue, any_value::Value},
    profiles::v1development as otlp,
    resource::v1::Resource,
};

use super::{Prepared, Source, unix_nanos};
use crate::profile::{LabelValue, LocationKind, Profile};

/// Builds the request for one prepared profile.
pub(crate) fn export_request(message: &Prepared) -> ExportProfilesServiceRequest {
    let mut dict = Dictionary::new();
    let profile = &message.profile;
    let locations = dict.add_locations(profile);
    let mut profiles = Vec::with_capacity(profile.sample_types.len());
    for (column, sample_type) in profile.sample_types.iter().enumerate() {
        let mut samples = Vec::new();
        for sample in &profile.samples {
            let value = sample.values.get(column).copied().unwrap_or(0);
            if value == 0 {
                continue;
            }
            let stack: Vec<i32> = sample.locations.iter().map(|&l| locations[l]).collect();
            let attribute_indices = sample
                .labels
                .iter()
                .filter(|l| l.key != "pid")
                .filter_map(|l| match &l.value {
                    LabelValue::Num(n, unit) => {
                        let key = if l.key == "tid" { "thread.id" } else { &l.key };
                        Some(dict.attribute(key, Value::IntValue(*n), unit))
                    }
                    LabelValue::Str(_) => None,
                })
                .collect();
            samples.push(otlp::Sample {
                stack_index: dict.stack(stack),
                attribute_indices,
                values: vec![value],
                ..Default::default()
            });
        }
        profiles.push(otlp::Profile {
            sample_type: Some(dict.value_type(&sample_type.kind, &sample_type.unit)),
            samples,
            time_unix_nano: u64::try_from(unix_nanos(message.start)).unwrap_or(0),
            duration_nano: u64::try_from(profile.duration_nanos).unwrap_or(0),
            period_type: profile
                .period_type
                .as_ref()
                .map(|t| dict.value_type(&t.kind, &t.unit)),
            period: profile.period,
            profile_id: fastrand::u128(1..).to_le_bytes().to_vec(),
            ..Default::default()
        });
    }
    ExportProfilesServiceRequest {
        resource_profiles: vec![otlp::ResourceProfiles {
            resource: Some(resource(&message.source)),
            scope_profiles: vec![otlp::ScopeProfiles {
                scope: Some(InstrumentationScope {
                    name: "prof-bpf".into(),
                    version: env!("CARGO_PKG_VERSION").into(),
                    ..Default::default()
                }),
                profiles,
                schema_url: String::new(),
            }],
            schema_url: String::new(),
        }],
        dictionary: Some(dict.tables),
    }
}

fn resource(source: &Source) -> Resource {
    let string = |k: &str, v: &str| KeyValue {
        key: k.into(),
        value: Some(AnyValue {
            value: Some(Value::StringValue(v.into())),
        }),
        ..Default::default()
    };
    let mut attributes = vec![
        string("service.name", &source.service_name),
        KeyValue {
            key: "process.pid".into(),
            value: Some(AnyValue {
                value: Some(Value::IntValue(i64::from(source.pid))),
            }),
            ..Default::default()
        },
    ];
    if !source.hostname.is_empty() {
        attributes.push(string("host.name", &source.hostname));
    }
    if !source.executable.is_empty() {
        attributes.push(string("process.executable.path", &source.executable));
    }
    if let Some(id) = &source.container_id {
        attributes.push(string("container.id", id));
    }
    for (k, v) in &source.labels {
        attributes.push(string(k, v));
    }
    Resource {
        attributes,
        ..Default::default()
    }
}

/// The `ProfilesDictionary` being built, with its interning maps.
struct Dictionary {
    tables: otlp::ProfilesDictionary,
    strings: HashMap<String, i32>,
    functions: HashMap<(i32, i32), i32>,
    stacks: HashMap<Vec<i32>, i32>,
    attributes: HashMap<(i32, String, i32), i32>,
}

fn index(len: usize) -> i32 {
    i32::try_from(len).unwrap_or(i32::MAX)
}

impl Dictionary {
    fn new() -> Self {
        let mut d = Self {
            tables: otlp::ProfilesDictionary {
                mapping_table: vec![otlp::Mapping::default()],
                location_table: vec![otlp::Location::default()],
                function_table: vec![otlp::Function::default()],
                link_table: vec![otlp::Link::default()],
                string_table: Vec::new(),
                attribute_table: vec![otlp::KeyValueAndUnit::default()],
                stack_table: vec![otlp::Stack::default()],
            },
            strings: HashMap::new(),
            functions: HashMap::new(),
            stacks: HashMap::new(),
            attributes: HashMap::new(),
        };
        d.string("");
        d
    }

    fn string(&mut self, s: &str) -> i32 {
        if let Some(&i) = self.strings.get(s) {
            return i;
        }
        let i = index(self.tables.string_table.len());
        self.tables.string_table.push(s.to_owned());
        self.strings.insert(s.to_owned(), i);
        i
    }

    fn value_type(&mut self, kind: &str, unit: &str) -> otlp::ValueType {
        otlp::ValueType {
            type_strindex: self.string(kind),
            unit_strindex: self.string(unit),
        }
    }

    /// Interns an attribute; only string and integer values are used.
    fn attribute(&mut self, key: &str, value: Value, unit: &str) -> i32 {
        let value_key = match &value {
            Value::StringValue(s) => format!("s{s}"),
            Value::IntValue(n) => format!("i{n}"),
            other => format!("{other:?}"),
        };
        let (key, unit) = (self.string(key), self.string(unit));
        if let Some(&i) = self.attributes.get(&(key, value_key.clone(), unit)) {
            return i;
        }
        let i = index(self.tables.attribute_table.len());
        self.tables.attribute_table.push(otlp::KeyValueAndUnit {
            key_strindex: key,
            value: Some(AnyValue { value: Some(value) }),
            unit_strindex: unit,
        });
        self.attributes.insert((key, value_key, unit), i);
        i
    }

    fn stack(&mut self, locations: Vec<i32>) -> i32 {
        if let Some(&i) = self.stacks.get(&locations) {
            return i;
        }
        let i = index(self.tables.stack_table.len());
        self.tables.stack_table.push(otlp::Stack {
            location_indices: locations.clone(),
        });
        self.stacks.insert(locations, i);
        i
    }

    fn function(&mut self, name: &str, file: &str) -> i32 {
        let key = (self.string(name), self.string(file));
        if let Some(&i) = self.functions.get(&key) {
            return i;
        }
        let i = index(self.tables.function_table.len());
        self.tables.function_table.push(otlp::Function {
            name_strindex: key.0,
            system_name_strindex: key.0,
            filename_strindex: key.1,
            start_line: 0,
        });
        self.functions.insert(key, i);
        i
    }

    /// Adds the profile's mappings and locations; returns the dictionary
    /// index of each of the profile's locations.
    fn add_locations(&mut self, profile: &Profile) -> Vec<i32> {
        let mapping_base = self.tables.mapping_table.len();
        for m in &profile.mappings {
            let filename_strindex = self.string(&m.file);
            let attribute_indices = if m.build_id.is_empty() {
                Vec::new()
            } else {
                let id = Value::StringValue(m.build_id.clone());
                vec![self.attribute("process.executable.build_id.gnu", id, "")]
            };
            self.tables.mapping_table.push(otlp::Mapping {
                memory_start: m.start,
                memory_limit: m.limit,
                file_offset: m.offset,
                filename_strindex,
                attribute_indices,
            });
        }
        let mut indices = Vec::with_capacity(profile.locations.len());
        for loc in &profile.locations {
            let frame_type = match loc.kind {
                LocationKind::Kernel => "kernel",
                LocationKind::Python => "cpython",
                LocationKind::User | LocationKind::Marker => "native",
            };
            let frame_type = self.attribute(
                "profile.frame.type",
                Value::StringValue(frame_type.into()),
                "",
            );
            let lines = if loc.frames.is_empty() {
                // Unsymbolized: the `object+0xOFFSET` name every writer shows.
                let name = profile.unresolved_name(loc);
                vec![otlp::Line {
                    function_index: self.function(&name, ""),
                    ..Default::default()
                }]
            } else {
                // Inlining is the order of the lines, the kernel is the
                // frame type: names stay as the symbolizer gave them.
                loc.frames
                    .iter()
                    .map(|f| otlp::Line {
                        function_index: self.function(&f.function, &f.file),
                        line: f.line,
                        column: 0,
                    })
                    .collect()
            };
            indices.push(index(self.tables.location_table.len()));
            self.tables.location_table.push(otlp::Location {
                mapping_index: loc.mapping.map_or(0, |m| index(mapping_base + m)),
                address: loc.address,
                lines,
                attribute_indices: vec![frame_type],
            });
        }
        indices
    }
}
