//! CPUPROFILE (to do).
use core::sync::atomic::AtomicBool;
pub static ON: AtomicBool = AtomicBool::new(false);
pub fn start(_s: &super::env::Settings) {}
pub fn start_thread() {}
pub fn at_exit() {}
