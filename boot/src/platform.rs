//! Ending a run: QEMU's isa-debug-exit device (tests); on an emulator's ACPI (Bochs),
//! an S5 power-off; else a halt.

use core::sync::atomic::{AtomicU32, Ordering};

use hypervisor::arch::x86;

/// PM1a control port to power off through (0: none), from [`set_poweroff_port`].
static POWEROFF_PORT: AtomicU32 = AtomicU32::new(0);

/// Powers the machine off through this ACPI PM1a control port at the end of a run
/// (emulators only: their S5 sleep type is 0).
pub fn set_poweroff_port(port: u16) {
    POWEROFF_PORT.store(u32::from(port), Ordering::Relaxed);
}

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
    // The status QEMU's isa-debug-exit would give, for runs without that device (Bochs).
    crate::console::force_write_fmt(format_args!(
        "ferrovisor: exit status {}\n",
        ((code as u32) << 1) | 1
    ));
    // SAFETY: port 0xf4 is QEMU's isa-debug-exit when present (xtask adds it); on
    // other machines nothing decodes it and the write is ignored.
    unsafe { x86::outl(0xf4, code as u32) };
    let port = POWEROFF_PORT.load(Ordering::Relaxed) as u16;
    if port != 0 {
        // SAFETY: COM1's line status register and the emulator's PM1a control port
        // belong to the hypervisor; waiting for the transmitter to drain keeps the last
        // lines, then SLP_EN with sleep type 0 (S5 on these emulators) powers off.
        unsafe {
            for _ in 0..1_000_000 {
                if x86::inb(0x3fd) & 0x40 != 0 {
                    break;
                }
            }
            x86_64::instructions::port::Port::<u16>::new(port).write(0x2000);
        }
    }
    x86::halt_forever()
}
