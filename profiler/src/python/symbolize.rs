//! Names of Python frames: a code object's qualified name and file, and the
//! line of an instruction from its location table (the format of 3.11 and
//! later, PEP 626/657: `Objects/locations.md` in CPython).
use std::{collections::HashMap, fmt};

use profiler_common::python::{NO_CODE_CHECK, code_check};

use super::{
    discover::Interpreter,
    memory::{Memory, ReadError, check_pointer},
    stack::RawFrame,
};

/// Longest name or file name read, in code points.
const MAX_STRING: u64 = 4096;
/// Largest location table read.
const MAX_LINETABLE: u64 = 1 << 20;

/// One named Python frame.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PyFrame {
    /// `co_qualname` (`Class.method`, `outer.<locals>.inner`).
    pub qualname: String,
    /// `co_filename` as the interpreter has it.
    pub filename: String,
    /// Line of the current instruction; None when the table gives none.
    pub line: Option<u32>,
}

/// As py-spy writes frames: `qualname (file.py:LINE)`, file without
/// directories.
impl fmt::Display for PyFrame {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let file = self.filename.rsplit('/').next().unwrap_or(&self.filename);
        match self.line {
            Some(line) => write!(f, "{} ({file}:{line})", self.qualname),
            None => write!(f, "{} ({file})", self.qualname),
        }
    }
}

/// What identifies a code object beyond its address: a code object freed
/// and another allocated at the same address differs in at least one of
/// these (its strings are separate objects), so the cache never names a
/// frame after the code that lived there before.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct CodeIdentity {
    qualname: u64,
    filename: u64,
    linetable: u64,
    firstlineno: i32,
}

impl CodeIdentity {
    /// As the walkers record it with each frame.
    fn check(&self) -> u32 {
        code_check(
            self.qualname,
            self.filename,
            self.linetable,
            self.firstlineno.cast_unsigned(),
        )
    }
}

/// Why a frame has no name.
#[derive(Debug, PartialEq, Eq)]
pub enum Unnamed {
    /// Its code object could not be read.
    Unreadable(ReadError),
    /// The code that ran was freed, and its names with it: another code
    /// object is at its address now (its check differs from the frame's),
    /// or its reference count is no count (an allocator's free-list link,
    /// or 0).
    Freed,
}

impl From<ReadError> for Unnamed {
    fn from(err: ReadError) -> Self {
        Self::Unreadable(err)
    }
}

impl fmt::Display for Unnamed {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Unreadable(err) => err.fmt(f),
            Self::Freed => f.write_str("its code object was freed"),
        }
    }
}

struct CodeInfo {
    identity: CodeIdentity,
    qualname: String,
    filename: String,
    linetable: Vec<u8>,
}

/// Names frames, caching code objects by (pid, address, identity).
#[derive(Default)]
pub struct Symbolizer {
    codes: HashMap<(u32, u64), CodeInfo>,
}

impl Symbolizer {
    /// Names `frame` of process `pid`.
    pub fn frame(
        &mut self,
        pid: u32,
        memory: &impl Memory,
        py: &Interpreter,
        frame: RawFrame,
    ) -> Result<PyFrame, Unnamed> {
        let key = (pid, frame.code);
        let identity = match identity(memory, py, frame.code) {
            Ok(identity) => identity,
            // A process that exited changes no code object any more: its
            // code last read at that address is the one that ran.
            Err(ReadError::ProcessGone) if self.codes.contains_key(&key) => {
                self.codes[&key].identity
            }
            Err(err) => return Err(Unnamed::Unreadable(err)),
        };
        if frame.check != NO_CODE_CHECK && frame.check != identity.check() {
            return Err(Unnamed::Freed);
        }
        // Freed but not reused: its fields (and so its check) are intact,
        // but its strings may hold other text by now.
        match memory.read_u64(frame.code) {
            Ok(refcount) if !is_reference_count(refcount) => return Err(Unnamed::Freed),
            Ok(_) | Err(ReadError::ProcessGone) => {}
            Err(err) => return Err(Unnamed::Unreadable(err)),
        }
        if self
            .codes
            .get(&key)
            .is_none_or(|info| info.identity != identity)
        {
            let info = CodeInfo {
                identity,
                qualname: read_string(memory, py, identity.qualname)?,
                filename: read_string(memory, py, identity.filename)?,
                linetable: read_bytes(memory, py, identity.linetable)?,
            };
            self.codes.insert(key, info);
        }
        let info = &self.codes[&key];
        Ok(PyFrame {
            qualname: info.qualname.clone(),
            filename: info.filename.clone(),
            line: line_of(&info.linetable, identity.firstlineno, frame.instr_offset),
        })
    }

    /// Forgets the code objects of `pid` (it exited).
    pub fn forget(&mut self, pid: u32) {
        self.codes.retain(|&(p, _), _| p != pid);
    }
}

/// Whether `ob_refcnt` holds what a live object's does: at least 1, and
/// far below any user-space address (an immortal object's is below 2^32),
/// where a freed object has a free list's link (an address, or 0) in its
/// first word.
fn is_reference_count(refcount: u64) -> bool {
    (1..1 << 40).contains(&refcount)
}

fn identity(memory: &impl Memory, py: &Interpreter, code: u64) -> Result<CodeIdentity, ReadError> {
    let o = &py.offsets;
    Ok(CodeIdentity {
        qualname: memory.read_pointer(code + o.code_qualname, 8)?,
        filename: memory.read_pointer(code + o.code_filename, 8)?,
        linetable: memory.read_pointer(code + o.code_linetable, 8)?,
        firstlineno: memory.read_u32(code + o.code_firstlineno)?.cast_signed(),
    })
}

/// Reads a compact `str` object (all names and file names of code objects
/// are compact).
pub(super) fn read_string(
    memory: &impl Memory,
    py: &Interpreter,
    string: u64,
) -> Result<String, ReadError> {
    let o = &py.offsets;
    let length = memory.read_u64(string + o.unicode_length)?;
    let state = memory.read_u32(string + o.unicode_state)?;
    let kind = (state >> 2) & 7;
    let compact = state & (1 << 5) != 0;
    let ascii = state & (1 << 6) != 0;
    if !compact || !matches!(kind, 1 | 2 | 4) || (ascii && kind != 1) || length > MAX_STRING {
        return Err(ReadError::BadPointer(string));
    }
    let data = string
        + if ascii {
            o.unicode_ascii_data
        } else {
            o.unicode_compact_data
        };
    let mut bytes = vec![0; usize::try_from(length * u64::from(kind)).unwrap_or(0)];
    memory.read(data, &mut bytes)?;
    Ok(decode_unicode(&bytes, kind))
}

/// Decodes PEP 393 data of `kind` bytes per code point.
fn decode_unicode(bytes: &[u8], kind: u32) -> String {
    match kind {
        1 => bytes.iter().map(|&b| char::from(b)).collect(),
        2 => bytes
            .chunks_exact(2)
            .map(|c| char::from_u32(u32::from(u16::from_le_bytes([c[0], c[1]]))))
            .map(|c| c.unwrap_or(char::REPLACEMENT_CHARACTER))
            .collect(),
        _ => bytes
            .chunks_exact(4)
            .map(|c| char::from_u32(u32::from_le_bytes([c[0], c[1], c[2], c[3]])))
            .map(|c| c.unwrap_or(char::REPLACEMENT_CHARACTER))
            .collect(),
    }
}

fn read_bytes(memory: &impl Memory, py: &Interpreter, object: u64) -> Result<Vec<u8>, ReadError> {
    check_pointer(object, 8)?;
    let o = &py.offsets;
    let len = memory.read_u64(object + o.var_object_size)?;
    if len > MAX_LINETABLE {
        return Err(ReadError::BadPointer(object));
    }
    let mut bytes = vec![0; usize::try_from(len).unwrap_or(0)];
    memory.read(object + o.bytes_data, &mut bytes)?;
    Ok(bytes)
}

pub use profiler_common::python_layout::line_of;

#[cfg(test)]
mod tests {
    use super::*;
    use crate::python::{
        memory::fake::FakeMemory,
        offsets::{PY312, PythonVersion},
    };

    /// A compact ASCII string of 3.12 (length at 16, state at 32, data at 40).
    fn ascii(m: &mut FakeMemory, at: u64, text: &str) {
        let mut bytes = vec![0u8; 40];
        bytes[16..24].copy_from_slice(&(text.len() as u64).to_le_bytes());
        // kind 1, compact, ascii.
        bytes[32] = (1 << 2) | (1 << 5) | (1 << 6);
        bytes.extend_from_slice(text.as_bytes());
        m.put(at, &bytes);
    }

    /// A 3.12 code object at `at` named `name`, its strings and location
    /// table (one entry: 8 code units on the first line) at `at + 0x1000..`.
    fn code(m: &mut FakeMemory, at: u64, name: &str, firstlineno: u32) {
        code_counted(m, at, name, firstlineno, 1);
    }

    /// [`code`] with `ob_refcnt` `refcount`.
    fn code_counted(m: &mut FakeMemory, at: u64, name: &str, firstlineno: u32, refcount: u64) {
        let (qualname, filename, linetable) = (at + 0x1000, at + 0x2000, at + 0x3000);
        let mut bytes = vec![0u8; 192];
        bytes[..8].copy_from_slice(&refcount.to_le_bytes());
        bytes[68..72].copy_from_slice(&firstlineno.to_le_bytes());
        bytes[112..120].copy_from_slice(&filename.to_le_bytes());
        bytes[128..136].copy_from_slice(&qualname.to_le_bytes());
        bytes[136..144].copy_from_slice(&linetable.to_le_bytes());
        m.put(at, &bytes);
        ascii(m, qualname, name);
        ascii(m, filename, "/src/mod.py");
        let mut table = vec![0u8; 32];
        table[16] = 2;
        // Code 13 (line delta only), 8 units; delta 0.
        table.extend_from_slice(&[0x80 | (13 << 3) | 7, 0]);
        m.put(linetable, &table);
    }

    /// A 3.12 interpreter for the code objects of [`code`].
    fn interpreter() -> Interpreter {
        Interpreter {
            object: "test".to_owned(),
            version: PythonVersion { hex: 0x030c_01f0 },
            runtime: 0,
            code_type: 0,
            offsets: PY312,
            eval_loop: profiler_common::python_splice::EvalCode::default(),
        }
    }

    #[test]
    fn a_code_object_replaced_at_the_same_address_is_named_anew() {
        let py = interpreter();
        let at = 0x10_0000;
        let frame = RawFrame {
            code: at,
            instr_offset: 4,
            check: NO_CODE_CHECK,
        };
        let mut m = FakeMemory::default();
        code(&mut m, at, "first", 10);
        let mut symbolizer = Symbolizer::default();
        let named = symbolizer.frame(1, &m, &py, frame).unwrap();
        assert_eq!(named.to_string(), "first (mod.py:10)");
        // Same address and string addresses, another first line: the
        // identity differs, so the cached name is not used.
        let mut m = FakeMemory::default();
        code(&mut m, at, "second", 20);
        let named = symbolizer.frame(1, &m, &py, frame).unwrap();
        assert_eq!(named.to_string(), "second (mod.py:20)");
        assert_eq!(
            line_of(&[0x80 | (13 << 3) | 7, 0], 20, 16),
            None,
            "past 8 units"
        );
    }

    #[test]
    fn a_frame_whose_code_object_was_replaced_is_not_named_after_the_new_one() {
        let py = interpreter();
        let at = 0x10_0000;
        let mut m = FakeMemory::default();
        code(&mut m, at, "first", 10);
        // Recorded with the check of the code object there at the time.
        let first = identity(&m, &py, at).unwrap().check();
        let frame = RawFrame {
            code: at,
            instr_offset: 4,
            check: first,
        };
        let mut symbolizer = Symbolizer::default();
        let named = symbolizer.frame(1, &m, &py, frame).unwrap();
        assert_eq!(named.to_string(), "first (mod.py:10)");
        // Freed, and another code object allocated at its address.
        let mut m = FakeMemory::default();
        code(&mut m, at, "second", 20);
        assert_eq!(symbolizer.frame(1, &m, &py, frame), Err(Unnamed::Freed));
        // Frames recorded since carry the new one's check.
        let now = RawFrame {
            check: identity(&m, &py, at).unwrap().check(),
            ..frame
        };
        let named = symbolizer.frame(1, &m, &py, now).unwrap();
        assert_eq!(named.to_string(), "second (mod.py:20)");
        // Freed and not reused: the fields are intact, but the first word
        // is a free list's link.
        for link in [0x7f00_1234_5670, 0] {
            code_counted(&mut m, at, "second", 20, link);
            assert_eq!(symbolizer.frame(1, &m, &py, now), Err(Unnamed::Freed));
        }
    }

    fn hex(s: &str) -> Vec<u8> {
        (0..s.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
            .collect()
    }

    /// `co_linetable` and `co_lines()` of one function (first line 2, with
    /// a comprehension, a jump of four lines, a try/except and lines
    /// without location) as CPython compiled it.
    fn check(table: &str, lines: &[(u32, u32, Option<u32>)]) {
        let table = hex(table);
        for &(start, end, want) in lines {
            for offset in (start..end).step_by(2) {
                assert_eq!(line_of(&table, 2, offset), want, "offset {offset}");
            }
        }
        let last = lines.last().unwrap().1;
        assert_eq!(line_of(&table, 2, last), None, "past the end");
    }

    #[test]
    fn lines_of_a_311_table_match_co_lines() {
        check(
            "8000d808098041d80708f000070516f002010d20f000010d20dd161b984191689468f003010d20\
             f100010d20f400010d208801f00a001112d8101190219404f103011115f000010916f00403050e\
             d80c0d9001894588018801f8dd0b1cf00001050ef00001050ef00001050ed80c0d880188018801\
             f00301050ef8f8f8e00b0c8048",
            &[
                (0, 2, Some(2)),
                (2, 6, Some(3)),
                (6, 10, Some(4)),
                (10, 14, Some(5)),
                (14, 42, Some(6)),
                (42, 60, Some(5)),
                (60, 62, Some(10)),
                (62, 76, Some(11)),
                (76, 82, Some(10)),
                (82, 84, Some(12)),
                (84, 96, Some(13)),
                (96, 98, None),
                (98, 116, Some(14)),
                (116, 124, Some(15)),
                (124, 126, Some(14)),
                (126, 132, None),
                (132, 136, Some(16)),
            ],
        );
    }

    #[test]
    fn lines_of_a_313_table_match_co_lines() {
        check(
            "8000d808098041de0708e4161b98419468f303010d20d9161e9011f303000e0fd9161ef00300\
             090af000010d20f00a001112d8101190219104f103011115f000010916f00403050ed80c0d9001\
             89458801f006000c0d8048f9f217010d20f8f412000c1df30001050ed80c0d8901d80b0c8048f0\
             0501050efa",
            &[
                (0, 2, Some(2)),
                (2, 6, Some(3)),
                (6, 20, Some(4)),
                (20, 42, Some(6)),
                (42, 50, Some(5)),
                (50, 56, Some(6)),
                (56, 64, Some(5)),
                (64, 68, Some(6)),
                (68, 72, Some(5)),
                (72, 74, Some(10)),
                (74, 82, Some(11)),
                (82, 88, Some(10)),
                (88, 90, Some(12)),
                (90, 100, Some(13)),
                (100, 104, Some(16)),
                (104, 108, None),
                (108, 114, Some(5)),
                (114, 116, None),
                (116, 134, Some(14)),
                (134, 140, Some(15)),
                (140, 144, Some(16)),
                (144, 146, Some(14)),
                (146, 152, None),
            ],
        );
    }

    #[test]
    fn truncated_or_malformed_tables_give_no_line() {
        assert_eq!(line_of(&[0xf0], 1, 0), None);
        assert_eq!(line_of(&[0x00], 1, 0), None);
        assert_eq!(line_of(&[], 1, 0), None);
    }

    #[test]
    fn decodes_every_string_kind_and_writes_frames_like_py_spy() {
        assert_eq!(decode_unicode(b"caf\xe9", 1), "café");
        assert_eq!(decode_unicode(&[0x3b, 0x04], 2), "л");
        assert_eq!(decode_unicode(&[0x00, 0xf6, 0x01, 0x00], 4), "😀");
        let frame = PyFrame {
            qualname: "A.f".to_owned(),
            filename: "/x/y.py".to_owned(),
            line: Some(7),
        };
        assert_eq!(frame.to_string(), "A.f (y.py:7)");
    }
}
