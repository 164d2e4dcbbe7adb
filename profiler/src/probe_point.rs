//! Where to place a uprobe on a function so that hitting it is cheap.
//!
//! A uprobe replaces an instruction with `int3`. When it fires, the kernel
//! must execute the original instruction: a few kinds (`nop`, `push reg`,
//! `jmp`, `call`, `jcc` with relative targets) it emulates on the spot; any
//! other is single-stepped out of line, a second trap that costs many
//! microseconds more per hit (about 10 µs against 1 µs per hit measured
//! here, in a virtual machine). Allocator entry points often begin with a
//! check such as `test rdi, rdi; je ...` (glibc's free) or
//! `cmp rdi, imm; jae ...` (libprofalloc's malloc), so the first
//! instruction is single-stepped on every call.
//!
//! When the instructions before the first emulated one only set flags or
//! scratch registers (rax, r10, r11, which carry no argument), never touch
//! memory, the stack pointer or the control flow, and nothing in the
//! function jumps back into them, the state at that instruction is the
//! function's entry state for everything a probe reads (argument
//! registers, rsp, rbp, the return address at [rsp]), and every call passes
//! through it. The probe is placed there instead.
//!
//! Linux 6.18 goes further for a probe on a 5-byte `nop`: it rewrites it
//! into a call to a trampoline that enters the kernel by a syscall, with no
//! trap at all (about 35% cheaper per hit than an emulated 1-byte `nop`,
//! measured on libprofalloc.so's hooks). On such kernels a 5-byte `nop`
//! counts as the cheapest instruction to probe.
use std::sync::OnceLock;

use iced_x86::{
    Decoder, DecoderOptions, FlowControl, Instruction, InstructionInfoFactory, OpAccess, Register,
};

/// At most this many leading instructions are skipped.
const MAX_SKIPPED: usize = 8;

/// The offset, from the start of `code` (a function's bytes, loaded at
/// `address`), of the instruction to probe: 0 unless a later one is as good
/// for a probe and cheaper to hit (see the module comment).
pub fn cheap_offset(code: &[u8], address: u64) -> u64 {
    cheap_offset_for_args(code, address, ARGUMENT_REGISTERS.len())
}

/// The System V argument registers, in order.
const ARGUMENT_REGISTERS: [Register; 6] = [
    Register::RDI,
    Register::RSI,
    Register::RDX,
    Register::RCX,
    Register::R8,
    Register::R9,
];

/// [`cheap_offset`] for a function known to take `args` register
/// arguments: the argument registers after those are scratch too (a
/// one-argument function that starts `mov rsi, rdi` can be probed after
/// it).
pub fn cheap_offset_for_args(code: &[u8], address: u64, args: usize) -> u64 {
    let scratch = &ARGUMENT_REGISTERS[args.min(ARGUMENT_REGISTERS.len())..];
    let mut decoder = Decoder::with_ip(64, code, address, DecoderOptions::NONE);
    let mut factory = InstructionInfoFactory::new();
    let mut instr = Instruction::default();
    let mut probe = None;
    for _ in 0..=MAX_SKIPPED {
        if !decoder.can_decode() {
            return 0;
        }
        decoder.decode_out(&mut instr);
        if instr.is_invalid() {
            return 0;
        }
        let offset = instr.ip() - address;
        let bytes = &code[offset as usize..offset as usize + instr.len()];
        if emulated(bytes) || (bytes == NOP5 && kernel_optimizes_nop5()) {
            probe = Some(instr.ip());
            break;
        }
        if !only_scratch_effects(&instr, &mut factory, scratch) {
            return 0;
        }
    }
    let Some(probe) = probe else { return 0 };
    if probe == address {
        return 0;
    }
    // Nothing may branch into the skipped instructions or onto the probe:
    // the probe would then fire in another state, or not on every call.
    let mut decoder = Decoder::with_ip(64, code, address, DecoderOptions::NONE);
    while decoder.can_decode() {
        decoder.decode_out(&mut instr);
        if instr.is_invalid() {
            // Data or padding after the function's code: nothing to learn.
            break;
        }
        let target = instr.near_branch_target();
        if target > address && target <= probe {
            return 0;
        }
    }
    probe - address
}

/// `nop dword ptr [rax + rax + 0]`, the 5-byte nop the kernel optimizes.
const NOP5: [u8; 5] = [0x0f, 0x1f, 0x44, 0x00, 0x00];

/// Whether the running kernel turns uprobes on a 5-byte nop into calls
/// (Linux 6.18 and later).
fn kernel_optimizes_nop5() -> bool {
    static OPTIMIZES: OnceLock<bool> = OnceLock::new();
    *OPTIMIZES.get_or_init(|| {
        let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
        let mut parts = release
            .split(|c: char| !c.is_ascii_digit())
            .map(|p| p.parse::<u32>().unwrap_or(0));
        let (major, minor) = (parts.next().unwrap_or(0), parts.next().unwrap_or(0));
        (major, minor) >= (6, 18)
    })
}

/// Whether the kernel emulates this x86-64 instruction when a uprobe on it
/// fires (arch/x86/kernel/uprobes.c: branch and push emulation), rather
/// than single-stepping it. Only unprefixed encodings, as the kernel wants.
fn emulated(bytes: &[u8]) -> bool {
    match bytes {
        // nop; push r64
        [0x90] | [0x50..=0x57] | [0x41, 0x50..=0x57] => true,
        // jcc rel8, jmp rel8
        [0x70..=0x7f | 0xeb, _] => true,
        // jmp rel32, call rel32
        [0xe9 | 0xe8, _, _, _, _] => true,
        // jcc rel32
        [0x0f, 0x80..=0x8f, _, _, _, _] => true,
        _ => false,
    }
}

/// Whether `instr` falls through and writes nothing but flags, rax, r10,
/// r11 and the registers `scratch`.
fn only_scratch_effects(
    instr: &Instruction,
    factory: &mut InstructionInfoFactory,
    scratch: &[Register],
) -> bool {
    if instr.flow_control() != FlowControl::Next {
        return false;
    }
    let info = factory.info(instr);
    let writes = |access: OpAccess| {
        matches!(
            access,
            OpAccess::Write | OpAccess::CondWrite | OpAccess::ReadWrite | OpAccess::ReadCondWrite
        )
    };
    if info.used_memory().iter().any(|m| writes(m.access())) {
        return false;
    }
    info.used_registers().iter().all(|r| {
        let full = r.register().full_register();
        !writes(r.access())
            || matches!(full, Register::RAX | Register::R10 | Register::R11)
            || scratch.contains(&full)
    })
}

#[cfg(test)]
mod tests {
    use super::{cheap_offset, cheap_offset_for_args};

    #[test]
    fn argument_registers_past_the_arguments_are_scratch() {
        // mov rsi, rdi; test rdi, rdi; js +0x18 (pyenv's PyObject_Malloc,
        // one argument): rsi is no argument of it.
        let code = [0x48, 0x89, 0xfe, 0x48, 0x85, 0xff, 0x78, 0x18, 0xc3];
        assert_eq!(cheap_offset_for_args(&code, 0x1000, 1), 6);
        assert_eq!(cheap_offset_for_args(&code, 0x1000, 2), 0);
        assert_eq!(cheap_offset(&code, 0x1000), 0);
    }

    #[test]
    fn skips_a_check_to_its_conditional_jump() {
        // test rdi, rdi; je +0x10; push rbp; ...  (glibc's free)
        let code = [0x48, 0x85, 0xff, 0x74, 0x10, 0x55, 0x48, 0x89, 0xe5, 0xc3];
        assert_eq!(cheap_offset(&code, 0x1000), 3);
        // cmp rdi, 0x40001; jae +0x20  (libprofalloc's malloc)
        let code = [0x48, 0x81, 0xff, 0x01, 0x00, 0x04, 0x00, 0x73, 0x20, 0xc3];
        assert_eq!(cheap_offset(&code, 0x1000), 7);
        // endbr64; mov rax, rdi; shr rax, 48; jne +5
        let code = [
            0xf3, 0x0f, 0x1e, 0xfa, 0x48, 0x89, 0xf8, 0x48, 0xc1, 0xe8, 0x30, 0x75, 0x05, 0xc3,
        ];
        assert_eq!(cheap_offset(&code, 0x1000), 11);
    }

    #[test]
    fn keeps_the_entry_when_it_is_emulated_or_nothing_may_be_skipped() {
        // push r12 (glibc's malloc): emulated already.
        assert_eq!(cheap_offset(&[0x41, 0x54, 0x55, 0xc3], 0x1000), 0);
        // mov rdx, rdi writes an argument register: the probe would see it changed.
        assert_eq!(
            cheap_offset(&[0x48, 0x89, 0xfa, 0x74, 0x02, 0xc3], 0x1000),
            0
        );
        // sub rsp, 8 moves the stack pointer.
        assert_eq!(
            cheap_offset(&[0x48, 0x83, 0xec, 0x08, 0x74, 0x02, 0xc3], 0x1000),
            0
        );
        // mov [rdi], rax writes memory.
        assert_eq!(
            cheap_offset(&[0x48, 0x89, 0x07, 0x74, 0x02, 0xc3], 0x1000),
            0
        );
        // ret: nothing to skip to.
        assert_eq!(cheap_offset(&[0xc3], 0x1000), 0);
    }

    #[test]
    fn a_five_byte_nop_is_probed_where_the_kernel_optimizes_it() {
        // nopl 0(rax,rax); nop; ret  (libprofalloc.so's hooks)
        let code = [0x0f, 0x1f, 0x44, 0x00, 0x00, 0x90, 0xc3];
        let want = if super::kernel_optimizes_nop5() { 0 } else { 5 };
        assert_eq!(cheap_offset(&code, 0x1000), want);
    }

    #[test]
    fn keeps_the_entry_when_a_branch_lands_on_the_probe() {
        // 0: test rdi, rdi; 3: je +3 (-> 8); 5: xor eax, eax; 7: ret;
        // 8: jmp -7 (-> 3, the je itself)
        let code = [0x48, 0x85, 0xff, 0x74, 0x03, 0x31, 0xc0, 0xc3, 0xeb, 0xf9];
        assert_eq!(cheap_offset(&code, 0x1000), 0);
    }
}
