//! Looks up the interpreter's exported symbols (`.dynsym`, through the GNU
//! hash table of each loaded object's dynamic section), without dlsym:
//! dlsym of a missing name builds its error message with malloc, which
//! would re-enter the allocator during its initialisation.

/// An exported symbol: its address in the process and its size.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Symbol {
    pub address: usize,
    pub size: usize,
}

/// What is looked up, and what was found (in the first object that
/// exports `names[0]`).
pub(crate) struct Lookup<'a> {
    pub names: &'a [&'a [u8]],
    pub found: [Option<Symbol>; 8],
    /// The file name of the object that exports `names[0]`, as the loader
    /// has it (empty for the executable); null when none does.
    pub object: *const libc::c_char,
    /// That object's load bias and program headers (the loader keeps them
    /// while the object stays loaded).
    pub bias: usize,
    pub phdrs: &'static [libc::Elf64_Phdr],
}

/// Searches every loaded object for `lookup.names` (at most 8). The first
/// name decides the object: the others are taken from the same object.
#[unsafe(link_section = ".text.hot.profalloc")]
pub(crate) fn find(lookup: &mut Lookup<'_>) {
    debug_assert!(lookup.names.len() <= 8);
    // SAFETY: the callback only reads the loaded objects' headers and
    // dynamic sections, which stay mapped while the loader lists them.
    unsafe { libc::dl_iterate_phdr(Some(visit), (lookup as *mut Lookup<'_>).cast()) };
}

#[unsafe(link_section = ".text.hot.profalloc")]
unsafe extern "C" fn visit(
    info: *mut libc::dl_phdr_info,
    _size: usize,
    data: *mut libc::c_void,
) -> i32 {
    // SAFETY: the loader's info is valid during the call; data is our Lookup.
    unsafe {
        let info = &*info;
        let lookup = &mut *data.cast::<Lookup<'_>>();
        let bias = info.dlpi_addr as usize;
        let phdrs = core::slice::from_raw_parts(info.dlpi_phdr, info.dlpi_phnum as usize);
        let Some(dynamic) = phdrs.iter().find(|p| p.p_type == libc::PT_DYNAMIC) else {
            return 0;
        };
        let Some(table) = DynTable::read(bias, bias + dynamic.p_vaddr as usize) else {
            return 0;
        };
        let Some(first) = table.lookup(lookup.names[0]) else {
            return 0;
        };
        lookup.found[0] = Some(first);
        lookup.object = info.dlpi_name;
        lookup.bias = bias;
        lookup.phdrs = phdrs;
        for (i, name) in lookup.names.iter().enumerate().skip(1) {
            lookup.found[i] = table.lookup(name);
        }
        1
    }
}

/// An entry of a dynamic section (`Elf64_Dyn`).
#[repr(C)]
struct Dyn {
    tag: i64,
    value: u64,
}

const DT_NULL: i64 = 0;
const DT_STRTAB: i64 = 5;
const DT_SYMTAB: i64 = 6;
const DT_GNU_HASH: i64 = 0x6fff_fef5;

struct DynTable {
    bias: usize,
    symtab: usize,
    strtab: usize,
    gnu_hash: usize,
}

impl DynTable {
    /// # Safety
    /// `dynamic` is the address of a loaded object's dynamic section.
    unsafe fn read(bias: usize, dynamic: usize) -> Option<Self> {
        let (mut symtab, mut strtab, mut gnu_hash) = (0, 0, 0);
        let mut p = dynamic as *const Dyn;
        // SAFETY: the section ends with DT_NULL.
        unsafe {
            for _ in 0..4096 {
                let d = &*p;
                // The loader relocates these in place in most objects, not
                // in all (the vdso): an address below the bias is unrelocated.
                let ptr = d.value as usize;
                let ptr = if ptr < bias { ptr + bias } else { ptr };
                match d.tag {
                    DT_NULL => break,
                    DT_SYMTAB => symtab = ptr,
                    DT_STRTAB => strtab = ptr,
                    DT_GNU_HASH => gnu_hash = ptr,
                    _ => {}
                }
                p = p.add(1);
            }
        }
        (symtab != 0 && strtab != 0 && gnu_hash != 0).then_some(Self {
            bias,
            symtab,
            strtab,
            gnu_hash,
        })
    }

    /// The defined symbol `name`, through the GNU hash table.
    fn lookup(&self, name: &[u8]) -> Option<Symbol> {
        let h = name.iter().fold(5381u32, |h, &c| {
            h.wrapping_mul(33).wrapping_add(u32::from(c))
        });
        // SAFETY: the table's layout is the ELF GNU hash section's; every
        // index read is bounded by the header's counts.
        unsafe {
            let head = self.gnu_hash as *const u32;
            let (nbuckets, symoffset, bloom_size) = (*head, *head.add(1), *head.add(2));
            if nbuckets == 0 {
                return None;
            }
            let buckets = head.add(4 + 2 * bloom_size as usize);
            let chains = buckets.add(nbuckets as usize);
            let mut i = *buckets.add((h % nbuckets) as usize);
            if i < symoffset {
                return None;
            }
            loop {
                let chain = *chains.add((i - symoffset) as usize);
                if chain | 1 == h | 1 {
                    let sym = &*(self.symtab as *const libc::Elf64_Sym).add(i as usize);
                    let s = core::ffi::CStr::from_ptr((self.strtab + sym.st_name as usize) as _);
                    if s.to_bytes() == name && sym.st_shndx != 0 && sym.st_value != 0 {
                        return Some(Symbol {
                            address: self.bias + sym.st_value as usize,
                            size: sym.st_size as usize,
                        });
                    }
                }
                if chain & 1 != 0 {
                    return None;
                }
                i += 1;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_libc_exports_with_their_sizes() {
        let mut l = Lookup {
            names: &[b"malloc_usable_size", b"getpid", b"no_such_symbol_here"],
            found: [None; 8],
            object: core::ptr::null(),
            bias: 0,
            phdrs: &[],
        };
        find(&mut l);
        let getpid = l.found[1].expect("getpid");
        assert_eq!(getpid.address, libc::getpid as *const () as usize);
        assert!(getpid.size > 0);
        assert_eq!(l.found[2], None);
        // SAFETY: the loader's name of the object, NUL-terminated.
        let object = unsafe { core::ffi::CStr::from_ptr(l.object) };
        assert!(object.to_string_lossy().contains("libc.so"), "{object:?}");
    }
}
