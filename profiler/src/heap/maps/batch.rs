//! Reading the whole live map with `BPF_MAP_LOOKUP_BATCH`: the kernel
//! copies it bucket by bucket, each bucket under its lock, and goes on from
//! the next bucket whatever the probes delete meanwhile. A walk by key
//! (`BPF_MAP_GET_NEXT_KEY`) starts over from the first bucket when the key
//! it stands on is deleted: on a busy host it reads keys again and, when
//! the probes delete faster than it reads, may never reach the end.
use std::{
    io,
    os::fd::{AsFd as _, AsRawFd as _},
};

use aya::maps::MapData;
use profiler_common::heap::{LiveAlloc, LiveKey};

const BPF_MAP_LOOKUP_BATCH: libc::c_long = 24;
/// Entries asked for per call; a bucket holding more is asked again with
/// room for it.
const BATCH: usize = 4096;
/// No bucket holds that many entries: the hash spreads them.
const MAX_ROOM: usize = 1 << 20;

/// The batch part of `union bpf_attr`.
#[repr(C)]
#[derive(Default)]
struct BatchAttr {
    in_batch: u64,
    out_batch: u64,
    keys: u64,
    values: u64,
    count: u32,
    map_fd: u32,
    elem_flags: u64,
    flags: u64,
}

/// Every entry of the live map `map`, each bucket read at once.
pub(super) fn live_entries(map: &MapData) -> io::Result<Vec<(LiveKey, LiveAlloc)>> {
    let fd = map.fd().as_fd().as_raw_fd();
    let mut out = Vec::new();
    let mut room = BATCH;
    // A hash map's batch token is the index of the next bucket.
    let (mut from, mut next) = (0u32, 0u32);
    let mut started = false;
    loop {
        let mut keys = vec![LiveKey::default(); room];
        let mut values = vec![LiveAlloc::default(); room];
        let mut attr = BatchAttr {
            in_batch: if started { (&raw const from) as u64 } else { 0 },
            out_batch: (&raw mut next) as u64,
            keys: keys.as_mut_ptr() as u64,
            values: values.as_mut_ptr() as u64,
            count: room as u32,
            map_fd: fd as u32,
            ..BatchAttr::default()
        };
        // SAFETY: bpf(2) reads `attr`, whose size is passed, reads the
        // token at `in_batch`, and writes at most `count` keys and values
        // (of the map's sizes, those of LiveKey and LiveAlloc) into the
        // buffers and one token into `next`; all outlive the call.
        let rc = unsafe {
            libc::syscall(
                libc::SYS_bpf,
                BPF_MAP_LOOKUP_BATCH,
                &raw mut attr,
                size_of::<BatchAttr>(),
            )
        };
        let got = (attr.count as usize).min(room);
        let past_the_end = if rc == 0 {
            false
        } else {
            let err = io::Error::last_os_error();
            match err.raw_os_error() {
                Some(libc::ENOENT) => true,
                // One bucket holds more than there is room for.
                Some(libc::ENOSPC) if got == 0 && room < MAX_ROOM => {
                    room *= 2;
                    continue;
                }
                _ => return Err(err),
            }
        };
        out.extend(keys.into_iter().zip(values).take(got));
        if past_the_end {
            return Ok(out);
        }
        from = next;
        started = true;
    }
}
