//! Size classes: the table that maps a request size to a class, and each
//! class's object size, span length and batch size.
//!
//! Columns (all computed at compile time by [`build`] and checked by const
//! assertions and unit tests):
//! - `SIZE[c]`: object size in bytes. Every size is a multiple of 16, so every
//!   object is 16-byte aligned (glibc's `max_align_t` guarantee), and a size
//!   that is a multiple of a power of two `a <= PAGE_SIZE` gives objects
//!   aligned to `a` (spans start on page boundaries).
//! - `PAGES[c]`: pages per span, the smallest count whose tail waste is at
//!   most 1/8 of the span.
//! - `BATCH[c]`: objects moved at once between a thread cache and the
//!   transfer cache or central list: 16 KiB worth, clamped to [1, 32]
//!   (every class up to 512 B moves 32; a larger class moves fewer, so that
//!   the batches thread caches and transfer caches hold for classes a
//!   program uses only now and then pin less memory).
//! - `transfer_slots(c)`: batches the transfer cache keeps (about 512 KiB;
//!   none for big objects, see `central`).
//! - `max_cached(c)`: the largest length a thread's list may grow to
//!   (64 KiB worth).
//!
//! Sizes: 16-byte steps up to 256 B, then 32 and 64-byte steps up to 1 KiB,
//! then eight classes per power of two up to [`MAX_SMALL`] (rounding costs
//! at most 12.5%).
//! Class 0 means "not a small object" everywhere (page map, tables).
//!
//! Lock: none (constant tables, built at compile time).

/// log2 of the allocator's page (the unit of spans and of the page map).
pub const PAGE_SHIFT: usize = 13;
/// Bytes per allocator page (8 KiB, as tcmalloc).
pub const PAGE_SIZE: usize = 1 << PAGE_SHIFT;
/// The largest size served from size classes.
pub const MAX_SMALL: usize = 256 * 1024;
/// Alignment of every allocation.
pub const MIN_ALIGN: usize = 16;
/// Number of classes, including the unused class 0.
pub const NUM_CLASSES: usize = build().count;

const MAX_CLASSES: usize = 128;
/// Entries of the size-to-slot lookup table (see [`lookup_index`]).
const LOOKUP_LEN: usize = lookup_index(MAX_SMALL) + 1;

/// log2 of the bytes of a thread cache's per-class list: a class's *slot*
/// is `c << SLOT_SHIFT`, the byte offset of its list in the cache's list
/// array. The lookup table and the page map hold slots, so the fast paths
/// index the list with the loaded value as it is (no shift).
pub const SLOT_SHIFT: u32 = 4;

/// Index into the lookup table: one entry per 16-byte granule (every
/// class is a multiple of 16), one add and one shift; the table's 32 KiB
/// are touched only where programs' sizes fall.
#[inline(always)]
pub const fn lookup_index(size: usize) -> usize {
    (size + 15) >> 4
}

struct Tables {
    count: usize,
    size: [u32; MAX_CLASSES],
    pages: [u8; MAX_CLASSES],
    batch: [u8; MAX_CLASSES],
    lookup: [u16; LOOKUP_LEN],
}

const fn build() -> Tables {
    let mut t = Tables {
        count: 1,
        size: [0; MAX_CLASSES],
        pages: [0; MAX_CLASSES],
        batch: [0; MAX_CLASSES],
        lookup: [0; LOOKUP_LEN],
    };
    let mut size = 16;
    while size <= MAX_SMALL {
        let c = t.count;
        t.size[c] = size as u32;
        // Pages per span: the smallest span whose tail waste is <= 1/8.
        let mut pages = size.div_ceil(PAGE_SIZE);
        while (pages * PAGE_SIZE) % size > (pages * PAGE_SIZE) / 8 {
            pages += 1;
        }
        t.pages[c] = pages as u8;
        let mut batch = 16384 / size;
        if batch < 1 {
            batch = 1;
        }
        if batch > 32 {
            batch = 32;
        }
        t.batch[c] = batch as u8;
        t.count += 1;
        let step = if size < 256 {
            16
        } else if size < 512 {
            32
        } else if size < 1024 {
            64
        } else {
            // Eight classes per power of two: at most 12.5% rounding.
            (1usize << (usize::BITS - 1 - size.leading_zeros())) / 8
        };
        size += step;
    }
    // Each lookup entry gets the slot of the smallest class holding the largest size
    // that maps to the slot.
    let mut i = 0;
    let mut c = 1;
    while i < LOOKUP_LEN {
        let largest = i * 16;
        while (t.size[c] as usize) < largest {
            c += 1;
        }
        t.lookup[i] = (c << SLOT_SHIFT) as u16;
        i += 1;
    }
    t
}

const TABLES: Tables = build();

/// Object size per class.
pub static SIZE: [u32; MAX_CLASSES] = TABLES.size;
/// Pages per span per class.
pub static PAGES: [u8; MAX_CLASSES] = TABLES.pages;
/// Batch size per class.
pub static BATCH: [u8; MAX_CLASSES] = TABLES.batch;
// In a section of its own that libprofalloc.so places after the other
// read-only data (allocator/preload/layout.ld): the entries of large
// sizes, at its end, are rarely read.
#[unsafe(link_section = ".rodata_lookup.profalloc")]
static LOOKUP: [u16; LOOKUP_LEN] = TABLES.lookup;

const _: () = assert!(NUM_CLASSES <= MAX_CLASSES && NUM_CLASSES < 256);
const _: () = assert!(TABLES.size[NUM_CLASSES - 1] as usize == MAX_SMALL);
const _: () = assert!(MAX_SMALL.div_ceil(PAGE_SIZE) < 256);

/// The slot (class << SLOT_SHIFT) of a small request (`size <= MAX_SMALL`).
#[inline(always)]
pub fn slot_of(size: usize) -> usize {
    debug_assert!(size <= MAX_SMALL);
    // SAFETY: lookup_index(size) <= lookup_index(MAX_SMALL) < LOOKUP_LEN
    // for every size the callers pass (they check size <= MAX_SMALL).
    unsafe { *LOOKUP.get_unchecked(lookup_index(size)) as usize }
}

/// The class of a small request (`size <= MAX_SMALL`).
#[inline(always)]
pub fn class_of(size: usize) -> usize {
    slot_of(size) >> SLOT_SHIFT
}

/// Object size of class `c`.
#[inline(always)]
pub fn size_of_class(c: usize) -> usize {
    // SAFETY: callers pass classes below NUM_CLASSES <= MAX_CLASSES.
    unsafe { *SIZE.get_unchecked(c) as usize }
}

/// Batches the transfer cache of class `c` holds: about 512 KiB, in [2, 64].
pub fn transfer_slots(c: usize) -> usize {
    let batch_bytes = BATCH[c] as usize * size_of_class(c);
    (512 * 1024 / batch_bytes).clamp(2, 64)
}

/// The longest a thread's list for class `c` may grow: 64 KiB worth,
/// at least one batch, at most 2048 objects.
pub fn max_cached(c: usize) -> u32 {
    let by_bytes = 64 * 1024 / size_of_class(c);
    by_bytes.clamp(BATCH[c] as usize, 2048) as u32
}

/// Objects a span of class `c` holds.
pub fn objects_per_span(c: usize) -> usize {
    PAGES[c] as usize * PAGE_SIZE / size_of_class(c)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_size_maps_to_the_smallest_fitting_class() {
        let mut prev_class = 1;
        for size in 0..=MAX_SMALL {
            let c = class_of(size);
            assert!((1..NUM_CLASSES).contains(&c), "size {size} -> class {c}");
            assert!(size_of_class(c) >= size, "size {size} -> class {c}");
            if c > 1 {
                assert!(
                    size_of_class(c - 1) < size,
                    "size {size} could use class {}",
                    c - 1
                );
            }
            assert!(c >= prev_class);
            prev_class = c;
        }
    }

    #[test]
    fn classes_are_aligned_and_spans_waste_little() {
        for c in 1..NUM_CLASSES {
            let size = size_of_class(c);
            assert_eq!(size % MIN_ALIGN, 0);
            let span = PAGES[c] as usize * PAGE_SIZE;
            assert!(span % size <= span / 8, "class {c} wastes {}", span % size);
            assert!(objects_per_span(c) >= 1);
            assert!((1..=32).contains(&BATCH[c]));
            assert!(max_cached(c) >= u32::from(BATCH[c]));
            if c > 1 {
                assert!(size > size_of_class(c - 1));
                // Neighbouring classes are at most 12.5% apart above 1 KiB.
                if size > 1024 {
                    assert!(size * 8 <= size_of_class(c - 1) * 9, "class {c}");
                }
            }
        }
        assert_eq!(size_of_class(NUM_CLASSES - 1), MAX_SMALL);
    }
}
