//! Python thread names (`threading.Thread.name`), read from outside as
//! py-spy reads them: the interpreter's `sys.modules` dict, its `threading`
//! module's `_active` dict (thread ident → `Thread`), and each thread's
//! `_name` attribute. Threads not started by `threading` (or a process that
//! never imported it) have no name here.
use std::collections::HashMap;

use super::{
    discover::Interpreter,
    memory::{Memory, ReadError, check_pointer},
    symbolize::read_string,
};

/// Where the objects this reads keep what it needs, per minor version
/// (from CPython's headers; `tests/tests/python.rs` checks them against
/// the DWARF of the pyenv builds).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct NameLayout {
    /// `PyInterpreterState.modules` (3.11), `.imports.modules` (3.12+).
    pub interp_modules: u64,
    /// `PyHeapTypeObject.ht_cached_keys`: the shared keys of instances'
    /// attribute values.
    pub heap_type_cached_keys: u64,
    /// Offset of the first value in a `PyDictValues`.
    pub dict_values_data: u64,
    pub minor: u32,
}

impl NameLayout {
    pub fn for_minor(minor: u32) -> Option<Self> {
        let (interp_modules, heap_type_cached_keys, dict_values_data) = match minor {
            11 => (888, 872, 0),
            12 => (944, 880, 0),
            13 => (7656, 880, 8),
            _ => return None,
        };
        Some(Self {
            interp_modules,
            heap_type_cached_keys,
            dict_values_data,
            minor,
        })
    }
}

// Layouts shared by 3.11 to 3.13.
const TYPE_BASICSIZE: u64 = 32;
const TYPE_FLAGS: u64 = 168;
const TYPE_DICTOFFSET: u64 = 288;
const MODULE_DICT: u64 = 16;
const DICT_KEYS: u64 = 32;
const DICT_VALUES: u64 = 40;
/// Followed by `dk_kind`.
const KEYS_LOG2_INDEX_BYTES: u64 = 9;
const KEYS_NENTRIES: u64 = 24;
const KEYS_INDICES: u64 = 32;
const LONG_SIZE: u64 = 16;
const LONG_DIGITS: u64 = 24;
/// The managed dict (3.11: and the values pointer one word below) sit
/// before the object.
const MANAGED_DICT: u64 = 24;
const MANAGED_VALUES_311: u64 = 32;
const TPFLAGS_INLINE_VALUES: u64 = 1 << 2;
const TPFLAGS_MANAGED_DICT: u64 = 1 << 4;
/// Bounds against garbage.
const MAX_ENTRIES: u64 = 1 << 16;

/// Thread ident (`pthread_t`, `PyThreadState.thread_id`) → name, for the
/// threads of interpreter `interp`.
pub fn thread_names(
    memory: &impl Memory,
    py: &Interpreter,
    interp: u64,
) -> Result<HashMap<u64, String>, ReadError> {
    let Some(layout) = NameLayout::for_minor(py.version.minor()) else {
        return Ok(HashMap::new());
    };
    let r = Reader { memory, py, layout };
    let modules = memory.read_pointer(interp + layout.interp_modules, 8)?;
    let Some(threading) = r.dict_get(modules, "threading")? else {
        return Ok(HashMap::new());
    };
    let globals = memory.read_pointer(threading + MODULE_DICT, 8)?;
    let Some(active) = r.dict_get(globals, "_active")? else {
        return Ok(HashMap::new());
    };
    let mut out = HashMap::new();
    for (key, thread) in r.dict_items(active)? {
        let Ok(ident) = r.long(key) else { continue };
        if let Some(name) = r.attribute(thread, "_name")?
            && let Ok(name) = read_string(memory, py, name)
        {
            out.insert(ident, name);
        }
    }
    Ok(out)
}

struct Reader<'a, M> {
    memory: &'a M,
    py: &'a Interpreter,
    layout: NameLayout,
}

impl<M: Memory> Reader<'_, M> {
    /// (key, value) of a dict, in its order.
    fn dict_items(&self, dict: u64) -> Result<Vec<(u64, u64)>, ReadError> {
        check_pointer(dict, 8)?;
        let keys = self.memory.read_pointer(dict + DICT_KEYS, 8)?;
        let values = self.memory.read_u64(dict + DICT_VALUES)?;
        self.keys_items(keys, (values != 0).then_some(values))
    }

    /// The entries of a keys object, their values from `values` when the
    /// table is split.
    fn keys_items(&self, keys: u64, values: Option<u64>) -> Result<Vec<(u64, u64)>, ReadError> {
        let mut head = [0u8; 2];
        self.memory.read(keys + KEYS_LOG2_INDEX_BYTES, &mut head)?;
        let (log2_index_bytes, kind) = (head[0], head[1]);
        let count = self.memory.read_u64(keys + KEYS_NENTRIES)?;
        if log2_index_bytes > 32 || count > MAX_ENTRIES {
            return Err(ReadError::BadPointer(keys));
        }
        let entries = keys + KEYS_INDICES + (1u64 << log2_index_bytes);
        // DICT_KEYS_GENERAL entries hold the hash first.
        let (size, key_at) = if kind == 0 { (24, 8) } else { (16, 0) };
        let mut out = Vec::new();
        for i in 0..count {
            let entry = entries + i * size;
            let key = self.memory.read_u64(entry + key_at)?;
            let value = match values {
                Some(v) => self
                    .memory
                    .read_u64(v + self.layout.dict_values_data + 8 * i)?,
                None => self.memory.read_u64(entry + key_at + 8)?,
            };
            if key != 0 && value != 0 {
                out.push((key, value));
            }
        }
        Ok(out)
    }

    fn dict_get(&self, dict: u64, name: &str) -> Result<Option<u64>, ReadError> {
        self.find(self.dict_items(dict)?, name)
    }

    fn find(&self, items: Vec<(u64, u64)>, name: &str) -> Result<Option<u64>, ReadError> {
        for (key, value) in items {
            if read_string(self.memory, self.py, key).is_ok_and(|k| k == name) {
                return Ok(Some(value));
            }
        }
        Ok(None)
    }

    /// Attribute `name` from the instance dict or values of `object`.
    fn attribute(&self, object: u64, name: &str) -> Result<Option<u64>, ReadError> {
        check_pointer(object, 8)?;
        let m = self.memory;
        let ty = m.read_pointer(object + self.py.offsets.object_type, 8)?;
        let flags = m.read_u64(ty + TYPE_FLAGS)?;
        let cached_keys = || m.read_pointer(ty + self.layout.heap_type_cached_keys, 8);
        if flags & TPFLAGS_MANAGED_DICT == 0 {
            let offset = m.read_u64(ty + TYPE_DICTOFFSET)?;
            if offset == 0 || offset > 1 << 20 {
                return Ok(None);
            }
            let dict = m.read_u64(object + offset)?;
            return if dict == 0 {
                Ok(None)
            } else {
                self.dict_get(dict, name)
            };
        }
        let slot = m.read_u64(object - MANAGED_DICT)?;
        let values = match self.layout.minor {
            // A dict, else the values pointer below it.
            11 if slot == 0 => m.read_u64(object - MANAGED_VALUES_311)?,
            // Dict or values, the values stored one byte below their
            // address (odd: the tag).
            12 if slot & 1 == 1 => slot + 1,
            // A dict, else the values inline after the object.
            13 if slot == 0 && flags & TPFLAGS_INLINE_VALUES != 0 => {
                object + m.read_u64(ty + TYPE_BASICSIZE)?
            }
            _ if slot == 0 => return Ok(None),
            _ => return self.dict_get(slot, name),
        };
        if values == 0 {
            return Ok(None);
        }
        self.find(self.keys_items(cached_keys()?, Some(values))?, name)
    }

    /// A non-negative int below 2**64.
    fn long(&self, object: u64) -> Result<u64, ReadError> {
        let size = self.memory.read_u64(object + LONG_SIZE)?;
        let digits = if self.layout.minor >= 12 {
            // lv_tag: digit count above 3 bits of sign (2: negative).
            if size & 3 == 2 {
                return Err(ReadError::BadPointer(object));
            }
            size >> 3
        } else {
            if (size as i64) < 0 {
                return Err(ReadError::BadPointer(object));
            }
            size
        };
        if digits > 3 {
            return Err(ReadError::BadPointer(object));
        }
        let mut value: u64 = 0;
        for i in 0..digits {
            let digit = u64::from(self.memory.read_u32(object + LONG_DIGITS + 4 * i)?);
            value |= digit.checked_shl(30 * i as u32).unwrap_or(0);
        }
        Ok(value)
    }
}
