//! Finding what to probe and attaching to it: the targets' allocators
//! (resolved before anything is loaded, so that bad input fails fast), the
//! heap programs, the `--mmap` tracepoints, and in launch mode the stops in
//! the program's loader.
use std::{
    num::NonZeroU32,
    path::{Path, PathBuf},
    time::Duration,
};

use anyhow::{Context as _, bail};
use aya::{
    Ebpf,
    programs::{
        TracePoint, UProbe,
        uprobe::{UProbeAttachLocation, UProbeAttachPoint, UProbeLinkId, UProbeScope},
    },
};
use log::{debug, info};
use profiler_common::heap::{LIVE_MAP, STACK_STATS_MAP};

use super::{
    discover::{self, Allocator, Role},
    maps, pymalloc,
    settings::{HookOffer, ProbeRequest, Settings, Targets, Tracking, resolve_probe},
    usdt_attach::{self, UsdtAttacher},
    usdt_sites::{self, PROVIDER},
};
use crate::{ebpf, launch, process};

pub(crate) const ENTRY_PROGRAM: &str = "heap_alloc_entry";
pub(crate) const RETURN_PROGRAM: &str = "heap_alloc_return";
pub(crate) const FREE_PROGRAM: &str = "heap_free_entry";
pub(crate) const HOOK_ALLOC_PROGRAM: &str = "heap_hook_alloc";
pub(crate) const HOOK_FREE_PROGRAM: &str = "heap_hook_free";
const LOADER_STOP_PROGRAM: &str = "heap_loader_stop";
/// `--mmap`: (program, syscall tracepoint), exits and munmap before the
/// entries that start calls, so that every call started has its end seen.
const MMAP_PROGRAMS: [(&str, &str); 5] = [
    ("heap_mmap_exit", "sys_exit_mmap"),
    ("heap_mremap_exit", "sys_exit_mremap"),
    ("heap_munmap_enter", "sys_enter_munmap"),
    ("heap_mmap_enter", "sys_enter_mmap"),
    ("heap_mremap_enter", "sys_enter_mremap"),
];
/// How long the launched program may take to reach its loader's stops.
const LOADER_STOP_WAIT: Duration = Duration::from_secs(5);

/// What a session attaches to, found before anything is loaded.
pub(crate) struct Plan {
    /// `--probe` resolved against the targets.
    pub tracking: Tracking,
    /// Each allocator with the processes its probes fire for.
    pub allocators: Vec<(Allocator, UProbeScope)>,
    /// Processes targeted by pid, the launched one included (empty with --all).
    pub pids: Vec<u32>,
    /// Launch mode: the program, held before exec.
    pub launch: Option<Launch>,
}

/// A program forked and held before exec until the probes are in place.
pub(crate) struct Launch {
    pub child: launch::Suspended,
    /// Its loader and the file offset of `_dl_debug_state`, when known.
    pub loader: Option<(PathBuf, u64)>,
}

/// Resolves the targets, their allocators and `--probe`. In launch mode
/// the program is forked here and held; on error it never runs.
pub(crate) fn plan(settings: &Settings) -> anyhow::Result<Plan> {
    if settings.probe == ProbeRequest::Hooks && !matches!(settings.targets, Targets::Pids(_)) {
        bail!("--probe hooks works with --pid targets only");
    }
    if settings.probe == ProbeRequest::Usdt && !matches!(settings.targets, Targets::Pids(_)) {
        bail!("--probe usdt works with --pid targets only");
    }
    if settings.pymalloc && !matches!(settings.targets, Targets::Pids(_)) {
        bail!("--pymalloc works with --pid targets only");
    }
    let malloc = Tracking::Malloc {
        sample_bytes: settings.sample_bytes,
    };
    let given_lib = |lib: &PathBuf| Allocator::from_file(&lib.to_string_lossy(), lib.clone());
    match &settings.targets {
        Targets::Pids(list) => {
            let mut allocators = Vec::new();
            let mut offers = Vec::new();
            let mut every_target_has_usdt = true;
            for &pid in list {
                let nz = NonZeroU32::new(pid).context("no process with pid 0")?;
                process::check_user_process(pid)?;
                let mut allocator = discover::for_process(pid, settings.lib.as_deref())?;
                if settings.probe != ProbeRequest::Malloc {
                    offers.push((pid, hook_offer(pid, &allocator)?));
                }
                if matches!(settings.probe, ProbeRequest::Auto | ProbeRequest::Usdt) {
                    allocator.usdt = usdt_offer(pid, settings.probe)?;
                    every_target_has_usdt &= !allocator.usdt.is_empty();
                }
                allocators.push((allocator, UProbeScope::OneProcess(nz)));
            }
            let tracking = match settings.probe {
                // Leak mode needs the whole heap: the allocator's live heap
                // (with the probes for its alloc values), else every
                // allocation since the attach.
                ProbeRequest::Auto if settings.leaks => {
                    if every_target_has_usdt
                        && !list.is_empty()
                        && list.iter().all(|&pid| crate::live_heap::read(pid).is_ok())
                    {
                        Tracking::Usdt
                    } else {
                        malloc
                    }
                }
                ProbeRequest::Auto if every_target_has_usdt && !list.is_empty() => Tracking::Usdt,
                request => resolve_probe(request, settings.sample_bytes, &offers)?,
            };
            if settings.pymalloc {
                // The interpreter's object allocator: one more allocator.
                for &pid in list {
                    let nz = NonZeroU32::new(pid).context("no process with pid 0")?;
                    allocators.push((pymalloc::for_process(pid)?, UProbeScope::OneProcess(nz)));
                }
            }
            Ok(Plan {
                tracking,
                allocators,
                pids: list.clone(),
                launch: None,
            })
        }
        Targets::All => {
            let allocator = match &settings.lib {
                Some(lib) => given_lib(lib)?,
                None => discover::own_libc()?,
            };
            Ok(Plan {
                tracking: malloc,
                allocators: vec![(allocator, UProbeScope::AllProcesses)],
                pids: Vec::new(),
                launch: None,
            })
        }
        Targets::Launch(command) => {
            let child = launch::spawn_suspended(command)?;
            let allocator = match &settings.lib {
                Some(lib) => given_lib(lib),
                None => launch::program::allocator_of_program(&child.program),
            };
            // On error the child sees EOF on its pipe and never runs.
            let allocator = allocator?;
            let pid = NonZeroU32::new(child.pid).context("fork returned pid 0")?;
            let loader = launch::program::loader_of_program(&child.program);
            Ok(Plan {
                tracking: malloc,
                allocators: vec![(allocator, UProbeScope::OneProcess(pid))],
                pids: vec![child.pid],
                launch: Some(Launch { child, loader }),
            })
        }
    }
}

/// What a running target's allocator offers the hooks.
fn hook_offer(pid: u32, allocator: &Allocator) -> anyhow::Result<HookOffer> {
    Ok(match &allocator.hooks {
        Some(hooks) => HookOffer::Rate(discover::hook_rate(pid, allocator, hooks)?),
        None => HookOffer::NoHooks {
            allocator: allocator.path.clone(),
        },
    })
}

/// The `otel_memory` USDT probe sites of running target `pid`. With
/// `--probe usdt`, fails when it has none or has them in a form the
/// programs cannot read; with `auto`, such a target just offers none.
fn usdt_offer(pid: u32, request: ProbeRequest) -> anyhow::Result<Vec<usdt_sites::UsdtSites>> {
    match (usdt_sites::for_process(pid), request) {
        (Ok(sites), ProbeRequest::Usdt) if sites.is_empty() => bail!(
            "--probe usdt: pid {pid} maps no object with {PROVIDER}:alloc and {PROVIDER}:free USDT probes"
        ),
        (Ok(sites), _) => Ok(sites),
        (Err(err), ProbeRequest::Usdt) => Err(err.context("--probe usdt")),
        (Err(err), _) => {
            log::warn!("{err:#}; probing pid {pid} otherwise");
            Ok(Vec::new())
        }
    }
}

/// Loads the programs with the maps sized and the sampler configured.
pub(crate) fn load(
    settings: &Settings,
    tracking: Tracking,
    mmap_new_targets: bool,
) -> anyhow::Result<Ebpf> {
    let (max_live, max_stacks) = (settings.max_live, settings.max_stacks);
    let mut ebpf = ebpf::load_with(|loader| {
        loader
            .map_max_entries(LIVE_MAP, max_live)
            .map_max_entries(STACK_STATS_MAP, max_stacks);
    })?;
    ebpf::spawn_logger(&mut ebpf);
    maps::configure(&mut ebpf, tracking.kernel_sample_bytes(), mmap_new_targets)?;
    let programs: &[&str] = match tracking {
        Tracking::Hooks { .. } => &[HOOK_FREE_PROGRAM, HOOK_ALLOC_PROGRAM],
        Tracking::Usdt => &[usdt_attach::FREE_PROGRAM, usdt_attach::ALLOC_PROGRAM],
        Tracking::Malloc { .. } => &[FREE_PROGRAM, RETURN_PROGRAM, ENTRY_PROGRAM],
    };
    for name in programs {
        let _: &mut UProbe = ebpf::program(&mut ebpf, name)?;
    }
    Ok(ebpf)
}

/// Attaches to one allocator: frees first, then the allocation returns,
/// then the allocation entries, so that every block recorded has its free
/// probed and every entry seen has its return probed.
pub(crate) fn allocator(
    ebpf: &mut Ebpf,
    tracking: Tracking,
    allocator: &Allocator,
    scope: UProbeScope,
    usdt: &mut UsdtAttacher,
) -> anyhow::Result<()> {
    let what = match scope {
        UProbeScope::OneProcess(pid) => format!("pid {pid}"),
        _ => "all processes".to_owned(),
    };
    if let Tracking::Usdt = tracking {
        usdt.attach(ebpf, &allocator.usdt, scope, &what)?;
        let objects: Vec<&str> = allocator.usdt.iter().map(|s| s.path.as_str()).collect();
        info!(
            "attached to the {PROVIDER} USDT probes of {} for {what}",
            objects.join(", ")
        );
        return Ok(());
    }
    if let Tracking::Hooks { .. } = tracking {
        let hooks = allocator
            .hooks
            .context("the allocator has no sampling hooks")?;
        // The free hook first, as with the malloc family.
        for (program, offset) in [
            (HOOK_FREE_PROGRAM, hooks.free_offset),
            (HOOK_ALLOC_PROGRAM, hooks.alloc_offset),
        ] {
            uprobe(ebpf, program)?
                .attach(
                    UProbeAttachLocation::AbsoluteOffset(offset),
                    &allocator.open_path,
                    scope,
                )
                .with_context(|| {
                    format!(
                        "attaching to the sampling hooks of {} for {what}",
                        allocator.path
                    )
                })?;
        }
        return Ok(());
    }
    malloc_family(ebpf, allocator, scope, &what)?;
    info!(
        "attached to {} entry points of {} (inode {}) for {what}",
        allocator.points.len(),
        allocator.path,
        allocator.inode
    );
    Ok(())
}

/// Attaches to the malloc family of `allocator` (frees first, then the
/// allocation returns, then the entries) and returns the links, so that
/// they can be detached again; on error, nothing stays attached.
pub(crate) fn malloc_family(
    ebpf: &mut Ebpf,
    allocator: &Allocator,
    scope: UProbeScope,
    what: &str,
) -> anyhow::Result<Vec<(&'static str, UProbeLinkId)>> {
    let mut links = Vec::new();
    for program in [FREE_PROGRAM, RETURN_PROGRAM, ENTRY_PROGRAM] {
        for point in &allocator.points {
            let cookie = match (program, point.role) {
                (FREE_PROGRAM, Role::Free) => None,
                (RETURN_PROGRAM | ENTRY_PROGRAM, Role::Alloc(kind)) => Some(kind as u64),
                _ => continue,
            };
            let result = uprobe(ebpf, program)?.attach(
                UProbeAttachPoint {
                    location: UProbeAttachLocation::AbsoluteOffset(point.probe_offset),
                    cookie,
                },
                &allocator.open_path,
                scope,
            );
            let err = match result {
                Ok(link) => {
                    links.push((program, link));
                    continue;
                }
                Err(err) => err,
            };
            detach(ebpf, std::mem::take(&mut links));
            if let UProbeScope::OneProcess(pid) = scope
                && process::check_pid(pid.get()).is_err()
            {
                bail!("pid {pid} exited while the probes were being attached");
            }
            let err = anyhow::Error::from(err).context(format!(
                "attaching to {} in {} for {what}",
                point.symbol, allocator.path
            ));
            // Another tracer's probe at the same place is named.
            return Err(crate::probe_conflict::explain(
                err,
                &allocator.open_path,
                point.probe_offset,
            ));
        }
    }
    Ok(links)
}

/// Detaches `links` (made by [`malloc_family`]).
pub(crate) fn detach(ebpf: &mut Ebpf, links: Vec<(&'static str, UProbeLinkId)>) {
    for (program, link) in links {
        match uprobe(ebpf, program).map(|probe| probe.detach(link)) {
            Ok(Ok(())) => {}
            Ok(Err(err)) => debug!("detaching {program}: {err}"),
            Err(err) => debug!("detaching {program}: {err:#}"),
        }
    }
}

/// `--mmap`: marks `pids` as mapping targets and attaches the syscall
/// tracepoints.
pub(crate) fn mmap_tracepoints(ebpf: &mut Ebpf, pids: &[u32]) -> anyhow::Result<()> {
    maps::add_mmap_targets(ebpf, pids)?;
    for (program, name) in MMAP_PROGRAMS {
        let tp: &mut TracePoint = ebpf::program(ebpf, program)?;
        tp.attach("syscalls", name)
            .with_context(|| format!("attaching to the tracepoint syscalls:{name}"))?;
    }
    Ok(())
}

/// Launch mode: makes the program stop each time its loader calls
/// `_dl_debug_state` (file `loader`, at `offset`), before and after it
/// maps the libraries (see `heap_loader_stop`).
pub(crate) fn loader_stop(
    ebpf: &mut Ebpf,
    pid: u32,
    loader: &Path,
    offset: u64,
) -> anyhow::Result<UProbeLinkId> {
    let nz = NonZeroU32::new(pid).context("no process with pid 0")?;
    let probe: &mut UProbe = ebpf::program(ebpf, LOADER_STOP_PROGRAM)?;
    probe
        .attach(
            UProbeAttachPoint {
                location: UProbeAttachLocation::AbsoluteOffset(offset),
                cookie: None,
            },
            loader,
            UProbeScope::OneProcess(nz),
        )
        .with_context(|| format!("attaching a uprobe to {}", loader.display()))
}

/// Serves the launched program's stops in its loader: at each, calls
/// `on_stop` (which loads the unwind tables of what it has mapped) and
/// continues it. The second stop comes once every library is mapped, before
/// any of their code (constructors, main) runs: from there on its stacks
/// are complete.
///
/// Stops are taken from the kernel's stop reports for this child
/// (`waitid(WSTOPPED)`, one report per stop), not from its state: a program
/// that runs from one stop to the next between two looks would otherwise
/// seem never to have left the first.
pub(crate) fn serve_loader_stops(pid: u32, mut on_stop: impl FnMut()) {
    let deadline = std::time::Instant::now() + LOADER_STOP_WAIT;
    let mut stops = 0;
    while stops < 2 && std::time::Instant::now() < deadline {
        if take_stop_report(pid) {
            stops += 1;
            launch::test_pause("loader-stop");
            on_stop();
            resume(pid);
            continue;
        }
        match process::state(pid) {
            None | Some('Z' | 'X') => break,
            Some(_) => std::thread::sleep(Duration::from_micros(200)),
        }
    }
}

/// Whether child `pid` has stopped since the last report taken, consuming
/// that report. Exits are not reported (nor reaped) here.
fn take_stop_report(pid: u32) -> bool {
    // SAFETY: a zeroed siginfo_t is a valid output buffer for waitid.
    let mut info: libc::siginfo_t = unsafe { std::mem::zeroed() };
    // SAFETY: waitid writes only into `info`.
    let rc = unsafe {
        libc::waitid(
            libc::P_PID,
            pid as libc::id_t,
            &raw mut info,
            libc::WSTOPPED | libc::WNOHANG,
        )
    };
    // SAFETY: after a successful waitid, si_pid is the field it filled (0
    // when no child had a report).
    rc == 0 && unsafe { info.si_pid() } == pid as libc::pid_t
}

/// Detaches the loader probe, and continues the program if it stopped
/// there meanwhile: it is never left stopped.
pub(crate) fn detach_loader_stop(ebpf: &mut Ebpf, link: UProbeLinkId, pid: u32) {
    match uprobe(ebpf, LOADER_STOP_PROGRAM).map(|probe| probe.detach(link)) {
        Ok(Ok(())) => {}
        Ok(Err(err)) => debug!("detaching the loader probe: {err}"),
        Err(err) => debug!("detaching the loader probe: {err:#}"),
    }
    // A stop that came after the wait ended.
    if process::state(pid) == Some('T') {
        resume(pid);
    }
}

/// The uprobe program `name`, loaded already by [`load`] or [`loader_stop`].
fn uprobe<'a>(ebpf: &'a mut Ebpf, name: &str) -> anyhow::Result<&'a mut UProbe> {
    ebpf.program_mut(name)
        .with_context(|| format!("eBPF program {name} missing from the object"))?
        .try_into()
        .with_context(|| format!("eBPF program {name} has an unexpected type"))
}

/// Continues a stopped process.
fn resume(pid: u32) {
    // SAFETY: kill has no memory-safety preconditions.
    unsafe { libc::kill(pid as i32, libc::SIGCONT) };
}
