//! The pprof reader: any tool's `profile.proto` message (already
//! decompressed) into our [`Profile`].
//!
//! Strings are read lossily, as `go tool pprof` does: an invalid UTF-8 byte
//! in one symbol becomes U+FFFD instead of rejecting the file.
use std::collections::HashMap;

use anyhow::{Context as _, bail};
use prost::Message as _;

use crate::profile::{
    Frame, Label, Location, LocationKind, Mapping, Profile, Sample, SampleType, proto,
};

/// Decodes an uncompressed profile.proto message.
pub(crate) fn decode(bytes: &[u8]) -> anyhow::Result<Profile> {
    let message = proto::Profile::decode(bytes).context("not a pprof profile")?;
    from_proto(&message)
}

/// The string table, decoded once.
struct Strings(Vec<String>);

impl Strings {
    fn new(table: &[Vec<u8>]) -> anyhow::Result<Self> {
        if table.first().is_none_or(|s| !s.is_empty()) {
            bail!("not a pprof profile (its string table does not start with \"\")");
        }
        Ok(Self(
            table
                .iter()
                .map(|s| String::from_utf8_lossy(s).into_owned())
                .collect(),
        ))
    }

    fn get(&self, i: i64) -> anyhow::Result<String> {
        usize::try_from(i)
            .ok()
            .and_then(|i| self.0.get(i))
            .cloned()
            .with_context(|| format!("corrupt pprof profile: string index {i} out of range"))
    }

    fn value_type(&self, v: &proto::ValueType) -> anyhow::Result<SampleType> {
        Ok(SampleType::new(self.get(v.r#type)?, self.get(v.unit)?))
    }
}

fn from_proto(p: &proto::Profile) -> anyhow::Result<Profile> {
    let strings = Strings::new(&p.string_table)?;
    if p.sample_type.is_empty() {
        bail!("not a pprof profile (no sample types)");
    }
    let sample_types = p
        .sample_type
        .iter()
        .map(|t| strings.value_type(t))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let (mappings, mapping_index) = mappings(p, &strings)?;
    let (locations, location_index) = locations(p, &strings, &mappings, &mapping_index)?;
    let samples = p
        .sample
        .iter()
        .map(|s| sample(s, &strings, sample_types.len(), &location_index))
        .collect::<anyhow::Result<Vec<_>>>()?;
    Ok(Profile {
        sample_types,
        default_sample_type: strings.get(p.default_sample_type)?,
        period_type: p
            .period_type
            .as_ref()
            .map(|t| strings.value_type(t))
            .transpose()?,
        period: p.period,
        comments: p
            .comment
            .iter()
            .map(|&c| strings.get(c))
            .collect::<anyhow::Result<_>>()?,
        time_nanos: p.time_nanos,
        duration_nanos: p.duration_nanos,
        mappings,
        locations,
        samples,
    })
}

/// The mappings, and our index of each pprof mapping id.
fn mappings(
    p: &proto::Profile,
    strings: &Strings,
) -> anyhow::Result<(Vec<Mapping>, HashMap<u64, usize>)> {
    let mut index = HashMap::new();
    let mut mappings = Vec::with_capacity(p.mapping.len());
    for m in &p.mapping {
        index.insert(m.id, mappings.len());
        mappings.push(Mapping {
            start: m.memory_start,
            limit: m.memory_limit,
            offset: m.file_offset,
            file: strings.get(m.filename)?,
            build_id: strings.get(m.build_id)?,
            local_path: None,
        });
    }
    Ok((mappings, index))
}

/// Whether a mapping's file names the kernel (ours, perf's, Parca's).
fn is_kernel_file(file: &str) -> bool {
    file.starts_with("[kernel") || file == "[vmlinux]"
}

/// The locations with their frames, and our index of each pprof location id.
fn locations(
    p: &proto::Profile,
    strings: &Strings,
    mappings: &[Mapping],
    mapping_index: &HashMap<u64, usize>,
) -> anyhow::Result<(Vec<Location>, HashMap<u64, usize>)> {
    let mut functions = HashMap::new();
    for f in &p.function {
        let name = strings.get(f.name)?;
        let name = if name.is_empty() {
            strings.get(f.system_name)?
        } else {
            name
        };
        functions.insert(f.id, (name, strings.get(f.filename)?));
    }
    let mut index = HashMap::new();
    let mut locations = Vec::with_capacity(p.location.len());
    for l in &p.location {
        let mapping = match l.mapping_id {
            0 => None,
            id => Some(*mapping_index.get(&id).with_context(|| {
                format!(
                    "corrupt pprof profile: location {} names unknown mapping {id}",
                    l.id
                )
            })?),
        };
        let file = mapping.map(|m| mappings[m].file.as_str());
        let kernel = file.is_some_and(is_kernel_file);
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
        index.insert(l.id, locations.len());
        locations.push(Location {
            mapping,
            address: l.address,
            kind: if kernel {
                LocationKind::Kernel
            } else if file == Some(crate::profile::PYTHON_MAPPING) {
                LocationKind::Python
            } else {
                LocationKind::User
            },
            frames,
        });
    }
    Ok((locations, index))
}

fn sample(
    s: &proto::Sample,
    strings: &Strings,
    sample_types: usize,
    location_index: &HashMap<u64, usize>,
) -> anyhow::Result<Sample> {
    if s.value.len() != sample_types {
        bail!(
            "corrupt pprof profile: a sample has {} values for {sample_types} sample types",
            s.value.len(),
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
                Label::str(strings.get(l.key)?, strings.get(l.str)?)
            } else {
                Label::num(strings.get(l.key)?, l.num, strings.get(l.num_unit)?)
            })
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    Ok(Sample {
        locations,
        values: s.value.clone(),
        labels,
    })
}
