//! [`Profile::symbolize`]: frames for the locations that have none, one
//! lookup batch per mapping.
use std::collections::HashMap;

use super::{LocationKind, Profile};
use crate::symbolize::{SymbolCache, SymbolSource};

impl Profile {
    /// Gives frames to every location that has none and whose mapping has a
    /// `local_path` (user objects, or the kernel's mapping with a kallsyms
    /// file). Objects that cannot be read are noted in the comments; their
    /// addresses stay unresolved.
    pub fn symbolize(&mut self) {
        self.symbolize_with(&SymbolCache::new());
    }

    /// [`Profile::symbolize`] with objects parsed by earlier calls kept in
    /// `cache`.
    pub fn symbolize_with(&mut self, cache: &SymbolCache) {
        // Locations to look up, per mapping.
        let mut per_mapping: HashMap<usize, Vec<usize>> = HashMap::new();
        for (i, loc) in self.locations.iter().enumerate() {
            if !loc.frames.is_empty() || loc.kind == LocationKind::Marker {
                continue;
            }
            if let Some(m) = loc.mapping
                && self.mappings.get(m).is_some_and(|m| m.local_path.is_some())
            {
                per_mapping.entry(m).or_default().push(i);
            }
        }
        let mut mapping_ids: Vec<usize> = per_mapping.keys().copied().collect();
        mapping_ids.sort_unstable();
        for m in mapping_ids {
            let locations = &per_mapping[&m];
            let mapping = &self.mappings[m];
            let Some(local) = mapping.local_path.clone() else {
                continue;
            };
            let kernel = mapping.is_kernel();
            // The kernel is looked up by address, objects by file offset.
            let addrs: Vec<u64> = locations
                .iter()
                .map(|&l| {
                    let a = self.locations[l].address;
                    if kernel {
                        a
                    } else {
                        a.wrapping_sub(mapping.start).wrapping_add(mapping.offset)
                    }
                })
                .collect();
            let source = if kernel {
                SymbolSource::Kernel(&local)
            } else {
                SymbolSource::Elf(&local)
            };
            match cache.frames(source, &addrs) {
                Ok(frames) => {
                    for (&l, frames) in locations.iter().zip(frames) {
                        self.locations[l].frames = frames;
                    }
                }
                Err(err) => {
                    let name = self.mappings[m].file.clone();
                    self.comments
                        .push(format!("could not symbolize {name}: {err:#}"));
                }
            }
        }
    }
}
