//! Attaching the USDT programs at a target's `otel_memory` sites: each
//! site's argument spec goes into the spec map, and the site's uprobe
//! carries the spec's index as its BPF cookie. Objects mapped after the
//! attach (dlopen) are probed when the session next looks at the target's
//! mappings.
use std::collections::{HashMap, HashSet};

use anyhow::{Context as _, bail};
use aya::{
    Ebpf,
    maps::Array,
    programs::{
        UProbe,
        uprobe::{UProbeAttachLocation, UProbeAttachPoint, UProbeScope},
    },
};
use profiler_common::usdt::{MAX_USDT_SPECS, USDT_SPECS_MAP, UsdtSpec};

use super::usdt_sites::{self, PROVIDER, Site, UsdtSites};

pub(crate) const ALLOC_PROGRAM: &str = "heap_usdt_alloc";
pub(crate) const FREE_PROGRAM: &str = "heap_usdt_free";

/// The specs written to the spec map, each once, and the objects whose
/// sites are attached, per process.
#[derive(Default)]
pub(crate) struct UsdtAttacher {
    specs: HashMap<UsdtSpec, u32>,
    /// Per target, the inodes of the mapped objects already looked at.
    seen: HashMap<u32, HashSet<u64>>,
}

impl UsdtAttacher {
    /// Attaches at every site of `objects` for `scope`: every free site
    /// before any alloc site, so that each block recorded has its free seen.
    pub(crate) fn attach(
        &mut self,
        ebpf: &mut Ebpf,
        objects: &[UsdtSites],
        scope: UProbeScope,
        what: &str,
    ) -> anyhow::Result<()> {
        if objects.is_empty() {
            bail!("{what} has no {PROVIDER} USDT probes");
        }
        if let UProbeScope::OneProcess(pid) = scope {
            self.seen
                .entry(pid.get())
                .or_default()
                .extend(objects.iter().map(|o| o.inode));
        }
        for (program, name) in [(FREE_PROGRAM, "free"), (ALLOC_PROGRAM, "alloc")] {
            for object in objects {
                let sites = if name == "free" {
                    &object.free
                } else {
                    &object.alloc
                };
                for site in sites {
                    self.attach_site(ebpf, program, object, site, scope)
                        .with_context(|| {
                            format!(
                                "attaching to {PROVIDER}:{name} at offset {:#x} of {} for {what}",
                                site.offset, object.path
                            )
                        })?;
                }
            }
        }
        Ok(())
    }

    fn attach_site(
        &mut self,
        ebpf: &mut Ebpf,
        program: &str,
        object: &UsdtSites,
        site: &Site,
        scope: UProbeScope,
    ) -> anyhow::Result<()> {
        let cookie = self.spec_index(ebpf, &site.spec)?;
        // Loaded by `attach::load`.
        let probe: &mut UProbe = ebpf
            .program_mut(program)
            .with_context(|| format!("eBPF program {program} missing from the object"))?
            .try_into()?;
        probe.attach(
            UProbeAttachPoint {
                location: UProbeAttachLocation::AbsoluteOffset(site.offset),
                cookie: Some(u64::from(cookie)),
            },
            &object.open_path,
            scope,
        )?;
        Ok(())
    }

    /// The index of `spec` in the spec map, written there on first use.
    fn spec_index(&mut self, ebpf: &mut Ebpf, spec: &UsdtSpec) -> anyhow::Result<u32> {
        if let Some(&i) = self.specs.get(spec) {
            return Ok(i);
        }
        let index = u32::try_from(self.specs.len()).unwrap_or(u32::MAX);
        if index >= MAX_USDT_SPECS {
            bail!("more than {MAX_USDT_SPECS} distinct USDT argument layouts");
        }
        let map = ebpf
            .map_mut(USDT_SPECS_MAP)
            .with_context(|| format!("map {USDT_SPECS_MAP} missing from the object"))?;
        let mut specs: Array<_, UsdtSpec> = Array::try_from(map)?;
        specs.set(index, *spec, 0)?;
        self.specs.insert(*spec, index);
        Ok(index)
    }

    /// Attaches at the sites of the objects `pid` mapped since it was last
    /// looked at; returns their paths. An object whose sites cannot be read
    /// or attached is reported and left out.
    pub(crate) fn follow(&mut self, ebpf: &mut Ebpf, pid: u32) -> Vec<String> {
        let Some(nz) = std::num::NonZeroU32::new(pid) else {
            return Vec::new();
        };
        let seen = self.seen.entry(pid).or_default();
        let found = match usdt_sites::new_objects(pid, seen) {
            Ok((found, errors)) => {
                for err in errors {
                    log::warn!("{err:#}");
                }
                found
            }
            // The process is gone, or its maps are unreadable now.
            Err(err) => {
                log::debug!("{err:#}");
                return Vec::new();
            }
        };
        let mut attached = Vec::new();
        for object in found {
            let what = format!("pid {pid}");
            match self.attach(
                ebpf,
                std::slice::from_ref(&object),
                UProbeScope::OneProcess(nz),
                &what,
            ) {
                Ok(()) => attached.push(object.path),
                Err(err) => log::warn!("{err:#}"),
            }
        }
        attached
    }
}
