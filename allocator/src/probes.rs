//! The USDT probes of the OpenTelemetry memory-profiling contract:
//! `otel_memory:alloc(ptr, size, weight)` for each sampled allocation and
//! `otel_memory:free(ptr)` for the free of a sampled allocation (names in
//! `profiler_common::hooks`).
//!
//! Each probe is a `.note.stapsdt` ELF note (the SystemTap SDT format,
//! version 3: pc, the `.stapsdt.base` address, the semaphore address,
//! then provider, name and argument strings, NUL-terminated) whose site is
//! the first instruction of a function of its own: a 5-byte `nop`. There is
//! no semaphore (address 0): the probes cost a call on the sampled path
//! only, whether or not a tracer is attached.
//!
//! The sites are naked functions: nothing runs before the nop. Why the
//! first instruction: Linux 6.18 turns a uprobe on a 5-byte `nop`
//! into a call to a trampoline (no trap), and that call pushes its return
//! address below `rsp`. At a function's entry nothing lives below `rsp`
//! (the red zone is empty), so the push clobbers nothing. The arguments
//! are then still in the System V argument registers, which is what the
//! notes say (`8@%rdi 8@%rsi 8@%rdx`).

/// The note of one probe whose site is the local label `990` just before.
/// `.stapsdt.base` (defined once below) lets a reader tell how the file
/// was moved after linking (prelink); it is the section's own address here.
macro_rules! stapsdt_note {
    ($name:literal, $args:literal) => {
        concat!(
            ".pushsection .note.stapsdt, \"\", \"note\"\n",
            ".balign 4\n",
            ".4byte 992f - 991f, 994f - 993f, 3\n",
            "991: .asciz \"stapsdt\"\n",
            "992: .balign 4\n",
            "993: .8byte 990b\n",
            ".8byte _.stapsdt.base\n",
            ".8byte 0\n",
            ".asciz \"",
            profiler_common::usdt_provider!(),
            "\"\n",
            ".asciz \"",
            $name,
            "\"\n",
            ".asciz \"",
            $args,
            "\"\n",
            "994: .balign 4\n",
            ".popsection\n",
        )
    };
}

core::arch::global_asm!(
    ".pushsection .stapsdt.base, \"aR\", @progbits",
    ".weak _.stapsdt.base",
    ".hidden _.stapsdt.base",
    "_.stapsdt.base:",
    ".space 1",
    ".size _.stapsdt.base, 1",
    ".popsection",
);

/// The `alloc` probe site: a sampled allocation succeeded. Naked, so that
/// the site is the first instruction in every build (no prologue) and the
/// arguments are in the registers the System V ABI passes them in.
#[unsafe(naked)]
#[unsafe(link_section = ".text.hot.profalloc")]
pub(crate) extern "C" fn alloc(ptr: *mut u8, size: usize, weight: u64) {
    core::arch::naked_asm!(
        "990: .byte 0x0f, 0x1f, 0x44, 0x00, 0x00",
        stapsdt_note!("alloc", "8@%rdi 8@%rsi 8@%rdx"),
        "ret",
    )
}

/// The `free` probe site: a sampled allocation is being freed.
#[unsafe(naked)]
#[unsafe(link_section = ".text.hot.profalloc")]
pub(crate) extern "C" fn free(ptr: *mut u8) {
    core::arch::naked_asm!(
        "990: .byte 0x0f, 0x1f, 0x44, 0x00, 0x00",
        stapsdt_note!("free", "8@%rdi"),
        "ret",
    )
}
