//! Fuzzing of the profile readers and the writers behind them, from a fixed
//! seed corpus and a fixed random seed, for a set time.
//!
//! Three properties, each given a third of the time:
//! - generated profiles survive pprof encoding and reading back unchanged,
//!   and every writer accepts them;
//! - seed files (pprof raw and gzip-compressed, gperftools heap and CPU
//!   profiles) with random mutations never panic a reader, and every error
//!   is one line;
//! - random bytes, likewise.
//!
//! `PROF_BPF_FUZZ_SECONDS` sets the time (default 60); `0` runs a few cases
//! only.
use std::{
    io::Write as _,
    time::{Duration, Instant},
};

use profiler::{
    output::{Format, OutputArgs, pprof},
    profile::{Frame, Label, Location, LocationKind, Mapping, Profile, Sample, SampleType, read},
};
use proptest::{
    prelude::*,
    sample::Index,
    strategy::ValueTree as _,
    test_runner::{Config, RngAlgorithm, TestCaseError, TestRng, TestRunner},
};

/// The cap given to the readers: small, so that a mutated length or a
/// decompression bomb hits it quickly.
const MAX_INPUT: u64 = 4 << 20;

fn duration() -> Duration {
    let seconds = std::env::var("PROF_BPF_FUZZ_SECONDS")
        .ok()
        .map(|s| {
            s.parse::<f64>()
                .expect("PROF_BPF_FUZZ_SECONDS: a number of seconds")
        })
        .unwrap_or(60.0);
    Duration::from_secs_f64(seconds)
}

/// A runner with a fixed seed, so that a failure reproduces.
fn runner(seed: u8) -> TestRunner {
    let config = Config {
        failure_persistence: None,
        ..Config::default()
    };
    TestRunner::new_with_rng(
        config,
        TestRng::from_seed(RngAlgorithm::ChaCha, &[seed; 32]),
    )
}

/// Runs `test` on values of `strategy` until `time` has passed (at least 16
/// cases); panics with the shrunk input on failure.
fn run_for<S: Strategy>(
    time: Duration,
    seed: u8,
    strategy: S,
    test: impl Fn(S::Value) -> Result<(), TestCaseError>,
) where
    S::Value: std::fmt::Debug,
{
    let mut runner = runner(seed);
    let deadline = Instant::now() + time;
    let mut cases = 0;
    while cases < 16 || Instant::now() < deadline {
        let case = strategy
            .new_tree(&mut runner)
            .expect("a strategy without filters");
        if let Err(e) = runner.run_one(case, &test) {
            panic!("fuzz seed {seed}: {e}");
        }
        cases += 1;
    }
    eprintln!("fuzz seed {seed}: {cases} cases");
}

/// Names with the characters the writers must cope with.
fn name() -> impl Strategy<Value = String> {
    prop_oneof![
        "[a-z_:<>]{1,12}",
        Just("a;b\nc\r\"\\d".to_owned()),
        Just(String::new()),
        any::<String>(),
    ]
}

fn value() -> impl Strategy<Value = i64> {
    prop_oneof![-1000i64..1000, Just(i64::MAX), Just(i64::MIN), any::<i64>()]
}

type RawLocation = (Option<Index>, u64, Vec<(String, String, i64)>);
type RawSample = (Vec<Index>, Vec<i64>, Vec<(String, bool, String, i64)>);

/// Profiles whose indices are all in range, as the model requires.
fn profile() -> impl Strategy<Value = Profile> {
    let mapping = (
        any::<u64>(),
        any::<u64>(),
        name(),
        "[0-9a-f]{0,40}",
        any::<bool>(),
    );
    let location = (
        any::<Option<Index>>(),
        any::<u64>(),
        prop::collection::vec((name(), name(), any::<i64>()), 0..3),
    );
    let label = ("[a-z]{1,6}", any::<bool>(), "[a-z0-9]{1,6}", value());
    let sample = (
        prop::collection::vec(any::<Index>(), 0..8),
        prop::collection::vec(value(), 3),
        prop::collection::vec(label, 0..3),
    );
    (
        prop::collection::vec(("[a-z_]{1,8}", "[a-z]{0,6}"), 1..4),
        prop::collection::vec(mapping, 0..4),
        prop::collection::vec(location, 1..12),
        prop::collection::vec(sample, 0..20),
        prop::collection::vec(name(), 0..3),
        any::<Index>(),
    )
        .prop_map(|(types, mappings, locations, samples, comments, default)| {
            build(types, mappings, locations, samples, comments, default)
        })
}

fn build(
    types: Vec<(String, String)>,
    mappings: Vec<(u64, u64, String, String, bool)>,
    locations: Vec<RawLocation>,
    samples: Vec<RawSample>,
    comments: Vec<String>,
    default: Index,
) -> Profile {
    let mappings: Vec<Mapping> = mappings
        .into_iter()
        .map(|(start, size, file, build_id, kernel)| Mapping {
            start,
            limit: start.saturating_add(size),
            offset: 0,
            file: if kernel {
                Mapping::KERNEL.to_owned()
            } else {
                file
            },
            build_id,
            local_path: None,
        })
        .collect();
    let locations: Vec<Location> = locations
        .into_iter()
        .map(|(mapping, address, frames)| {
            let mapping = mapping
                .filter(|_| !mappings.is_empty())
                .map(|i| i.index(mappings.len()));
            let n = frames.len();
            Location {
                mapping,
                address,
                kind: match mapping {
                    Some(m) if mappings[m].is_kernel() => LocationKind::Kernel,
                    _ => LocationKind::User,
                },
                frames: frames
                    .into_iter()
                    .enumerate()
                    .map(|(i, (function, file, line))| Frame {
                        function,
                        file,
                        line,
                        inlined: i + 1 < n,
                    })
                    .collect(),
            }
        })
        .collect();
    let samples = samples
        .into_iter()
        .map(|(locs, mut values, labels)| {
            values.truncate(types.len());
            Sample {
                locations: locs.iter().map(|i| i.index(locations.len())).collect(),
                values,
                labels: labels
                    .into_iter()
                    .map(|(key, is_str, s, n)| {
                        if is_str {
                            Label::str(key, s)
                        } else {
                            Label::num(key, n, "")
                        }
                    })
                    .collect(),
            }
        })
        .collect();
    let default_sample_type = types[default.index(types.len())].0.clone();
    Profile {
        sample_types: types
            .into_iter()
            .map(|(k, u)| SampleType::new(k, u))
            .collect(),
        default_sample_type,
        comments,
        mappings,
        locations,
        samples,
        ..Profile::default()
    }
}

/// A location as (mapping file, function names, address).
type PlacedLocation = (String, Vec<String>, u64);

/// What a profile says, independent of how its tables are ordered: per
/// sample its values, stack and labels.
fn meaning(p: &Profile) -> Vec<(Vec<i64>, Vec<PlacedLocation>, Vec<Label>)> {
    p.samples
        .iter()
        .map(|s| {
            let stack = s
                .locations
                .iter()
                .map(|&l| {
                    let loc = &p.locations[l];
                    let file = loc
                        .mapping
                        .map_or(String::new(), |m| p.mappings[m].file.clone());
                    (
                        file,
                        loc.frames.iter().map(|f| f.function.clone()).collect(),
                        loc.address,
                    )
                })
                .collect();
            (s.values.clone(), stack, s.labels.clone())
        })
        .collect()
}

/// Every writer, to /dev/null; they must all succeed on a valid profile.
fn write_all(p: &Profile) -> Result<(), String> {
    for format in [
        Format::Text,
        Format::Folded,
        Format::Svg,
        Format::Callgraph,
        Format::Pprof,
    ] {
        OutputArgs {
            format: Some(format),
            output: Some("/dev/null".into()),
            ..OutputArgs::default()
        }
        .check(&[])
        .and_then(|plan| plan.write(p))
        .map_err(|e| format!("{format:?}: {e:#}"))?;
    }
    Ok(())
}

/// Reads `bytes`; an error must be one line, a profile must be writable.
fn read_checked(bytes: &[u8]) -> Result<(), TestCaseError> {
    match read::from_bytes(bytes, MAX_INPUT) {
        Ok(p) => write_all(&p).map_err(TestCaseError::fail),
        Err(e) => {
            let message = format!("{e:#}");
            prop_assert!(!message.contains('\n'), "multi-line error: {message}");
            prop_assert!(!message.is_empty());
            Ok(())
        }
    }
}

fn gzip(data: &[u8]) -> Vec<u8> {
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    gz.write_all(data).unwrap();
    gz.finish().unwrap()
}

fn gunzip(data: &[u8]) -> Vec<u8> {
    use std::io::Read as _;
    let mut out = Vec::new();
    flate2::read::GzDecoder::new(data)
        .read_to_end(&mut out)
        .unwrap();
    out
}

/// The seed corpus: one file of each format the readers take.
fn corpus() -> Vec<Vec<u8>> {
    let mut runner = runner(7);
    let generated = profile().new_tree(&mut runner).unwrap().current();
    let pprof_gz = pprof::encode(&generated).unwrap();
    let heap = b"heap profile:      2:      300 [     5:      900] @ heap_v2/524288\n\
        \x20    2:      300 [     5:      900] @ 0x401005 0x7f0000001234\n\
        \x20    1:      100 [     1:      100] @ 0x401105\n\
        \n\
        MAPPED_LIBRARIES:\n\
        00400000-00402000 r-xp 00000000 fe:01 11 /usr/bin/app\n\
        7f0000000000-7f0000010000 r-xp 00001000 fe:01 12 /usr/lib/libx.so\n"
        .to_vec();
    let words: [u64; 15] = [
        0, 3, 0, 10_000, 0, 7, 2, 0x401000, 0x401100, 3, 1, 0x401200, 0, 1, 0,
    ];
    let mut cpu: Vec<u8> = words.iter().flat_map(|w| w.to_ne_bytes()).collect();
    cpu.extend_from_slice(b"00400000-00402000 r-xp 00000000 fe:01 11 /usr/bin/app\n");
    vec![gunzip(&pprof_gz), pprof_gz, heap.clone(), gzip(&heap), cpu]
}

/// One edit of a seed file.
#[derive(Clone, Debug)]
enum Mutation {
    Flip(Index, u8),
    Insert(Index, Vec<u8>),
    Remove(Index, usize),
    Truncate(Index),
    /// A copy of a byte range elsewhere (repeats length prefixes, records).
    Splice(Index, Index, usize),
}

fn mutation() -> impl Strategy<Value = Mutation> {
    prop_oneof![
        (any::<Index>(), 1u8..=255).prop_map(|(i, b)| Mutation::Flip(i, b)),
        (any::<Index>(), prop::collection::vec(any::<u8>(), 1..16))
            .prop_map(|(i, b)| Mutation::Insert(i, b)),
        (any::<Index>(), 1usize..64).prop_map(|(i, n)| Mutation::Remove(i, n)),
        any::<Index>().prop_map(Mutation::Truncate),
        (any::<Index>(), any::<Index>(), 1usize..64)
            .prop_map(|(a, b, n)| Mutation::Splice(a, b, n)),
    ]
}

fn mutate(mut data: Vec<u8>, edits: &[Mutation]) -> Vec<u8> {
    for edit in edits {
        if data.is_empty() {
            data.push(0);
        }
        let len = data.len();
        match edit {
            Mutation::Flip(i, b) => data[i.index(len)] ^= b,
            Mutation::Insert(i, bytes) => {
                let at = i.index(len + 1);
                data.splice(at..at, bytes.iter().copied());
            }
            Mutation::Remove(i, n) => {
                let at = i.index(len);
                data.drain(at..(at + n).min(len));
            }
            Mutation::Truncate(i) => data.truncate(i.index(len)),
            Mutation::Splice(from, to, n) => {
                let from = from.index(len);
                let copy: Vec<u8> = data[from..(from + n).min(len)].to_vec();
                let at = to.index(len + 1);
                data.splice(at..at, copy);
            }
        }
    }
    data
}

#[test]
fn readers_and_writers_survive_fuzzing() {
    let third = duration() / 3;
    // Round trip: what pprof carries comes back, and every writer copes.
    run_for(third, 1, profile(), |p| {
        let bytes = pprof::encode(&p).map_err(|e| TestCaseError::fail(format!("{e:#}")))?;
        let back = read::from_bytes(&bytes, MAX_INPUT)
            .map_err(|e| TestCaseError::fail(format!("reading back: {e:#}")))?;
        prop_assert_eq!(&back.sample_types, &p.sample_types);
        prop_assert_eq!(&back.comments, &p.comments);
        prop_assert_eq!(meaning(&back), meaning(&p));
        write_all(&p).map_err(TestCaseError::fail)?;
        Ok(())
    });
    // Mutated seeds, read raw and (for the uncompressed ones) gzip-wrapped.
    let seeds = corpus();
    let count = seeds.len();
    run_for(
        third,
        2,
        (0..count, prop::collection::vec(mutation(), 1..6)),
        |(seed, edits)| {
            let data = mutate(seeds[seed].clone(), &edits);
            read_checked(&data)?;
            read_checked(&gzip(&data))
        },
    );
    // Random bytes, with and without a format's first bytes (the CPU
    // profile's are the words 0, 3, 0).
    let cpu_header: Vec<u8> = [0u64, 3, 0].iter().flat_map(|w| w.to_ne_bytes()).collect();
    let prefixes: [&[u8]; 4] = [b"", b"heap profile:", &[0x1f, 0x8b, 8, 0], &cpu_header];
    run_for(
        third,
        3,
        (
            0..prefixes.len(),
            prop::collection::vec(any::<u8>(), 0..512),
        ),
        |(prefix, tail)| {
            let mut data = prefixes[prefix].to_vec();
            data.extend(tail);
            read_checked(&data)
        },
    );
}
