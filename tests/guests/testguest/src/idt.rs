//! 64-bit IDT for vectors 0-31 and the exception handler.
//!
//! Every stub pushes a dummy error code (when the CPU pushes none) and its vector, then
//! jumps to a common path that saves the general registers and calls
//! [`testguest_exception`] with a pointer to the saved [`ExceptionFrame`].
//!
//! An expected fault (see [`crate::arch::try_rdmsr`]) is recorded and execution resumes at
//! the recovery address. Anything else is reported on the debug port (so it is visible
//! both under ferrovisor, which prints port 0xe9 as the guest console, and under bare
//! QEMU's `-debugcon`) and ends the guest with `SHUTDOWN_crash`.

use core::fmt::Write;
use core::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use crate::arch;

/// Number of vectors with a handler (the CPU exceptions).
const VECTORS: usize = 32;
/// Distance between two stubs in `exception_stubs`.
const STUB_STRIDE: u64 = 16;
/// Kernel code selector of the boot GDT.
const CODE_SELECTOR: u64 = 0x08;

core::arch::global_asm!(
    r#"
    .macro EXC_STUB vec, has_err
    .balign 16
    .if \has_err == 0
    pushq $0
    .endif
    pushq $\vec
    jmp exception_common
    .endm

    .pushsection .text.exceptions, "ax", @progbits
    .balign 16
    .globl exception_stubs
exception_stubs:
    EXC_STUB 0, 0
    EXC_STUB 1, 0
    EXC_STUB 2, 0
    EXC_STUB 3, 0
    EXC_STUB 4, 0
    EXC_STUB 5, 0
    EXC_STUB 6, 0
    EXC_STUB 7, 0
    EXC_STUB 8, 1
    EXC_STUB 9, 0
    EXC_STUB 10, 1
    EXC_STUB 11, 1
    EXC_STUB 12, 1
    EXC_STUB 13, 1
    EXC_STUB 14, 1
    EXC_STUB 15, 0
    EXC_STUB 16, 0
    EXC_STUB 17, 1
    EXC_STUB 18, 0
    EXC_STUB 19, 0
    EXC_STUB 20, 0
    EXC_STUB 21, 1
    EXC_STUB 22, 0
    EXC_STUB 23, 0
    EXC_STUB 24, 0
    EXC_STUB 25, 0
    EXC_STUB 26, 0
    EXC_STUB 27, 0
    EXC_STUB 28, 0
    EXC_STUB 29, 1
    EXC_STUB 30, 1
    EXC_STUB 31, 0
    /* Each stub is at most 9 bytes (push imm8, push imm8, jmp rel32), so `.balign 16`
       puts them exactly 16 bytes apart. */

exception_common:
    push %rax
    push %rbx
    push %rcx
    push %rdx
    push %rsi
    push %rdi
    push %rbp
    push %r8
    push %r9
    push %r10
    push %r11
    push %r12
    push %r13
    push %r14
    push %r15
    mov %rsp, %rdi
    mov %rsp, %rbx
    and $-16, %rsp
    cld
    call testguest_exception
    mov %rbx, %rsp
    pop %r15
    pop %r14
    pop %r13
    pop %r12
    pop %r11
    pop %r10
    pop %r9
    pop %r8
    pop %rbp
    pop %rdi
    pop %rsi
    pop %rdx
    pop %rcx
    pop %rbx
    pop %rax
    add $16, %rsp
    iretq
    .popsection
    "#,
    options(att_syntax)
);

extern "C" {
    /// First of 32 exception stubs, [`STUB_STRIDE`] bytes apart (asm above).
    fn exception_stubs();
}

/// What the common stub leaves on the stack, lowest address first.
#[repr(C)]
#[derive(Debug)]
#[allow(dead_code)] // the layout must match `exception_common`; not every field is read
pub struct ExceptionFrame {
    r15: u64,
    r14: u64,
    r13: u64,
    r12: u64,
    r11: u64,
    r10: u64,
    r9: u64,
    r8: u64,
    rbp: u64,
    rdi: u64,
    rsi: u64,
    rdx: u64,
    rcx: u64,
    rbx: u64,
    rax: u64,
    vector: u64,
    error_code: u64,
    rip: u64,
    cs: u64,
    rflags: u64,
    rsp: u64,
    ss: u64,
}

/// The IDT: two quadwords per gate. Atomics only so that it can be filled without
/// `static mut`; the CPU reads it as plain memory.
#[repr(C, align(16))]
struct Idt([AtomicU64; VECTORS * 2]);

static IDT: Idt = Idt([const { AtomicU64::new(0) }; VECTORS * 2]);

/// Set once an unexpected exception is being reported, to catch one inside the report.
static IN_FATAL: AtomicBool = AtomicBool::new(false);

/// Fills the IDT with interrupt gates to the stubs and loads it.
pub fn init() {
    let base = exception_stubs as unsafe extern "C" fn() as usize as u64;
    for vector in 0..VECTORS {
        let handler = base + vector as u64 * STUB_STRIDE;
        // 64-bit interrupt gate, present, DPL 0, IST 0.
        let low = (handler & 0xffff)
            | CODE_SELECTOR << 16
            | 0x8e00u64 << 32
            | ((handler >> 16) & 0xffff) << 48;
        let high = handler >> 32;
        IDT.0[vector * 2].store(low, Ordering::Relaxed);
        IDT.0[vector * 2 + 1].store(high, Ordering::Relaxed);
    }
    let limit = (core::mem::size_of::<Idt>() - 1) as u16;
    // SAFETY: IDT is a static (lives forever) holding 32 interrupt gates just written,
    // each pointing at a stub of `exception_stubs`, which saves state and calls
    // `testguest_exception`.
    unsafe { arch::lidt(IDT.0.as_ptr() as u64, limit) };
}

/// Writes text to the debug port, byte by byte.
pub struct DebugPort;

impl Write for DebugPort {
    fn write_str(&mut self, s: &str) -> core::fmt::Result {
        for b in s.bytes() {
            arch::outb(abi::ferro::DEBUG_PORT, b);
        }
        Ok(())
    }
}

fn exception_name(vector: u64) -> &'static str {
    match vector {
        0 => "#DE",
        1 => "#DB",
        2 => "NMI",
        3 => "#BP",
        4 => "#OF",
        5 => "#BR",
        6 => "#UD",
        7 => "#NM",
        8 => "#DF",
        10 => "#TS",
        11 => "#NP",
        12 => "#SS",
        13 => "#GP",
        14 => "#PF",
        16 => "#MF",
        17 => "#AC",
        18 => "#MC",
        19 => "#XM",
        20 => "#VE",
        21 => "#CP",
        _ => "reserved",
    }
}

/// Called by `exception_common` with the saved state.
#[no_mangle]
extern "C" fn testguest_exception(frame: &mut ExceptionFrame) {
    let recovery = arch::FAULT_RECOVERY_RIP.swap(0, Ordering::SeqCst);
    if recovery != 0 {
        arch::FAULT_VECTOR.store(frame.vector as u8, Ordering::SeqCst);
        frame.rip = recovery;
        return;
    }

    let mut out = DebugPort;
    if IN_FATAL.swap(true, Ordering::SeqCst) {
        // An exception while reporting one: under bare QEMU, the shutdown `vmmcall`
        // itself raises #UD. Nothing more can be done.
        let _ = writeln!(
            out,
            "testguest: nested exception {} ({}) at rip {:#x}, halting",
            frame.vector,
            exception_name(frame.vector),
            frame.rip
        );
        arch::halt_forever();
    }
    let cr2: u64;
    // SAFETY: reading CR2 has no side effects.
    unsafe {
        core::arch::asm!("mov {}, cr2", out(reg) cr2, options(nomem, nostack, preserves_flags))
    };
    let _ = writeln!(
        out,
        "testguest: exception {} ({}) error {:#x} at rip {:#x} rsp {:#x} cr2 {:#x}",
        frame.vector,
        exception_name(frame.vector),
        frame.error_code,
        frame.rip,
        frame.rsp,
        cr2
    );
    let _ = write!(
        out,
        "testguest: rax {:#x} rdi {:#x} rsi {:#x} rdx {:#x} cmdline \"",
        frame.rax, frame.rdi, frame.rsi, frame.rdx
    );
    for &b in crate::cmdline() {
        arch::outb(abi::ferro::DEBUG_PORT, b);
    }
    let _ = out.write_str("\"\n");
    crate::shutdown(abi::hypercall::SHUTDOWN_CRASH);
}
