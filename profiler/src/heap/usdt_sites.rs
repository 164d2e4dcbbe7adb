//! The `otel_memory:alloc(ptr, size, weight)` and `otel_memory:free(ptr)`
//! USDT probes of a running process, found in the `.note.stapsdt` notes of
//! its mapped objects. They are served by the kernel programs of
//! libprofalloc.so's sampling hooks, which read (ptr, size, weight) from
//! rdi, rsi and rdx: sites whose arguments the compiler placed elsewhere
//! are refused with the places they are in.
use std::path::PathBuf;

use anyhow::{Context as _, bail};

use super::discover;
use crate::{
    process,
    usdt::{self, Location, Probe, Reg},
};

/// The provider and probe names.
pub(crate) const PROVIDER: &str = "otel_memory";
const ALLOC: &str = "alloc";
const FREE: &str = "free";
/// Where the hook programs read the arguments of each probe.
const ALLOC_REGISTERS: [Reg; 3] = [Reg::Rdi, Reg::Rsi, Reg::Rdx];
const FREE_REGISTERS: [Reg; 1] = [Reg::Rdi];

/// The probe sites of one object.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct UsdtSites {
    /// Path as the target sees it (for messages).
    pub path: String,
    /// Path this process opens.
    pub open_path: PathBuf,
    /// File offsets of the `alloc` sites.
    pub alloc_offsets: Vec<u64>,
    /// File offsets of the `free` sites.
    pub free_offsets: Vec<u64>,
}

/// What a process offers: the objects with both probes. Fails when an
/// object has them with arguments the hook programs cannot read.
pub(crate) fn for_process(pid: u32) -> anyhow::Result<Vec<UsdtSites>> {
    let maps = process::maps(pid)?;
    let mut found = Vec::new();
    for object in discover::mapped_objects(&maps) {
        let open_path = process::path_in_root(pid, &object.path);
        // Objects that cannot be read (deleted, not ELF) have no probes to offer.
        let Ok(probes) = usdt::probes_in_file(&open_path) else {
            continue;
        };
        if let Some(sites) = from_probes(&object.path, open_path, &probes)
            .with_context(|| format!("pid {pid}: the {PROVIDER} probes of {}", object.path))?
        {
            found.push(sites);
        }
    }
    Ok(found)
}

/// The probe sites of one object file given its bytes `data` (`path` as
/// processes see it, `open_path` as this process opens it): none when it
/// has not both probes or is not an ELF file; an error when it has them
/// with arguments the hook programs cannot read.
pub(crate) fn in_object(
    path: &str,
    open_path: PathBuf,
    data: &[u8],
) -> anyhow::Result<Option<UsdtSites>> {
    let Ok(probes) = usdt::probes(data) else {
        return Ok(None);
    };
    from_probes(path, open_path, &probes)
}

fn from_probes(
    path: &str,
    open_path: PathBuf,
    probes: &[Probe],
) -> anyhow::Result<Option<UsdtSites>> {
    Ok(
        sites(probes)?.map(|(alloc_offsets, free_offsets)| UsdtSites {
            path: path.to_owned(),
            open_path,
            alloc_offsets,
            free_offsets,
        }),
    )
}

/// The file offsets of the `alloc` and `free` sites among `probes`, when
/// there are both; an error when a site's arguments are not where the hook
/// programs read them.
fn sites(probes: &[Probe]) -> anyhow::Result<Option<(Vec<u64>, Vec<u64>)>> {
    let of = |name: &str, registers: &[Reg]| -> anyhow::Result<Vec<u64>> {
        let mut offsets = Vec::new();
        for probe in probes
            .iter()
            .filter(|p| p.provider == PROVIDER && p.name == name)
        {
            check_args(probe, registers)?;
            if !offsets.contains(&probe.file_offset) {
                offsets.push(probe.file_offset);
            }
        }
        Ok(offsets)
    };
    let alloc = of(ALLOC, &ALLOC_REGISTERS)?;
    let free = of(FREE, &FREE_REGISTERS)?;
    Ok((!alloc.is_empty() && !free.is_empty()).then_some((alloc, free)))
}

/// Checks that the probe's arguments are 8-byte values in `registers`.
fn check_args(probe: &Probe, registers: &[Reg]) -> anyhow::Result<()> {
    let fits = probe.args.len() == registers.len()
        && probe
            .args
            .iter()
            .zip(registers)
            .all(|(arg, reg)| arg.size == 8 && arg.location == Location::Register(*reg));
    if !fits {
        let wanted: Vec<String> = registers
            .iter()
            .map(|r| format!("8@%{}", format!("{r:?}").to_lowercase()))
            .collect();
        bail!(
            "{PROVIDER}:{} at file offset {:#x} passes its arguments as `{}`; prof-bpf reads them only as `{}` (use --probe malloc)",
            probe.name,
            probe.file_offset,
            probe.args_text,
            wanted.join(" ")
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn probe(name: &str, args: &str, file_offset: u64) -> Probe {
        Probe {
            provider: PROVIDER.to_owned(),
            name: name.to_owned(),
            pc: file_offset,
            semaphore: 0,
            args_text: args.to_owned(),
            args: usdt::parse_args(args).unwrap(),
            file_offset,
        }
    }

    #[test]
    fn sites_in_the_hook_registers_are_taken() {
        let probes = [
            probe(ALLOC, "8@%rdi 8@%rsi 8@%rdx", 0x10),
            probe(ALLOC, "8@%rdi 8@%rsi 8@%rdx", 0x20),
            probe(FREE, "8@%rdi", 0x30),
            probe(FREE, "8@%rdi", 0x30),
        ];
        assert_eq!(
            sites(&probes).unwrap(),
            Some((vec![0x10, 0x20], vec![0x30]))
        );
    }

    #[test]
    fn other_registers_are_refused_naming_them() {
        let probes = [
            probe(ALLOC, "8@%rdi 8@%rbx 8@%r8", 0x13fb),
            probe(FREE, "8@%rdi", 0x14d8),
        ];
        let err = sites(&probes).unwrap_err().to_string();
        assert!(
            err.contains("8@%rdi 8@%rbx 8@%r8")
                && err.contains("0x13fb")
                && err.contains("8@%rdi 8@%rsi 8@%rdx"),
            "{err}"
        );
        let narrow = [probe(FREE, "4@%edi", 0x1)];
        assert!(sites(&narrow).is_err());
    }

    #[test]
    fn an_object_needs_both_probes() {
        assert_eq!(sites(&[probe(FREE, "8@%rdi", 0x30)]).unwrap(), None);
        let other = Probe {
            provider: "other".to_owned(),
            ..probe(ALLOC, "8@%rdi 8@%rsi 8@%rdx", 0x10)
        };
        assert_eq!(sites(&[other, probe(FREE, "8@%rdi", 0x30)]).unwrap(), None);
    }
}
