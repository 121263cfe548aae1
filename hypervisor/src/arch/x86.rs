//! Thin wrappers around privileged x86 instructions.
//!
//! Each function is `unsafe` because executing it at the wrong time or with a wrong value
//! breaks the machine (or faults); callers state why their use holds.

use core::arch::asm;

/// Reads model-specific register `msr`.
///
/// # Safety
/// `msr` must exist on this CPU (else #GP) and reading it must have no side effect the
/// caller does not expect.
pub unsafe fn rdmsr(msr: u32) -> u64 {
    let (lo, hi): (u32, u32);
    // SAFETY: the caller guarantees the MSR exists and may be read.
    unsafe { asm!("rdmsr", in("ecx") msr, out("eax") lo, out("edx") hi, options(nomem, nostack)) };
    (u64::from(hi) << 32) | u64::from(lo)
}

/// Writes model-specific register `msr`.
///
/// # Safety
/// `msr` must exist and `value` must be valid for it; the write's effect on the machine
/// is the caller's responsibility.
pub unsafe fn wrmsr(msr: u32, value: u64) {
    // SAFETY: the caller guarantees the MSR and value are valid.
    unsafe {
        asm!("wrmsr", in("ecx") msr, in("eax") value as u32, in("edx") (value >> 32) as u32,
             options(nostack))
    };
}

/// Writes a byte to an I/O port.
///
/// # Safety
/// The port must belong to a device the hypervisor owns and the write must be meaningful
/// to it.
pub unsafe fn outb(port: u16, value: u8) {
    // SAFETY: the caller owns the device behind `port`.
    unsafe { asm!("out dx, al", in("dx") port, in("al") value, options(nomem, nostack)) };
}

/// Writes a 32-bit value to an I/O port.
///
/// # Safety
/// As [`outb`].
pub unsafe fn outl(port: u16, value: u32) {
    // SAFETY: the caller owns the device behind `port`.
    unsafe { asm!("out dx, eax", in("dx") port, in("eax") value, options(nomem, nostack)) };
}

/// Reads a byte from an I/O port.
///
/// # Safety
/// As [`outb`]; reads can have side effects on devices.
pub unsafe fn inb(port: u16) -> u8 {
    let v: u8;
    // SAFETY: the caller owns the device behind `port`.
    unsafe { asm!("in al, dx", in("dx") port, out("al") v, options(nomem, nostack)) };
    v
}

/// Reads a 32-bit value from an I/O port.
///
/// # Safety
/// As [`inb`].
pub unsafe fn inl(port: u16) -> u32 {
    let v: u32;
    // SAFETY: the caller owns the device behind `port`.
    unsafe { asm!("in eax, dx", in("dx") port, out("eax") v, options(nomem, nostack)) };
    v
}

/// Reads CR0.
pub fn cr0() -> u64 {
    let v: u64;
    // SAFETY: reading CR0 has no side effects; the image runs at CPL 0.
    unsafe { asm!("mov {}, cr0", out(reg) v, options(nomem, nostack)) };
    v
}

/// Reads CR3.
pub fn cr3() -> u64 {
    let v: u64;
    // SAFETY: reading CR3 has no side effects; the image runs at CPL 0.
    unsafe { asm!("mov {}, cr3", out(reg) v, options(nomem, nostack)) };
    v
}

/// Reads CR4.
pub fn cr4() -> u64 {
    let v: u64;
    // SAFETY: reading CR4 has no side effects; the image runs at CPL 0.
    unsafe { asm!("mov {}, cr4", out(reg) v, options(nomem, nostack)) };
    v
}

/// Writes CR4.
///
/// # Safety
/// The new value must keep the running code valid (PAE stays on, features set exist).
pub unsafe fn write_cr4(v: u64) {
    // SAFETY: the caller guarantees the value is valid for this CPU and context.
    unsafe { asm!("mov cr4, {}", in(reg) v, options(nostack)) };
}

/// Writes CR0.
///
/// # Safety
/// As [`write_cr4`].
pub unsafe fn write_cr0(v: u64) {
    // SAFETY: the caller guarantees the value is valid for this CPU and context.
    unsafe { asm!("mov cr0, {}", in(reg) v, options(nostack)) };
}

/// Reads the extended control register XCR0.
///
/// # Safety
/// CR4.OSXSAVE must be set.
pub unsafe fn xgetbv0() -> u64 {
    let (lo, hi): (u32, u32);
    // SAFETY: OSXSAVE is set (caller), so XGETBV with ecx=0 is defined.
    unsafe { asm!("xgetbv", in("ecx") 0, out("eax") lo, out("edx") hi, options(nomem, nostack)) };
    (u64::from(hi) << 32) | u64::from(lo)
}

/// Writes XCR0.
///
/// # Safety
/// CR4.OSXSAVE must be set and `v` a valid XCR0 value for this CPU (bit 0 set, only
/// supported components, AVX only with SSE).
pub unsafe fn xsetbv0(v: u64) {
    // SAFETY: the caller guarantees OSXSAVE and a valid value.
    unsafe {
        asm!("xsetbv", in("ecx") 0, in("eax") v as u32, in("edx") (v >> 32) as u32,
             options(nomem, nostack))
    };
}

/// Reads the time-stamp counter.
pub fn rdtsc() -> u64 {
    // SAFETY: RDTSC is always available on x86-64 at CPL 0 and has no side effects.
    unsafe { core::arch::x86_64::_rdtsc() }
}

/// Halts the CPU with interrupts off, forever.
pub fn halt_forever() -> ! {
    loop {
        // SAFETY: disabling interrupts and halting is what the caller asked for; nothing
        // needs this CPU afterwards.
        unsafe { asm!("cli; hlt", options(nomem, nostack)) };
    }
}

/// Executes CPUID.
pub fn cpuid(leaf: u32, subleaf: u32) -> [u32; 4] {
    let r = core::arch::x86_64::__cpuid_count(leaf, subleaf);
    [r.eax, r.ebx, r.ecx, r.edx]
}

/// MSR numbers used by the hypervisor.
pub mod msr {
    /// IA32_EFER
    pub const EFER: u32 = 0xc000_0080;
    /// AMD VM_HSAVE_PA
    pub const VM_HSAVE_PA: u32 = 0xc001_0117;
    /// AMD VM_CR (SVMDIS in bit 4)
    pub const VM_CR: u32 = 0xc001_0114;
    /// IA32_PAT
    pub const PAT: u32 = 0x277;
    /// IA32_APIC_BASE
    pub const APIC_BASE: u32 = 0x1b;
    /// IA32_TSC
    pub const TSC: u32 = 0x10;
    /// IA32_SYSENTER_CS
    pub const SYSENTER_CS: u32 = 0x174;
    /// IA32_SYSENTER_ESP
    pub const SYSENTER_ESP: u32 = 0x175;
    /// IA32_SYSENTER_EIP
    pub const SYSENTER_EIP: u32 = 0x176;
    /// STAR
    pub const STAR: u32 = 0xc000_0081;
    /// LSTAR
    pub const LSTAR: u32 = 0xc000_0082;
    /// CSTAR
    pub const CSTAR: u32 = 0xc000_0083;
    /// SFMASK
    pub const SFMASK: u32 = 0xc000_0084;
    /// FS.base
    pub const FS_BASE: u32 = 0xc000_0100;
    /// GS.base
    pub const GS_BASE: u32 = 0xc000_0101;
    /// KernelGSbase
    pub const KERNEL_GS_BASE: u32 = 0xc000_0102;
    /// TSC_AUX
    pub const TSC_AUX: u32 = 0xc000_0103;
}

/// EFER bits.
pub mod efer {
    /// System call extensions.
    pub const SCE: u64 = 1 << 0;
    /// Long mode enable.
    pub const LME: u64 = 1 << 8;
    /// Long mode active.
    pub const LMA: u64 = 1 << 10;
    /// No-execute enable.
    pub const NXE: u64 = 1 << 11;
    /// Secure virtual machine enable.
    pub const SVME: u64 = 1 << 12;
    /// Long mode segment limit enable.
    pub const LMSLE: u64 = 1 << 13;
    /// Fast FXSAVE/FXRSTOR.
    pub const FFXSR: u64 = 1 << 14;
    /// Translation cache extension.
    pub const TCE: u64 = 1 << 15;
}
