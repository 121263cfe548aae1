//! The few instructions the test guest needs, each wrapped once.

use core::arch::asm;
use core::sync::atomic::{AtomicU64, AtomicU8, Ordering};

/// Recovery RIP for an expected fault; non-zero while a fault is expected.
/// Written by [`try_rdmsr`], consumed by the exception handler.
pub static FAULT_RECOVERY_RIP: AtomicU64 = AtomicU64::new(0);
/// Vector of the last expected fault the exception handler recovered from.
pub static FAULT_VECTOR: AtomicU8 = AtomicU8::new(NO_FAULT);
/// [`FAULT_VECTOR`] value meaning "no fault taken".
const NO_FAULT: u8 = 0xff;

/// `out dx, al`
pub fn outb(port: u16, value: u8) {
    // SAFETY: port I/O touches no memory the compiler knows about; the guest drives no
    // DMA-capable device, so no port write here can change Rust-visible memory.
    unsafe {
        asm!("out dx, al", in("dx") port, in("al") value, options(nomem, nostack, preserves_flags))
    };
}

/// `in al, dx`
pub fn inb(port: u16) -> u8 {
    let value: u8;
    // SAFETY: as in `outb`: a port read only yields a value.
    unsafe {
        asm!("in al, dx", in("dx") port, out("al") value, options(nomem, nostack, preserves_flags))
    };
    value
}

/// `out dx, eax`
pub fn outl(port: u16, value: u32) {
    // SAFETY: port I/O touches no memory the compiler knows about. The one device this
    // guest may drive (the NIC of `test=dma-nic`) is configured through memory-mapped
    // registers and only DMAs into buffers the guest hands it through atomics.
    unsafe {
        asm!("out dx, eax", in("dx") port, in("eax") value, options(nomem, nostack, preserves_flags))
    };
}

/// `in eax, dx`
pub fn inl(port: u16) -> u32 {
    let value: u32;
    // SAFETY: as in `outb`: a port read only yields a value.
    unsafe {
        asm!("in eax, dx", in("dx") port, out("eax") value, options(nomem, nostack, preserves_flags))
    };
    value
}

/// `wrmsr`.
///
/// # Safety
/// Writing an MSR can change how the CPU executes (EFER, PAT, segment bases, ...): the
/// caller must name an MSR whose new value the rest of the guest does not depend on, and
/// one that exists (an unexpected #GP ends the guest).
pub unsafe fn wrmsr(msr: u32, value: u64) {
    // SAFETY: the caller vouches for the MSR and the value (see `# Safety`).
    unsafe {
        asm!(
            "wrmsr",
            in("ecx") msr,
            in("eax") value as u32,
            in("edx") (value >> 32) as u32,
            options(nostack, preserves_flags),
        )
    };
}

/// `rdmsr` that survives a fault: `Ok(value)`, or `Err(vector)` when the CPU raised an
/// exception (the handler records the vector and resumes after the `rdmsr`).
pub fn try_rdmsr(msr: u32) -> Result<u64, u8> {
    FAULT_VECTOR.store(NO_FAULT, Ordering::SeqCst);
    let lo: u32;
    let hi: u32;
    // If rdmsr faults, the exception handler sees the non-zero FAULT_RECOVERY_RIP (set
    // by the first two instructions), clears it and returns to label 2 inside this same
    // asm block, with every register the block declares as output merely holding an
    // unspecified value. The block is not `nomem`, so the compiler assumes it writes
    // the two statics.
    // SAFETY: reading an MSR has no side effects on memory; a fault resumes as above.
    unsafe {
        asm!(
            "lea {tmp}, [rip + 2f]",
            "mov qword ptr [rip + {rec}], {tmp}",
            "rdmsr",
            "2:",
            "mov qword ptr [rip + {rec}], 0",
            rec = sym FAULT_RECOVERY_RIP,
            tmp = out(reg) _,
            in("ecx") msr,
            out("eax") lo,
            out("edx") hi,
            options(nostack),
        )
    };
    match FAULT_VECTOR.swap(NO_FAULT, Ordering::SeqCst) {
        NO_FAULT => Ok(u64::from(hi) << 32 | u64::from(lo)),
        vector => Err(vector),
    }
}

/// The hypercall page: the hypervisor fills it with one 32-byte stub per hypercall
/// (`mov eax, nr; vmcall|vmmcall; ret`, the instruction of the CPU's vendor) when its
/// address is written to the MSR CPUID leaf 0x40000002 names, as Linux does.
#[repr(C, align(4096))]
struct HypercallPage([u8; 4096]);

static mut HYPERCALL_PAGE: HypercallPage = HypercallPage([0; 4096]);
/// Set once the hypervisor has been told where the page is.
static HYPERCALL_PAGE_READY: AtomicU8 = AtomicU8::new(0);
/// The hypercall-page MSR (CPUID 0x40000002 ebx in Xen and here).
const HYPERCALL_PAGE_MSR: u32 = 0x4000_0000;

/// The address of the hypercall page, registered with the hypervisor on first use.
fn hypercall_page() -> u64 {
    let page = (&raw const HYPERCALL_PAGE) as u64;
    if HYPERCALL_PAGE_READY.load(Ordering::Acquire) == 0 {
        // SAFETY: the page is this guest's own, page-aligned and identity-mapped; the
        // hypervisor writes the stubs into it and nothing else uses it.
        unsafe { wrmsr(HYPERCALL_PAGE_MSR, page) };
        HYPERCALL_PAGE_READY.store(1, Ordering::Release);
    }
    page
}

/// Xen hypercall through the hypercall page: `rax` = number, arguments in `rdi`, `rsi`,
/// `rdx`; the result comes back in `rax`.
///
/// # Safety
/// Pointer arguments are handed to the hypervisor, which may read (or, for some calls,
/// write) guest memory through them: they must be valid for what `nr` does with them.
pub unsafe fn hypercall(nr: u64, a1: u64, a2: u64, a3: u64) -> i64 {
    let ret: u64;
    let page = hypercall_page();
    if nr < 4096 / 32 {
        let stub = page + nr * 32;
        // SAFETY: the caller guarantees the arguments (see `# Safety`). The stub is the
        // hypervisor's `mov eax, nr; vmcall; ret` (`call` pushes: no `nostack`). The
        // block is not `nomem`: the hypervisor may read or write the memory the
        // arguments name; every argument register is declared clobbered in case the
        // hypervisor changes it.
        unsafe {
            asm!(
                "call {stub}",
                stub = in(reg) stub,
                inlateout("rax") nr => ret,
                inlateout("rdi") a1 => _,
                inlateout("rsi") a2 => _,
                inlateout("rdx") a3 => _,
                lateout("r10") _,
                lateout("r8") _,
            )
        };
        return ret as i64;
    }
    // Numbers beyond the page (the project's test hypercall, deliberately bad ones): the
    // instruction the hypervisor put in stub 0 (bytes 5..8: 0f 01 c1 vmcall, 0f 01 d9
    // vmmcall).
    // SAFETY: the page was filled by the hypervisor when registered; one byte is read.
    let intel = u64::from(unsafe { ((page + 7) as *const u8).read_volatile() } == 0xc1);
    // SAFETY: as above.
    unsafe {
        asm!(
            "test {intel}, {intel}",
            "jnz 2f",
            "vmmcall",
            "jmp 3f",
            "2:",
            "vmcall",
            "3:",
            intel = in(reg) intel,
            inlateout("rax") nr => ret,
            inlateout("rdi") a1 => _,
            inlateout("rsi") a2 => _,
            inlateout("rdx") a3 => _,
            lateout("r10") _,
            lateout("r8") _,
            options(nostack),
        )
    };
    ret as i64
}

/// 32-bit load with one plain `mov r32, [r64]`, for addresses the hypervisor emulates.
///
/// # Safety
/// `addr` must be mapped by the guest's page tables and 4-byte aligned; the load must be
/// harmless (no device side effects the caller did not intend).
pub unsafe fn read32(addr: u64) -> u32 {
    let value: u32;
    // SAFETY: the caller guarantees the address is mapped and aligned (see `# Safety`).
    unsafe {
        asm!("mov {0:e}, dword ptr [{1}]", out(reg) value, in(reg) addr, options(nostack, preserves_flags, readonly))
    };
    value
}

/// 32-bit store with one plain `mov [r64], r32`, for addresses the hypervisor emulates.
///
/// # Safety
/// `addr` must be mapped, 4-byte aligned and not hold anything Rust code relies on.
pub unsafe fn write32(addr: u64, value: u32) {
    // SAFETY: the caller guarantees the address is mapped, aligned and not Rust memory.
    unsafe {
        asm!("mov dword ptr [{0}], {1:e}", in(reg) addr, in(reg) value, options(nostack, preserves_flags))
    };
}

/// Loads IDTR from a base and limit.
///
/// # Safety
/// `limit + 1` bytes at `base` must hold valid 64-bit gate descriptors that stay in place
/// for as long as this IDT is loaded, each pointing at a working handler.
pub unsafe fn lidt(base: u64, limit: u16) {
    let mut desc = [0u8; 10];
    desc[..2].copy_from_slice(&limit.to_le_bytes());
    desc[2..].copy_from_slice(&base.to_le_bytes());
    // SAFETY: the caller guarantees the table (see `# Safety`); `lidt` only reads the
    // 10-byte descriptor, which lives on the stack for the duration of the instruction.
    unsafe {
        asm!("lidt [{}]", in(reg) desc.as_ptr(), options(nostack, preserves_flags, readonly))
    };
}

/// Loads an IDT with limit 0 and executes `ud2`: the #UD cannot be delivered, escalates to
/// #DF, which cannot be delivered either: a triple fault (shutdown). Never returns.
pub fn triple_fault() -> ! {
    let desc = [0u8; 10];
    // SAFETY: the point of this function is to bring the (virtual) CPU down: after the
    // empty IDT is loaded, `ud2` shuts the machine down; no Rust code runs again, which
    // `noreturn` states. Should the CPU continue anyway, the `cli; hlt` loop stops it.
    unsafe {
        asm!(
            "lidt [{}]",
            "ud2",
            "2:",
            "cli",
            "hlt",
            "jmp 2b",
            in(reg) desc.as_ptr(),
            options(noreturn, nostack),
        )
    }
}

/// `cli; hlt` forever (the hypervisor treats a halt with interrupts off as poweroff).
pub fn halt_forever() -> ! {
    loop {
        // SAFETY: disabling interrupts and halting touch no memory.
        unsafe { asm!("cli", "hlt", options(nomem, nostack)) };
    }
}
