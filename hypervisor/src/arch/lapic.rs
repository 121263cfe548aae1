//! The host's local APIC (xAPIC MMIO, the same address on every CPU, each CPU seeing
//! its own): its one-shot timer preempts guests and wakes the idle loop, and its
//! interrupt command register starts secondary CPUs (INIT, start-up IPIs) and kicks
//! other CPUs ([`KICK_VECTOR`]). Interrupts reach the host only at two places (the
//! world switch's `stgi` and [`wait_for_interrupt`]); the image's IDT handlers for
//! [`TIMER_VECTOR`] and [`KICK_VECTOR`] just acknowledge them.

use core::sync::atomic::{AtomicU64, Ordering};

use super::x86::{self, msr};

/// Vector of the host timer interrupt.
pub const TIMER_VECTOR: u8 = 0x20;
/// Vector of the inter-processor "kick": another CPU wants this one out of its guest
/// (or out of its idle halt) to look at the shared state again. Its handler only
/// acknowledges it, like the timer's.
pub const KICK_VECTOR: u8 = 0xf0;
/// Spurious-interrupt vector.
pub const SPURIOUS_VECTOR: u8 = 0xff;

const REG_ID: u64 = 0x20;
const REG_TPR: u64 = 0x80;
const REG_EOI: u64 = 0xb0;
const REG_SVR: u64 = 0xf0;
const REG_ICR_LOW: u64 = 0x300;
const REG_ICR_HIGH: u64 = 0x310;
const REG_LVT_TIMER: u64 = 0x320;
const REG_LVT_LINT0: u64 = 0x350;
const REG_LVT_LINT1: u64 = 0x360;
const REG_LVT_ERROR: u64 = 0x370;
const REG_INITIAL: u64 = 0x380;
const REG_CURRENT: u64 = 0x390;
const REG_DIVIDE: u64 = 0x3e0;
const MASKED: u32 = 1 << 16;
/// ICR: delivery status (send pending).
const ICR_PENDING: u32 = 1 << 12;
/// ICR: level assert.
const ICR_ASSERT: u32 = 1 << 14;
/// ICR delivery modes.
const ICR_FIXED: u32 = 0;
const ICR_INIT: u32 = 5 << 8;
const ICR_STARTUP: u32 = 6 << 8;

static BASE: AtomicU64 = AtomicU64::new(0);
static TICKS_PER_MS: AtomicU64 = AtomicU64::new(0);

/// Address the timer interrupt handler writes 0 to (EOI); read by the image's stub.
#[unsafe(no_mangle)]
pub static FERROVISOR_LAPIC_EOI: AtomicU64 = AtomicU64::new(0);

fn read(reg: u64) -> u32 {
    // SAFETY: BASE is the identity-mapped xAPIC page (set by init); registers are
    // 32-bit, 16-byte aligned.
    unsafe { core::ptr::read_volatile((BASE.load(Ordering::Relaxed) + reg) as *const u32) }
}

fn write(reg: u64, v: u32) {
    // SAFETY: as in `read`.
    unsafe { core::ptr::write_volatile((BASE.load(Ordering::Relaxed) + reg) as *mut u32, v) }
}

/// Enables the local APIC with every local interrupt masked and measures its timer
/// against the TSC (`tsc_khz`) over about 10 ms. Returns timer ticks per millisecond.
///
/// # Safety
/// Call once on the boot CPU, interrupts off, with the APIC page identity-mapped
/// uncached (the image's boot map covers the first 4 GiB).
pub unsafe fn init(tsc_khz: u64) -> u64 {
    // SAFETY: IA32_APIC_BASE exists on every x86-64 CPU; setting the global enable bit
    // keeps the default base.
    let base_msr = unsafe { x86::rdmsr(msr::APIC_BASE) };
    // SAFETY: as above.
    unsafe { x86::wrmsr(msr::APIC_BASE, base_msr | (1 << 11)) };
    let base = base_msr & 0x000f_ffff_ffff_f000;
    BASE.store(base, Ordering::Relaxed);
    FERROVISOR_LAPIC_EOI.store(base + REG_EOI, Ordering::Relaxed);
    setup_local();
    write(REG_INITIAL, u32::MAX);
    let t0 = x86::rdtsc();
    let wait = tsc_khz.max(1) * 10;
    while x86::rdtsc() - t0 < wait {
        core::hint::spin_loop();
    }
    let elapsed = u64::from(u32::MAX - read(REG_CURRENT));
    write(REG_INITIAL, 0);
    let per_ms = (elapsed / 10).max(1);
    TICKS_PER_MS.store(per_ms, Ordering::Relaxed);
    per_ms
}

/// Software-enables this CPU's APIC with every local interrupt masked and the timer
/// dividing by 1.
fn setup_local() {
    write(REG_SVR, 0x100 | u32::from(SPURIOUS_VECTOR));
    write(REG_TPR, 0);
    write(REG_LVT_LINT0, MASKED);
    write(REG_LVT_LINT1, MASKED);
    write(REG_LVT_ERROR, MASKED);
    write(REG_DIVIDE, 0b1011); // divide by 1
    write(REG_LVT_TIMER, MASKED | u32::from(TIMER_VECTOR));
    write(REG_INITIAL, 0);
}

/// Sets up the local APIC of a secondary CPU like [`init`] did the boot CPU's, with
/// the timer rate the boot CPU measured (every local APIC timer runs from the same bus
/// clock).
///
/// # Safety
/// Call once on each secondary CPU, interrupts off, after [`init`] ran on the boot CPU.
pub unsafe fn init_ap() {
    // SAFETY: as in `init`: the global enable bit with the default base.
    let base_msr = unsafe { x86::rdmsr(msr::APIC_BASE) };
    // SAFETY: as above.
    unsafe { x86::wrmsr(msr::APIC_BASE, base_msr | (1 << 11)) };
    setup_local();
}

/// This CPU's local APIC id (`None` before [`init`]).
pub fn id() -> Option<u32> {
    if BASE.load(Ordering::Relaxed) == 0 {
        return None;
    }
    Some(read(REG_ID) >> 24)
}

/// Waits (bounded) until the previous IPI has left the local APIC.
fn wait_icr_idle() -> bool {
    for _ in 0..1_000_000 {
        if read(REG_ICR_LOW) & ICR_PENDING == 0 {
            return true;
        }
        core::hint::spin_loop();
    }
    false
}

fn send_icr(apic_id: u32, low: u32) -> bool {
    if BASE.load(Ordering::Relaxed) == 0 {
        return false;
    }
    wait_icr_idle();
    write(REG_ICR_HIGH, (apic_id & 0xff) << 24);
    write(REG_ICR_LOW, low);
    wait_icr_idle()
}

/// Sends the fixed interrupt `vector` to the CPU whose local APIC id is `apic_id`.
/// Returns false when the APIC did not take the request (no APIC, or stuck busy).
pub fn send_ipi(apic_id: u32, vector: u8) -> bool {
    send_icr(apic_id, ICR_FIXED | ICR_ASSERT | u32::from(vector))
}

/// Sends INIT to `apic_id` (the first step of starting a secondary CPU).
pub fn send_init(apic_id: u32) -> bool {
    send_icr(apic_id, ICR_INIT | ICR_ASSERT)
}

/// Sends a start-up IPI: the CPU `apic_id` begins in real mode at `page << 12`.
pub fn send_startup(apic_id: u32, page: u8) -> bool {
    send_icr(apic_id, ICR_STARTUP | ICR_ASSERT | u32::from(page))
}

/// Arms the one-shot timer to interrupt after `ns` nanoseconds (at least one tick).
pub fn arm_ns(ns: u64) {
    if BASE.load(Ordering::Relaxed) == 0 {
        return;
    }
    let ticks = (u128::from(ns) * u128::from(TICKS_PER_MS.load(Ordering::Relaxed)) / 1_000_000)
        .clamp(1, u128::from(u32::MAX)) as u32;
    write(REG_LVT_TIMER, u32::from(TIMER_VECTOR));
    write(REG_INITIAL, ticks);
}

/// Stops the timer.
pub fn disarm() {
    if BASE.load(Ordering::Relaxed) != 0 {
        write(REG_INITIAL, 0);
    }
}

/// Enables interrupts, halts until one arrives (handled by the image's IDT), and
/// disables them again.
pub fn wait_for_interrupt() {
    // SAFETY: `sti; hlt` is race-free (the STI shadow covers HLT); the only unmasked
    // interrupt sources are the APIC timer and the kick IPI, whose handlers only
    // acknowledge them.
    unsafe { core::arch::asm!("sti", "hlt", "cli", options(nomem, nostack)) };
}
