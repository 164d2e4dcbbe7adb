//! [`Collector`]: builds a [`Profile`] from raw samples of live processes.
//!
//! Addresses are normalized when a sample is added (the process may exit
//! right after), identical stacks are merged, and symbolization happens once
//! in [`Collector::finish`], one blazesym batch per object.
use std::collections::HashMap;

use super::{
    Frame, Label, Location, LocationKind, MISSING_USER_STACK, Mapping, Profile, RawSample, Sample,
    SampleType, StackStatus, TRUNCATED,
};
use crate::symbolize::{self, Normalized, Normalizer};

/// Synthetic address space of the profile's mappings: object `i` is placed
/// at `(i + 1) << OBJECT_SHIFT`, so that a location's address minus its
/// mapping's start is its file offset (pprof's rule) and mappings of
/// different objects never overlap. Objects are far smaller than 1 TiB.
const OBJECT_SHIFT: u32 = 40;
/// The kernel mapping covers the upper half of the address space.
const KERNEL_START: u64 = 0xffff_8000_0000_0000;

/// What a location is, for deduplication.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
enum LocationKey {
    File {
        object: usize,
        offset: u64,
    },
    Jit {
        name: String,
    },
    Named {
        function: String,
        file: String,
        line: i64,
    },
    Anon {
        name: String,
        offset: u64,
    },
    Kernel(u64),
    Marker(&'static str),
}

/// Identity of a merged sample.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
struct SampleKey {
    locations: Vec<usize>,
    labels: Vec<Label>,
}

/// Accumulates raw samples into a profile (see the module docs).
pub struct Collector {
    profile: Profile,
    normalizer: Normalizer,
    locations: HashMap<LocationKey, usize>,
    samples: HashMap<SampleKey, usize>,
    /// Mapping index of each normalizer object, of each pseudo mapping
    /// (`[vdso]`, `[jit]`), and of the kernel.
    object_mappings: HashMap<usize, usize>,
    pseudo_mappings: HashMap<String, usize>,
    kernel_mapping: Option<usize>,
    /// The first noted process and the normalizer object of its executable
    /// as last seen (it changes when the process execs).
    main: Option<(u32, Option<usize>)>,
    started: std::time::SystemTime,
    /// Stacks whose kernel-side status value was unknown (shown and counted).
    unknown_statuses: u64,
}

impl Collector {
    /// A collector whose samples carry `sample_types` values, shown by
    /// default as `default_sample_type` (a kind, e.g. `inuse_space`).
    pub fn new(sample_types: Vec<SampleType>, default_sample_type: &str) -> Self {
        let started = std::time::SystemTime::now();
        let profile = Profile {
            sample_types,
            default_sample_type: default_sample_type.to_owned(),
            time_nanos: started
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| i64::try_from(d.as_nanos()).unwrap_or(i64::MAX)),
            ..Profile::default()
        };
        Self {
            profile,
            normalizer: Normalizer::new(),
            locations: HashMap::new(),
            samples: HashMap::new(),
            object_mappings: HashMap::new(),
            pseudo_mappings: HashMap::new(),
            kernel_mapping: None,
            main: None,
            started,
            unknown_statuses: 0,
        }
    }

    /// What one event stands for, e.g. (cpu/nanoseconds, 10101010) at 99 Hz.
    pub fn set_period(&mut self, ty: SampleType, period: i64) {
        self.profile.period_type = Some(ty);
        self.profile.period = period;
    }

    /// A note shown with the profile ("lost events: 3", "mode: ...").
    pub fn add_comment(&mut self, c: impl Into<String>) {
        self.profile.comments.push(c.into());
    }

    /// Reads processes' mappings through `cache`, shared with the other
    /// collectors of a long-running profiler (call before noting any).
    pub(crate) fn share_maps(&mut self, cache: std::sync::Arc<crate::symbolize::MapsCache>) {
        self.normalizer.share_maps(cache);
    }

    /// Snapshot `pid`'s mappings now (call when a process is first seen or
    /// execs), so its addresses can be normalized after it exits.
    pub fn note_process(&mut self, pid: u32) {
        self.normalizer.note_process(pid);
        self.note_main(pid);
    }

    /// [`Collector::note_process`] with `pid`'s mappings as the caller
    /// read them (while it lived: it may be gone now).
    pub fn note_process_maps(&mut self, pid: u32, maps: &[crate::process::Mapping]) {
        self.normalizer.note_maps(pid, maps);
        self.note_main(pid);
    }

    fn note_main(&mut self, pid: u32) {
        if self.main.is_none_or(|(first, _)| first == pid) {
            self.main = Some((pid, self.normalizer.executable(pid)));
        }
    }

    /// Adds one sample, normalizing its user addresses now. User frames
    /// outside every executable mapping of the process (garbage from a
    /// broken unwind) end the stack, which is then marked truncated.
    pub fn add(&mut self, s: RawSample) {
        let mut locations = Vec::with_capacity(s.kernel.len() + s.user.len() + 2);
        if let Some(name) = s.leaf_marker {
            locations.push(self.marker(name));
        }
        for (i, &addr) in s.kernel.iter().enumerate() {
            // kernel[0] is the interrupted pc; the others return addresses.
            let lookup = if i == 0 { addr } else { addr.wrapping_sub(1) };
            locations.push(self.kernel_location(lookup));
        }
        let mut status = s.user_status;
        let mut splices = s.splices.iter().peekable();
        if status == StackStatus::Missing {
            locations.push(self.marker(MISSING_USER_STACK));
            for splice in splices {
                for frame in &splice.frames {
                    locations.push(self.named_location(frame));
                }
            }
        } else {
            for (i, &addr) in s.user.iter().enumerate() {
                if let Some(splice) = splices.next_if(|sp| sp.at == i) {
                    for frame in &splice.frames {
                        locations.push(self.named_location(frame));
                    }
                    continue;
                }
                let lookup = if i == 0 && s.leaf_is_pc {
                    addr
                } else {
                    addr.wrapping_sub(1)
                };
                match self.normalizer.normalize(s.pid, lookup) {
                    Some(n) => locations.push(self.user_location(n)),
                    None => {
                        status = StackStatus::Truncated;
                        break;
                    }
                }
            }
            // Frames of the outer end (or past a broken native walk).
            for splice in splices {
                for frame in &splice.frames {
                    locations.push(self.named_location(frame));
                }
            }
            match status {
                StackStatus::Truncated => locations.push(self.marker(TRUNCATED)),
                StackStatus::Unknown(value) => {
                    self.unknown_statuses += 1;
                    locations.push(self.marker(super::unknown_status_marker(value)));
                }
                StackStatus::Complete | StackStatus::Missing => {}
            }
        }
        let mut labels = vec![
            Label::num("pid", i64::from(s.pid), ""),
            Label::str("comm", s.comm),
        ];
        if let Some(tid) = s.tid {
            labels.push(Label::num("tid", i64::from(tid), ""));
        }
        if let Some(name) = s.thread_comm {
            labels.push(Label::str("thread_comm", name));
        }
        if let Some(name) = s.python_thread {
            labels.push(Label::str("python_thread", name));
        }
        for (key, value, unit) in s.numeric_labels {
            labels.push(Label::num(key, value, unit));
        }
        let key = SampleKey { locations, labels };
        let n = self.profile.sample_types.len();
        let index = match self.samples.get(&key) {
            Some(&i) => i,
            None => {
                self.profile.samples.push(Sample {
                    locations: key.locations.clone(),
                    values: vec![0; n],
                    labels: key.labels.clone(),
                });
                let i = self.profile.samples.len() - 1;
                self.samples.insert(key, i);
                i
            }
        };
        let values = &mut self.profile.samples[index].values;
        for (v, add) in values.iter_mut().zip(&s.values) {
            *v = v.saturating_add(*add);
        }
    }

    /// Symbolizes every location and returns the profile.
    pub fn finish(self) -> anyhow::Result<Profile> {
        self.finish_with(&crate::symbolize::SymbolCache::new())
    }

    /// [`Collector::finish`] with objects parsed by earlier profiles kept in
    /// `cache` (one thread symbolizing many profiles parses each object once).
    pub fn finish_with(mut self, cache: &crate::symbolize::SymbolCache) -> anyhow::Result<Profile> {
        if self.unknown_statuses > 0 {
            let n = self.unknown_statuses;
            self.add_comment(format!("stacks with an unknown status value: {n}"));
        }
        let profile = std::mem::take(&mut self.profile);
        // The normalizer (and its open files) lives until this returns.
        let mut profile = self.placed(profile);
        profile.symbolize_with(cache);
        Ok(profile)
    }

    /// The profile so far, symbolized, leaving the collector running (for
    /// periodic reports). Each call parses the objects afresh: a symbol
    /// cache would hold `Rc`s and make the collector unsendable.
    pub fn snapshot(&self) -> anyhow::Result<Profile> {
        Ok(self.symbolized(self.profile.clone()))
    }

    fn symbolized(&self, profile: Profile) -> Profile {
        let mut profile = self.placed(profile);
        profile.symbolize();
        profile
    }

    /// `profile` with its mappings' local files, the main executable's
    /// mapping first, and its duration: everything but symbols.
    fn placed(&self, mut profile: Profile) -> Profile {
        for (&object, &mapping) in &self.object_mappings {
            profile.mappings[mapping].local_path = self.normalizer.objects[object].local_path();
        }
        if let Some((_, Some(exe))) = self.main
            && let Some(&mapping) = self.object_mappings.get(&exe)
        {
            move_mapping_first(&mut profile, mapping);
        }
        profile.duration_nanos = self
            .started
            .elapsed()
            .map_or(0, |d| i64::try_from(d.as_nanos()).unwrap_or(i64::MAX));
        profile
    }

    fn location(&mut self, key: LocationKey, make: impl FnOnce(&mut Self) -> Location) -> usize {
        if let Some(&i) = self.locations.get(&key) {
            return i;
        }
        let loc = make(self);
        self.profile.locations.push(loc);
        let i = self.profile.locations.len() - 1;
        self.locations.insert(key, i);
        i
    }

    fn marker(&mut self, name: &'static str) -> usize {
        self.location(LocationKey::Marker(name), |_| Location {
            kind: LocationKind::Marker,
            frames: vec![Frame::named(name)],
            ..Location::default()
        })
    }

    /// A frame the source named itself, in the pseudo mapping `[python]`.
    fn named_location(&mut self, frame: &Frame) -> usize {
        let key = LocationKey::Named {
            function: frame.function.clone(),
            file: frame.file.clone(),
            line: frame.line,
        };
        self.location(key, |c| Location {
            mapping: Some(c.pseudo_mapping(super::PYTHON_MAPPING)),
            address: 0,
            kind: LocationKind::Python,
            frames: vec![frame.clone()],
        })
    }

    fn kernel_location(&mut self, addr: u64) -> usize {
        self.location(LocationKey::Kernel(addr), |c| {
            let mapping = *c.kernel_mapping.get_or_insert_with(|| {
                c.profile.mappings.push(Mapping {
                    start: KERNEL_START,
                    limit: u64::MAX,
                    offset: 0,
                    file: Mapping::KERNEL.to_owned(),
                    local_path: Some(symbolize::KALLSYMS.into()),
                    ..Mapping::default()
                });
                c.profile.mappings.len() - 1
            });
            Location {
                mapping: Some(mapping),
                address: addr,
                kind: LocationKind::Kernel,
                frames: Vec::new(),
            }
        })
    }

    fn user_location(&mut self, n: Normalized) -> usize {
        match n {
            Normalized::File { object, offset } => {
                self.location(LocationKey::File { object, offset }, |c| {
                    let mapping = c.object_mapping(object);
                    Location {
                        mapping: Some(mapping),
                        address: c.profile.mappings[mapping].start + offset,
                        ..Location::default()
                    }
                })
            }
            Normalized::Jit { name } => {
                self.location(LocationKey::Jit { name: name.clone() }, |c| {
                    let mapping = c.pseudo_mapping("[jit]");
                    Location {
                        mapping: Some(mapping),
                        address: 0,
                        frames: vec![Frame::named(name)],
                        ..Location::default()
                    }
                })
            }
            Normalized::Anon { name, offset } => self.location(
                LocationKey::Anon {
                    name: name.clone(),
                    offset,
                },
                |c| {
                    let mapping = c.pseudo_mapping(&name);
                    Location {
                        mapping: Some(mapping),
                        address: c.profile.mappings[mapping].start + offset,
                        ..Location::default()
                    }
                },
            ),
        }
    }

    /// The profile mapping of normalizer object `object`.
    fn object_mapping(&mut self, object: usize) -> usize {
        if let Some(&m) = self.object_mappings.get(&object) {
            return m;
        }
        let o = &self.normalizer.objects[object];
        let start = self.next_base();
        self.profile.mappings.push(Mapping {
            start,
            limit: start + o.size.max(1),
            offset: 0,
            file: o.path.clone(),
            build_id: o.build_id.clone(),
            local_path: None,
        });
        let m = self.profile.mappings.len() - 1;
        self.object_mappings.insert(object, m);
        m
    }

    fn pseudo_mapping(&mut self, name: &str) -> usize {
        if let Some(&m) = self.pseudo_mappings.get(name) {
            return m;
        }
        let start = self.next_base();
        self.profile.mappings.push(Mapping {
            start,
            limit: start + (1 << OBJECT_SHIFT) - 1,
            file: name.to_owned(),
            ..Mapping::default()
        });
        let m = self.profile.mappings.len() - 1;
        self.pseudo_mappings.insert(name.to_owned(), m);
        m
    }

    fn next_base(&self) -> u64 {
        (self.profile.mappings.len() as u64 + 1) << OBJECT_SHIFT
    }
}

/// Makes mapping `m` the first, keeping the others' order: pprof takes the
/// first mapping for the main binary, which is the first noted process's
/// executable, not whichever object (or the kernel) a first sample hit.
fn move_mapping_first(profile: &mut Profile, m: usize) {
    let mapping = profile.mappings.remove(m);
    profile.mappings.insert(0, mapping);
    for loc in &mut profile.locations {
        if let Some(l) = &mut loc.mapping {
            *l = match *l {
                l if l == m => 0,
                l if l < m => l + 1,
                l => l,
            };
        }
    }
}

// Sessions move the collector between tasks and threads.
const _: () = {
    const fn sendable<T: Send>() {}
    sendable::<Collector>();
};

#[cfg(test)]
mod tests {
    use super::*;
    use crate::profile::Frame;

    /// pprof's main binary is the first mapping: the target's executable,
    /// even when the first sample starts in the kernel and then libc.
    #[test]
    fn the_executable_is_the_main_binary() {
        let pid = std::process::id();
        let mut c = Collector::new(vec![SampleType::samples()], "samples");
        c.note_process(pid);
        let in_libc = libc::getpid as *const () as usize as u64;
        let in_exe = the_executable_is_the_main_binary as *const () as usize as u64;
        c.add(RawSample {
            pid,
            comm: "test".into(),
            user: vec![in_libc + 1, in_exe + 1],
            kernel: vec![KERNEL_START + 0x1000],
            values: vec![1],
            ..RawSample::default()
        });
        let profile = c.finish().unwrap();
        let message = crate::output::pprof::to_proto(&profile);
        let file = |m: &crate::profile::proto::Mapping| {
            String::from_utf8_lossy(&message.string_table[m.filename as usize]).into_owned()
        };
        let exe = std::fs::canonicalize("/proc/self/exe").unwrap();
        assert_eq!(file(&message.mapping[0]), exe.to_string_lossy());
        assert_eq!(message.mapping.len(), 3, "exe, libc, kernel");
        assert!(file(&message.mapping[1]).contains("libc"));
        assert_eq!(file(&message.mapping[2]), Mapping::KERNEL);
        // Locations keep pointing at their own mappings after the reorder.
        let kernel_loc = &message.location[profile.samples[0].locations[0]];
        assert_eq!(kernel_loc.mapping_id, 3);
    }

    /// Kernel functions keep their names in pprof; the mapping marks them
    /// and readers show `_[k]` again.
    #[test]
    fn kernel_function_names_have_no_display_suffix() {
        let profile = Profile {
            sample_types: vec![SampleType::samples()],
            mappings: vec![
                Mapping {
                    start: KERNEL_START,
                    limit: u64::MAX,
                    file: Mapping::KERNEL.into(),
                    ..Mapping::default()
                },
                Mapping {
                    start: 1 << 40,
                    limit: 2 << 40,
                    file: "/usr/bin/app".into(),
                    ..Mapping::default()
                },
            ],
            locations: vec![
                Location {
                    mapping: Some(0),
                    address: KERNEL_START + 0x10,
                    kind: LocationKind::Kernel,
                    frames: vec![Frame::named("vfs_read")],
                },
                Location {
                    mapping: Some(1),
                    address: (1 << 40) + 0x10,
                    frames: vec![Frame::named("main")],
                    ..Location::default()
                },
            ],
            samples: vec![Sample {
                locations: vec![0, 1],
                values: vec![1],
                labels: vec![],
            }],
            ..Profile::default()
        };
        let message = crate::output::pprof::to_proto(&profile);
        let names: Vec<String> = message
            .function
            .iter()
            .map(|f| String::from_utf8_lossy(&message.string_table[f.name as usize]).into_owned())
            .collect();
        assert_eq!(names, ["vfs_read", "main"]);
        let bytes = crate::output::pprof::encode(&profile).unwrap();
        let back = crate::profile::read::from_bytes(&bytes, 1 << 20).unwrap();
        assert_eq!(back.mappings[0].file, "/usr/bin/app");
        let leaf = &back.locations[back.samples[0].locations[0]];
        assert_eq!(leaf.kind, LocationKind::Kernel);
        assert_eq!(back.frame_names(leaf), ["vfs_read_[k]"]);
    }
}
