//! A span: a run of pages with one use. Span records for the page heap
//! live in a metadata arena (see `page_heap`); huge mappings carry theirs
//! in their first system page. A record is guarded by the lock of the
//! tier that holds the span (page heap, central list) or by its owner
//! (large and huge objects).

/// The span is free in the page heap.
pub const FREE: u8 = 1;
/// Holds small objects of one class.
pub const SMALL: u8 = 2;
/// One large object from the page heap.
pub const LARGE: u8 = 3;
/// One huge object in its own mapping.
pub const HUGE: u8 = 4;

#[repr(C)]
pub struct Span {
    /// First page number (address >> PAGE_SHIFT). Huge: unused.
    pub start: usize,
    /// Length in pages. Huge: the mapping's length in bytes.
    pub npages: usize,
    pub next: *mut Span,
    pub prev: *mut Span,
    /// Small: objects given back, linked through their first word.
    pub freelist: *mut u8,
    /// Small: next never-used object address; objects are carved lazily,
    /// so untouched parts of a span stay untouched.
    pub bump: usize,
    /// Small: end of the last whole object.
    pub limit: usize,
    /// Large/huge: the size asked for (the sampled weight's S).
    /// Huge: also the mapping's base address is `base`.
    pub requested: usize,
    pub base: usize,
    /// Free: the page heap's release epoch when it was last freed.
    pub free_epoch: u64,
    /// Small: objects handed out of the span.
    pub allocated: u32,
    pub class: u8,
    pub state: u8,
    /// Free: the pages were given back to the OS (not resident). In use:
    /// they were when the span was handed out, so a new large object's
    /// pages read as zero (calloc need not clear them).
    pub returned: bool,
    /// Large/huge: the allocation was sampled (its free calls the hook).
    pub sampled: bool,
}

impl Span {
    pub const fn zeroed() -> Self {
        Self {
            start: 0,
            npages: 0,
            next: core::ptr::null_mut(),
            prev: core::ptr::null_mut(),
            freelist: core::ptr::null_mut(),
            bump: 0,
            limit: 0,
            requested: 0,
            base: 0,
            free_epoch: 0,
            allocated: 0,
            class: 0,
            state: 0,
            returned: false,
            sampled: false,
        }
    }

    pub fn start_addr(&self) -> usize {
        self.start << crate::size_class::PAGE_SHIFT
    }
}

/// An intrusive doubly-linked list of spans (through `next`/`prev`).
pub struct SpanList {
    pub head: *mut Span,
}

impl SpanList {
    pub const fn new() -> Self {
        Self {
            head: core::ptr::null_mut(),
        }
    }

    /// # Safety
    /// `s` is a live span on no list.
    pub unsafe fn push(&mut self, s: *mut Span) {
        // SAFETY: s and the head are live spans owned by the lock holder.
        unsafe {
            (*s).prev = core::ptr::null_mut();
            (*s).next = self.head;
            if !self.head.is_null() {
                (*self.head).prev = s;
            }
        }
        self.head = s;
    }

    /// # Safety
    /// `s` is a live span on this list.
    pub unsafe fn remove(&mut self, s: *mut Span) {
        // SAFETY: s and its neighbours are live spans on this list.
        unsafe {
            if (*s).prev.is_null() {
                self.head = (*s).next;
            } else {
                (*(*s).prev).next = (*s).next;
            }
            if !(*s).next.is_null() {
                (*(*s).next).prev = (*s).prev;
            }
            (*s).next = core::ptr::null_mut();
            (*s).prev = core::ptr::null_mut();
        }
    }
}

impl Default for SpanList {
    fn default() -> Self {
        Self::new()
    }
}
