//! Where the fields the frame walker and the symbolizer read sit in CPython's
//! structures: the tables live in `profiler_common::python_layout` (shared
//! with libprofalloc.so's in-process walker); this adds the error type the
//! profiler reports.
#[cfg(test)]
use profiler_common::python_layout::{DEBUG_OFFSETS_COOKIE, debug};
pub use profiler_common::python_layout::{
    DEBUG_OFFSETS_LEN, FrameAnchor, GilAnchor, Offsets, PY311, PY312, PythonVersion,
    has_debug_offsets, table,
};

/// 3.13.0 as its `_Py_DebugOffsets` describes it, for unit tests of the
/// walkers (the integration tests check it against DWARF).
#[cfg(test)]
pub const PY313_FOR_TESTS: Offsets = Offsets {
    runtime_interpreters_head: 632,
    interp_next: 7264,
    interp_threads_head: 7344,
    tstate_thread_id: 152,
    tstate_native_thread_id: 160,
    tstate_frame: FrameAnchor::Direct { current_frame: 72 },
    frame_code: 0,
    frame_previous: 8,
    frame_instr: 56,
    frame_owner: 70,
    code_firstlineno: 68,
    code_adaptive: 200,
    code_firsttraceable: 184,
    gil: GilAnchor::ThroughInterpreter {
        gil: 16,
        locked: 16,
        holder: 8,
    },
    ..PY312
};

/// Builds the offsets from the bytes of a 3.13 `_Py_DebugOffsets`, after
/// checking its cookie, that it describes `version`, and that the build
/// has the GIL.
pub fn from_debug_offsets(bytes: &[u8], version: PythonVersion) -> anyhow::Result<Offsets> {
    profiler_common::python_layout::from_debug_offsets(bytes, version)
        .map_err(|e| anyhow::anyhow!("{e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    const V3130: PythonVersion = PythonVersion { hex: 0x030d_00f0 };

    fn image(pairs: &[(usize, u64)]) -> Vec<u8> {
        let mut bytes = vec![0; DEBUG_OFFSETS_LEN];
        bytes[..8].copy_from_slice(DEBUG_OFFSETS_COOKIE);
        for &(at, value) in pairs {
            bytes[at..at + 8].copy_from_slice(&value.to_le_bytes());
        }
        bytes
    }

    #[test]
    fn debug_offsets_fields_land_in_their_places() {
        let bytes = image(&[
            (debug::VERSION, 0x030d_00f0),
            (debug::RUNTIME_INTERPRETERS_HEAD, 632),
            (debug::TSTATE_CURRENT_FRAME, 72),
            (debug::FRAME_OWNER, 70),
            (debug::UNICODE_ASCII_SIZE, 40),
            (debug::INTERP_CEVAL_GIL, 16),
            (debug::INTERP_GIL, 7752),
            (debug::GIL_LOCKED, 7768),
            (debug::GIL_HOLDER, 7760),
        ]);
        let o = from_debug_offsets(&bytes, V3130).unwrap();
        assert_eq!(
            o.gil,
            GilAnchor::ThroughInterpreter {
                gil: 16,
                locked: 16,
                holder: 8
            }
        );
        assert_eq!(o.runtime_interpreters_head, 632);
        assert_eq!(o.tstate_frame, FrameAnchor::Direct { current_frame: 72 });
        assert_eq!(o.frame_owner, 70);
        assert_eq!(o.unicode_ascii_data, 40);
        assert_eq!(o.unicode_compact_data, 56);
    }

    #[test]
    fn debug_offsets_refuse_wrong_cookie_version_and_free_threading() {
        let mut bytes = image(&[(debug::VERSION, 0x030d_00f0)]);
        bytes[0] = b'y';
        assert!(from_debug_offsets(&bytes, V3130).is_err());
        let other = image(&[(debug::VERSION, 0x030e_00f0)]);
        let err = from_debug_offsets(&other, V3130).unwrap_err();
        assert!(format!("{err:#}").contains("0x30e00f0"), "{err:#}");
        let free = image(&[(debug::VERSION, 0x030d_00f0), (debug::FREE_THREADED, 1)]);
        assert!(from_debug_offsets(&free, V3130).is_err());
        let garbage = image(&[(debug::VERSION, 0x030d_00f0), (debug::FRAME_OWNER, 1 << 40)]);
        assert!(from_debug_offsets(&garbage, V3130).is_err());
    }

    #[test]
    fn tables_exist_for_311_and_312_only() {
        for (hex, has) in [
            (0x030b_07f0, true),
            (0x030c_01f0, true),
            (0x030a_0df0, false),
        ] {
            assert_eq!(table(PythonVersion { hex }).is_some(), has, "{hex:#x}");
        }
        assert_eq!(PythonVersion { hex: 0x030b_07f0 }.to_string(), "3.11.7");
    }
}
