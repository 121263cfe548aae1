//! Uptime for log stamps: the TSC, calibrated against the PIT at boot.

use core::sync::atomic::{AtomicU64, Ordering};

use hypervisor::arch::x86;

static TSC_START: AtomicU64 = AtomicU64::new(0);
static TSC_PER_MS: AtomicU64 = AtomicU64::new(0);

/// Calibrates the TSC with PIT channel 2 (gated by port 0x61) over 10 ms.
pub fn init() {
    // SAFETY: the PIT (ports 0x42, 0x43) and the speaker gate (0x61) belong to the
    // hypervisor; channel 2 only drives the PC speaker, which is gated off.
    let ticks = unsafe {
        let gate = x86::inb(0x61);
        x86::outb(0x61, (gate & !0x02) | 0x01);
        x86::outb(0x43, 0b1011_0000); // channel 2, lobyte/hibyte, mode 0
        let count: u16 = 11932; // 10 ms at 1.193182 MHz
        x86::outb(0x42, count as u8);
        x86::outb(0x42, (count >> 8) as u8);
        let t0 = x86::rdtsc();
        let mut spins = 0u64;
        while x86::inb(0x61) & 0x20 == 0 && spins < 100_000_000 {
            spins += 1;
        }
        let t1 = x86::rdtsc();
        x86::outb(0x61, gate);
        t1 - t0
    };
    TSC_PER_MS.store((ticks / 10).max(1), Ordering::Relaxed);
    TSC_START.store(x86::rdtsc(), Ordering::Relaxed);
}

/// Milliseconds since [`init`] (0 before).
pub fn uptime_ms() -> u64 {
    let per = TSC_PER_MS.load(Ordering::Relaxed);
    if per == 0 {
        return 0;
    }
    x86::rdtsc().saturating_sub(TSC_START.load(Ordering::Relaxed)) / per
}

/// TSC ticks per millisecond as calibrated.
pub fn tsc_per_ms() -> u64 {
    TSC_PER_MS.load(Ordering::Relaxed)
}
