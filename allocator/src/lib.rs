//! profalloc: a TCMalloc-style allocator (work in progress).
