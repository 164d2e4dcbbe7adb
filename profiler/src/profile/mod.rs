//! The one profile model every source fills and every writer reads.
//!
//! It is shaped like pprof's `profile.proto`: samples, each a stack of
//! locations (leaf first) and one value per sample type; a location is an
//! address in a mapping (an object file) that symbolizes to one or more
//! frames (several when functions were inlined there). Process and thread
//! are labels; the writers turn them into root frames (`--group-by`).
//!
//! Sources: the eBPF sessions go through [`Collector`], which takes raw
//! addresses, normalizes them while the process is alive and symbolizes at
//! the end ([`Profile::symbolize`]); [`read`] turns files (pprof, gperftools
//! heap and CPU profiles) into the same [`Profile`].
mod collector;
pub(crate) mod proto;
pub mod read;
mod symbolized;

pub use collector::Collector;

/// A function at a location; symbolization makes them.
pub use crate::symbolize::Frame;

/// One kind of value a sample carries, in pprof's vocabulary
/// (`inuse_space`/`bytes`, `cpu`/`nanoseconds`, ...).
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct SampleType {
    pub kind: String,
    pub unit: String,
}

impl SampleType {
    pub fn new(kind: impl Into<String>, unit: impl Into<String>) -> Self {
        Self {
            kind: kind.into(),
            unit: unit.into(),
        }
    }
    /// Number of allocations made.
    pub fn alloc_objects() -> Self {
        Self::new("alloc_objects", "count")
    }
    /// Bytes allocated.
    pub fn alloc_space() -> Self {
        Self::new("alloc_space", "bytes")
    }
    /// Allocations not yet freed.
    pub fn inuse_objects() -> Self {
        Self::new("inuse_objects", "count")
    }
    /// Bytes not yet freed.
    pub fn inuse_space() -> Self {
        Self::new("inuse_space", "bytes")
    }
    /// CPU samples taken.
    pub fn samples() -> Self {
        Self::new("samples", "count")
    }
    /// CPU time.
    pub fn cpu() -> Self {
        Self::new("cpu", "nanoseconds")
    }
    /// Hardware cycles (`--event cycles`).
    pub fn cycles() -> Self {
        Self::new("cycles", "count")
    }
}

impl std::fmt::Display for SampleType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.kind, self.unit)
    }
}

/// How far a captured user stack goes.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum StackStatus {
    /// Reached the outermost frame.
    #[default]
    Complete,
    /// Cut: depth limit, or a frame that could not be unwound. Writers end
    /// the stack with `[truncated]`.
    Truncated,
    /// The user stack could not be read at all (`[missing user stack]`).
    Missing,
    /// A status value the kernel side wrote that this build does not know:
    /// shown as `[unknown stack status N]` and counted, never guessed.
    Unknown(u32),
}

impl StackStatus {
    /// The status of a stack recorded by the kernel walker
    /// (`profiler_common::stack::UserStack::status`).
    pub fn from_kernel(raw: u32) -> Self {
        use profiler_common::stack::StackStatus as Kernel;
        match Kernel::try_from(raw) {
            Ok(Kernel::Complete) => Self::Complete,
            Ok(Kernel::Truncated) => Self::Truncated,
            Ok(Kernel::Missing) => Self::Missing,
            Err(value) => Self::Unknown(value),
        }
    }
}

/// One sample as a profiler captured it: absolute addresses of one process.
#[derive(Clone, Debug, Default)]
pub struct RawSample {
    pub pid: u32,
    pub tid: Option<u32>,
    /// The process's command name.
    pub comm: String,
    /// The thread's name, when it differs from the process's.
    pub thread_comm: Option<String>,
    /// The Python thread's name (`threading.Thread.name`), when known.
    pub python_thread: Option<String>,
    /// Absolute user addresses in `pid`, leaf first. All are return
    /// addresses except `user[0]` when `leaf_is_pc` is set.
    pub user: Vec<u64>,
    /// `user[0]` is the sampled program counter (a CPU sample) rather than a
    /// return address; only return addresses are looked up as `addr - 1`.
    pub leaf_is_pc: bool,
    pub user_status: StackStatus,
    /// Kernel addresses, leaf first; `kernel[0]` is the interrupted pc.
    pub kernel: Vec<u64>,
    /// One value per sample type of the collector, in the same order.
    pub values: Vec<i64>,
    /// Extra numeric labels: (key, value, unit), e.g. ("age", 12, "seconds").
    pub numeric_labels: Vec<(String, i64, String)>,
    /// A marker frame below the leaf saying what the leaf did (`[mmap]`:
    /// the values are memory mappings the leaf function made).
    pub leaf_marker: Option<&'static str>,
    /// Frames named by the source itself (interpreted code: Python), each
    /// group replacing the native frame `user[at]` that ran it, or added
    /// at the outer end when `at` is `user.len()`. Sorted by `at`.
    pub splices: Vec<Splice>,
}

/// Named frames that stand for one native frame of a [`RawSample`].
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Splice {
    /// Index into [`RawSample::user`].
    pub at: usize,
    /// Innermost first.
    pub frames: Vec<Frame>,
}

/// A profile: what every writer takes.
#[derive(Clone, Debug, Default)]
pub struct Profile {
    pub sample_types: Vec<SampleType>,
    /// The `kind` of the sample type writers show unless told otherwise.
    pub default_sample_type: String,
    /// What one sampling event stands for (pprof's period_type/period).
    pub period_type: Option<SampleType>,
    pub period: i64,
    /// Free-form notes shown by the text writer and stored in pprof
    /// (mode, lost events, unresolved objects...).
    pub comments: Vec<String>,
    /// Wall-clock start, nanoseconds since the epoch (0: unknown).
    pub time_nanos: i64,
    pub duration_nanos: i64,
    pub mappings: Vec<Mapping>,
    pub locations: Vec<Location>,
    pub samples: Vec<Sample>,
}

/// An object file mapped into a profiled process (or the kernel).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Mapping {
    /// Address range and the file offset of `start`, as in pprof: a
    /// location's file offset is `address - start + offset`.
    pub start: u64,
    pub limit: u64,
    pub offset: u64,
    /// The path as the process saw it, or a pseudo name (`[vdso]`,
    /// `[kernel.kallsyms]`, `[jit]`).
    pub file: String,
    /// The GNU build-id as lower-case hex, empty when unknown.
    pub build_id: String,
    /// Where the object can be read on this machine for symbolization, when
    /// known to be the same file (not stored in files: another machine's
    /// paths mean nothing).
    pub local_path: Option<std::path::PathBuf>,
}

impl Mapping {
    /// The pseudo file name of the kernel's mapping.
    pub const KERNEL: &'static str = "[kernel.kallsyms]";

    /// The file's name without directories.
    pub fn base_name(&self) -> &str {
        self.file.rsplit('/').next().unwrap_or(&self.file)
    }

    pub fn is_kernel(&self) -> bool {
        self.file == Self::KERNEL
    }
}

/// What kind of code a location is in; decides frame-name suffixes.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum LocationKind {
    #[default]
    User,
    Kernel,
    /// Interpreted code named by its source (Python's frames): the
    /// frame's function is the qualified name, its file and line apart.
    Python,
    /// Not code: `[truncated]`, `[missing user stack]`.
    Marker,
}

/// One address of a stack, and what it symbolizes to.
#[derive(Clone, Debug, Default)]
pub struct Location {
    /// Index into [`Profile::mappings`].
    pub mapping: Option<usize>,
    /// The address looked up (a return address already minus one), in the
    /// mapping's address space.
    pub address: u64,
    pub kind: LocationKind,
    /// Innermost first: the inlined frames, then the function they were
    /// inlined into. Empty when the address could not be symbolized.
    pub frames: Vec<Frame>,
}

/// One stack and its values.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Sample {
    /// Indices into [`Profile::locations`], leaf first.
    pub locations: Vec<usize>,
    pub values: Vec<i64>,
    pub labels: Vec<Label>,
}

impl Sample {
    /// The string label `key`.
    pub fn str_label(&self, key: &str) -> Option<&str> {
        self.labels.iter().find_map(|l| match &l.value {
            LabelValue::Str(s) if l.key == key => Some(s.as_str()),
            _ => None,
        })
    }

    /// The numeric label `key`.
    pub fn num_label(&self, key: &str) -> Option<i64> {
        self.labels.iter().find_map(|l| match l.value {
            LabelValue::Num(n, _) if l.key == key => Some(n),
            _ => None,
        })
    }
}

/// A sample's label: `pid`, `tid` (numbers), `comm`, `thread_comm`
/// (strings), or a source-specific number such as `age`.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Label {
    pub key: String,
    pub value: LabelValue,
}

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum LabelValue {
    Str(String),
    /// A number and its unit (may be empty).
    Num(i64, String),
}

impl Label {
    pub fn str(key: impl Into<String>, value: impl Into<String>) -> Self {
        Self {
            key: key.into(),
            value: LabelValue::Str(value.into()),
        }
    }
    pub fn num(key: impl Into<String>, value: i64, unit: impl Into<String>) -> Self {
        Self {
            key: key.into(),
            value: LabelValue::Num(value, unit.into()),
        }
    }
}

/// `qualname (file.py:LINE)`, `qualname (file.py)` without a line, and
/// the name alone for the walker's markers (`[python truncated]`), which
/// have no file.
fn python_frame_name(frame: &Frame) -> String {
    if frame.file.is_empty() {
        return frame.function.clone();
    }
    let file = frame.file.rsplit('/').next().unwrap_or(&frame.file);
    if frame.line > 0 {
        format!("{} ({file}:{})", frame.function, frame.line)
    } else {
        format!("{} ({file})", frame.function)
    }
}

/// The pseudo mapping of Python's frames.
pub const PYTHON_MAPPING: &str = "[python]";

/// The names shown for markers.
pub const TRUNCATED: &str = "[truncated]";
pub const MISSING_USER_STACK: &str = "[missing user stack]";

/// The marker of a stack whose status value is unknown: `[unknown stack
/// status N]`, one name per distinct value (the kernel side writes a few
/// known values, so the set stays tiny even if a mismatched build writes
/// others).
pub fn unknown_status_marker(value: u32) -> &'static str {
    static NAMES: std::sync::Mutex<Vec<(u32, &'static str)>> = std::sync::Mutex::new(Vec::new());
    let mut names = NAMES
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    if let Some(&(_, name)) = names.iter().find(|(v, _)| *v == value) {
        return name;
    }
    let name: &'static str = Box::leak(format!("[unknown stack status {value}]").into_boxed_str());
    names.push((value, name));
    name
}
/// A sample that has no locations at all (allowed in pprof files).
pub const NO_STACK: &str = "[no stack]";
/// Leaf marker of heap samples that are memory mappings (`heap --mmap`).
pub const MMAP: &str = "[mmap]";

impl Profile {
    /// Index of the sample type called `kind`, or a one-line error listing
    /// the ones this profile has.
    pub fn sample_type_index(&self, kind: &str) -> anyhow::Result<usize> {
        self.sample_types
            .iter()
            .position(|t| t.kind == kind)
            .ok_or_else(|| {
                anyhow::anyhow!(
                    "no sample type `{kind}` in this profile; it has: {}",
                    self.sample_types
                        .iter()
                        .map(|t| t.kind.as_str())
                        .collect::<Vec<_>>()
                        .join(", ")
                )
            })
    }

    /// The sample type writers show by default: `default_sample_type`, else
    /// the last one (pprof's rule).
    pub fn default_sample_type_index(&self) -> usize {
        self.sample_types
            .iter()
            .position(|t| t.kind == self.default_sample_type)
            .unwrap_or(self.sample_types.len().saturating_sub(1))
    }

    /// The frame names of `location`, innermost first, following the naming
    /// rules every writer shares: kernel functions end in `_[k]`, inlined
    /// ones in `_[i]`, an unresolved address reads `object+0xOFFSET`, a
    /// Python frame reads as py-spy writes it, `qualname (file.py:LINE)`.
    pub fn frame_names(&self, location: &Location) -> Vec<String> {
        if location.frames.is_empty() {
            return vec![self.unresolved_name(location)];
        }
        if location.kind == LocationKind::Python {
            return location.frames.iter().map(python_frame_name).collect();
        }
        location
            .frames
            .iter()
            .map(|f| {
                // A nameless function (other tools write some) reads as
                // its address.
                if f.function.is_empty() {
                    return self.unresolved_name(location);
                }
                let suffix = if location.kind == LocationKind::Kernel {
                    "_[k]"
                } else if f.inlined {
                    "_[i]"
                } else {
                    ""
                };
                if suffix.is_empty() || f.function.ends_with(suffix) {
                    f.function.clone()
                } else {
                    format!("{}{suffix}", f.function)
                }
            })
            .collect()
    }

    /// `libname.so+0x1a2b` (file offset) for an address no symbol covers.
    pub fn unresolved_name(&self, location: &Location) -> String {
        match location.mapping.and_then(|m| self.mappings.get(m)) {
            Some(m) if m.is_kernel() => format!("{:#x}_[k]", location.address),
            Some(m) => {
                let offset = location
                    .address
                    .wrapping_sub(m.start)
                    .wrapping_add(m.offset);
                let name = if m.file.is_empty() {
                    "[unknown]"
                } else {
                    m.base_name()
                };
                format!("{name}+{offset:#x}")
            }
            None => format!("{:#x}", location.address),
        }
    }

    /// Appends `other`'s samples with their values multiplied by `factor`
    /// (-1 subtracts a base profile). Sample types must match by kind.
    pub fn merge(&mut self, other: &Profile, factor: i64) -> anyhow::Result<()> {
        let columns: Vec<usize> = self
            .sample_types
            .iter()
            .map(|t| {
                other
                    .sample_types
                    .iter()
                    .position(|o| o.kind == t.kind)
                    .ok_or_else(|| {
                        anyhow::anyhow!("the base profile has no sample type `{}`", t.kind)
                    })
            })
            .collect::<anyhow::Result<_>>()?;
        let mapping_base = self.mappings.len();
        self.mappings.extend(other.mappings.iter().cloned());
        let location_base = self.locations.len();
        self.locations
            .extend(other.locations.iter().map(|l| Location {
                mapping: l.mapping.map(|m| m + mapping_base),
                ..l.clone()
            }));
        for s in &other.samples {
            self.samples.push(Sample {
                locations: s.locations.iter().map(|l| l + location_base).collect(),
                values: columns
                    .iter()
                    .map(|&c| s.values.get(c).copied().unwrap_or(0).saturating_mul(factor))
                    .collect(),
                labels: s.labels.clone(),
            });
        }
        Ok(())
    }
}

#[cfg(test)]
mod stack_status_tests {
    use super::*;

    #[test]
    fn kernel_values_map_to_statuses_and_unknown_ones_are_kept() {
        assert_eq!(StackStatus::from_kernel(0), StackStatus::Complete);
        assert_eq!(StackStatus::from_kernel(1), StackStatus::Truncated);
        assert_eq!(StackStatus::from_kernel(2), StackStatus::Missing);
        assert_eq!(StackStatus::from_kernel(9), StackStatus::Unknown(9));
        assert_eq!(unknown_status_marker(9), "[unknown stack status 9]");
        // One name per value, the same each time.
        assert!(std::ptr::eq(
            unknown_status_marker(9),
            unknown_status_marker(9)
        ));
    }
}

#[cfg(test)]
mod python_frame_tests {
    use super::*;

    fn python_profile(line: i64) -> Profile {
        let frame = |function: &str, file: &str, line| Frame {
            function: function.to_owned(),
            file: file.to_owned(),
            line,
            inlined: false,
        };
        Profile {
            sample_types: vec![SampleType::samples()],
            mappings: vec![Mapping {
                start: 1 << 40,
                limit: 2 << 40,
                file: PYTHON_MAPPING.into(),
                ..Mapping::default()
            }],
            locations: vec![
                Location {
                    mapping: Some(0),
                    kind: LocationKind::Python,
                    frames: vec![frame("Handler.run", "/srv/app/server.py", line)],
                    ..Location::default()
                },
                Location {
                    mapping: Some(0),
                    kind: LocationKind::Python,
                    frames: vec![frame("[python truncated]", "", 0)],
                    ..Location::default()
                },
            ],
            samples: vec![Sample {
                locations: vec![0, 1],
                values: vec![1],
                labels: vec![],
            }],
            ..Profile::default()
        }
    }

    /// Writers show py-spy's names; pprof keeps the qualified name, the
    /// file and the line apart, and reads them back as Python frames.
    #[test]
    fn python_frames_are_named_like_py_spy_and_stored_apart_in_pprof() {
        let profile = python_profile(17);
        assert_eq!(
            profile.frame_names(&profile.locations[0]),
            ["Handler.run (server.py:17)"]
        );
        assert_eq!(
            profile.frame_names(&profile.locations[1]),
            ["[python truncated]"]
        );
        let no_line = python_profile(0);
        assert_eq!(
            no_line.frame_names(&no_line.locations[0]),
            ["Handler.run (server.py)"]
        );
        let message = crate::output::pprof::to_proto(&profile);
        let string =
            |i: i64| String::from_utf8_lossy(&message.string_table[i as usize]).into_owned();
        let f = &message.function[0];
        assert_eq!(
            (string(f.name), string(f.filename)),
            ("Handler.run".to_owned(), "/srv/app/server.py".to_owned())
        );
        assert_eq!(message.location[0].line[0].line, 17);
        let bytes = crate::output::pprof::encode(&profile).unwrap();
        let back = read::from_bytes(&bytes, 1 << 20).unwrap();
        assert_eq!(back.locations[0].kind, LocationKind::Python);
        assert_eq!(
            back.frame_names(&back.locations[0]),
            ["Handler.run (server.py:17)"]
        );
    }
}
