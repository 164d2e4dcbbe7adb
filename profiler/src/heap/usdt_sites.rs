//! The `otel_memory:alloc(ptr, size, weight)` and `otel_memory:free(ptr)`
//! USDT probes of a running process, found in the `.note.stapsdt` notes of
//! its mapped objects, each site with the spec of where its arguments are
//! (`profiler_common::usdt`), decoded from the note's argument string:
//! registers, memory at a register (with index and scale) or at a symbol
//! (`sym(%rip)`), constants, of 1, 2, 4 or 8 bytes, signed or not.
use std::{collections::HashSet, path::PathBuf};

use anyhow::{Context as _, bail};
use profiler_common::usdt::{
    USDT_ARG_CONSTANT, USDT_ARG_MEMORY, USDT_ARG_REGISTER, USDT_MAX_ARGS, USDT_NO_REGISTER,
    UsdtArgSpec, UsdtSpec,
};

use super::discover;
use crate::{
    process,
    usdt::{self, Arg, Location, Probe, Reg},
};

/// The provider and probe names.
pub(crate) const PROVIDER: &str = profiler_common::hooks::USDT_PROVIDER;
const ALLOC: &str = profiler_common::hooks::USDT_ALLOC;
const FREE: &str = profiler_common::hooks::USDT_FREE;
/// Arguments of each probe: alloc(ptr, size, weight), free(ptr).
const ALLOC_ARGS: usize = 3;
const FREE_ARGS: usize = 1;

/// One probe site: where a uprobe attaches and where its arguments are.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Site {
    /// File offset of the site.
    pub offset: u64,
    pub spec: UsdtSpec,
}

/// The probe sites of one object.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct UsdtSites {
    /// Path as the target sees it (for messages).
    pub path: String,
    /// Path this process opens.
    pub open_path: PathBuf,
    /// The object's inode: an object mapped twice is probed once.
    pub inode: u64,
    pub alloc: Vec<Site>,
    pub free: Vec<Site>,
}

/// What a process offers: the objects with both probes. Fails when an
/// object has them with arguments that cannot be read.
pub(crate) fn for_process(pid: u32) -> anyhow::Result<Vec<UsdtSites>> {
    let (found, mut errors) = new_objects(pid, &mut HashSet::new())?;
    match errors.pop() {
        Some(err) => Err(err),
        None => Ok(found),
    }
}

/// The objects of [`for_process`] whose inodes are not in `seen`, which it
/// adds them to (those without probes too: each is read once), and the
/// errors of those whose sites cannot be read.
pub(crate) fn new_objects(
    pid: u32,
    seen: &mut HashSet<u64>,
) -> anyhow::Result<(Vec<UsdtSites>, Vec<anyhow::Error>)> {
    let maps = process::maps(pid)?;
    let mut found = Vec::new();
    let mut errors = Vec::new();
    for object in discover::mapped_objects(&maps) {
        if !seen.insert(object.inode) {
            continue;
        }
        let open_path = process::path_in_root(pid, &object.path);
        // Objects that cannot be read (deleted, not ELF) have no probes to offer.
        let Ok(probes) = usdt::probes_in_file(&open_path) else {
            continue;
        };
        match sites(&probes) {
            Ok(Some((alloc, free))) => found.push(UsdtSites {
                path: object.path.clone(),
                open_path,
                inode: object.inode,
                alloc,
                free,
            }),
            Ok(None) => {}
            Err(err) => errors.push(err.context(format!(
                "pid {pid}: the {PROVIDER} probes of {}",
                object.path
            ))),
        }
    }
    Ok((found, errors))
}

/// The probe sites of one object file given its bytes `data` (`path` as
/// processes see it, `open_path` as this process opens it): none when it
/// has not both probes or is not an ELF file; an error when it has them
/// with arguments that cannot be read.
pub(crate) fn in_object(
    path: &str,
    open_path: PathBuf,
    inode: u64,
    data: &[u8],
) -> anyhow::Result<Option<UsdtSites>> {
    let Ok(probes) = usdt::probes(data) else {
        return Ok(None);
    };
    Ok(sites(&probes)?.map(|(alloc, free)| UsdtSites {
        path: path.to_owned(),
        open_path,
        inode,
        alloc,
        free,
    }))
}

/// The `alloc` and `free` sites among `probes`, when there are both; an
/// error when a site's arguments cannot be read.
fn sites(probes: &[Probe]) -> anyhow::Result<Option<(Vec<Site>, Vec<Site>)>> {
    let of = |name: &str, wanted: usize| -> anyhow::Result<Vec<Site>> {
        let mut sites: Vec<Site> = Vec::new();
        for probe in probes
            .iter()
            .filter(|p| p.provider == PROVIDER && p.name == name)
        {
            let spec = spec(probe, wanted)?;
            if !sites.iter().any(|s| s.offset == probe.file_offset) {
                sites.push(Site {
                    offset: probe.file_offset,
                    spec,
                });
            }
        }
        Ok(sites)
    };
    let alloc = of(ALLOC, ALLOC_ARGS)?;
    let free = of(FREE, FREE_ARGS)?;
    Ok((!alloc.is_empty() && !free.is_empty()).then_some((alloc, free)))
}

/// Where the `wanted` arguments of `probe` are, or one line saying which
/// argument cannot be read and why.
pub(crate) fn spec(probe: &Probe, wanted: usize) -> anyhow::Result<UsdtSpec> {
    let site = format!(
        "{}:{} at file offset {:#x}",
        probe.provider, probe.name, probe.file_offset
    );
    if let Some(err) = &probe.args_error {
        bail!("{site}: {err} (use --probe malloc)");
    }
    if probe.args.len() != wanted || wanted > USDT_MAX_ARGS {
        bail!(
            "{site} has {} arguments (`{}`), the contract has {wanted} (use --probe malloc)",
            probe.args.len(),
            probe.args_text
        );
    }
    let mut spec = UsdtSpec {
        from_entry: u8::from(probe.return_address_at_sp),
        ..UsdtSpec::default()
    };
    for (slot, arg) in spec.args.iter_mut().zip(&probe.args) {
        *slot = arg_spec(arg, probe)
            .with_context(|| format!("{site}: argument `{}`", arg_text(arg)))
            .map_err(|err| anyhow::anyhow!("{err:#} (use --probe malloc)"))?;
    }
    Ok(spec)
}

/// The spec of one decoded argument.
fn arg_spec(arg: &Arg, probe: &Probe) -> anyhow::Result<UsdtArgSpec> {
    let mut spec = UsdtArgSpec {
        size: arg.size,
        signed: u8::from(arg.signed),
        index: USDT_NO_REGISTER,
        scale: 1,
        ..UsdtArgSpec::default()
    };
    match &arg.location {
        Location::Constant(value) => {
            spec.kind = USDT_ARG_CONSTANT;
            spec.offset = *value;
        }
        Location::Register(reg) => {
            if *reg == Reg::Rip {
                bail!("%rip is no argument register");
            }
            spec.kind = USDT_ARG_REGISTER;
            spec.base = reg_offset(*reg);
        }
        Location::Memory {
            base,
            index,
            offset,
            symbol,
        } => {
            spec.kind = USDT_ARG_MEMORY;
            spec.base = reg_offset(*base);
            spec.offset = *offset;
            match (base, symbol) {
                (Reg::Rip, Some(name)) => {
                    // In the program, rip is the probe's address: the
                    // symbol is as far from it as at link time.
                    let (_, addr) = probe
                        .symbols
                        .iter()
                        .find(|(s, _)| s == name)
                        .with_context(|| format!("the file defines no symbol `{name}`"))?;
                    spec.offset = addr.wrapping_add(*offset as u64).wrapping_sub(probe.pc) as i64;
                }
                (Reg::Rip, None) => {
                    bail!("a %rip displacement without a symbol has no defined address")
                }
                (_, Some(name)) => bail!("symbol `{name}` relative to a register other than %rip"),
                (_, None) => {}
            }
            if let Some((reg, scale)) = index {
                if *reg == Reg::Rip {
                    bail!("%rip cannot be an index");
                }
                spec.index = reg_offset(*reg);
                spec.scale = *scale;
            }
        }
    }
    Ok(spec)
}

fn reg_offset(reg: Reg) -> u16 {
    reg.pt_regs_offset() as u16
}

/// An argument written back (`-4@%r12`), for messages.
fn arg_text(arg: &Arg) -> String {
    let sign = if arg.signed { "-" } else { "" };
    let operand = match &arg.location {
        Location::Constant(v) => format!("${v}"),
        Location::Register(r) => format!("%{}", reg_name(*r)),
        Location::Memory {
            base,
            index,
            offset,
            symbol,
        } => {
            let disp = match symbol {
                Some(s) if *offset != 0 => format!("{s}{offset:+}"),
                Some(s) => s.clone(),
                None if *offset != 0 => offset.to_string(),
                None => String::new(),
            };
            let index = index
                .map(|(r, s)| format!(",%{},{s}", reg_name(r)))
                .unwrap_or_default();
            format!("{disp}(%{}{index})", reg_name(*base))
        }
    };
    format!("{sign}{}@{operand}", arg.size)
}

fn reg_name(reg: Reg) -> String {
    format!("{reg:?}").to_lowercase()
}

#[cfg(test)]
#[path = "usdt_sites_tests.rs"]
mod tests;
