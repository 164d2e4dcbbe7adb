//! pprof's profile.proto, gzip-compressed: encoding our [`Profile`] and
//! decoding any tool's file into it.
mod proto;

use std::{collections::HashMap, io::Read as _, io::Write as _};

use anyhow::{Context as _, bail};
use prost::Message as _;

use crate::profile::{
    Frame, Label, LabelValue, Location, LocationKind, Mapping, Profile, Sample, SampleType,
};

/// Interns strings into pprof's string table (index 0 is "").
#[derive(Default)]
struct Strings {
    table: Vec<String>,
    index: HashMap<String, i64>,
}

impl Strings {
    fn new() -> Self {
        let mut s = Self::default();
        s.get("");
        s
    }
    fn get(&mut self, s: &str) -> i64 {
        if let Some(&i) = self.index.get(s) {
            return i;
        }
        let i = self.table.len() as i64;
        self.table.push(s.to_owned());
        self.index.insert(s.to_owned(), i);
        i
    }
}

/// The profile as a gzip-compressed profile.proto message.
pub fn encode(profile: &Profile) -> anyhow::Result<Vec<u8>> {
    let message = to_proto(profile);
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    gz.write_all(&message.encode_to_vec())?;
    Ok(gz.finish()?)
}

fn to_proto(profile: &Profile) -> proto::Profile {
    let mut strings = Strings::new();
    let value_type = |s: &mut Strings, t: &SampleType| proto::ValueType {
        r#type: s.get(&t.kind),
        unit: s.get(&t.unit),
    };
    let sample_type = profile
        .sample_types
        .iter()
        .map(|t| value_type(&mut strings, t))
        .collect();
    let mut mapping: Vec<proto::Mapping> = profile
        .mappings
        .iter()
        .enumerate()
        .map(|(i, m)| proto::Mapping {
            id: i as u64 + 1,
            memory_start: m.start,
            memory_limit: m.limit,
            file_offset: m.offset,
            filename: strings.get(&m.file),
            build_id: strings.get(&m.build_id),
            ..Default::default()
        })
        .collect();
    let mut functions: Vec<proto::Function> = Vec::new();
    let mut function_ids: HashMap<(String, String), u64> = HashMap::new();
    let mut location = Vec::with_capacity(profile.locations.len());
    for (i, loc) in profile.locations.iter().enumerate() {
        let mut line = Vec::with_capacity(loc.frames.len());
        for f in &loc.frames {
            // Inlining is pprof's own (several lines per location); the
            // kernel is marked in the name, as in every other output.
            let name = if loc.kind == LocationKind::Kernel && !f.function.ends_with("_[k]") {
                format!("{}_[k]", f.function)
            } else {
                f.function.clone()
            };
            let key = (name, f.file.clone());
            let id = match function_ids.get(&key) {
                Some(&id) => id,
                None => {
                    let id = functions.len() as u64 + 1;
                    functions.push(proto::Function {
                        id,
                        name: strings.get(&key.0),
                        system_name: strings.get(&key.0),
                        filename: strings.get(&key.1),
                        start_line: 0,
                    });
                    function_ids.insert(key, id);
                    id
                }
            };
            line.push(proto::Line {
                function_id: id,
                line: f.line,
                column: 0,
            });
        }
        if let Some(m) = loc.mapping.and_then(|m| mapping.get_mut(m))
            && !loc.frames.is_empty()
        {
            m.has_functions = true;
            m.has_filenames |= loc.frames.iter().any(|f| !f.file.is_empty());
            m.has_line_numbers |= loc.frames.iter().any(|f| f.line != 0);
            m.has_inline_frames |= loc.frames.len() > 1;
        }
        location.push(proto::Location {
            id: i as u64 + 1,
            mapping_id: loc.mapping.map_or(0, |m| m as u64 + 1),
            address: loc.address,
            line,
            is_folded: false,
        });
    }
    let sample = profile
        .samples
        .iter()
        .map(|s| proto::Sample {
            location_id: s.locations.iter().map(|&l| l as u64 + 1).collect(),
            value: s.values.clone(),
            label: s
                .labels
                .iter()
                .map(|l| match &l.value {
                    LabelValue::Str(v) => proto::Label {
                        key: strings.get(&l.key),
                        str: strings.get(v),
                        ..Default::default()
                    },
                    LabelValue::Num(n, unit) => proto::Label {
                        key: strings.get(&l.key),
                        num: *n,
                        num_unit: if unit.is_empty() {
                            0
                        } else {
                            strings.get(unit)
                        },
                        ..Default::default()
                    },
                })
                .collect(),
        })
        .collect();
    let period_type = profile
        .period_type
        .as_ref()
        .map(|t| value_type(&mut strings, t));
    let comment = profile.comments.iter().map(|c| strings.get(c)).collect();
    let default_sample_type = if profile.default_sample_type.is_empty() {
        0
    } else {
        strings.get(&profile.default_sample_type)
    };
    proto::Profile {
        sample_type,
        sample,
        mapping,
        location,
        function: functions,
        string_table: strings.table,
        time_nanos: profile.time_nanos,
        duration_nanos: profile.duration_nanos,
        period_type,
        period: profile.period,
        comment,
        default_sample_type,
        ..Default::default()
    }
}

/// Whether `data` starts like a gzip stream.
pub fn is_gzip(data: &[u8]) -> bool {
    data.starts_with(&[0x1f, 0x8b])
}

/// Decodes a pprof file (gzip-compressed or not).
pub fn decode(data: &[u8]) -> anyhow::Result<Profile> {
    let raw;
    let bytes = if is_gzip(data) {
        let mut out = Vec::new();
        flate2::read::MultiGzDecoder::new(data)
            .read_to_end(&mut out)
            .context("bad gzip data (truncated or corrupt)")?;
        raw = out;
        &raw[..]
    } else {
        data
    };
    let message = proto::Profile::decode(bytes).context("not a pprof profile")?;
    from_proto(message)
}

fn from_proto(p: proto::Profile) -> anyhow::Result<Profile> {
    let table = &p.string_table;
    if table.first().is_none_or(|s| !s.is_empty()) {
        bail!("not a pprof profile (its string table does not start with \"\")");
    }
    let string = |i: i64| -> anyhow::Result<String> {
        usize::try_from(i)
            .ok()
            .and_then(|i| table.get(i))
            .cloned()
            .with_context(|| format!("corrupt pprof profile: string index {i} out of range"))
    };
    let value_type = |v: &proto::ValueType| -> anyhow::Result<SampleType> {
        Ok(SampleType::new(string(v.r#type)?, string(v.unit)?))
    };
    if p.sample_type.is_empty() {
        bail!("not a pprof profile (no sample types)");
    }
    let sample_types = p
        .sample_type
        .iter()
        .map(value_type)
        .collect::<anyhow::Result<Vec<_>>>()?;
    let mut mapping_index = HashMap::new();
    let mut mappings = Vec::with_capacity(p.mapping.len());
    for m in &p.mapping {
        mapping_index.insert(m.id, mappings.len());
        mappings.push(Mapping {
            start: m.memory_start,
            limit: m.memory_limit,
            offset: m.file_offset,
            file: string(m.filename)?,
            build_id: string(m.build_id)?,
            local_path: None,
        });
    }
    let mut functions = HashMap::new();
    for f in &p.function {
        let name = string(f.name)?;
        let name = if name.is_empty() {
            string(f.system_name)?
        } else {
            name
        };
        functions.insert(f.id, (name, string(f.filename)?));
    }
    let mut location_index = HashMap::new();
    let mut locations = Vec::with_capacity(p.location.len());
    for l in &p.location {
        let mapping = if l.mapping_id == 0 {
            None
        } else {
            Some(*mapping_index.get(&l.mapping_id).with_context(|| {
                format!(
                    "corrupt pprof profile: location {} names unknown mapping {}",
                    l.id, l.mapping_id
                )
            })?)
        };
        let kernel = mapping.is_some_and(|m: usize| {
            let file = &mappings[m].file;
            file.starts_with("[kernel") || file == "[vmlinux]"
        });
        let n = l.line.len();
        let frames = l
            .line
            .iter()
            .enumerate()
            .map(|(i, line)| {
                let (function, file) =
                    functions.get(&line.function_id).cloned().with_context(|| {
                        format!(
                            "corrupt pprof profile: unknown function {}",
                            line.function_id
                        )
                    })?;
                Ok(Frame {
                    function,
                    file,
                    line: line.line,
                    inlined: i + 1 < n,
                })
            })
            .collect::<anyhow::Result<Vec<_>>>()?;
        location_index.insert(l.id, locations.len());
        locations.push(Location {
            mapping,
            address: l.address,
            kind: if kernel {
                LocationKind::Kernel
            } else {
                LocationKind::User
            },
            frames,
        });
    }
    let mut samples = Vec::with_capacity(p.sample.len());
    for s in &p.sample {
        if s.value.len() != sample_types.len() {
            bail!(
                "corrupt pprof profile: a sample has {} values for {} sample types",
                s.value.len(),
                sample_types.len()
            );
        }
        let locations = s
            .location_id
            .iter()
            .map(|id| {
                location_index
                    .get(id)
                    .copied()
                    .with_context(|| format!("corrupt pprof profile: unknown location {id}"))
            })
            .collect::<anyhow::Result<Vec<_>>>()?;
        let labels = s
            .label
            .iter()
            .map(|l| {
                Ok(if l.str != 0 {
                    Label::str(string(l.key)?, string(l.str)?)
                } else {
                    Label::num(string(l.key)?, l.num, string(l.num_unit)?)
                })
            })
            .collect::<anyhow::Result<Vec<_>>>()?;
        samples.push(Sample {
            locations,
            values: s.value.clone(),
            labels,
        });
    }
    Ok(Profile {
        sample_types,
        default_sample_type: string(p.default_sample_type)?,
        period_type: p.period_type.as_ref().map(value_type).transpose()?,
        period: p.period,
        comments: p
            .comment
            .iter()
            .map(|&c| string(c))
            .collect::<anyhow::Result<_>>()?,
        time_nanos: p.time_nanos,
        duration_nanos: p.duration_nanos,
        mappings,
        locations,
        samples,
    })
}
