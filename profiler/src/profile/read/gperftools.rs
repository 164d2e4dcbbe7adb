//! gperftools' legacy profile formats.
//!
//! Heap profiles (`HEAPPROFILE`, heap-profile-table.cc) are text:
//! ```text
//! heap profile:   IN_OBJS:  IN_BYTES [ ALLOC_OBJS: ALLOC_BYTES] @ heapprofile
//!      1:      100 [     1:      100] @ 0x4006b1 0x7f1e2a43a24a
//! MAPPED_LIBRARIES:
//! <the process's /proc/self/maps>
//! ```
//! `@ heap_v2/N` marks a sampled profile (one sample per N bytes on
//! average), whose counts are scaled back up as pprof does.
//!
//! CPU profiles (`CPUPROFILE`, profiledata.cc) are native-endian machine
//! words: a header `0, 3, 0, period_us, 0`, records `count, depth, pc...`,
//! a trailer `0, 1, 0`, then the maps text. The first pc of a record is
//! where the signal hit; the others are return addresses.
use anyhow::{Context as _, bail};

use crate::{
    process,
    profile::{Location, Mapping, Profile, Sample, SampleType},
};

/// Builds mappings from `/proc/self/maps` text and places addresses in them.
struct AddressSpace {
    profile: Profile,
    /// Executable mappings' (start, end, mapping index), sorted.
    ranges: Vec<(u64, u64, usize)>,
    locations: std::collections::HashMap<u64, usize>,
}

impl AddressSpace {
    fn new(profile: Profile, maps_text: &str) -> Self {
        let mut profile = profile;
        let mut ranges = Vec::new();
        for m in process::parse_maps(maps_text)
            .into_iter()
            .filter(|m| m.is_executable())
        {
            ranges.push((m.start, m.end, profile.mappings.len()));
            profile.mappings.push(Mapping {
                start: m.start,
                limit: m.end,
                offset: m.offset,
                file: m.path.clone(),
                ..Mapping::default()
            });
        }
        ranges.sort_unstable();
        Self {
            profile,
            ranges,
            locations: Default::default(),
        }
    }

    /// The location of `addr` (already adjusted to the call instruction).
    fn location(&mut self, addr: u64) -> usize {
        if let Some(&l) = self.locations.get(&addr) {
            return l;
        }
        let i = self.ranges.partition_point(|r| r.1 <= addr);
        let mapping = self.ranges.get(i).filter(|r| r.0 <= addr).map(|r| r.2);
        self.profile.locations.push(Location {
            mapping,
            address: addr,
            ..Location::default()
        });
        let l = self.profile.locations.len() - 1;
        self.locations.insert(addr, l);
        l
    }
}

pub(super) fn parse_heap(data: &[u8]) -> anyhow::Result<Profile> {
    let text = std::str::from_utf8(data).context("bad gperftools heap profile: not text")?;
    let (body, maps) = match text.find("\nMAPPED_LIBRARIES:") {
        Some(i) => {
            let rest = &text[i + 1..];
            (&text[..i], rest.split_once('\n').map_or("", |r| r.1))
        }
        None => (text, ""),
    };
    let mut lines = body.lines();
    let header = lines.next().unwrap_or("");
    let (_, kind) = header
        .split_once('@')
        .context("bad gperftools heap profile: no `@` in the header line")?;
    let kind = kind.trim();
    // heap_v2/N: sampled every N bytes on average.
    let sample_period: Option<f64> = match kind.strip_prefix("heap_v2/") {
        Some(n) => Some(
            n.parse::<f64>()
                .ok()
                .filter(|n| *n > 0.0)
                .with_context(|| format!("bad gperftools heap profile: sampling period `{n}`"))?,
        ),
        None => None,
    };
    let profile = Profile {
        sample_types: vec![
            SampleType::alloc_objects(),
            SampleType::alloc_space(),
            SampleType::inuse_objects(),
            SampleType::inuse_space(),
        ],
        default_sample_type: "inuse_space".to_owned(),
        period_type: Some(SampleType::new("space", "bytes")),
        period: sample_period.map_or(0, |p| p as i64),
        comments: vec![format!("gperftools heap profile ({kind})")],
        ..Profile::default()
    };
    let mut space = AddressSpace::new(profile, maps);
    for (n, line) in lines.enumerate() {
        let line = line.trim();
        if line.is_empty() {
            continue;
        }
        let bad = || format!("bad gperftools heap profile: line {}: `{line}`", n + 2);
        let (counts, stack) = line.split_once('@').with_context(bad)?;
        let nums: Vec<i64> = counts
            .split(|c: char| c == ':' || c == '[' || c == ']' || c.is_whitespace())
            .filter(|s| !s.is_empty())
            .map(str::parse)
            .collect::<Result<_, _>>()
            .ok()
            .with_context(bad)?;
        let [inuse_objs, inuse_bytes, alloc_objs, alloc_bytes] = nums[..] else {
            bail!(bad());
        };
        let (inuse_objs, inuse_bytes) = unsample(inuse_objs, inuse_bytes, sample_period);
        let (alloc_objs, alloc_bytes) = unsample(alloc_objs, alloc_bytes, sample_period);
        let mut locations = Vec::new();
        for a in stack.split_whitespace() {
            let addr = u64::from_str_radix(a.trim_start_matches("0x"), 16)
                .ok()
                .with_context(bad)?;
            // Every address is a return address: look up the call.
            locations.push(space.location(addr.saturating_sub(1)));
        }
        space.profile.samples.push(Sample {
            locations,
            values: vec![alloc_objs, alloc_bytes, inuse_objs, inuse_bytes],
            labels: Vec::new(),
        });
    }
    Ok(space.profile)
}

/// Undoes the sampling of a heap_v2 profile: an allocation of average size
/// S is sampled with probability 1 - exp(-S/N).
fn unsample(count: i64, bytes: i64, period: Option<f64>) -> (i64, i64) {
    let Some(period) = period else {
        return (count, bytes);
    };
    if count == 0 || bytes == 0 {
        return (count, bytes);
    }
    let avg = bytes as f64 / count as f64;
    let scale = 1.0 / (1.0 - (-avg / period).exp());
    (
        (count as f64 * scale).round() as i64,
        (bytes as f64 * scale).round() as i64,
    )
}

const WORD: usize = 8;

fn word(data: &[u8], i: usize) -> Option<u64> {
    let bytes = data.get(i * WORD..(i + 1) * WORD)?;
    Some(u64::from_ne_bytes(bytes.try_into().ok()?))
}

/// Whether `data` starts with the header of a 64-bit gperftools CPU profile.
pub(super) fn is_cpu_profile(data: &[u8]) -> bool {
    word(data, 0) == Some(0) && word(data, 1) == Some(3) && word(data, 2) == Some(0)
}

pub(super) fn parse_cpu(data: &[u8]) -> anyhow::Result<Profile> {
    let truncated = || "bad gperftools CPU profile: truncated";
    let period_us = word(data, 3).with_context(truncated)?;
    if period_us == 0 {
        bail!("bad gperftools CPU profile: sampling period 0");
    }
    let period_ns = period_us
        .checked_mul(1000)
        .and_then(|ns| i64::try_from(ns).ok())
        .with_context(|| format!("bad gperftools CPU profile: sampling period {period_us} us"))?;
    let header_words = 5;
    let mut records: Vec<(u64, Vec<u64>)> = Vec::new();
    let mut i = header_words;
    loop {
        let count = word(data, i).with_context(truncated)?;
        let depth = word(data, i + 1).with_context(truncated)?;
        if count == 0 && depth == 1 && word(data, i + 2) == Some(0) {
            i += 3;
            break;
        }
        let depth = usize::try_from(depth)
            .ok()
            .filter(|&d| d <= 1024)
            .context("bad gperftools CPU profile: stack depth out of range")?;
        let pcs = (0..depth)
            .map(|k| word(data, i + 2 + k))
            .collect::<Option<Vec<_>>>()
            .with_context(truncated)?;
        records.push((count, pcs));
        i += 2 + depth;
    }
    let maps = String::from_utf8_lossy(data.get(i * WORD..).unwrap_or(&[]));
    let profile = Profile {
        sample_types: vec![SampleType::samples(), SampleType::cpu()],
        default_sample_type: "cpu".to_owned(),
        period_type: Some(SampleType::cpu()),
        period: period_ns,
        comments: vec![format!(
            "gperftools CPU profile, {} Hz",
            1_000_000 / period_us.max(1)
        )],
        ..Profile::default()
    };
    let mut space = AddressSpace::new(profile, &maps);
    for (count, pcs) in records {
        let count = i64::try_from(count).context("bad gperftools CPU profile: sample count")?;
        let locations = pcs
            .iter()
            .enumerate()
            .map(|(k, &pc)| space.location(if k == 0 { pc } else { pc.saturating_sub(1) }))
            .collect();
        space.profile.samples.push(Sample {
            locations,
            values: vec![count, count.saturating_mul(period_ns)],
            labels: Vec::new(),
        });
    }
    Ok(space.profile)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn heap_profile_with_maps() {
        let text = "heap profile:      2:      300 [     5:      900] @ heapprofile\n\
                    \x20    2:      300 [     5:      900] @ 0x401005 0x7f0000001234\n\
                    \n\
                    MAPPED_LIBRARIES:\n\
                    00400000-00402000 r-xp 00000000 fe:01 11 /usr/bin/app\n\
                    7f0000000000-7f0000010000 r-xp 00001000 fe:01 12 /usr/lib/libx.so\n";
        let p = parse_heap(text.as_bytes()).unwrap();
        assert_eq!(p.samples.len(), 1);
        assert_eq!(p.samples[0].values, vec![5, 900, 2, 300]);
        assert_eq!(p.default_sample_type, "inuse_space");
        // Return addresses minus one, placed in their mappings.
        let locs: Vec<_> = p.samples[0]
            .locations
            .iter()
            .map(|&l| &p.locations[l])
            .collect();
        assert_eq!(locs[0].address, 0x401004);
        assert_eq!(
            p.mappings[locs[1].mapping.unwrap()].file,
            "/usr/lib/libx.so"
        );
        assert_eq!(p.unresolved_name(locs[1]), "libx.so+0x2233");
    }

    #[test]
    fn sampled_heap_profile_is_scaled_up() {
        // Average size equal to the period: probability 1 - 1/e.
        let text = "heap profile: 3: 1572864 [ 3: 1572864] @ heap_v2/524288\n\
                    \x20 3: 1572864 [ 3: 1572864] @ 0x1000\n";
        let p = parse_heap(text.as_bytes()).unwrap();
        assert_eq!(p.samples[0].values, vec![5, 2_488_234, 5, 2_488_234]);
        assert_eq!(p.period, 524288);
    }

    #[test]
    fn cpu_profile_words() {
        let words: [u64; 14] = [0, 3, 0, 10_000, 0, 7, 2, 0x401000, 0x401100, 0, 1, 0, 0, 0];
        let mut data: Vec<u8> = words[..12].iter().flat_map(|w| w.to_ne_bytes()).collect();
        data.extend_from_slice(b"00400000-00402000 r-xp 00000000 fe:01 11 /usr/bin/app\n");
        assert!(is_cpu_profile(&data));
        let p = parse_cpu(&data).unwrap();
        assert_eq!(p.samples[0].values, vec![7, 70_000_000]);
        let addrs: Vec<u64> = p.samples[0]
            .locations
            .iter()
            .map(|&l| p.locations[l].address)
            .collect();
        // The pc as is, the return address minus one.
        assert_eq!(addrs, vec![0x401000, 0x4010ff]);
        assert!(
            parse_cpu(&data[..60])
                .unwrap_err()
                .to_string()
                .contains("truncated")
        );
    }
}
