//! The physical CPUs as the scheduler sees them, outside the big lock: which CPUs are
//! up (index -> local APIC id), which one is inside a guest and of which domain, the
//! kick IPI, and the per-CPU counters.
//!
//! A CPU marks itself "in a guest" (its epoch becomes odd) while it still holds the
//! big lock, right before it lets go of the lock and enters the guest, and marks
//! itself out (even) as soon as the guest exits, before it takes the lock again. So a
//! CPU holding the lock that sees an even epoch knows that CPU cannot be running the
//! guest, and one that sees an odd epoch can kick it and wait for the epoch to move:
//! the wait never needs the lock, so it cannot deadlock. That is how nested-page-table
//! changes reach vCPUs running elsewhere before a frame is released
//! ([`sync_domain`]).

use core::sync::atomic::{AtomicU32, AtomicU64, Ordering};

/// Most physical CPUs used (a bit each in a 32-bit mask).
pub const MAX_CPUS: usize = 16;

/// One physical CPU.
struct Cpu {
    apic_id: AtomicU32,
    /// Odd while this CPU runs a guest (or has committed to entering one).
    epoch: AtomicU64,
    /// Domain id of the guest it runs while `epoch` is odd.
    domain: AtomicU32,
    slices: AtomicU64,
    exits: AtomicU64,
    idle_ns: AtomicU64,
    guest_ns: AtomicU64,
    lock_wait_ns: AtomicU64,
    kicks: AtomicU64,
}

impl Cpu {
    const fn new() -> Cpu {
        Cpu {
            apic_id: AtomicU32::new(0),
            epoch: AtomicU64::new(0),
            domain: AtomicU32::new(0),
            slices: AtomicU64::new(0),
            exits: AtomicU64::new(0),
            idle_ns: AtomicU64::new(0),
            guest_ns: AtomicU64::new(0),
            lock_wait_ns: AtomicU64::new(0),
            kicks: AtomicU64::new(0),
        }
    }
}

static CPUS: [Cpu; MAX_CPUS] = [const { Cpu::new() }; MAX_CPUS];
/// Bit i: CPU i is up.
static ONLINE: AtomicU32 = AtomicU32::new(0);

/// CPUs inside guests now, since when two or more were, and the total time two or
/// more were: one small lock so that the count and the time move together.
struct Overlap {
    in_guest: u32,
    since: u64,
    total_ns: u64,
}

static OVERLAP: spin::Mutex<Overlap> = spin::Mutex::new(Overlap {
    in_guest: 0,
    since: 0,
    total_ns: 0,
});

/// Records CPU `index` as up with local APIC id `apic_id` (before it schedules).
pub fn register(index: usize, apic_id: u32) {
    if let Some(c) = CPUS.get(index) {
        c.apic_id.store(apic_id, Ordering::SeqCst);
        ONLINE.fetch_or(1 << index, Ordering::SeqCst);
    }
}

/// Takes CPU `index` off the list again (it never answered).
pub fn unregister(index: usize) {
    if index < MAX_CPUS {
        ONLINE.fetch_and(!(1 << index), Ordering::SeqCst);
    }
}

/// The indexes of the CPUs that are up.
pub fn online() -> impl Iterator<Item = usize> {
    let mask = ONLINE.load(Ordering::Relaxed);
    (0..MAX_CPUS).filter(move |&i| mask & (1 << i) != 0)
}

/// How many CPUs are up.
pub fn count() -> usize {
    ONLINE.load(Ordering::Relaxed).count_ones() as usize
}

/// The local APIC id of CPU `index`.
pub fn apic_id(index: usize) -> u32 {
    CPUS.get(index)
        .map_or(0, |c| c.apic_id.load(Ordering::Relaxed))
}

/// CPU `index` is about to enter a guest of domain `dom` (call with the big lock held).
pub fn entering_guest(index: usize, dom: u16) {
    let c = &CPUS[index];
    c.domain.store(u32::from(dom), Ordering::SeqCst);
    let e = c.epoch.load(Ordering::SeqCst);
    debug_assert!(e.is_multiple_of(2));
    c.epoch.store(e + 1, Ordering::SeqCst);
    let mut o = OVERLAP.lock();
    o.in_guest += 1;
    if o.in_guest == 2 {
        o.since = crate::time::now_ns();
    }
}

/// CPU `index` left its guest after `ns` nanoseconds in it (call before taking the lock).
pub fn left_guest(index: usize, ns: u64) {
    let c = &CPUS[index];
    {
        let mut o = OVERLAP.lock();
        if o.in_guest == 2 {
            o.total_ns += crate::time::now_ns().saturating_sub(o.since);
        }
        o.in_guest = o.in_guest.saturating_sub(1);
    }
    c.guest_ns.fetch_add(ns, Ordering::Relaxed);
    c.exits.fetch_add(1, Ordering::Relaxed);
    c.epoch.fetch_add(1, Ordering::SeqCst);
}

/// Is CPU `index` inside a guest (or committed to entering one)? Read with the big
/// lock held, the answer stays true until it is kicked out, and a CPU seen outside
/// cannot enter a guest before it has taken the lock and looked at the shared state.
pub fn in_guest(index: usize) -> bool {
    CPUS.get(index)
        .is_some_and(|c| !c.epoch.load(Ordering::SeqCst).is_multiple_of(2))
}

/// Sends the kick IPI to CPU `index`: out of its guest, or out of its idle halt.
pub fn kick(index: usize) {
    let c = &CPUS[index];
    c.kicks.fetch_add(1, Ordering::Relaxed);
    crate::arch::lapic::send_ipi(
        c.apic_id.load(Ordering::Relaxed),
        crate::arch::lapic::KICK_VECTOR,
    );
}

/// Makes sure no CPU runs a vCPU of domain `dom` with translations from before now:
/// every CPU inside one of its guests is kicked, and this waits until each has left
/// it (its next entry flushes: see the scheduler's TLB generations). Call with the big
/// lock held; the calling CPU is never inside a guest then.
pub fn sync_domain(dom: u16) {
    for i in online() {
        let c = &CPUS[i];
        let e = c.epoch.load(Ordering::SeqCst);
        if e.is_multiple_of(2) || c.domain.load(Ordering::SeqCst) != u32::from(dom) {
            continue;
        }
        kick(i);
        let t0 = crate::time::now_ns();
        let mut warned = false;
        while c.epoch.load(Ordering::SeqCst) == e {
            core::hint::spin_loop();
            if !warned && crate::time::now_ns().saturating_sub(t0) > 1_000_000_000 {
                warned = true;
                log::warn!(
                    "cpu{i} has not left its guest of d{dom} 1 s after a kick: still waiting"
                );
            }
        }
    }
}

/// Counts a time slice run on CPU `index`.
pub fn count_slice(index: usize) {
    CPUS[index].slices.fetch_add(1, Ordering::Relaxed);
}

/// Adds idle time of CPU `index`.
pub fn count_idle(index: usize, ns: u64) {
    CPUS[index].idle_ns.fetch_add(ns, Ordering::Relaxed);
}

/// Adds time CPU `index` waited for the big lock.
pub fn count_lock_wait(index: usize, ns: u64) {
    CPUS[index].lock_wait_ns.fetch_add(ns, Ordering::Relaxed);
}

/// The counters of one CPU.
#[derive(Clone, Copy, Debug, Default)]
pub struct CpuCounters {
    /// Time slices run (vCPUs picked and entered).
    pub slices: u64,
    /// Guest exits.
    pub exits: u64,
    /// Time halted with nothing to run.
    pub idle_ns: u64,
    /// Time inside guests.
    pub guest_ns: u64,
    /// Time spent waiting for the big lock.
    pub lock_wait_ns: u64,
    /// Kick IPIs sent to it.
    pub kicks: u64,
}

/// The counters of CPU `index`.
pub fn counters(index: usize) -> CpuCounters {
    let c = &CPUS[index];
    CpuCounters {
        slices: c.slices.load(Ordering::Relaxed),
        exits: c.exits.load(Ordering::Relaxed),
        idle_ns: c.idle_ns.load(Ordering::Relaxed),
        guest_ns: c.guest_ns.load(Ordering::Relaxed),
        lock_wait_ns: c.lock_wait_ns.load(Ordering::Relaxed),
        kicks: c.kicks.load(Ordering::Relaxed),
    }
}

/// Time during which guests ran on two or more CPUs at once.
pub fn overlap_ns() -> u64 {
    OVERLAP.lock().total_ns
}
