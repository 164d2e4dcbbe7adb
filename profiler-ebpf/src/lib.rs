// Empty on purpose: cargo needs a library target so that `profiler` can list
// this crate as a build-dependency (which makes cargo rebuild `profiler` when
// the programs change). The programs are the `profiler` binary in main.rs.
#![no_std]
