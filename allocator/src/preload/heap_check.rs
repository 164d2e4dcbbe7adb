//! HEAPCHECK (to do).
pub fn at_exit() {}
