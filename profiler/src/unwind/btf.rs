//! Just enough of a BTF reader to find where the running kernel keeps a
//! struct's field (`/sys/kernel/btf/vmlinux`): the walker reads a few
//! kernel structures at these offsets ([`super::files`]). Fields inside
//! anonymous structs and unions, and paths through embedded structs
//! (`mm_struct.context.vdso`), are found as C would name them.
use thiserror::Error;

/// Why a BTF blob could not be read.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum BtfError {
    #[error("not BTF (bad magic)")]
    Magic,
    #[error("BTF truncated at byte {0}")]
    Truncated(usize),
    #[error("unknown BTF type kind {0}")]
    Kind(u32),
}

const MAGIC: u16 = 0xeb9f;
const KIND_STRUCT: u8 = 4;
const KIND_UNION: u8 = 5;
const KIND_TYPEDEF: u8 = 8;
const KIND_VOLATILE: u8 = 9;
const KIND_CONST: u8 = 10;
const KIND_RESTRICT: u8 = 11;
const KIND_TYPE_TAG: u8 = 18;

/// One type: its kind, name and, for structs and unions, its members
/// (`members[first..first + len]`).
#[derive(Clone, Copy, Debug)]
struct Type {
    name: u32,
    kind: u8,
    /// The referred type (typedef, const, ...), else the size.
    size_or_type: u32,
    first: u32,
    len: u32,
}

/// A struct or union member: name, type and offset in bits.
#[derive(Clone, Copy, Debug)]
struct Member {
    name: u32,
    ty: u32,
    bits: u32,
}

/// The types of one BTF blob.
pub struct Btf {
    /// Type id n is `types[n - 1]` (id 0 is void).
    types: Vec<Type>,
    members: Vec<Member>,
    strings: Vec<u8>,
}

fn u32_at(data: &[u8], at: usize) -> Result<u32, BtfError> {
    data.get(at..at + 4)
        .map(|b| u32::from_le_bytes(b.try_into().expect("4 bytes")))
        .ok_or(BtfError::Truncated(at))
}

impl Btf {
    /// Reads a little-endian BTF blob (the kernel's own, on x86-64).
    pub fn parse(data: &[u8]) -> Result<Self, BtfError> {
        let magic = data.get(0..2).ok_or(BtfError::Truncated(0))?;
        if u16::from_le_bytes([magic[0], magic[1]]) != MAGIC {
            return Err(BtfError::Magic);
        }
        let hdr_len = u32_at(data, 4)? as usize;
        let (type_off, type_len) = (u32_at(data, 8)? as usize, u32_at(data, 12)? as usize);
        let (str_off, str_len) = (u32_at(data, 16)? as usize, u32_at(data, 20)? as usize);
        let strings = data
            .get(hdr_len + str_off..hdr_len + str_off + str_len)
            .ok_or(BtfError::Truncated(hdr_len + str_off + str_len))?
            .to_vec();
        let (mut at, end) = (hdr_len + type_off, hdr_len + type_off + type_len);
        let mut types = Vec::new();
        let mut members = Vec::new();
        while at < end {
            let name = u32_at(data, at)?;
            let info = u32_at(data, at + 4)?;
            let size_or_type = u32_at(data, at + 8)?;
            at += 12;
            let (kind, vlen) = (((info >> 24) & 0x1f) as u8, (info & 0xffff) as usize);
            let bitfields = info >> 31 == 1;
            let first = members.len() as u32;
            let extra = match kind {
                // void placeholder kinds with no data: ptr, fwd, typedef,
                // volatile, const, restrict, func, float, type tag.
                2 | 7..=12 | 16 | 18 => 0,
                // int, var, decl tag.
                1 | 14 | 17 => 4,
                3 => 12,
                KIND_STRUCT | KIND_UNION => {
                    for i in 0..vlen {
                        let m = at + i * 12;
                        let offset = u32_at(data, m + 8)?;
                        members.push(Member {
                            name: u32_at(data, m)?,
                            ty: u32_at(data, m + 4)?,
                            bits: if bitfields {
                                offset & 0xff_ffff
                            } else {
                                offset
                            },
                        });
                    }
                    vlen * 12
                }
                6 | 13 => vlen * 8,
                15 | 19 => vlen * 12,
                other => return Err(BtfError::Kind(other.into())),
            };
            at += extra;
            types.push(Type {
                name,
                kind,
                size_or_type,
                first,
                len: members.len() as u32 - first,
            });
        }
        if at != end {
            return Err(BtfError::Truncated(end));
        }
        Ok(Self {
            types,
            members,
            strings,
        })
    }

    fn name(&self, offset: u32) -> &[u8] {
        let rest = self.strings.get(offset as usize..).unwrap_or_default();
        &rest[..rest.iter().position(|&b| b == 0).unwrap_or(rest.len())]
    }

    fn get(&self, id: u32) -> Option<&Type> {
        self.types.get((id as usize).checked_sub(1)?)
    }

    /// `id` without typedefs and qualifiers.
    fn resolve(&self, mut id: u32) -> Option<&Type> {
        for _ in 0..32 {
            let t = self.get(id)?;
            match t.kind {
                KIND_TYPEDEF | KIND_VOLATILE | KIND_CONST | KIND_RESTRICT | KIND_TYPE_TAG => {
                    id = t.size_or_type;
                }
                _ => return Some(t),
            }
        }
        None
    }

    /// Byte offset of `path` (member names, each in the struct or union
    /// the previous one is) in struct `name`.
    pub fn offset_of(&self, name: &str, path: &[&str]) -> Option<u32> {
        let mut ty = self
            .types
            .iter()
            .find(|t| t.kind == KIND_STRUCT && self.name(t.name) == name.as_bytes())?;
        let mut bits = 0;
        for (i, field) in path.iter().enumerate() {
            let (at, member_ty) = self.member(ty, field.as_bytes(), 0)?;
            bits += at;
            if i + 1 < path.len() {
                ty = self.resolve(member_ty)?;
            }
        }
        (bits % 8 == 0).then_some(bits / 8)
    }

    /// Bit offset and type of member `name` of `ty`, looking into
    /// anonymous members too.
    fn member(&self, ty: &Type, name: &[u8], depth: u32) -> Option<(u32, u32)> {
        if !matches!(ty.kind, KIND_STRUCT | KIND_UNION) || depth > 8 {
            return None;
        }
        let members = self
            .members
            .get(ty.first as usize..(ty.first + ty.len) as usize)?;
        for m in members {
            if m.name != 0 && self.name(m.name) == name {
                return Some((m.bits, m.ty));
            }
        }
        members.iter().filter(|m| m.name == 0).find_map(|m| {
            let inner = self.resolve(m.ty)?;
            let (at, t) = self.member(inner, name, depth + 1)?;
            Some((m.bits + at, t))
        })
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// Builds BTF blobs for tests.
    #[derive(Default)]
    pub(crate) struct Builder {
        types: Vec<u8>,
        strings: Vec<u8>,
        next: u32,
    }

    impl Builder {
        pub(crate) fn new() -> Self {
            Self {
                strings: vec![0],
                next: 1,
                ..Self::default()
            }
        }

        fn string(&mut self, s: &str) -> u32 {
            if s.is_empty() {
                return 0;
            }
            let at = self.strings.len() as u32;
            self.strings.extend_from_slice(s.as_bytes());
            self.strings.push(0);
            at
        }

        fn header(&mut self, name: &str, kind: u32, vlen: u32, size_or_type: u32) -> u32 {
            let name = self.string(name);
            for v in [name, kind << 24 | vlen, size_or_type] {
                self.types.extend_from_slice(&v.to_le_bytes());
            }
            self.next += 1;
            self.next - 1
        }

        pub(crate) fn int(&mut self, name: &str, size: u32) -> u32 {
            let id = self.header(name, 1, 0, size);
            self.types.extend_from_slice(&(size * 8).to_le_bytes());
            id
        }

        pub(crate) fn ptr(&mut self, to: u32) -> u32 {
            self.header("", 2, 0, to)
        }

        pub(crate) fn typedef(&mut self, name: &str, to: u32) -> u32 {
            self.header(name, 8, 0, to)
        }

        /// A struct (or union) of (name, type, byte offset) members.
        pub(crate) fn record(
            &mut self,
            name: &str,
            union: bool,
            members: &[(&str, u32, u32)],
        ) -> u32 {
            let kind = if union { 5 } else { 4 };
            let id = self.header(name, kind, members.len() as u32, 64);
            for &(m, ty, offset) in members {
                let m = self.string(m);
                for v in [m, ty, offset * 8] {
                    self.types.extend_from_slice(&v.to_le_bytes());
                }
            }
            id
        }

        pub(crate) fn finish(&self) -> Vec<u8> {
            let mut out = Vec::new();
            out.extend_from_slice(&MAGIC.to_le_bytes());
            out.extend_from_slice(&[1, 0]);
            let (tl, sl) = (self.types.len() as u32, self.strings.len() as u32);
            for v in [24, 0, tl, tl, sl] {
                out.extend_from_slice(&v.to_le_bytes());
            }
            out.extend_from_slice(&self.types);
            out.extend_from_slice(&self.strings);
            out
        }
    }

    #[test]
    fn members_direct_anonymous_and_nested() {
        let mut b = Builder::new();
        let long = b.int("long unsigned int", 8);
        let inner = b.record("", false, &[("vm_start", long, 0), ("vm_end", long, 8)]);
        let anon = b.record("", true, &[("", inner, 0), ("vm_rcu", long, 0)]);
        b.record(
            "vm_area_struct",
            false,
            &[("", anon, 0), ("vm_pgoff", long, 40)],
        );
        let ctx = b.record("", false, &[("ldt", long, 0), ("vdso", long, 24)]);
        let ctx_t = b.typedef("mm_context_t", ctx);
        let body = b.record(
            "",
            false,
            &[("mmap_base", long, 8), ("context", ctx_t, 800)],
        );
        b.record("mm_struct", false, &[("", body, 0)]);
        let btf = Btf::parse(&b.finish()).unwrap();
        assert_eq!(btf.offset_of("vm_area_struct", &["vm_start"]), Some(0));
        assert_eq!(btf.offset_of("vm_area_struct", &["vm_end"]), Some(8));
        assert_eq!(btf.offset_of("vm_area_struct", &["vm_pgoff"]), Some(40));
        assert_eq!(btf.offset_of("mm_struct", &["context", "vdso"]), Some(824));
        assert_eq!(btf.offset_of("mm_struct", &["context", "nope"]), None);
        assert_eq!(btf.offset_of("no_such_struct", &["vm_start"]), None);
    }

    #[test]
    fn pointers_and_other_kinds_are_skipped_correctly() {
        let mut b = Builder::new();
        let int = b.int("int", 4);
        let p = b.ptr(int);
        b.record("file", false, &[("f_mode", int, 4), ("f_inode", p, 32)]);
        let btf = Btf::parse(&b.finish()).unwrap();
        assert_eq!(btf.offset_of("file", &["f_inode"]), Some(32));
    }

    #[test]
    fn bad_blobs_are_errors() {
        assert_eq!(Btf::parse(b"xx").err(), Some(BtfError::Magic));
        let mut blob = Builder::new().finish();
        blob[12] = 200; // types longer than the blob
        assert!(Btf::parse(&blob).is_err());
    }

    #[test]
    fn the_running_kernel_has_the_fields_the_walker_reads() {
        let Ok(data) = std::fs::read("/sys/kernel/btf/vmlinux") else {
            eprintln!("skipping: no /sys/kernel/btf/vmlinux");
            return;
        };
        let btf = Btf::parse(&data).unwrap();
        // vm_start is the first field of every kernel's vm_area_struct.
        assert_eq!(btf.offset_of("vm_area_struct", &["vm_start"]), Some(0));
        assert!(btf.offset_of("inode", &["i_ino"]).is_some());
        assert!(btf.offset_of("mm_struct", &["context", "vdso"]).is_some());
    }
}
