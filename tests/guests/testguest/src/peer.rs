//! `test=peer-a` and `test=peer-b`: two test guests share a page through a grant and
//! signal each other over an interdomain event channel.
//!
//! A (domid 1) grants ref [`GREF`] on one page to B, allocates an unbound port for B,
//! and waits. B binds to that port (A's first allocated port, 3: ports 1 and 2 are
//! the console's and xenstore's), maps the grant, checks A's pattern, writes its own, unmaps, and
//! notifies A. A checks B's pattern, ends the grant, and notifies B. B maps again:
//! the map must fail with `GNTST_general_error`, as Xen answers for an entry that no
//! longer permits access, and tells A, which has waited for that. Each side reports its
//! failures through the test interface.

use core::fmt::Write;
use core::sync::atomic::{compiler_fence, AtomicU8, Ordering};

use abi::ferro::Check;
use abi::hypercall as hc;

use crate::{arch, console_write, console_write_bytes, report, shutdown, StackBuf};

/// The grant reference A uses.
pub const GREF: u32 = 8;
/// A's first allocated event-channel port (ports 1 and 2 are the console's and
/// xenstore's, which the hypervisor allocates when it builds the domain).
pub const A_PORT: u32 = 3;

const DOMID_SELF: u16 = 0x7ff0;
const GNTTABOP_MAP_GRANT_REF: u64 = 0;
const GNTTABOP_UNMAP_GRANT_REF: u64 = 1;
const GNTMAP_DEVICE_MAP: u32 = 1;
const GNTMAP_HOST_MAP: u32 = 2;
const GTF_PERMIT_ACCESS: u16 = 1;
const GTF_READING: u16 = 1 << 3;
const GTF_WRITING: u16 = 1 << 4;
const GNTST_GENERAL_ERROR: i16 = -1;
const EVTCHNOP_BIND_INTERDOMAIN: u64 = 0;
const EVTCHNOP_SEND: u64 = 4;
const EVTCHNOP_ALLOC_UNBOUND: u64 = 6;
const XENMAPSPACE_GRANT_TABLE: u32 = 1;

/// A page-aligned page of the guest's memory (identity-mapped: its address is its
/// guest-physical address).
#[repr(C, align(4096))]
pub struct Page([AtomicU8; 4096]);

impl Page {
    /// A zeroed page.
    pub const fn new() -> Page {
        Page([const { AtomicU8::new(0) }; 4096])
    }
    /// Its (guest-physical) address.
    pub fn addr(&self) -> u64 {
        self.0.as_ptr() as u64
    }
    /// Byte `i`.
    pub fn byte(&self, i: usize) -> u8 {
        self.0[i].load(Ordering::SeqCst)
    }
    /// Sets byte `i` to `f(i)` for the whole page.
    pub fn fill(&self, f: impl Fn(usize) -> u8) {
        for (i, b) in self.0.iter().enumerate() {
            b.store(f(i), Ordering::Relaxed);
        }
        compiler_fence(Ordering::SeqCst);
    }
    fn matches(&self, f: impl Fn(usize) -> u8) -> bool {
        compiler_fence(Ordering::SeqCst);
        self.0
            .iter()
            .enumerate()
            .all(|(i, b)| b.load(Ordering::Relaxed) == f(i))
    }
}

/// A's shared page, granted to B.
static SHARED: Page = Page::new();
/// Where A places its first grant-table frame.
static GRANT_TABLE: Page = Page::new();
/// Where B maps A's grant (the RAM page there is replaced while mapped).
static SLOT: Page = Page::new();
/// Where each side places its shared_info (to clear event-pending bits).
static SHINFO: Page = Page::new();

/// Places shared_info at [`SHINFO`].
pub fn map_shared_info() -> i64 {
    let mut xatp = [0u8; 24];
    xatp[0..2].copy_from_slice(&DOMID_SELF.to_le_bytes());
    xatp[16..24].copy_from_slice(&(SHINFO.addr() >> 12).to_le_bytes());
    hypercall(
        hc::MEMORY_OP,
        hc::XENMEM_ADD_TO_PHYSMAP,
        xatp.as_ptr() as u64,
        0,
    )
}

/// Clears `port`'s bit in shared_info's `evtchn_pending` (2-level), as a guest's
/// event handler does before looking at what the event means.
pub fn clear_pending(port: u32) {
    let byte = 2048 + (port / 8) as usize;
    SHINFO.0[byte].fetch_and(!(1u8 << (port % 8)), Ordering::SeqCst);
}

/// Waits for the next event on `port` and consumes it.
pub fn wait(port: u32) -> i64 {
    let rc = poll(port);
    clear_pending(port);
    rc
}

fn pattern_a(i: usize) -> u8 {
    (i as u8) ^ 0x5a
}

fn pattern_b(i: usize) -> u8 {
    (i as u8).wrapping_mul(3) ^ 0xa5
}

/// Steps of a two-domain test: each prints a line, failures are counted.
pub struct Steps {
    name: &'static str,
    /// Steps checked.
    pub done: u64,
    /// Steps that failed.
    pub failed: u64,
}

impl Steps {
    /// No steps yet; lines say `testguest: <name>: ...`.
    pub fn new(name: &'static str) -> Steps {
        Steps {
            name,
            done: 0,
            failed: 0,
        }
    }

    /// Counts one step and prints it.
    pub fn check(&mut self, what: &str, ok: bool, got: i64) {
        self.done += 1;
        if !ok {
            self.failed += 1;
        }
        let mut line = StackBuf::<128>::new();
        let _ = writeln!(
            line,
            "testguest: {}: {what}: {} ({got})",
            self.name,
            if ok { "ok" } else { "WRONG" }
        );
        console_write_bytes(line.as_bytes());
    }
}

fn hypercall(nr: u64, a1: u64, a2: u64, a3: u64) -> i64 {
    // SAFETY: every pointer passed below names a live, identity-mapped buffer of the
    // size the hypercall reads or writes.
    unsafe { arch::hypercall(nr, a1, a2, a3) }
}

/// EVTCHNOP_send.
pub fn evtchn_send(port: u32) -> i64 {
    let p = port.to_le_bytes();
    hypercall(hc::EVENT_CHANNEL_OP, EVTCHNOP_SEND, p.as_ptr() as u64, 0)
}

/// Blocks until `port` is pending (SCHEDOP_poll; no timeout).
pub fn poll(port: u32) -> i64 {
    let ports = [port];
    let mut a = [0u8; 24];
    a[0..8].copy_from_slice(&(ports.as_ptr() as u64).to_le_bytes());
    a[8..12].copy_from_slice(&1u32.to_le_bytes());
    hypercall(hc::SCHED_OP, hc::SCHEDOP_POLL, a.as_ptr() as u64, 0)
}

fn map_grant(slot: u64, dom: u16) -> (i16, u32) {
    map_grant_at(slot, dom, false)
}

/// Maps the peer's grant [`GREF`] at guest-physical `slot` (`GNTMAP_host_map`, plus
/// `GNTMAP_device_map` when `device`); returns (status, handle).
pub fn map_grant_at(slot: u64, dom: u16, device: bool) -> (i16, u32) {
    let flags = GNTMAP_HOST_MAP | if device { GNTMAP_DEVICE_MAP } else { 0 };
    let mut op = [0u8; 32];
    op[0..8].copy_from_slice(&slot.to_le_bytes());
    op[8..12].copy_from_slice(&flags.to_le_bytes());
    op[12..16].copy_from_slice(&GREF.to_le_bytes());
    op[16..18].copy_from_slice(&dom.to_le_bytes());
    let rc = hypercall(
        hc::GRANT_TABLE_OP,
        GNTTABOP_MAP_GRANT_REF,
        op.as_mut_ptr() as u64,
        1,
    );
    if rc != 0 {
        return (rc as i16, 0);
    }
    compiler_fence(Ordering::SeqCst);
    (
        i16::from_le_bytes([op[18], op[19]]),
        u32::from_le_bytes([op[20], op[21], op[22], op[23]]),
    )
}

fn unmap_grant(slot: u64, handle: u32) -> i16 {
    unmap_grant_at(slot, handle)
}

/// Unmaps a grant mapped with [`map_grant_at`]; returns the status.
pub fn unmap_grant_at(slot: u64, handle: u32) -> i16 {
    let mut op = [0u8; 24];
    op[0..8].copy_from_slice(&slot.to_le_bytes());
    op[16..20].copy_from_slice(&handle.to_le_bytes());
    let rc = hypercall(
        hc::GRANT_TABLE_OP,
        GNTTABOP_UNMAP_GRANT_REF,
        op.as_mut_ptr() as u64,
        1,
    );
    if rc != 0 {
        return rc as i16;
    }
    compiler_fence(Ordering::SeqCst);
    i16::from_le_bytes([op[20], op[21]])
}

fn grant_flags() -> &'static AtomicU8 {
    &GRANT_TABLE.0[GREF as usize * 8]
}

/// Domain A.
pub fn run_a(peer: u16) -> ! {
    let mut s = Steps::new("peer-a");
    console_write("testguest: peer-a: granting a page\n");
    let (port, _) = grant_page_to(&mut s, peer, pattern_a);
    let rc = wait(port);
    s.check("woken by the peer's event", rc == 0, rc);
    s.check(
        "peer's pattern in the shared page",
        SHARED.matches(pattern_b),
        0,
    );
    let flags = u16::from(grant_flags().load(Ordering::SeqCst));
    s.check(
        "no pins left after the peer unmapped",
        flags & (GTF_READING | GTF_WRITING) == 0,
        i64::from(flags),
    );
    end_access();
    let rc = evtchn_send(port);
    s.check("event to the peer", rc == 0, rc);
    // stay until B has tried its second map (a dead granter answers GNTST_bad_domain)
    let rc = wait(port);
    s.check("woken by the peer's last event", rc == 0, rc);
    report(Check::PeerA, s.failed, s.done);
    shutdown(hc::SHUTDOWN_POWEROFF)
}

/// Domain B.
pub fn run_b(peer: u16) -> ! {
    let mut s = Steps::new("peer-b");
    console_write("testguest: peer-b: waiting for the peer's port\n");
    let port = bind_to_peer(&mut s, peer);
    let (st, handle) = map_grant(SLOT.addr(), peer);
    s.check("grant mapped", st == 0, i64::from(st));
    s.check(
        "peer's pattern read through the mapping",
        SLOT.matches(pattern_a),
        0,
    );
    SLOT.fill(pattern_b);
    let st = unmap_grant(SLOT.addr(), handle);
    s.check("grant unmapped", st == 0, i64::from(st));
    let rc = evtchn_send(port);
    s.check("event to the peer", rc == 0, rc);
    let rc = wait(port);
    s.check("woken by the peer's event", rc == 0, rc);
    let (st, _) = map_grant(SLOT.addr(), peer);
    s.check(
        "second map after the peer ended access fails",
        st == GNTST_GENERAL_ERROR,
        i64::from(st),
    );
    let rc = evtchn_send(port);
    s.check("last event to the peer", rc == 0, rc);
    report(Check::PeerB, s.failed, s.done);
    shutdown(hc::SHUTDOWN_POWEROFF)
}

/// The granting side's setup: places shared_info and grant frame 0, fills [`SHARED`]
/// with `pattern`, grants it (ref [`GREF`], writable) to `peer`, and allocates an
/// unbound port for `peer` (which must come out as [`A_PORT`]). Returns the port and
/// the shared page.
pub fn grant_page_to(
    s: &mut Steps,
    peer: u16,
    pattern: impl Fn(usize) -> u8,
) -> (u32, &'static Page) {
    let rc = map_shared_info();
    s.check("shared_info placed", rc == 0, rc);
    // place grant frame 0 at GRANT_TABLE
    let mut xatp = [0u8; 24];
    xatp[0..2].copy_from_slice(&DOMID_SELF.to_le_bytes());
    xatp[4..8].copy_from_slice(&XENMAPSPACE_GRANT_TABLE.to_le_bytes());
    xatp[16..24].copy_from_slice(&(GRANT_TABLE.addr() >> 12).to_le_bytes());
    let rc = hypercall(
        hc::MEMORY_OP,
        hc::XENMEM_ADD_TO_PHYSMAP,
        xatp.as_ptr() as u64,
        0,
    );
    s.check("grant frame placed", rc == 0, rc);
    SHARED.fill(pattern);
    // entry v1: flags u16, domid u16, frame u32; flags last
    let e = &GRANT_TABLE.0[GREF as usize * 8..GREF as usize * 8 + 8];
    for (i, b) in peer.to_le_bytes().into_iter().enumerate() {
        e[2 + i].store(b, Ordering::Relaxed);
    }
    for (i, b) in ((SHARED.addr() >> 12) as u32)
        .to_le_bytes()
        .into_iter()
        .enumerate()
    {
        e[4 + i].store(b, Ordering::Relaxed);
    }
    compiler_fence(Ordering::SeqCst);
    grant_flags().store(GTF_PERMIT_ACCESS as u8, Ordering::SeqCst);
    let mut au = [0u8; 8];
    au[0..2].copy_from_slice(&DOMID_SELF.to_le_bytes());
    au[2..4].copy_from_slice(&peer.to_le_bytes());
    let rc = hypercall(
        hc::EVENT_CHANNEL_OP,
        EVTCHNOP_ALLOC_UNBOUND,
        au.as_mut_ptr() as u64,
        0,
    );
    let port = u32::from_le_bytes([au[4], au[5], au[6], au[7]]);
    s.check(
        "unbound port for the peer",
        rc == 0 && port == A_PORT,
        i64::from(port),
    );
    (port, &SHARED)
}

/// Ends the peer's access to [`SHARED`] (clears the grant entry's flags).
pub fn end_access() {
    grant_flags().store(0, Ordering::SeqCst);
}

/// The mapping side's setup: places shared_info and binds to the granter's
/// [`A_PORT`] (retrying until the granter has allocated it); returns the local port.
pub fn bind_to_peer(s: &mut Steps, peer: u16) -> u32 {
    let rc = map_shared_info();
    s.check("shared_info placed", rc == 0, rc);
    let mut bi = [0u8; 12];
    bi[0..2].copy_from_slice(&peer.to_le_bytes());
    bi[4..8].copy_from_slice(&A_PORT.to_le_bytes());
    let mut rc = -1;
    for _ in 0..100_000 {
        rc = hypercall(
            hc::EVENT_CHANNEL_OP,
            EVTCHNOP_BIND_INTERDOMAIN,
            bi.as_mut_ptr() as u64,
            0,
        );
        if rc == 0 {
            break;
        }
        hypercall(hc::SCHED_OP, hc::SCHEDOP_YIELD, 0, 0);
    }
    let port = u32::from_le_bytes([bi[8], bi[9], bi[10], bi[11]]);
    s.check("bound to the peer's port", rc == 0, i64::from(port));
    clear_pending(port); // Xen flags a freshly bound interdomain port
    port
}

/// SCHEDOP_yield: lets the hypervisor run its loop (and other domains) once.
pub fn yield_now() {
    hypercall(hc::SCHED_OP, hc::SCHEDOP_YIELD, 0, 0);
}
