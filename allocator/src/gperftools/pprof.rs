//! A small pprof (profile.proto) writer that allocates nothing on the
//! profiled heap: protobuf varints into mmap'd buffers, then gzip with
//! stored deflate blocks and a crc32. Addresses stay raw; every loaded
//! object becomes a mapping (path, file offset, build-id), so that
//! `prof-bpf report` or `go tool pprof` symbolize against the binaries.
//!
//! Field numbers are those of google/pprof's proto/profile.proto.
use super::{
    arena::{Buf, Table},
    objects,
    python::names::{self, PY_TAG},
};

const MAX_STRINGS: usize = 1 << 14;
const LOC_SLOTS: usize = 1 << 20;

pub struct Encoder {
    /// The Profile message being built (without the string table).
    body: Buf,
    /// A submessage being built.
    msg: Buf,
    /// The sample message being built.
    sample: Buf,
    /// Packed repeated field scratch.
    packed: Buf,
    /// String bytes, and (offset, len) of each table entry.
    strings: Buf,
    string_index: Table<(u32, u32)>,
    /// Open-addressing map address -> location id (0 = empty).
    locations: Table<(u64, u64)>,
    next_location: u64,
    next_function: u64,
    /// The gzip output.
    pub out: Buf,
}

// Wire types.
const VARINT: u64 = 0;
const LEN: u64 = 2;

fn varint(b: &mut Buf, mut v: u64) {
    let mut tmp = [0u8; 10];
    let mut n = 0;
    loop {
        let byte = (v & 0x7f) as u8;
        v >>= 7;
        if v == 0 {
            tmp[n] = byte;
            n += 1;
            break;
        }
        tmp[n] = byte | 0x80;
        n += 1;
    }
    b.extend(&tmp[..n]);
}

fn key(b: &mut Buf, field: u64, wire: u64) {
    varint(b, field << 3 | wire);
}

fn int_field(b: &mut Buf, field: u64, v: u64) {
    if v != 0 {
        key(b, field, VARINT);
        varint(b, v);
    }
}

fn bytes_field(b: &mut Buf, field: u64, bytes: &[u8]) {
    key(b, field, LEN);
    varint(b, bytes.len() as u64);
    b.extend(bytes);
}

impl Encoder {
    pub const fn new() -> Self {
        Self {
            body: Buf::new(),
            msg: Buf::new(),
            sample: Buf::new(),
            packed: Buf::new(),
            strings: Buf::new(),
            string_index: Table::empty(),
            locations: Table::empty(),
            next_location: 1,
            next_function: 1,
            out: Buf::new(),
        }
    }

    /// Starts a profile; `types` are (type, unit) pairs in value order.
    pub fn begin(
        &mut self,
        types: &[(&str, &str)],
        default: &str,
        period: (&str, &str, i64),
    ) -> bool {
        if !self.string_index.reserve(MAX_STRINGS) || !self.locations.reserve(LOC_SLOTS) {
            return false;
        }
        self.body.clear();
        self.strings.clear();
        self.string_index.clear();
        self.out.clear();
        for slot in self.locations.slots() {
            if slot.1 != 0 {
                *slot = (0, 0);
            }
        }
        self.next_location = 1;
        self.next_function = 1;
        self.string(""); // index 0 is always ""
        for (ty, unit) in types {
            self.value_type(1, ty, unit);
        }
        self.value_type(11, period.0, period.1);
        int_field(&mut self.body, 12, period.2 as u64);
        let d = self.string(default);
        int_field(&mut self.body, 14, d);
        let mut ts = libc::timespec {
            tv_sec: 0,
            tv_nsec: 0,
        };
        // SAFETY: ts is a valid out-parameter.
        unsafe { libc::clock_gettime(libc::CLOCK_REALTIME, &mut ts) };
        int_field(
            &mut self.body,
            9,
            ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64,
        );
        true
    }

    fn value_type(&mut self, field: u64, ty: &str, unit: &str) {
        let (t, u) = (self.string(ty), self.string(unit));
        self.msg.clear();
        int_field(&mut self.msg, 1, t);
        int_field(&mut self.msg, 2, u);
        bytes_field(&mut self.body, field, self.msg.as_slice());
    }

    /// The string table index of `s`.
    pub fn string(&mut self, s: &str) -> u64 {
        let bytes = s.as_bytes();
        let all = self.strings.as_slice();
        for (i, &(off, len)) in self.string_index.as_slice().iter().enumerate() {
            if &all[off as usize..(off + len) as usize] == bytes {
                return i as u64;
            }
        }
        let off = self.strings.len() as u32;
        self.strings.extend(bytes);
        if !self.string_index.push((off, bytes.len() as u32)) {
            return 0;
        }
        (self.string_index.len() - 1) as u64
    }

    pub fn comment(&mut self, c: &str) {
        let i = self.string(c);
        key(&mut self.body, 13, VARINT);
        varint(&mut self.body, i);
    }

    fn location(&mut self, addr: u64) -> u64 {
        let slots = self.locations.slots();
        let mask = slots.len() - 1;
        let mut i = (addr.wrapping_mul(0x9e37_79b9_7f4a_7c15) >> 40) as usize & mask;
        loop {
            let (a, id) = slots[i];
            if id == 0 {
                break;
            }
            if a == addr {
                return id;
            }
            i = (i + 1) & mask;
        }
        let id = self.next_location;
        self.next_location += 1;
        slots[i] = (addr, id);
        if addr & PY_TAG != 0 {
            self.python_location(id, addr);
            return id;
        }
        // Location { id, mapping_id, address }
        let mapping = objects::all()
            .iter()
            .position(|o| o.start <= addr as usize && (addr as usize) < o.end)
            .map_or(0, |i| i as u64 + 1);
        self.msg.clear();
        int_field(&mut self.msg, 1, id);
        int_field(&mut self.msg, 2, mapping);
        int_field(&mut self.msg, 3, addr);
        bytes_field(&mut self.body, 4, self.msg.as_slice());
        id
    }

    /// A Python frame's location ([`names`]): a line of a function named
    /// as py-spy names frames, `qualname (file.py:LINE)`, with its file and
    /// line, so readers need no symbolization.
    fn python_location(&mut self, id: u64, word: u64) {
        let n = names::name(word);
        let mut text = [0u8; 1300];
        let mut len = 0;
        let file = n.filename.rsplit('/').next().unwrap_or("");
        let mut put = |s: &str| {
            let k = s.len().min(text.len() - len);
            text[len..len + k].copy_from_slice(&s.as_bytes()[..k]);
            len += k;
        };
        put(n.qualname);
        if !n.filename.is_empty() {
            put(" (");
            put(file);
            if n.line != 0 {
                let mut digits = [0u8; 10];
                let mut d = digits.len();
                let mut v = n.line;
                while v > 0 || d == digits.len() {
                    d -= 1;
                    digits[d] = b'0' + (v % 10) as u8;
                    v /= 10;
                }
                put(":");
                put(core::str::from_utf8(&digits[d..]).unwrap_or(""));
            }
            put(")");
        }
        let name = core::str::from_utf8(&text[..len]).unwrap_or("?");
        let name = self.string(name);
        let filename = self.string(n.filename);
        let function = self.function(name, filename);
        // Location { id, line: Line { function_id, line } }
        self.msg.clear();
        int_field(&mut self.msg, 1, id);
        // (`packed` holds the sample being built; `sample` is free here.)
        self.sample.clear();
        int_field(&mut self.sample, 1, function);
        int_field(&mut self.sample, 2, u64::from(n.line));
        bytes_field(&mut self.msg, 4, self.sample.as_slice());
        bytes_field(&mut self.body, 4, self.msg.as_slice());
    }

    /// The id of the function named by string `name` (written once).
    fn function(&mut self, name: u64, filename: u64) -> u64 {
        // Keys of functions never equal an address or a Python frame word.
        let key = 1 << 62 | name;
        let slots = self.locations.slots();
        let mask = slots.len() - 1;
        let mut i = (key.wrapping_mul(0x9e37_79b9_7f4a_7c15) >> 40) as usize & mask;
        loop {
            let (k, id) = slots[i];
            if id == 0 {
                break;
            }
            if k == key {
                return id;
            }
            i = (i + 1) & mask;
        }
        let id = self.next_function;
        self.next_function += 1;
        slots[i] = (key, id);
        // Function { id, name, system_name, filename }
        self.msg.clear();
        int_field(&mut self.msg, 1, id);
        int_field(&mut self.msg, 2, name);
        int_field(&mut self.msg, 3, name);
        int_field(&mut self.msg, 4, filename);
        bytes_field(&mut self.body, 5, self.msg.as_slice());
        id
    }

    /// Adds a sample: `stack` leaf first, one value per sample type,
    /// numeric labels as (key, value), string labels as (key, value).
    /// A `truncated` stack (cut before its outermost frame) ends with a
    /// `[truncated]` frame, so the cut shows where the stack is drawn.
    /// Every frame is a return address except `stack[0]` when
    /// `leaf_is_pc` (a CPU sample's interrupted pc). Locations hold return
    /// addresses minus one, the call instruction, as pprof expects: a
    /// return address can belong to the next line, or past the end of a
    /// function that calls a noreturn one.
    pub fn sample(
        &mut self,
        stack: &[u64],
        truncated: bool,
        leaf_is_pc: bool,
        values: &[i64],
        labels: &[(&str, i64)],
        str_labels: &[(&str, &str)],
    ) {
        self.packed.clear();
        for (i, &addr) in stack.iter().enumerate() {
            let call = if (i == 0 && leaf_is_pc) || addr & PY_TAG != 0 {
                addr
            } else {
                addr.saturating_sub(1)
            };
            let id = self.location(call);
            varint(&mut self.packed, id);
        }
        if truncated {
            let id = self.location(names::NATIVE_TRUNCATED_WORD);
            varint(&mut self.packed, id);
        }
        let mut sample = core::mem::take(&mut self.sample);
        sample.clear();
        bytes_field(&mut sample, 1, self.packed.as_slice());
        self.packed.clear();
        for &v in values {
            varint(&mut self.packed, v as u64);
        }
        bytes_field(&mut sample, 2, self.packed.as_slice());
        for &(k, v) in labels {
            let k = self.string(k);
            self.packed.clear();
            int_field(&mut self.packed, 1, k);
            key(&mut self.packed, 3, VARINT);
            varint(&mut self.packed, v as u64);
            bytes_field(&mut sample, 3, self.packed.as_slice());
        }
        for &(k, v) in str_labels {
            let (k, v) = (self.string(k), self.string(v));
            self.packed.clear();
            int_field(&mut self.packed, 1, k);
            int_field(&mut self.packed, 2, v);
            bytes_field(&mut sample, 3, self.packed.as_slice());
        }
        bytes_field(&mut self.body, 2, sample.as_slice());
        self.sample = sample;
    }

    /// Writes the mappings and the string table and gzips the profile
    /// into `out`. None when an mmap failed on the way.
    pub fn finish(&mut self) -> Option<&[u8]> {
        let mut hex = [0u8; 2 * objects::BUILD_ID_MAX];
        for (i, o) in objects::all().iter().enumerate() {
            // Mappings start on a page, like /proc/PID/maps.
            let skew = o.start & 4095;
            let name = core::str::from_utf8(&o.name[..o.name_len]).unwrap_or("");
            let fname = self.string(name);
            for (j, b) in o.build_id[..o.build_id_len].iter().enumerate() {
                hex[2 * j] = b"0123456789abcdef"[usize::from(b >> 4)];
                hex[2 * j + 1] = b"0123456789abcdef"[usize::from(b & 15)];
            }
            let id = core::str::from_utf8(&hex[..2 * o.build_id_len]).unwrap_or("");
            let bid = self.string(id);
            self.msg.clear();
            int_field(&mut self.msg, 1, i as u64 + 1);
            int_field(&mut self.msg, 2, (o.start - skew) as u64);
            int_field(&mut self.msg, 3, o.end as u64);
            int_field(&mut self.msg, 4, o.offset.saturating_sub(skew) as u64);
            int_field(&mut self.msg, 5, fname);
            int_field(&mut self.msg, 6, bid);
            bytes_field(&mut self.body, 3, self.msg.as_slice());
        }
        let all = self.strings.as_slice();
        for &(off, len) in self.string_index.as_slice() {
            bytes_field(&mut self.body, 6, &all[off as usize..(off + len) as usize]);
        }
        if self.body.failed
            || self.msg.failed
            || self.sample.failed
            || self.packed.failed
            || self.strings.failed
        {
            return None;
        }
        gzip(self.body.as_slice(), &mut self.out);
        if self.out.failed {
            None
        } else {
            Some(self.out.as_slice())
        }
    }
}

/// This process's id and name (/proc/self/comm), for the pid and comm
/// labels of every sample.
pub struct ProcessLabels {
    pub pid: i64,
    comm: [u8; 32],
    len: usize,
}

impl ProcessLabels {
    pub fn read() -> Self {
        let mut l = Self {
            // SAFETY: getpid has no preconditions.
            pid: i64::from(unsafe { libc::getpid() }),
            comm: [0; 32],
            len: 0,
        };
        // SAFETY: open/read/close into our buffer.
        unsafe {
            let fd = libc::open(
                c"/proc/self/comm".as_ptr(),
                libc::O_RDONLY | libc::O_CLOEXEC,
            );
            if fd >= 0 {
                let n = libc::read(fd, l.comm.as_mut_ptr().cast(), l.comm.len());
                libc::close(fd);
                l.len = n.max(0) as usize;
            }
        }
        while l.len > 0 && l.comm[l.len - 1] == b'\n' {
            l.len -= 1;
        }
        l
    }

    pub fn comm(&self) -> &str {
        core::str::from_utf8(&self.comm[..self.len]).unwrap_or("?")
    }
}

impl Default for Encoder {
    fn default() -> Self {
        Self::new()
    }
}

const CRC_TABLE: [u32; 256] = {
    let mut t = [0u32; 256];
    let mut i = 0;
    while i < 256 {
        let mut c = i as u32;
        let mut k = 0;
        while k < 8 {
            c = if c & 1 != 0 {
                0xedb8_8320 ^ (c >> 1)
            } else {
                c >> 1
            };
            k += 1;
        }
        t[i] = c;
        i += 1;
    }
    t
};

pub fn crc32(data: &[u8]) -> u32 {
    let mut c = !0u32;
    for &b in data {
        c = CRC_TABLE[((c ^ u32::from(b)) & 0xff) as usize] ^ (c >> 8);
    }
    !c
}

/// gzip (RFC 1952) of `data` with stored deflate blocks: no compression,
/// no tables, no allocation.
pub fn gzip(data: &[u8], out: &mut Buf) {
    out.clear();
    out.extend(&[0x1f, 0x8b, 8, 0, 0, 0, 0, 0, 0, 0xff]);
    let mut chunks = data.chunks(0xffff).peekable();
    if chunks.peek().is_none() {
        out.extend(&[1, 0, 0, 0xff, 0xff]);
    }
    while let Some(chunk) = chunks.next() {
        let last = chunks.peek().is_none();
        let len = chunk.len() as u16;
        out.push(u8::from(last));
        out.extend(&len.to_le_bytes());
        out.extend(&(!len).to_le_bytes());
        out.extend(chunk);
    }
    out.extend(&crc32(data).to_le_bytes());
    out.extend(&(data.len() as u32).to_le_bytes());
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crc32_matches_the_standard_check_value() {
        assert_eq!(crc32(b"123456789"), 0xcbf4_3926);
    }

    #[test]
    fn gzip_round_trips_through_gunzip() {
        let data: Vec<u8> = (0..200_000u32).map(|i| (i * 7 % 251) as u8).collect();
        let mut out = Buf::new();
        gzip(&data, &mut out);
        let dir = std::env::temp_dir().join(format!("profalloc-gzip-{}", std::process::id()));
        std::fs::write(&dir, out.as_slice()).unwrap();
        let back = std::process::Command::new("gzip")
            .arg("-dc")
            .arg(&dir)
            .output()
            .unwrap();
        std::fs::remove_file(&dir).unwrap();
        assert!(back.status.success());
        assert_eq!(back.stdout, data);
    }

    #[test]
    fn varints_follow_protobuf() {
        let mut b = Buf::new();
        varint(&mut b, 300);
        assert_eq!(b.as_slice(), &[0xac, 0x02]);
    }
}
