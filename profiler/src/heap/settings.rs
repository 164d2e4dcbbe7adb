//! What a heap session is asked to do, in plain types (no clap), and
//! [`Tracking`]: how allocations are seen once `--probe` is resolved.
use std::{ffi::OsString, path::PathBuf, time::Duration};

use anyhow::bail;

/// What to profile.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Targets {
    /// Running processes.
    Pids(Vec<u32>),
    /// Every process mapping the library.
    All,
    /// A program to start.
    Launch(Vec<OsString>),
}

/// What `--probe` asks for, before the targets are known.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum ProbeRequest {
    /// The hooks when every target can give what is asked through them.
    Auto,
    /// libprofalloc.so's sampling hooks, or an error.
    Hooks,
    /// The malloc family.
    Malloc,
    /// The `otel_memory` USDT probes, or an error.
    Usdt,
}

/// Validated settings of a heap session.
#[derive(Debug, Clone)]
pub(crate) struct Settings {
    /// What to profile.
    pub targets: Targets,
    /// `--lib`.
    pub lib: Option<PathBuf>,
    /// Mean bytes between samples, 0 = every allocation (with the malloc
    /// family; the hooks sample at the target's own rate).
    pub sample_bytes: u64,
    /// Leak mode.
    pub leaks: bool,
    /// `--min-age`.
    pub min_age: Option<Duration>,
    /// `--duration`.
    pub duration: Option<Duration>,
    /// Time between snapshots (leak mode) or reports.
    pub interval: Option<Duration>,
    /// `--probe`, already `Malloc` when --leaks, --sample-bytes or --mmap
    /// rule the hooks out.
    pub probe: ProbeRequest,
    /// `--mmap`.
    pub mmap: bool,
    /// `--pymalloc`: also probe the CPython targets' object allocator.
    pub pymalloc: bool,
    /// Capacity of the live-allocation map.
    pub max_live: u32,
    /// Capacity of the per-stack totals map.
    pub max_stacks: u32,
    /// `--python-frames`, `--python-lines`.
    pub python: crate::python::PythonArgs,
    /// `--unwind-memory` and the unwind table cache.
    pub unwind: crate::unwind::UnwindOptions,
}

/// How allocations are seen: `--probe` resolved against the targets.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Tracking {
    /// libprofalloc.so's sampling hooks: only the blocks its sampler picked,
    /// one per `sample_bytes` bytes on average, with its weights.
    Hooks { sample_bytes: u64 },
    /// The malloc family, sampled in the kernel (0: every allocation).
    Malloc { sample_bytes: u64 },
    /// The `otel_memory:alloc/free` USDT probes: the allocations the
    /// target's allocator sampled, with the weights it gives them.
    Usdt,
}

impl Tracking {
    /// The mean bytes between samples; 0 when every allocation is tracked.
    pub fn sample_bytes(self) -> u64 {
        match self {
            Self::Hooks { sample_bytes } | Self::Malloc { sample_bytes } => sample_bytes,
            // The allocator's rate is its own; the weights say what it is.
            Self::Usdt => 0,
        }
    }

    /// What the kernel programs sample at: the hooks are sampled already.
    pub fn kernel_sample_bytes(self) -> u64 {
        match self {
            Self::Hooks { .. } | Self::Usdt => 0,
            Self::Malloc { sample_bytes } => sample_bytes,
        }
    }

    /// For the line printed at attach.
    pub fn describe(self) -> String {
        match self {
            Self::Hooks { sample_bytes } => {
                format!("libprofalloc.so's sampling hooks (one sample per {sample_bytes} bytes)")
            }
            Self::Usdt => {
                "the otel_memory USDT probes (the allocator's samples and weights)".to_owned()
            }
            Self::Malloc { sample_bytes: 0 } => "every allocation (malloc uprobes)".to_owned(),
            Self::Malloc { sample_bytes } => {
                format!("one sample per {sample_bytes} bytes (malloc uprobes)")
            }
        }
    }

    /// The report's `mode:` comment.
    pub fn comment(self) -> String {
        match self {
            Self::Hooks { sample_bytes } => format!(
                "mode: libprofalloc.so sampling hooks, one allocation per {sample_bytes} bytes on average (values are estimates)"
            ),
            Self::Usdt => "mode: otel_memory USDT probes, the allocations the allocator sampled with its weights (values are estimates)".to_owned(),
            Self::Malloc { sample_bytes: 0 } => {
                "mode: malloc uprobes, every allocation tracked".to_owned()
            }
            Self::Malloc { sample_bytes } => format!(
                "mode: malloc uprobes, sampled, one allocation per {sample_bytes} bytes on average (values are estimates)"
            ),
        }
    }
}

/// What one running target offers the hooks.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum HookOffer {
    /// It does not run libprofalloc.so; its allocator is this file.
    NoHooks { allocator: String },
    /// It runs libprofalloc.so sampling at this rate (0: sampler off).
    Rate(u64),
}

/// Resolves `--probe` for running processes given what each offers: the
/// hooks when every target runs libprofalloc.so with its sampler on (at the
/// first target's rate), else the malloc family at `sample_bytes`.
/// `--probe hooks` fails naming the target that cannot give them.
pub(crate) fn resolve_probe(
    request: ProbeRequest,
    sample_bytes: u64,
    offers: &[(u32, HookOffer)],
) -> anyhow::Result<Tracking> {
    let malloc = Tracking::Malloc { sample_bytes };
    match request {
        ProbeRequest::Malloc => return Ok(malloc),
        ProbeRequest::Usdt => return Ok(Tracking::Usdt),
        ProbeRequest::Auto | ProbeRequest::Hooks => {}
    }
    let mut rates = Vec::new();
    for (pid, offer) in offers {
        match offer {
            HookOffer::NoHooks { allocator } if request == ProbeRequest::Hooks => bail!(
                "--probe hooks: pid {pid} does not run libprofalloc.so (its allocator is {allocator})"
            ),
            HookOffer::Rate(0) if request == ProbeRequest::Hooks => bail!(
                "--probe hooks: the sampler of libprofalloc.so is off in pid {pid} (PROFALLOC_SAMPLE_BYTES=0)"
            ),
            HookOffer::NoHooks { .. } => rates.push(0),
            HookOffer::Rate(rate) => rates.push(*rate),
        }
    }
    let Some(&first) = rates.first() else {
        return Ok(malloc);
    };
    if rates.contains(&0) {
        return Ok(malloc);
    }
    if rates.iter().any(|&r| r != first) {
        log::warn!("the targets sample at different rates; the report states the first one's");
    }
    Ok(Tracking::Hooks {
        sample_bytes: first,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn profalloc(rate: u64) -> HookOffer {
        HookOffer::Rate(rate)
    }

    fn glibc() -> HookOffer {
        HookOffer::NoHooks {
            allocator: "/lib/libc.so.6".to_owned(),
        }
    }

    #[test]
    fn auto_takes_the_hooks_only_when_every_target_samples() {
        let auto = |offers: &[(u32, HookOffer)]| resolve_probe(ProbeRequest::Auto, 777, offers);
        assert_eq!(
            auto(&[(1, profalloc(4096)), (2, profalloc(8192))]).unwrap(),
            Tracking::Hooks { sample_bytes: 4096 }
        );
        assert_eq!(
            auto(&[(1, profalloc(4096)), (2, glibc())]).unwrap(),
            Tracking::Malloc { sample_bytes: 777 }
        );
        assert_eq!(
            auto(&[(1, profalloc(0))]).unwrap(),
            Tracking::Malloc { sample_bytes: 777 }
        );
        assert_eq!(auto(&[]).unwrap(), Tracking::Malloc { sample_bytes: 777 });
    }

    #[test]
    fn forced_hooks_name_the_target_that_cannot_give_them() {
        let err = resolve_probe(ProbeRequest::Hooks, 0, &[(1, profalloc(64)), (42, glibc())])
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("pid 42") && err.contains("/lib/libc.so.6"),
            "{err}"
        );
        let err = resolve_probe(ProbeRequest::Hooks, 0, &[(7, profalloc(0))])
            .unwrap_err()
            .to_string();
        assert!(err.contains("off in pid 7"), "{err}");
    }

    #[test]
    fn malloc_ignores_the_offers() {
        assert_eq!(
            resolve_probe(ProbeRequest::Malloc, 0, &[(1, profalloc(64))]).unwrap(),
            Tracking::Malloc { sample_bytes: 0 }
        );
    }

    #[test]
    fn only_the_kernel_samples_with_the_malloc_family() {
        let hooks = Tracking::Hooks { sample_bytes: 64 };
        assert_eq!(hooks.kernel_sample_bytes(), 0);
        assert_eq!(hooks.sample_bytes(), 64);
        let malloc = Tracking::Malloc { sample_bytes: 64 };
        assert_eq!(malloc.kernel_sample_bytes(), 64);
        assert_eq!(
            Tracking::Malloc { sample_bytes: 0 }.comment(),
            "mode: malloc uprobes, every allocation tracked"
        );
        assert!(Tracking::Usdt.comment().contains("otel_memory USDT probes"));
        assert_eq!(Tracking::Usdt.kernel_sample_bytes(), 0);
    }
}
