//! [`SymbolCache`]: addresses of objects and of the kernel to frames, with
//! blazesym, each object parsed once and each address looked up once
//! while the cache lives (a long-running profiler meets the same hot
//! addresses in every interval).
use std::{
    cell::RefCell,
    collections::HashMap,
    path::Path,
    rc::Rc,
    time::{Duration, Instant},
};

use blazesym::symbolize::{
    Input, Symbolized, Symbolizer,
    source::{Elf, Kernel, Source},
};

use super::{FileIdentity, Frame, identity_of};

/// Where the kernel's symbols are read from.
pub(crate) const KALLSYMS: &str = "/proc/kallsyms";

/// What a batch of addresses is looked up in.
#[derive(Clone, Copy, Debug)]
pub enum SymbolSource<'a> {
    /// An ELF object; the addresses are file offsets.
    Elf(&'a Path),
    /// The kernel, through a kallsyms file; the addresses are absolute.
    Kernel(&'a Path),
}

/// Default bound on the bytes of object files the cache keeps mapped.
pub const DEFAULT_MAPPED_BOUND: u64 = 128 << 20;

/// How long the kernel's symbols are kept before `/proc/kallsyms` is read
/// again (modules come and go; reading and sorting it costs tens of ms).
const KERNEL_REFRESH: Duration = Duration::from_secs(600);

/// Parsed objects (symbol tables, DWARF) kept across lookups. Holds `Rc`s:
/// one per thread.
///
/// Each object has a symbolizer of its own, so that it can be dropped on
/// its own: blazesym maps the whole file it reads, and a host's objects
/// (compilers, debuggers with gigabytes of debug info) would otherwise stay
/// mapped, and partly resident, for as long as the cache lives. When the
/// objects' file sizes add up to more than the bound, the least recently
/// used are dropped first. The kernel's symbols are kept apart, read once
/// per [`KERNEL_REFRESH`].
///
/// The frames found in objects are kept too, by object and address (at most
/// [`MAX_MEMO`] addresses, then forgotten all at once): a long-running
/// profiler meets the same hot addresses in every profile it symbolizes.
pub struct SymbolCache {
    kernel: RefCell<Option<(Instant, Symbolizer)>>,
    objects: RefCell<ObjectCache>,
    memo: RefCell<HashMap<(FileIdentity, u64), Vec<Frame>>>,
}

/// Addresses whose frames are kept at most.
const MAX_MEMO: usize = 100_000;

/// The per-object symbolizers, least recently used dropped first.
struct ObjectCache {
    /// Keyed by the file's identity, not its path: `/proc/self/fd/N`
    /// paths are reused for other files.
    entries: HashMap<FileIdentity, CachedObject>,
    /// Sum of the entries' file sizes.
    mapped: u64,
    bound: u64,
    /// Lookups so far: each entry's `used` is the tick of its last one.
    tick: u64,
}

struct CachedObject {
    symbolizer: Rc<Symbolizer>,
    size: u64,
    used: u64,
}

impl Default for SymbolCache {
    fn default() -> Self {
        Self::new()
    }
}

impl SymbolCache {
    pub fn new() -> Self {
        Self::with_mapped_bound(DEFAULT_MAPPED_BOUND)
    }

    /// A cache that keeps at most `bound` bytes of object files mapped
    /// (an object larger than the bound is parsed for each batch, never
    /// kept).
    pub fn with_mapped_bound(bound: u64) -> Self {
        Self {
            kernel: RefCell::new(None),
            objects: RefCell::new(ObjectCache {
                entries: HashMap::new(),
                mapped: 0,
                bound,
                tick: 0,
            }),
            memo: RefCell::new(HashMap::new()),
        }
    }

    /// Bytes of object files held now, and how many objects.
    pub fn mapped(&self) -> (u64, usize) {
        let objects = self.objects.borrow();
        (objects.mapped, objects.entries.len())
    }

    /// The frames at each address, innermost first; empty where no symbol
    /// covers the address. Addresses looked up before are not looked up
    /// again.
    pub fn frames(
        &self,
        source: SymbolSource<'_>,
        addrs: &[u64],
    ) -> anyhow::Result<Vec<Vec<Frame>>> {
        // The kernel's symbols are one binary search each, once loaded.
        let SymbolSource::Elf(path) = source else {
            return self.look_up(source, addrs);
        };
        let Ok(meta) = path.metadata() else {
            // Unreadable: blazesym says why.
            return self.look_up(source, addrs);
        };
        let object = identity_of(&meta);
        let mut missing: Vec<u64> = {
            let memo = self.memo.borrow();
            addrs
                .iter()
                .copied()
                .filter(|&a| !memo.contains_key(&(object, a)))
                .collect()
        };
        missing.sort_unstable();
        missing.dedup();
        let found: HashMap<u64, Vec<Frame>> = if missing.is_empty() {
            HashMap::new()
        } else {
            let frames = self.look_up(source, &missing)?;
            missing.into_iter().zip(frames).collect()
        };
        let mut memo = self.memo.borrow_mut();
        let frames = addrs
            .iter()
            .map(|a| {
                found
                    .get(a)
                    .or_else(|| memo.get(&(object, *a)))
                    .cloned()
                    .unwrap_or_default()
            })
            .collect();
        if memo.len() + found.len() > MAX_MEMO {
            memo.clear();
        }
        memo.extend(found.into_iter().map(|(a, f)| ((object, a), f)));
        Ok(frames)
    }

    /// The frames at each address, from blazesym.
    fn look_up(&self, source: SymbolSource<'_>, addrs: &[u64]) -> anyhow::Result<Vec<Vec<Frame>>> {
        let symbols = match source {
            SymbolSource::Kernel(kallsyms) => {
                let src = Source::Kernel(Kernel {
                    kallsyms: blazesym::MaybeDefault::Some(kallsyms.to_path_buf()),
                    vmlinux: blazesym::MaybeDefault::None,
                    ..Kernel::default()
                });
                let mut kernel = self.kernel.borrow_mut();
                if kernel
                    .as_ref()
                    .is_none_or(|(at, _)| at.elapsed() >= KERNEL_REFRESH)
                {
                    *kernel = Some((Instant::now(), Symbolizer::new()));
                }
                let (_, symbolizer) = kernel.as_ref().expect("set above");
                let symbols = symbolizer.symbolize(&src, Input::AbsAddr(addrs))?;
                return Ok(symbols.into_iter().map(frames_of).collect());
            }
            SymbolSource::Elf(path) => {
                let symbolizer = self.objects.borrow_mut().symbolizer_for(path);
                let src = Source::Elf(Elf::new(path));
                let symbols = symbolizer.symbolize(&src, Input::FileOffset(addrs))?;
                symbols.into_iter().map(frames_of).collect()
            }
        };
        Ok(symbols)
    }
}

impl ObjectCache {
    /// The symbolizer of the object at `path`, made room for.
    fn symbolizer_for(&mut self, path: &Path) -> Rc<Symbolizer> {
        self.tick += 1;
        let tick = self.tick;
        let Ok(meta) = path.metadata() else {
            // Unreadable: blazesym reports the error; nothing to keep.
            return Rc::new(Symbolizer::new());
        };
        let identity = identity_of(&meta);
        if let Some(entry) = self.entries.get_mut(&identity) {
            entry.used = tick;
            return entry.symbolizer.clone();
        }
        let size = meta.len();
        if size > self.bound {
            // Kept, it would push every other object out (a build host's
            // libLLVM, a debug binary of hundreds of MB): the others, with
            // their debug files inflated and indexed, would be parsed again
            // for every profile. It serves this batch only.
            return Rc::new(Symbolizer::new());
        }
        while self.mapped + size > self.bound {
            let Some(oldest) = self
                .entries
                .iter()
                .min_by_key(|(_, e)| e.used)
                .map(|(k, _)| *k)
            else {
                break;
            };
            let dropped = self.entries.remove(&oldest).expect("listed above");
            self.mapped -= dropped.size;
        }
        let symbolizer = Rc::new(Symbolizer::new());
        self.entries.insert(
            identity,
            CachedObject {
                symbolizer: symbolizer.clone(),
                size,
                used: tick,
            },
        );
        self.mapped += size;
        symbolizer
    }
}

/// A blazesym result as frames, innermost first.
fn frames_of(sym: Symbolized<'_>) -> Vec<Frame> {
    let Symbolized::Sym(sym) = sym else {
        return Vec::new();
    };
    let code = |c: Option<&blazesym::symbolize::CodeInfo<'_>>| {
        c.map_or((String::new(), 0), |c| {
            (
                c.to_path().display().to_string(),
                i64::from(c.line.unwrap_or(0)),
            )
        })
    };
    let mut frames = Vec::with_capacity(sym.inlined.len() + 1);
    // blazesym lists inlined calls outermost first; each carries the source
    // location inside that inlined function.
    for f in sym.inlined.iter().rev() {
        let (file, line) = code(f.code_info.as_ref());
        frames.push(Frame {
            function: f.name.to_string(),
            file,
            line,
            inlined: true,
        });
    }
    let (file, line) = code(sym.code_info.as_deref());
    frames.push(Frame {
        function: sym.name.to_string(),
        file,
        line,
        inlined: false,
    });
    frames
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_are_looked_up_once_and_answered_alike() {
        let addr = addresses_are_looked_up_once_and_answered_alike as *const () as u64;
        let maps = crate::process::maps(std::process::id()).unwrap();
        let m = maps
            .iter()
            .find(|m| m.start <= addr && addr < m.end)
            .unwrap();
        let offset = addr - m.start + m.offset;
        let object = std::path::PathBuf::from(&m.path);
        let cache = SymbolCache::new();
        let first = cache
            .frames(SymbolSource::Elf(&object), &[offset, offset, 0])
            .unwrap();
        assert!(
            first[0]
                .iter()
                .any(|f| f.function.contains("addresses_are_looked_up_once")),
            "{first:?}"
        );
        assert_eq!(first[0], first[1]);
        assert_eq!(cache.memo.borrow().len(), 2, "each address once");
        let again = cache
            .frames(SymbolSource::Elf(&object), &[0, offset])
            .unwrap();
        assert_eq!(again, vec![first[2].clone(), first[0].clone()]);
        assert_eq!(cache.memo.borrow().len(), 2);
    }

    #[test]
    fn the_object_cache_drops_the_least_recently_used_beyond_its_bound() {
        let dir = std::env::temp_dir().join(format!("prof-bpf-lru-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = |name: &str, size: usize| {
            let path = dir.join(name);
            std::fs::write(&path, vec![0u8; size]).unwrap();
            path
        };
        let (a, b, c) = (file("a", 100), file("b", 100), file("c", 100));
        let cache = SymbolCache::with_mapped_bound(250);
        let mut objects = cache.objects.borrow_mut();
        let first_a = objects.symbolizer_for(&a);
        let first_b = objects.symbolizer_for(&b);
        assert_eq!((objects.mapped, objects.entries.len()), (200, 2));
        // a is used again, so b is the one dropped for c.
        assert!(Rc::ptr_eq(&first_a, &objects.symbolizer_for(&a)));
        objects.symbolizer_for(&c);
        assert_eq!((objects.mapped, objects.entries.len()), (200, 2));
        assert!(Rc::ptr_eq(&first_a, &objects.symbolizer_for(&a)));
        assert!(!Rc::ptr_eq(&first_b, &objects.symbolizer_for(&b)));
        // An object larger than the bound is not kept, nor does it push
        // the others out.
        let big = file("big", 1000);
        let first_big = objects.symbolizer_for(&big);
        assert_eq!((objects.mapped, objects.entries.len()), (200, 2));
        assert!(!Rc::ptr_eq(&first_big, &objects.symbolizer_for(&big)));
        drop(objects);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
