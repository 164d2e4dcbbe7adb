//! Where the fields of CPython's structures sit, per minor version (x86-64,
//! default GIL builds): the one description of the layout, read by the
//! profiler (`profiler::python`) and by libprofalloc.so's in-process
//! Python walker. Plain data and pure functions, no allocation.
//!
//! 3.11 and 3.12 keep no description of their own layout: their tables are
//! written here from the headers of each release line (`pycore_runtime.h`,
//! `pycore_interp.h`, `cpython/pystate.h`, `pycore_frame.h`, `cpython/code.h`,
//! `cpython/unicodeobject.h`, `cpython/bytesobject.h`). Internal structures
//! only change between minor versions, so one table serves every 3.11.x
//! (likewise 3.12.x). 3.13 describes itself in `_Py_DebugOffsets`, the first
//! member of `_PyRuntime`, read from the process ([`from_debug_offsets`]);
//! the few fields it lacks (first traceable instruction, compact non-ASCII
//! string data) come from the 3.13 supplement below. The integration tests
//! compare every table with the DWARF of real builds.
use core::fmt;

/// A CPython version as `Py_Version` encodes it (0xMMmmppLS).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PythonVersion {
    pub hex: u32,
}

impl PythonVersion {
    pub fn major(self) -> u32 {
        self.hex >> 24
    }

    pub fn minor(self) -> u32 {
        (self.hex >> 16) & 0xff
    }

    pub fn micro(self) -> u32 {
        (self.hex >> 8) & 0xff
    }
}

impl fmt::Display for PythonVersion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}.{}", self.major(), self.minor(), self.micro())
    }
}

/// How a thread state reaches its innermost frame.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FrameAnchor {
    /// 3.11, 3.12: `tstate->cframe` (at `cframe`), then
    /// `cframe->current_frame` (at `current_frame`).
    ThroughCFrame { cframe: u64, current_frame: u64 },
    /// 3.13: `tstate->current_frame`.
    Direct { current_frame: u64 },
}

/// Where the GIL's state lives (`struct _gil_runtime_state`: `locked`, an
/// `int`, and `last_holder`, the thread state that took it last).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GilAnchor {
    /// 3.11: inside `_PyRuntime` (`ceval.gil`): offsets from `_PyRuntime`.
    InRuntime { locked: u64, holder: u64 },
    /// 3.12+: each interpreter's `ceval.gil` (at `gil`) points at the GIL
    /// it uses; `locked` and `holder` are offsets inside the GIL.
    ThroughInterpreter { gil: u64, locked: u64, holder: u64 },
}

/// Byte offsets of fields, named `<structure>_<field>`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Offsets {
    /// `_PyRuntime.interpreters.head`.
    pub runtime_interpreters_head: u64,
    /// `PyInterpreterState.next`.
    pub interp_next: u64,
    /// `PyInterpreterState.threads.head`.
    pub interp_threads_head: u64,
    /// `PyThreadState.next`.
    pub tstate_next: u64,
    /// `PyThreadState.interp`: must point back at the interpreter, which
    /// checks the table against the process.
    pub tstate_interp: u64,
    /// `PyThreadState.thread_id` (the `pthread_t`).
    pub tstate_thread_id: u64,
    /// `PyThreadState.native_thread_id` (the kernel thread id).
    pub tstate_native_thread_id: u64,
    pub tstate_frame: FrameAnchor,
    /// `_PyInterpreterFrame.f_code` (3.11, 3.12) or `f_executable` (3.13).
    pub frame_code: u64,
    /// `_PyInterpreterFrame.previous`.
    pub frame_previous: u64,
    /// `_PyInterpreterFrame.prev_instr` (3.11, 3.12: the instruction being
    /// executed) or `instr_ptr` (3.13: likewise); either minus the code's
    /// first instruction is the offset the location table is indexed by.
    pub frame_instr: u64,
    /// `_PyInterpreterFrame.owner` (one byte).
    pub frame_owner: u64,
    /// `_PyInterpreterFrame.is_entry` (3.11 only: the frame was entered
    /// from C, so the native stack resumes after it).
    pub frame_is_entry: Option<u64>,
    /// `owner` value of a frame that belongs to a generator or coroutine.
    pub owner_generator: u8,
    /// `owner` value of the shim frame that marks an entry from C (3.12+).
    pub owner_cstack: Option<u8>,
    /// `PyObject.ob_type`.
    pub object_type: u64,
    /// `PyVarObject.ob_size`: for a code object, its length in code units.
    pub var_object_size: u64,
    pub code_qualname: u64,
    pub code_name: u64,
    pub code_filename: u64,
    /// `co_firstlineno` (an `int`).
    pub code_firstlineno: u64,
    /// `co_linetable` (a bytes object).
    pub code_linetable: u64,
    /// `co_code_adaptive`: the first instruction, inside the code object.
    pub code_adaptive: u64,
    /// `_co_firsttraceable` (an `int`, in code units): a frame whose
    /// instruction is before it has not finished its prologue.
    pub code_firsttraceable: u64,
    /// `PyASCIIObject.length` (in code points).
    pub unicode_length: u64,
    /// `PyASCIIObject.state` (a 32-bit bit field: interned:2, kind:3,
    /// compact:1, ascii:1 from the lowest bit, in every supported version).
    pub unicode_state: u64,
    /// `sizeof(PyASCIIObject)`: where a compact ASCII string's data starts.
    pub unicode_ascii_data: u64,
    /// `sizeof(PyCompactUnicodeObject)`: where other compact strings' data starts.
    pub unicode_compact_data: u64,
    /// `PyBytesObject.ob_sval`.
    pub bytes_data: u64,
    pub gil: GilAnchor,
}

/// 3.11 (`pycore_frame.h` with `f_func` first and `is_entry`; the thread
/// state reaches frames through `_PyCFrame`; strings still carry `wstr`).
pub const PY311: Offsets = Offsets {
    runtime_interpreters_head: 40,
    interp_next: 0,
    interp_threads_head: 16,
    tstate_next: 8,
    tstate_interp: 16,
    tstate_thread_id: 152,
    tstate_native_thread_id: 160,
    tstate_frame: FrameAnchor::ThroughCFrame {
        cframe: 56,
        current_frame: 8,
    },
    frame_code: 32,
    frame_previous: 48,
    frame_instr: 56,
    frame_owner: 69,
    frame_is_entry: Some(68),
    owner_generator: 1,
    owner_cstack: None,
    object_type: 8,
    var_object_size: 16,
    code_qualname: 128,
    code_name: 120,
    code_filename: 112,
    code_firstlineno: 72,
    code_linetable: 136,
    code_adaptive: 184,
    code_firsttraceable: 168,
    unicode_length: 16,
    unicode_state: 32,
    unicode_ascii_data: 48,
    unicode_compact_data: 72,
    bytes_data: 32,
    gil: GilAnchor::InRuntime {
        locked: 376,
        holder: 368,
    },
};

/// 3.12 (`f_code` and `previous` first, C-stack shim frames; the
/// interpreter state grew before `threads`; `_PyCFrame` lost `use_tracing`).
pub const PY312: Offsets = Offsets {
    runtime_interpreters_head: 40,
    interp_next: 0,
    interp_threads_head: 72,
    tstate_next: 8,
    tstate_interp: 16,
    tstate_thread_id: 136,
    tstate_native_thread_id: 144,
    tstate_frame: FrameAnchor::ThroughCFrame {
        cframe: 56,
        current_frame: 0,
    },
    frame_code: 0,
    frame_previous: 8,
    frame_instr: 56,
    frame_owner: 70,
    frame_is_entry: None,
    owner_generator: 1,
    owner_cstack: Some(3),
    object_type: 8,
    var_object_size: 16,
    code_qualname: 128,
    code_name: 120,
    code_filename: 112,
    code_firstlineno: 68,
    code_linetable: 136,
    code_adaptive: 192,
    code_firsttraceable: 176,
    unicode_length: 16,
    unicode_state: 32,
    unicode_ascii_data: 40,
    unicode_compact_data: 56,
    bytes_data: 32,
    gil: GilAnchor::ThroughInterpreter {
        gil: 384,
        locked: 16,
        holder: 8,
    },
};

/// What `_Py_DebugOffsets` does not say in 3.13.
const PY313_FIRSTTRACEABLE: u64 = 184;
const PY313_OWNER_GENERATOR: u8 = 1;
const PY313_OWNER_CSTACK: u8 = 3;
/// `sizeof(PyCompactUnicodeObject) - sizeof(PyASCIIObject)`: `utf8_length`
/// and `utf8`.
const COMPACT_UNICODE_EXTRA: u64 = 16;

/// Bytes of the 3.13 `_Py_DebugOffsets` that are read.
pub const DEBUG_OFFSETS_LEN: usize = 584;
pub const DEBUG_OFFSETS_COOKIE: &[u8; 8] = b"xdebugpy";

/// Positions of the fields of the 3.13 `_Py_DebugOffsets` (every entry a
/// `uint64_t`; each sub-structure opens with its own size).
pub mod debug {
    pub const VERSION: usize = 8;
    pub const FREE_THREADED: usize = 16;
    pub const RUNTIME_INTERPRETERS_HEAD: usize = 40;
    pub const INTERP_NEXT: usize = 64;
    pub const INTERP_THREADS_HEAD: usize = 72;
    pub const INTERP_CEVAL_GIL: usize = 112;
    /// `_gil`, and its `locked` and `last_holder`, are given from the start
    /// of the interpreter state.
    pub const INTERP_GIL: usize = 120;
    pub const GIL_LOCKED: usize = 136;
    pub const GIL_HOLDER: usize = 144;
    pub const TSTATE_NEXT: usize = 168;
    pub const TSTATE_INTERP: usize = 176;
    pub const TSTATE_CURRENT_FRAME: usize = 184;
    pub const TSTATE_THREAD_ID: usize = 192;
    pub const TSTATE_NATIVE_THREAD_ID: usize = 200;
    pub const FRAME_PREVIOUS: usize = 232;
    pub const FRAME_EXECUTABLE: usize = 240;
    pub const FRAME_INSTR_PTR: usize = 248;
    pub const FRAME_OWNER: usize = 264;
    pub const CODE_FILENAME: usize = 280;
    pub const CODE_NAME: usize = 288;
    pub const CODE_QUALNAME: usize = 296;
    pub const CODE_LINETABLE: usize = 304;
    pub const CODE_FIRSTLINENO: usize = 312;
    pub const CODE_ADAPTIVE: usize = 344;
    pub const OBJECT_TYPE: usize = 360;
    pub const VAR_OBJECT_SIZE: usize = 416;
    pub const BYTES_DATA: usize = 528;
    pub const UNICODE_STATE: usize = 544;
    pub const UNICODE_LENGTH: usize = 552;
    pub const UNICODE_ASCII_SIZE: usize = 560;
}

/// The table for `version`, or None when the version has none here (3.13
/// reads its own from the process: see [`from_debug_offsets`]).
pub fn table(version: PythonVersion) -> Option<Offsets> {
    match (version.major(), version.minor()) {
        (3, 11) => Some(PY311),
        (3, 12) => Some(PY312),
        _ => None,
    }
}

/// Whether `version` describes itself through `_Py_DebugOffsets` in the
/// layout read here.
pub fn has_debug_offsets(version: PythonVersion) -> bool {
    (version.major(), version.minor()) == (3, 13)
}

/// Why a `_Py_DebugOffsets` image was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DebugOffsetsError {
    /// Fewer than [`DEBUG_OFFSETS_LEN`] bytes.
    Short(usize),
    /// No `xdebugpy` cookie.
    Cookie,
    /// It describes another version (the `Py_Version` value it holds).
    Version {
        described: u64,
        running: u32,
    },
    FreeThreaded,
    /// A field (at this position) that is no offset.
    Field {
        at: usize,
        value: u64,
    },
}

impl fmt::Display for DebugOffsetsError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            Self::Short(n) => write!(f, "_Py_DebugOffsets is {n} bytes, short"),
            Self::Cookie => write!(
                f,
                "_PyRuntime does not start with the `xdebugpy` cookie of _Py_DebugOffsets"
            ),
            Self::Version { described, running } => write!(
                f,
                "_Py_DebugOffsets describes version {described:#x}, not {} ({running:#x})",
                PythonVersion { hex: running }
            ),
            Self::FreeThreaded => write!(f, "free-threaded build (no GIL)"),
            Self::Field { at, value } => write!(
                f,
                "_Py_DebugOffsets field at {at} is {value:#x}, not an offset"
            ),
        }
    }
}

/// Builds the offsets from the bytes of a 3.13 `_Py_DebugOffsets`, after
/// checking its cookie, that it describes `version`, and that the build
/// has the GIL.
pub fn from_debug_offsets(
    bytes: &[u8],
    version: PythonVersion,
) -> Result<Offsets, DebugOffsetsError> {
    if bytes.len() < DEBUG_OFFSETS_LEN {
        return Err(DebugOffsetsError::Short(bytes.len()));
    }
    if &bytes[..8] != DEBUG_OFFSETS_COOKIE {
        return Err(DebugOffsetsError::Cookie);
    }
    let field = |at: usize| -> u64 {
        let mut b = [0; 8];
        b.copy_from_slice(&bytes[at..at + 8]);
        u64::from_le_bytes(b)
    };
    let described = field(debug::VERSION);
    if described >> 16 != u64::from(version.hex >> 16) {
        return Err(DebugOffsetsError::Version {
            described,
            running: version.hex,
        });
    }
    if field(debug::FREE_THREADED) != 0 {
        return Err(DebugOffsetsError::FreeThreaded);
    }
    let small = |at: usize| -> Result<u64, DebugOffsetsError> {
        let value = field(at);
        if value >= 1 << 16 {
            return Err(DebugOffsetsError::Field { at, value });
        }
        Ok(value)
    };
    // A field of a structure embedded at `base`, given from outside it.
    let inside = |at: usize, base: usize| -> Result<u64, DebugOffsetsError> {
        small(at)?
            .checked_sub(small(base)?)
            .filter(|&offset| offset < 256)
            .ok_or(DebugOffsetsError::Field {
                at,
                value: field(at),
            })
    };
    let ascii_data = small(debug::UNICODE_ASCII_SIZE)?;
    Ok(Offsets {
        runtime_interpreters_head: small(debug::RUNTIME_INTERPRETERS_HEAD)?,
        interp_next: small(debug::INTERP_NEXT)?,
        interp_threads_head: small(debug::INTERP_THREADS_HEAD)?,
        tstate_next: small(debug::TSTATE_NEXT)?,
        tstate_interp: small(debug::TSTATE_INTERP)?,
        tstate_thread_id: small(debug::TSTATE_THREAD_ID)?,
        tstate_native_thread_id: small(debug::TSTATE_NATIVE_THREAD_ID)?,
        tstate_frame: FrameAnchor::Direct {
            current_frame: small(debug::TSTATE_CURRENT_FRAME)?,
        },
        frame_code: small(debug::FRAME_EXECUTABLE)?,
        frame_previous: small(debug::FRAME_PREVIOUS)?,
        frame_instr: small(debug::FRAME_INSTR_PTR)?,
        frame_owner: small(debug::FRAME_OWNER)?,
        frame_is_entry: None,
        owner_generator: PY313_OWNER_GENERATOR,
        owner_cstack: Some(PY313_OWNER_CSTACK),
        object_type: small(debug::OBJECT_TYPE)?,
        var_object_size: small(debug::VAR_OBJECT_SIZE)?,
        code_qualname: small(debug::CODE_QUALNAME)?,
        code_name: small(debug::CODE_NAME)?,
        code_filename: small(debug::CODE_FILENAME)?,
        code_firstlineno: small(debug::CODE_FIRSTLINENO)?,
        code_linetable: small(debug::CODE_LINETABLE)?,
        code_adaptive: small(debug::CODE_ADAPTIVE)?,
        code_firsttraceable: PY313_FIRSTTRACEABLE,
        unicode_length: small(debug::UNICODE_LENGTH)?,
        unicode_state: small(debug::UNICODE_STATE)?,
        unicode_ascii_data: ascii_data,
        unicode_compact_data: ascii_data + COMPACT_UNICODE_EXTRA,
        bytes_data: small(debug::BYTES_DATA)?,
        gil: GilAnchor::ThroughInterpreter {
            gil: small(debug::INTERP_CEVAL_GIL)?,
            locked: inside(debug::GIL_LOCKED, debug::INTERP_GIL)?,
            holder: inside(debug::GIL_HOLDER, debug::INTERP_GIL)?,
        },
    })
}

/// The line of the instruction at byte offset `offset`, from a location
/// table. Each entry opens with a byte `1CCCCLLL`: code C, length L+1 code
/// units; the code says what follows and how the line moves:
/// 15 no location; 14 long form (signed line delta, end line, columns as
/// varints); 13 signed line delta only; 10-12 line delta C-10 and two
/// column bytes; 0-9 same line and one column byte.
pub fn line_of(table: &[u8], firstlineno: i32, offset: u32) -> Option<u32> {
    let mut reader = TableReader { table, at: 0 };
    let mut line = i64::from(firstlineno);
    let mut address = 0u64;
    let target = u64::from(offset);
    while let Some(first) = reader.byte() {
        if first & 0x80 == 0 {
            return None;
        }
        let code = (first >> 3) & 15;
        let end = address + (u64::from(first & 7) + 1) * 2;
        match code {
            15 => {}
            14 => {
                line += reader.svarint()?;
                for _ in 0..3 {
                    reader.varint()?;
                }
            }
            13 => line += reader.svarint()?,
            10..=12 => {
                line += i64::from(code - 10);
                reader.skip(2)?;
            }
            _ => reader.skip(1)?,
        }
        if target < end {
            return (code != 15).then(|| u32::try_from(line).ok()).flatten();
        }
        address = end;
    }
    None
}

struct TableReader<'a> {
    table: &'a [u8],
    at: usize,
}

impl TableReader<'_> {
    fn byte(&mut self) -> Option<u8> {
        let b = *self.table.get(self.at)?;
        self.at += 1;
        Some(b)
    }

    fn skip(&mut self, n: usize) -> Option<()> {
        self.at += n;
        (self.at <= self.table.len()).then_some(())
    }

    /// Six bits per byte, least significant first; bit 6 says more follow.
    fn varint(&mut self) -> Option<u64> {
        let mut b = self.byte()?;
        let mut value = u64::from(b & 63);
        let mut shift = 0;
        while b & 64 != 0 {
            b = self.byte()?;
            shift += 6;
            if shift > 60 {
                return None;
            }
            value |= u64::from(b & 63) << shift;
        }
        Some(value)
    }

    /// Sign in the lowest bit, magnitude above it.
    fn svarint(&mut self) -> Option<i64> {
        let raw = self.varint()?;
        let magnitude = i64::try_from(raw >> 1).ok()?;
        Some(if raw & 1 != 0 { -magnitude } else { magnitude })
    }
}
