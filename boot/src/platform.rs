//! Ending a run: QEMU's isa-debug-exit device (tests), else a halt.

use hypervisor::arch::x86;

/// The verdict written to isa-debug-exit; QEMU exits with status `(v << 1) | 1`.
#[derive(Clone, Copy, Debug)]
#[repr(u32)]
pub enum ExitCode {
    /// Every domain finished cleanly (status 1).
    Success = 0,
    /// The hypervisor is fine but some domain failed (status 3).
    DomainFailed = 1,
    /// Fatal error at boot (status 5).
    Fatal = 2,
    /// Panic or exception in the hypervisor (status 7).
    Crash = 3,
}

/// Stops the machine with a verdict: QEMU's isa-debug-exit at port 0xf4 ends the run;
/// on hardware without it the CPU halts.
pub fn exit(code: ExitCode) -> ! {
    // SAFETY: port 0xf4 is QEMU's isa-debug-exit when present (xtask adds it); on
    // other machines nothing decodes it and the write is ignored.
    unsafe { x86::outl(0xf4, code as u32) };
    x86::halt_forever()
}
