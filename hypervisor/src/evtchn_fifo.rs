//! FIFO event channels: the delivery half of the FIFO ABI (`EVTCHNOP_init_control`,
//! `EVTCHNOP_expand_array`, `EVTCHNOP_set_priority`, and `set_pending` / `unmask` /
//! `clear_pending` once a domain has switched to it).
//!
//! Pure logic, host-tested, generic over guest memory through [`FifoMemory`]. The port
//! table, bindings and vCPU routing stay in [`crate::evtchn::EventChannels`]; this module
//! only replaces what the 2-level ABI keeps in shared_info / vcpu_info.
//!
//! # What it mirrors (Xen's `xen/common/event_fifo.c`, `public/event_channel.h`)
//! - Guest memory: per vCPU a control block (`ready` u32 @0, `_rsvd` u32, `head[16]`
//!   u32 @8: 72 bytes) placed by `EVTCHNOP_init_control` anywhere 8-aligned inside one
//!   page; per domain up to 128 event-array pages of 1024 event words each, added one at
//!   a time by `EVTCHNOP_expand_array` (ports `0 .. 1024 * pages`, at most 2^17).
//! - Event word: PENDING (bit 31), MASKED (30), LINKED (29), BUSY (28), LINK (bits 0-16:
//!   the next port in the queue, 0 at the tail).
//! - Per vCPU, 16 queues (priority 0 = highest ... 15), the hypervisor remembering only
//!   each queue's tail; the guest walks from `head[q]` along LINK, clearing LINKED.
//! - [`FifoState::set_pending`] is `evtchn_fifo_set_pending`: set PENDING; if neither
//!   MASKED nor LINKED, set LINKED and append to the tail of the queue (vCPU, priority)
//!   (tail's LINK updated by compare-exchange, with BUSY held against guest unmasking
//!   after a first failure, at most 4 more tries), or write `head[q]` if the queue was
//!   empty; then, only in that case, set `ready` bit q and, on its 0→1 change,
//!   `evtchn_upcall_pending`. A port whose last queue differs from the new one has that
//!   old queue's tail invalidated if it was the tail (Xen's `fifo_lastq`).
//! - Ports whose event word does not exist yet (page not added) keep their pending state
//!   in the hypervisor; [`FifoState::expand_array`] re-raises them (Xen's
//!   `evtchn->pending`). Raises for a vCPU without a control block are dropped (newer
//!   Xen: not even PENDING is set).
//! - [`FifoState::unmask`] is `evtchn_fifo_unmask` (clear MASKED, re-raise if PENDING);
//!   `clear_pending` only clears PENDING (the guest unlinks); `is_masked` is true when the
//!   word does not exist.
//!
//! The hypervisor never follows a LINK value: only the guest walks queues. Everything it
//! reads from guest memory is a bit to test or an expected value for a compare-exchange,
//! so a hostile guest can only confuse its own queues. Every loop is bounded.
//!
//! # Deliberate differences from Xen (not guest-visible for a well-behaved guest)
//! - The saved pending state of a port is consumed when [`FifoState::expand_array`]
//!   re-raises it and dropped when the port is closed (Xen keeps the flag forever and
//!   re-raises even a port closed meanwhile).
//! - A port's priority returns to the default when it is closed ([`FifoState::close`])
//!   instead of when it is next bound (`evtchn_fifo_init`): unobservable, as a closed
//!   port can be neither raised nor given a priority.
//!
//! # Wiring (what the domain code does)
//! The domain holds `Option<FifoState>`: `None` is the 2-level ABI.
//! - `EVTCHNOP_init_control` {control_gfn, offset, vcpu}: take (or create with
//!   [`FifoState::new`]) the state; [`FifoState::check_init_control`] (`-ENOENT`, then
//!   `-EINVAL`); map `control_gfn` (writable guest RAM, else `-EINVAL`) to a frame handle
//!   [`FifoMemory`] understands; [`FifoState::init_control`]. On the first success the
//!   domain switches: call [`FifoState::switch_from_2level`] with every valid port whose
//!   shared_info pending bit is set (Xen's `setup_ports`), then store the state. On any
//!   failure of the first call, drop the new state (still 2-level). Success writes back
//!   `link_bits` = [`EVTCHN_FIFO_LINK_BITS`].
//! - `EVTCHNOP_expand_array` {array_gfn}: `-EOPNOTSUPP` without FIFO state;
//!   [`FifoState::check_expand_array`] (`-ENOSPC`); map the gfn (`-EINVAL`);
//!   [`FifoState::expand_array`], injecting the upcalls it reports.
//! - `EVTCHNOP_set_priority` {port, priority}: `-ENOSYS` under 2-level; `-EINVAL` if the
//!   port is not valid (`EventChannels::status` fails); `-EACCES` if not in use
//!   (`port_vcpu` is `None`); then [`FifoState::set_priority`].
//! - Raises, unmask, close and reset under FIFO: call the 2-level engine as today but
//!   with a [`FifoEventMemory`] as its memory, then [`FifoEventMemory::finish`] with
//!   `|p| chans.port_vcpu(p)` and inject each returned upcall. Or call
//!   [`FifoState::set_pending`] / [`FifoState::unmask`] directly with the port's vCPU.
//! - `EVTCHNOP_reset` (all ports closed): drop the state, the domain is 2-level again.
//! - `SCHEDOP_poll`: a port is pending when [`FifoState::is_pending`] says so.

use alloc::vec;
use alloc::vec::Vec;

use abi::errno::{EINVAL, ENOENT, ENOSPC};
use abi::event_channel::{
    EVTCHN_FIFO_BUSY, EVTCHN_FIFO_CONTROL_ALIGN, EVTCHN_FIFO_CONTROL_BLOCK_SIZE,
    EVTCHN_FIFO_CONTROL_HEAD_OFFSET, EVTCHN_FIFO_CONTROL_READY_OFFSET,
    EVTCHN_FIFO_EVENT_WORDS_PER_PAGE, EVTCHN_FIFO_LINKED, EVTCHN_FIFO_LINK_BITS,
    EVTCHN_FIFO_LINK_MASK, EVTCHN_FIFO_MASKED, EVTCHN_FIFO_MAX_EVENT_ARRAY_PAGES,
    EVTCHN_FIFO_MAX_QUEUES, EVTCHN_FIFO_NR_CHANNELS, EVTCHN_FIFO_PENDING,
    EVTCHN_FIFO_PRIORITY_DEFAULT, EVTCHN_FIFO_PRIORITY_MIN,
};

use crate::evtchn::{Errno, EventMemory, Raise};

/// Guest page size the FIFO structures are laid out in.
pub const PAGE_SIZE: u32 = 4096;

/// `link_bits` returned by `EVTCHNOP_init_control`.
pub const LINK_BITS: u8 = EVTCHN_FIFO_LINK_BITS as u8;

/// Compare-exchange attempts after BUSY is set on a tail word (Xen: 4).
const SET_LINK_TRIES: u32 = 4;

/// Compare-exchange attempts of the default bit operations of [`FifoMemory`].
const BIT_OP_TRIES: u32 = 16;

/// The guest-memory side of FIFO event channels: aligned 32-bit words in frames the
/// guest registered. `frame` is whatever the caller passed to
/// [`FifoState::init_control`] / [`FifoState::expand_array`] (e.g. the host-physical
/// address of the guest page, resolved and checked when the guest registered it);
/// `offset` is always a multiple of 4 below [`PAGE_SIZE`]. Every method must be atomic
/// with respect to the guest (locked instructions on the page). `None` means the word
/// cannot be reached any more; the engine then drops what it was doing.
pub trait FifoMemory {
    /// Reads the word.
    fn read(&self, frame: u64, offset: u32) -> Option<u32>;
    /// Writes the word; false if it cannot be reached.
    fn write(&mut self, frame: u64, offset: u32, value: u32) -> bool;
    /// Atomic compare-exchange: if the word is `old`, makes it `new`. Returns the value
    /// found (equal to `old` exactly when the exchange happened).
    fn cmpxchg(&mut self, frame: u64, offset: u32, old: u32, new: u32) -> Option<u32>;
    /// Atomically sets bit `bit` of the word; returns its old value. The default uses a
    /// bounded compare-exchange loop (a guest rewriting the word faster than that wins
    /// and the operation fails); override it with `lock bts` where available.
    fn test_and_set_bit(&mut self, frame: u64, offset: u32, bit: u32) -> Option<bool> {
        let mask = 1u32 << (bit % 32);
        let mut w = self.read(frame, offset)?;
        for _ in 0..BIT_OP_TRIES {
            let found = self.cmpxchg(frame, offset, w, w | mask)?;
            if found == w {
                return Some(w & mask != 0);
            }
            w = found;
        }
        None
    }
    /// Atomically clears bit `bit` of the word; returns its old value. Default as for
    /// [`test_and_set_bit`](Self::test_and_set_bit) (`lock btr`).
    fn test_and_clear_bit(&mut self, frame: u64, offset: u32, bit: u32) -> Option<bool> {
        let mask = 1u32 << (bit % 32);
        let mut w = self.read(frame, offset)?;
        for _ in 0..BIT_OP_TRIES {
            let found = self.cmpxchg(frame, offset, w, w & !mask)?;
            if found == w {
                return Some(w & mask != 0);
            }
            w = found;
        }
        None
    }
    /// Sets vCPU `vcpu`'s `vcpu_info.evtchn_upcall_pending`; returns whether it was
    /// already set (as [`EventMemory::set_upcall_pending`]).
    fn set_upcall_pending(&mut self, vcpu: u32) -> bool;
}

/// Where one vCPU's control block is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ControlBlock {
    /// Frame handle of the page holding it.
    pub frame: u64,
    /// Byte offset in that page (8-aligned, at most `4096 - 72`).
    pub offset: u32,
}

impl ControlBlock {
    /// Byte offset of `ready` in the page.
    pub fn ready_offset(&self) -> u32 {
        self.offset + EVTCHN_FIFO_CONTROL_READY_OFFSET
    }

    /// Byte offset of `head[q]` in the page (`q < 16`).
    pub fn head_offset(&self, q: u32) -> u32 {
        self.offset + EVTCHN_FIFO_CONTROL_HEAD_OFFSET + 4 * (q % EVTCHN_FIFO_MAX_QUEUES as u32)
    }
}

/// FIFO event counters of one domain.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FifoCounters {
    /// [`FifoState::set_pending`] calls.
    pub raised: u64,
    /// Raises that found PENDING already set.
    pub coalesced: u64,
    /// Raises that left the event unlinked because it was MASKED or already LINKED.
    pub not_linked: u64,
    /// Events appended to a queue (after a tail or as a new head).
    pub linked: u64,
    /// `ready` bit 0→1 followed by an `evtchn_upcall_pending` 0→1 (injections asked for).
    pub upcalls: u64,
    /// Raises kept in the hypervisor because the port's event-array page does not exist.
    pub saved: u64,
    /// Raises dropped because the vCPU has no control block.
    pub no_control_block: u64,
    /// Tail words the guest kept changing: linking gave up (Xen's "not linked").
    pub link_gave_up: u64,
    /// Unmasks that found the event pending and raised it again.
    pub unmask_raises: u64,
}

#[derive(Clone, Copy, Debug, Default)]
struct VcpuFifo {
    control: Option<ControlBlock>,
    /// Last port linked on each queue (0: none / invalidated).
    tail: [u32; EVTCHN_FIFO_MAX_QUEUES],
}

#[derive(Clone, Copy, Debug)]
struct PortFifo {
    priority: u8,
    /// The queue the port was last linked on (Xen's `fifo_lastq`), initially (0, 0).
    last_vcpu: u32,
    last_priority: u8,
    /// Raised while its event word did not exist (Xen's `evtchn->pending`).
    saved_pending: bool,
}

const PORT_DEFAULT: PortFifo = PortFifo {
    priority: EVTCHN_FIFO_PRIORITY_DEFAULT as u8,
    last_vcpu: 0,
    last_priority: 0,
    saved_pending: false,
};

/// Outcome of one attempt at updating a tail's LINK.
enum LinkTry {
    Linked,
    NotLinked,
    Changed(u32),
}

/// FIFO event-channel state of one domain (exists once the domain switched to FIFO).
#[derive(Clone, Debug)]
pub struct FifoState {
    vcpus: Vec<VcpuFifo>,
    /// Event-array page frames, in port order.
    array: Vec<u64>,
    /// Per-port state, grown on demand (only ever for ports below 2^17).
    ports: Vec<PortFifo>,
    counters: FifoCounters,
}

impl FifoState {
    /// The FIFO state of a domain with `nr_vcpus` vCPUs, no control block and no
    /// event-array page (Xen's `setup_control_block` for each vCPU + `setup_event_array`).
    pub fn new(nr_vcpus: u32) -> FifoState {
        FifoState {
            vcpus: vec![VcpuFifo::default(); nr_vcpus as usize],
            array: Vec::new(),
            ports: Vec::new(),
            counters: FifoCounters::default(),
        }
    }

    /// Number of vCPUs.
    pub fn nr_vcpus(&self) -> u32 {
        self.vcpus.len() as u32
    }

    /// Ports that have an event word: `1024 × pages`.
    pub fn nr_ports(&self) -> u32 {
        self.array.len() as u32 * EVTCHN_FIFO_EVENT_WORDS_PER_PAGE
    }

    /// The event-array page frames, in the order they were added.
    pub fn array_frames(&self) -> &[u64] {
        &self.array
    }

    /// vCPU `vcpu`'s control block, if registered.
    pub fn control_block(&self, vcpu: u32) -> Option<ControlBlock> {
        self.vcpus.get(vcpu as usize)?.control
    }

    /// The counters.
    pub fn counters(&self) -> FifoCounters {
        self.counters
    }

    /// Where `port`'s event word is: (frame, byte offset), if its page exists.
    pub fn word_location(&self, port: u32) -> Option<(u64, u32)> {
        let page = self
            .array
            .get((port / EVTCHN_FIFO_EVENT_WORDS_PER_PAGE) as usize)?;
        Some((*page, (port % EVTCHN_FIFO_EVENT_WORDS_PER_PAGE) * 4))
    }

    /// The checks of `EVTCHNOP_init_control` before the guest frame is mapped, in Xen's
    /// order: `-ENOENT` (no such vCPU), `-EINVAL` (block would cross the page end, or
    /// `offset` not 8-aligned, or this vCPU already has a control block).
    pub fn check_init_control(&self, vcpu: u32, offset: u32) -> Result<(), Errno> {
        let v = self.vcpus.get(vcpu as usize).ok_or(ENOENT)?;
        if offset > PAGE_SIZE - EVTCHN_FIFO_CONTROL_BLOCK_SIZE as u32 {
            return Err(EINVAL);
        }
        if !offset.is_multiple_of(EVTCHN_FIFO_CONTROL_ALIGN) {
            return Err(EINVAL);
        }
        if v.control.is_some() {
            return Err(EINVAL);
        }
        Ok(())
    }

    /// `EVTCHNOP_init_control` once `control_gfn` is mapped to `frame`: the same checks as
    /// [`check_init_control`](Self::check_init_control), then registers the block. The
    /// guest's control block contents are left as they are (Linux clears the page first).
    pub fn init_control(&mut self, vcpu: u32, frame: u64, offset: u32) -> Result<(), Errno> {
        self.check_init_control(vcpu, offset)?;
        let v = &mut self.vcpus[vcpu as usize];
        v.control = Some(ControlBlock { frame, offset });
        v.tail = [0; EVTCHN_FIFO_MAX_QUEUES];
        Ok(())
    }

    /// The domain switches from the 2-level ABI (right after its first successful
    /// [`init_control`](Self::init_control); Xen's `setup_ports`): every port in
    /// `pending_ports` (valid ports whose shared_info `evtchn_pending` bit is set) keeps
    /// its pending state until its event-array page is added, which raises it. All ports
    /// have the default priority. Port 0 and ports ≥ 2^17 are ignored.
    pub fn switch_from_2level<I: IntoIterator<Item = u32>>(&mut self, pending_ports: I) {
        for port in pending_ports {
            if port != 0 {
                if let Some(p) = self.port_mut(port) {
                    p.saved_pending = true;
                }
            }
        }
    }

    /// The check of `EVTCHNOP_expand_array` before the frame is mapped: `-ENOSPC` when all
    /// 128 pages (2^17 ports) exist. (Without FIFO state the caller answers
    /// `-EOPNOTSUPP`.)
    pub fn check_expand_array(&self) -> Result<(), Errno> {
        if self.array.len() as u32 >= EVTCHN_FIFO_MAX_EVENT_ARRAY_PAGES {
            Err(ENOSPC)
        } else {
            Ok(())
        }
    }

    /// `EVTCHNOP_expand_array` once `array_gfn` is mapped to `frame`: appends the page
    /// (ports `nr_ports() .. nr_ports() + 1024`), then raises every port of it that was
    /// raised while it had no event word, on the vCPU `vcpu_of` gives (ports it answers
    /// `None` for are no longer in use: their saved state is dropped). Returns each such
    /// (port, [`Raise`]). `-ENOSPC` as [`check_expand_array`](Self::check_expand_array).
    pub fn expand_array<M, F>(
        &mut self,
        frame: u64,
        mem: &mut M,
        vcpu_of: F,
    ) -> Result<Vec<(u32, Raise)>, Errno>
    where
        M: FifoMemory + ?Sized,
        F: Fn(u32) -> Option<u32>,
    {
        self.check_expand_array()?;
        let first = self.nr_ports();
        self.array.push(frame);
        let mut out = Vec::new();
        let end = self.nr_ports().min(self.ports.len() as u32);
        for port in first..end {
            if !self.ports[port as usize].saved_pending {
                continue;
            }
            self.ports[port as usize].saved_pending = false;
            if let Some(vcpu) = vcpu_of(port) {
                out.push((port, self.set_pending(port, vcpu, mem)));
            }
        }
        Ok(out)
    }

    /// `EVTCHNOP_set_priority` for a port in use (the caller checked it, see the module
    /// documentation): `-EINVAL` beyond [`EVTCHN_FIFO_PRIORITY_MIN`] (15) or for a port
    /// ≥ 2^17. Takes effect for the next time the event is linked.
    pub fn set_priority(&mut self, port: u32, priority: u32) -> Result<(), Errno> {
        if priority > EVTCHN_FIFO_PRIORITY_MIN {
            return Err(EINVAL);
        }
        self.port_mut(port).ok_or(EINVAL)?.priority = priority as u8;
        Ok(())
    }

    /// The priority `port`'s next link uses.
    pub fn priority(&self, port: u32) -> u32 {
        u32::from(self.port(port).priority)
    }

    /// Raises `port` on `vcpu` (the vCPU it is bound to): Xen's `evtchn_fifo_set_pending`,
    /// see the module documentation. Only call it for ports in use.
    pub fn set_pending<M: FifoMemory + ?Sized>(
        &mut self,
        port: u32,
        vcpu: u32,
        mem: &mut M,
    ) -> Raise {
        if port >= EVTCHN_FIFO_NR_CHANNELS {
            return Raise::default();
        }
        self.counters.raised += 1;
        let Some((wf, wo)) = self.word_location(port) else {
            self.counters.saved += 1;
            if let Some(p) = self.port_mut(port) {
                p.saved_pending = true;
            }
            return Raise::default();
        };
        let Some(cb) = self.control_block(vcpu) else {
            self.counters.no_control_block += 1;
            return Raise::default();
        };
        let info = self.port(port);
        let q = u32::from(info.priority).min(EVTCHN_FIFO_PRIORITY_MIN);

        let Some(was_pending) = mem.test_and_set_bit(wf, wo, EVTCHN_FIFO_PENDING) else {
            return Raise::default();
        };
        if was_pending {
            self.counters.coalesced += 1;
        }
        let masked = mem
            .read(wf, wo)
            .is_none_or(|w| w & (1 << EVTCHN_FIFO_MASKED) != 0);
        let mut linked = true;
        if !masked && mem.test_and_set_bit(wf, wo, EVTCHN_FIFO_LINKED) == Some(false) {
            // The old queue's tail, if it is this port, is stale now: the event was
            // consumed from there (it was not LINKED), so that queue is empty.
            let (ov, oq) = (info.last_vcpu, u32::from(info.last_priority));
            if let Some(old) = self.vcpus.get_mut(ov as usize) {
                if old.tail[oq as usize] == port {
                    old.tail[oq as usize] = 0;
                }
            }
            if (ov, oq) != (vcpu, q) {
                if let Some(p) = self.port_mut(port) {
                    p.last_vcpu = vcpu;
                    p.last_priority = q as u8;
                }
            }
            let tail = self.vcpus[vcpu as usize].tail[q as usize];
            linked = tail != 0
                && match self.word_location(tail) {
                    Some((tf, to)) => self.set_link(tf, to, port, mem),
                    None => false,
                };
            if !linked {
                mem.write(cb.frame, cb.head_offset(q), port);
            }
            self.vcpus[vcpu as usize].tail[q as usize] = port;
            self.counters.linked += 1;
        } else {
            self.counters.not_linked += 1;
        }

        let mut upcall = None;
        if !linked
            && mem.test_and_set_bit(cb.frame, cb.ready_offset(), q) == Some(false)
            && !mem.set_upcall_pending(vcpu)
        {
            self.counters.upcalls += 1;
            upcall = Some(vcpu);
        }
        Raise {
            newly_pending: !was_pending,
            upcall,
        }
    }

    /// Clears `port`'s PENDING bit (Xen's `evtchn_fifo_clear_pending`; the guest unlinks
    /// the event and ignores it). A saved pending state (no event word yet) is dropped.
    pub fn clear_pending<M: FifoMemory + ?Sized>(&mut self, port: u32, mem: &mut M) {
        match self.word_location(port) {
            Some((f, o)) => {
                mem.test_and_clear_bit(f, o, EVTCHN_FIFO_PENDING);
            }
            None => {
                if let Some(p) = self.ports.get_mut(port as usize) {
                    p.saved_pending = false;
                }
            }
        }
    }

    /// `port` is being closed: [`clear_pending`](Self::clear_pending) and back to the
    /// default priority.
    pub fn close<M: FifoMemory + ?Sized>(&mut self, port: u32, mem: &mut M) {
        self.clear_pending(port, mem);
        if let Some(p) = self.ports.get_mut(port as usize) {
            p.priority = PORT_DEFAULT.priority;
        }
    }

    /// `EVTCHNOP_unmask` under FIFO for a port in use, bound to `vcpu` (Xen's
    /// `evtchn_fifo_unmask`): clears MASKED and, if PENDING is set, raises the port again
    /// (linking it if it is not linked). Nothing without an event word.
    pub fn unmask<M: FifoMemory + ?Sized>(&mut self, port: u32, vcpu: u32, mem: &mut M) -> Raise {
        let Some((f, o)) = self.word_location(port) else {
            return Raise::default();
        };
        mem.test_and_clear_bit(f, o, EVTCHN_FIFO_MASKED);
        if mem
            .read(f, o)
            .is_some_and(|w| w & (1 << EVTCHN_FIFO_PENDING) != 0)
        {
            self.counters.unmask_raises += 1;
            return self.set_pending(port, vcpu, mem);
        }
        Raise::default()
    }

    /// PENDING of `port` (false without an event word).
    pub fn is_pending<M: FifoMemory + ?Sized>(&self, port: u32, mem: &M) -> bool {
        self.word_bit(port, mem, EVTCHN_FIFO_PENDING) == Some(true)
    }

    /// MASKED of `port` (true without an event word).
    pub fn is_masked<M: FifoMemory + ?Sized>(&self, port: u32, mem: &M) -> bool {
        self.word_bit(port, mem, EVTCHN_FIFO_MASKED) != Some(false)
    }

    /// LINKED of `port`: the event is still on a queue. Xen does not reallocate a free
    /// port while this holds (`evtchn_is_busy` in `evtchn_allocate_port`).
    pub fn is_busy<M: FifoMemory + ?Sized>(&self, port: u32, mem: &M) -> bool {
        self.word_bit(port, mem, EVTCHN_FIFO_LINKED) == Some(true)
    }

    fn word_bit<M: FifoMemory + ?Sized>(&self, port: u32, mem: &M, bit: u32) -> Option<bool> {
        let (f, o) = self.word_location(port)?;
        Some(mem.read(f, o)? & (1 << bit) != 0)
    }

    /// Xen's `evtchn_fifo_set_link`: make the tail word (at `f`:`o`) point at `link` if it
    /// is still LINKED. Returns whether it did (or gave up, which counts as linked, as in
    /// Xen); false means the queue is empty and the caller writes the head.
    fn set_link<M: FifoMemory + ?Sized>(&mut self, f: u64, o: u32, link: u32, mem: &mut M) -> bool {
        let Some(w) = mem.read(f, o) else {
            return false;
        };
        match Self::try_set_link(f, o, w, link, mem) {
            LinkTry::Linked => return true,
            LinkTry::NotLinked => return false,
            LinkTry::Changed(_) => {}
        }
        // Hold BUSY so that a well-behaved guest cannot unmask meanwhile.
        mem.test_and_set_bit(f, o, EVTCHN_FIFO_BUSY);
        let Some(mut w) = mem.read(f, o) else {
            return false;
        };
        for _ in 0..SET_LINK_TRIES {
            match Self::try_set_link(f, o, w, link, mem) {
                // the successful exchange also cleared BUSY
                LinkTry::Linked => return true,
                LinkTry::NotLinked => {
                    mem.test_and_clear_bit(f, o, EVTCHN_FIFO_BUSY);
                    return false;
                }
                LinkTry::Changed(now) => w = now,
            }
        }
        self.counters.link_gave_up += 1;
        mem.test_and_clear_bit(f, o, EVTCHN_FIFO_BUSY);
        true
    }

    fn try_set_link<M: FifoMemory + ?Sized>(
        f: u64,
        o: u32,
        w: u32,
        link: u32,
        mem: &mut M,
    ) -> LinkTry {
        if w & (1 << EVTCHN_FIFO_LINKED) == 0 {
            return LinkTry::NotLinked;
        }
        let new = (w & !((1 << EVTCHN_FIFO_BUSY) | EVTCHN_FIFO_LINK_MASK))
            | (link & EVTCHN_FIFO_LINK_MASK);
        match mem.cmpxchg(f, o, w, new) {
            Some(found) if found == w => LinkTry::Linked,
            Some(found) => LinkTry::Changed(found),
            None => LinkTry::NotLinked,
        }
    }

    fn port(&self, port: u32) -> PortFifo {
        self.ports
            .get(port as usize)
            .copied()
            .unwrap_or(PORT_DEFAULT)
    }

    fn port_mut(&mut self, port: u32) -> Option<&mut PortFifo> {
        if port >= EVTCHN_FIFO_NR_CHANNELS {
            return None;
        }
        if self.ports.len() <= port as usize {
            self.ports.resize(port as usize + 1, PORT_DEFAULT);
        }
        self.ports.get_mut(port as usize)
    }
}

/// What [`FifoEventMemory`] deferred until the port's vCPU is known.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Deferred {
    Raise(u32),
    Unmask(u32),
}

/// Runs the 2-level engine ([`crate::evtchn::EventChannels`]) of a FIFO domain: passed
/// as its [`EventMemory`], it turns the engine's guest-memory operations into FIFO ones.
/// Clearing a pending bit (close, reset) clears PENDING and resets the priority
/// ([`FifoState::close`]); pending and mask tests read the event word. A raise or an
/// unmask is recorded and suppressed in the 2-level engine (which then reports an empty
/// [`Raise`] and counts a coalesced raise); [`finish`](Self::finish) performs them once
/// the engine is free to say which vCPU each port is bound to:
///
/// ```ignore
/// let mut m = FifoEventMemory::new(fifo, &mut guest_fifo_mem);
/// let d = chans.send(port, &mut m)?;
/// for (port, raise) in m.finish(|p| chans.port_vcpu(p)) { /* inject raise.upcall */ }
/// ```
pub struct FifoEventMemory<'a, M: FifoMemory + ?Sized> {
    fifo: &'a mut FifoState,
    mem: &'a mut M,
    deferred: Vec<Deferred>,
}

impl<'a, M: FifoMemory + ?Sized> FifoEventMemory<'a, M> {
    /// Wraps the domain's FIFO state and its guest memory.
    pub fn new(fifo: &'a mut FifoState, mem: &'a mut M) -> Self {
        FifoEventMemory {
            fifo,
            mem,
            deferred: Vec::new(),
        }
    }

    /// Performs the raises and unmasks the 2-level engine asked for, in order, on the
    /// vCPU `vcpu_of` gives (ports it answers `None` for are not in use: skipped).
    /// Returns each performed operation's port and [`Raise`].
    pub fn finish<F: Fn(u32) -> Option<u32>>(self, vcpu_of: F) -> Vec<(u32, Raise)> {
        let FifoEventMemory {
            fifo,
            mem,
            deferred,
        } = self;
        let mut out = Vec::new();
        for d in deferred {
            match d {
                Deferred::Raise(port) => {
                    if let Some(v) = vcpu_of(port) {
                        out.push((port, fifo.set_pending(port, v, mem)));
                    }
                }
                Deferred::Unmask(port) => {
                    if let Some(v) = vcpu_of(port) {
                        out.push((port, fifo.unmask(port, v, mem)));
                    }
                }
            }
        }
        out
    }
}

impl<M: FifoMemory + ?Sized> EventMemory for FifoEventMemory<'_, M> {
    fn test_and_set_pending(&mut self, port: u32) -> bool {
        self.deferred.push(Deferred::Raise(port));
        true
    }
    fn clear_pending(&mut self, port: u32) {
        self.fifo.close(port, self.mem);
    }
    fn is_pending(&self, port: u32) -> bool {
        self.fifo.is_pending(port, &*self.mem)
    }
    fn is_masked(&self, port: u32) -> bool {
        self.fifo.is_masked(port, &*self.mem)
    }
    fn test_and_clear_mask(&mut self, port: u32) -> bool {
        self.deferred.push(Deferred::Unmask(port));
        false
    }
    fn test_and_set_sel(&mut self, _vcpu: u32, _word: u32) -> bool {
        true
    }
    fn set_upcall_pending(&mut self, vcpu: u32) -> bool {
        self.mem.set_upcall_pending(vcpu)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::evtchn::{Delivery, EventChannels};
    use abi::errno::EINVAL;
    use alloc::collections::{BTreeMap, VecDeque};
    use proptest::prelude::*;

    const PENDING: u32 = 1 << EVTCHN_FIFO_PENDING;
    const MASKED: u32 = 1 << EVTCHN_FIFO_MASKED;
    const LINKED: u32 = 1 << EVTCHN_FIFO_LINKED;
    const BUSY: u32 = 1 << EVTCHN_FIFO_BUSY;
    const DEFAULT: u32 = EVTCHN_FIFO_PRIORITY_DEFAULT;

    /// Guest frames as vectors of words, and each vCPU's upcall flag.
    #[derive(Clone, Debug, Default)]
    struct FakeMem {
        frames: BTreeMap<u64, Vec<u32>>,
        upcall: Vec<bool>,
        /// This many coming compare-exchanges find the word changed by the guest first
        /// (its MASKED bit toggled).
        meddle: u32,
        cmpxchgs: u32,
    }

    impl FakeMem {
        fn new(nvcpus: u32) -> FakeMem {
            FakeMem {
                upcall: vec![false; nvcpus as usize],
                ..FakeMem::default()
            }
        }
        fn add_frame(&mut self, frame: u64, fill: u32) {
            self.frames.insert(frame, vec![fill; 1024]);
        }
        fn slot(&mut self, frame: u64, offset: u32) -> Option<&mut u32> {
            assert!(
                offset.is_multiple_of(4) && offset < PAGE_SIZE,
                "bad offset {offset}"
            );
            self.frames.get_mut(&frame)?.get_mut((offset / 4) as usize)
        }
        fn get(&self, frame: u64, offset: u32) -> u32 {
            self.frames[&frame][(offset / 4) as usize]
        }
        fn set(&mut self, frame: u64, offset: u32, v: u32) {
            *self.slot(frame, offset).unwrap() = v;
        }
    }

    impl FifoMemory for FakeMem {
        fn read(&self, frame: u64, offset: u32) -> Option<u32> {
            assert!(
                offset.is_multiple_of(4) && offset < PAGE_SIZE,
                "bad offset {offset}"
            );
            self.frames.get(&frame)?.get((offset / 4) as usize).copied()
        }
        fn write(&mut self, frame: u64, offset: u32, value: u32) -> bool {
            self.slot(frame, offset).map(|s| *s = value).is_some()
        }
        fn cmpxchg(&mut self, frame: u64, offset: u32, old: u32, new: u32) -> Option<u32> {
            self.cmpxchgs += 1;
            let meddle = self.meddle > 0;
            self.meddle = self.meddle.saturating_sub(1);
            let s = self.slot(frame, offset)?;
            if meddle {
                *s ^= MASKED;
            }
            let cur = *s;
            if cur == old {
                *s = new;
            }
            Some(cur)
        }
        fn test_and_set_bit(&mut self, frame: u64, offset: u32, bit: u32) -> Option<bool> {
            let s = self.slot(frame, offset)?;
            let old = *s & (1 << bit) != 0;
            *s |= 1 << bit;
            Some(old)
        }
        fn test_and_clear_bit(&mut self, frame: u64, offset: u32, bit: u32) -> Option<bool> {
            let s = self.slot(frame, offset)?;
            let old = *s & (1 << bit) != 0;
            *s &= !(1 << bit);
            Some(old)
        }
        fn set_upcall_pending(&mut self, vcpu: u32) -> bool {
            core::mem::replace(&mut self.upcall[vcpu as usize], true)
        }
    }

    /// Only the required methods: bit operations take the trait's default path.
    struct CmpxchgOnly(FakeMem);

    impl FifoMemory for CmpxchgOnly {
        fn read(&self, frame: u64, offset: u32) -> Option<u32> {
            self.0.read(frame, offset)
        }
        fn write(&mut self, frame: u64, offset: u32, value: u32) -> bool {
            self.0.write(frame, offset, value)
        }
        fn cmpxchg(&mut self, frame: u64, offset: u32, old: u32, new: u32) -> Option<u32> {
            self.0.cmpxchg(frame, offset, old, new)
        }
        fn set_upcall_pending(&mut self, vcpu: u32) -> bool {
            self.0.set_upcall_pending(vcpu)
        }
    }

    /// The guest side as Linux's drivers/xen/events/events_fifo.c does it: per CPU a
    /// local copy of the queue heads; the upcall clears `evtchn_upcall_pending`, takes
    /// `ready` with an exchange, then consumes one event at a time from the lowest ready
    /// queue (clearing LINKED and LINK with a compare-exchange loop, handling the event
    /// if PENDING and not MASKED), merging `ready` in again after each event.
    #[derive(Clone, Debug)]
    struct Guest {
        cb: Vec<ControlBlock>,
        arrays: Vec<u64>,
        local_head: Vec<[u32; 16]>,
        local_ready: Vec<u32>,
        in_handler: Vec<bool>,
        delivered: Vec<Vec<u32>>,
    }

    impl Guest {
        fn new(cb: Vec<ControlBlock>, arrays: Vec<u64>) -> Guest {
            let n = cb.len();
            Guest {
                cb,
                arrays,
                local_head: vec![[0; 16]; n],
                local_ready: vec![0; n],
                in_handler: vec![false; n],
                delivered: vec![Vec::new(); n],
            }
        }
        fn word(&self, port: u32) -> (u64, u32) {
            (self.arrays[(port / 1024) as usize], (port % 1024) * 4)
        }
        fn mask(&self, m: &mut FakeMem, port: u32) {
            let (f, o) = self.word(port);
            let w = m.get(f, o);
            m.set(f, o, w | MASKED);
        }
        /// Linux 6.1 `evtchn_fifo_unmask`: clear MASKED unless PENDING (spinning while
        /// BUSY), else `EVTCHNOP_unmask`.
        fn unmask(&self, m: &mut FakeMem, fifo: &mut FifoState, port: u32, vcpu: u32) -> Raise {
            let (f, o) = self.word(port);
            let mut old = m.get(f, o);
            for _ in 0..8 {
                if old & MASKED == 0 {
                    return Raise::default();
                }
                if old & PENDING != 0 {
                    return fifo.unmask(port, vcpu, m);
                }
                let expect = old & !BUSY;
                match m.cmpxchg(f, o, expect, expect & !MASKED) {
                    Some(found) if found == expect => return Raise::default(),
                    Some(found) => old = found,
                    None => unreachable!(),
                }
            }
            panic!("BUSY left set on port {port}");
        }
        fn xchg_ready(&self, m: &mut FakeMem, v: usize) -> u32 {
            let cb = self.cb[v];
            let r = m.get(cb.frame, cb.ready_offset());
            m.set(cb.frame, cb.ready_offset(), 0);
            r
        }
        /// One step of the upcall handler; false if there was nothing to do.
        fn step(&mut self, m: &mut FakeMem, v: u32) -> bool {
            let v = v as usize;
            if !self.in_handler[v] {
                if !m.upcall[v] {
                    return false;
                }
                m.upcall[v] = false;
                self.local_ready[v] = self.xchg_ready(m, v);
                self.in_handler[v] = true;
                return true;
            }
            if self.local_ready[v] == 0 {
                self.in_handler[v] = false;
                return true;
            }
            let q = self.local_ready[v].trailing_zeros();
            let cb = self.cb[v];
            let mut head = self.local_head[v][q as usize];
            if head == 0 {
                head = m.get(cb.frame, cb.head_offset(q));
            }
            let port = head;
            assert!(port < self.arrays.len() as u32 * 1024, "bad head {port}");
            let (f, o) = self.word(port);
            let w = m.get(f, o);
            m.set(f, o, w & !(LINKED | EVTCHN_FIFO_LINK_MASK));
            let link = w & EVTCHN_FIFO_LINK_MASK;
            if link == 0 {
                self.local_ready[v] &= !(1 << q);
            }
            let w = m.get(f, o);
            if w & PENDING != 0 && w & MASKED == 0 {
                m.set(f, o, w & !PENDING);
                self.delivered[v].push(port);
            }
            self.local_head[v][q as usize] = link;
            self.local_ready[v] |= self.xchg_ready(m, v);
            true
        }
        fn drain(&mut self, m: &mut FakeMem, v: u32) {
            for _ in 0..100_000 {
                if !self.step(m, v) {
                    return;
                }
            }
            panic!("vCPU {v} never finished");
        }
        fn take(&mut self, v: u32) -> Vec<u32> {
            core::mem::take(&mut self.delivered[v as usize])
        }
    }

    const NV: u32 = 3;
    /// vCPU 0 and 1 share a page (offsets 0 and 72), vCPU 2 at the last valid offset.
    const CBS: [(u64, u32); 3] = [(100, 0), (100, 72), (101, 4024)];
    const ARRAYS: [u64; 2] = [200, 201];

    /// FIFO state with every vCPU's control block and two event-array pages whose words
    /// start MASKED (Linux's `init_array_page`), and the guest model.
    fn setup() -> (FifoState, FakeMem, Guest) {
        let mut m = FakeMem::new(NV);
        m.add_frame(100, 0);
        m.add_frame(101, 0);
        let mut f = FifoState::new(NV);
        for (v, (frame, off)) in CBS.iter().enumerate() {
            f.init_control(v as u32, *frame, *off).unwrap();
        }
        for a in ARRAYS {
            m.add_frame(a, MASKED);
            assert_eq!(f.expand_array(a, &mut m, |_| None), Ok(vec![]));
        }
        let cbs = CBS
            .iter()
            .map(|&(frame, offset)| ControlBlock { frame, offset })
            .collect();
        (f, m, Guest::new(cbs, ARRAYS.to_vec()))
    }

    /// `setup` with `ports` unmasked by the guest.
    fn setup_unmasked(ports: &[u32]) -> (FifoState, FakeMem, Guest) {
        let (mut f, mut m, g) = setup();
        for &p in ports {
            assert_eq!(g.unmask(&mut m, &mut f, p, 0), Raise::default());
        }
        (f, m, g)
    }

    fn word(m: &FakeMem, port: u32) -> u32 {
        m.get(ARRAYS[(port / 1024) as usize], (port % 1024) * 4)
    }

    fn up(v: u32) -> Raise {
        Raise {
            newly_pending: true,
            upcall: Some(v),
        }
    }

    const NEW: Raise = Raise {
        newly_pending: true,
        upcall: None,
    };

    #[test]
    fn init_control_checks_in_xen_order() {
        let f = FifoState::new(2);
        assert_eq!(f.check_init_control(0, 0), Ok(()));
        assert_eq!(f.check_init_control(0, 4024), Ok(()));
        assert_eq!(f.check_init_control(1, 8), Ok(()));
        assert_eq!(f.check_init_control(2, 0), Err(ENOENT));
        assert_eq!(f.check_init_control(u32::MAX, 3), Err(ENOENT)); // vCPU first
        for bad in [4, 12, 4028, 4032, 4095, 4096, u32::MAX] {
            assert_eq!(f.check_init_control(0, bad), Err(EINVAL), "{bad}");
        }
        assert_eq!(EVTCHN_FIFO_CONTROL_BLOCK_SIZE, 72);
        assert_eq!(LINK_BITS, 17);
    }

    #[test]
    fn init_control_registers_once_per_vcpu() {
        let mut f = FifoState::new(2);
        assert_eq!(f.init_control(0, 7, 4), Err(EINVAL));
        assert_eq!(f.control_block(0), None);
        assert_eq!(f.init_control(0, 7, 64), Ok(()));
        assert_eq!(
            f.control_block(0),
            Some(ControlBlock {
                frame: 7,
                offset: 64
            })
        );
        assert_eq!(f.init_control(0, 8, 0), Err(EINVAL)); // already registered
        assert_eq!(f.check_init_control(0, 0), Err(EINVAL));
        assert_eq!(f.init_control(1, 7, 136), Ok(())); // same page, another block
        assert_eq!(f.init_control(2, 7, 0), Err(ENOENT));
        assert_eq!(f.control_block(2), None);
        let cb = f.control_block(1).unwrap();
        assert_eq!((cb.ready_offset(), cb.head_offset(0)), (136, 144));
        assert_eq!(cb.head_offset(15), 136 + 8 + 60);
    }

    #[test]
    fn expand_array_up_to_2_pow_17_ports() {
        let mut f = FifoState::new(1);
        let mut m = FakeMem::new(1);
        assert_eq!(f.nr_ports(), 0);
        assert_eq!(f.word_location(0), None);
        for i in 0..128u64 {
            assert_eq!(f.check_expand_array(), Ok(()));
            assert_eq!(f.expand_array(1000 + i, &mut m, |_| None), Ok(vec![]));
        }
        assert_eq!(f.nr_ports(), EVTCHN_FIFO_NR_CHANNELS);
        assert_eq!(f.check_expand_array(), Err(ENOSPC));
        assert_eq!(f.expand_array(5, &mut m, |_| None), Err(ENOSPC));
        assert_eq!(f.array_frames().len(), 128);
        assert_eq!(f.word_location(1025), Some((1001, 4)));
        assert_eq!(f.word_location(131_071), Some((1127, 4092)));
        assert_eq!(f.word_location(131_072), None);
    }

    #[test]
    fn fifo_order_within_a_priority() {
        let ports = [4, 2, 1030, 1, 3];
        let (mut f, mut m, mut g) = setup_unmasked(&ports);
        assert_eq!(f.set_pending(4, 0, &mut m), up(0));
        for p in &ports[1..] {
            assert_eq!(f.set_pending(*p, 0, &mut m), NEW);
        }
        // the queue as the guest sees it: head 4, then along LINK
        let cb = f.control_block(0).unwrap();
        assert_eq!(m.get(cb.frame, cb.head_offset(DEFAULT)), 4);
        assert_eq!(word(&m, 4), PENDING | LINKED | 2);
        assert_eq!(word(&m, 1030), PENDING | LINKED | 1);
        assert_eq!(word(&m, 3), PENDING | LINKED);
        assert_eq!(m.get(cb.frame, cb.ready_offset()), 1 << DEFAULT);
        g.drain(&mut m, 0);
        assert_eq!(g.take(0), ports);
        for p in ports {
            assert_eq!(word(&m, p), 0);
        }
        assert_eq!(f.counters().upcalls, 1);
        assert_eq!(f.counters().linked, 5);
    }

    #[test]
    fn lower_priority_number_first() {
        let (mut f, mut m, mut g) = setup_unmasked(&[1, 2, 3, 4, 5]);
        f.set_priority(1, 15).unwrap();
        f.set_priority(3, 0).unwrap();
        f.set_priority(5, 3).unwrap();
        assert_eq!(f.set_pending(1, 1, &mut m), up(1));
        for p in [2, 3, 4, 5] {
            // the other ready bits go 0→1 but the upcall is already pending
            assert_eq!(f.set_pending(p, 1, &mut m), NEW);
        }
        let cb = f.control_block(1).unwrap();
        assert_eq!(
            m.get(cb.frame, cb.ready_offset()),
            1 << 15 | 1 << 7 | 1 << 3 | 1
        );
        g.drain(&mut m, 1);
        assert_eq!(g.take(1), [3, 5, 2, 4, 1]);
        assert_eq!(f.counters().upcalls, 1);
    }

    #[test]
    fn a_queue_refilled_while_handling_gets_a_new_head_and_upcall() {
        let (mut f, mut m, mut g) = setup_unmasked(&[1, 2, 3]);
        assert_eq!(f.set_pending(1, 0, &mut m), up(0));
        g.drain(&mut m, 0);
        assert_eq!(g.take(0), [1]);
        // the tail (1) was consumed: 2 becomes the new head, ready again
        assert_eq!(f.set_pending(2, 0, &mut m), up(0));
        // raised again after consumption: linked behind 2
        assert_eq!(f.set_pending(1, 0, &mut m), NEW);
        // the guest starts handling, then 3 arrives behind the tail it has not reached
        assert!(g.step(&mut m, 0));
        assert!(g.step(&mut m, 0));
        assert_eq!(g.delivered[0], [2]);
        assert_eq!(f.set_pending(3, 0, &mut m), NEW);
        g.drain(&mut m, 0);
        assert_eq!(g.take(0), [2, 1, 3]);
        // same port as the old tail, queue empty: head rewritten, not linked to itself
        assert_eq!(f.set_pending(3, 0, &mut m), up(0));
        assert_eq!(word(&m, 3), PENDING | LINKED);
        g.drain(&mut m, 0);
        assert_eq!(g.take(0), [3]);
    }

    #[test]
    fn coalesced_while_pending() {
        let (mut f, mut m, mut g) = setup_unmasked(&[9]);
        assert_eq!(f.set_pending(9, 2, &mut m), up(2));
        assert_eq!(f.set_pending(9, 2, &mut m), Raise::default());
        assert!(f.is_pending(9, &m) && f.is_busy(9, &m));
        g.drain(&mut m, 2);
        assert_eq!(g.take(2), [9]);
        assert!(!f.is_pending(9, &m) && !f.is_busy(9, &m));
        assert_eq!(f.counters().coalesced, 1);
        assert_eq!(f.counters().not_linked, 1);
    }

    #[test]
    fn masked_events_wait_for_unmask() {
        let (mut f, mut m, mut g) = setup_unmasked(&[1, 2]);
        g.mask(&mut m, 1);
        assert!(f.is_masked(1, &m));
        assert_eq!(f.set_pending(1, 0, &mut m), NEW); // pending, not linked
        assert_eq!(word(&m, 1), PENDING | MASKED);
        assert!(!m.upcall[0]);
        g.drain(&mut m, 0);
        assert_eq!(g.take(0), Vec::<u32>::new());
        // Linux sees PENDING and asks the hypervisor to unmask: linked, upcall
        assert_eq!(
            g.unmask(&mut m, &mut f, 1, 0),
            Raise {
                newly_pending: false,
                upcall: Some(0)
            }
        );
        assert_eq!(word(&m, 1), PENDING | LINKED);
        g.drain(&mut m, 0);
        assert_eq!(g.take(0), [1]);
        // masked while linked: skipped and unlinked, delivered after unmask
        assert_eq!(f.set_pending(2, 0, &mut m), up(0));
        g.mask(&mut m, 2);
        g.drain(&mut m, 0);
        assert_eq!(g.take(0), Vec::<u32>::new());
        assert_eq!(word(&m, 2), PENDING | MASKED);
        g.unmask(&mut m, &mut f, 2, 0);
        g.drain(&mut m, 0);
        assert_eq!(g.take(0), [2]);
        assert_eq!(f.counters().unmask_raises, 2);
        // unmask of a port that is not pending: nothing
        g.mask(&mut m, 2);
        assert_eq!(f.unmask(2, 0, &mut m), Raise::default());
        assert_eq!(word(&m, 2), 0);
    }

    #[test]
    fn moved_tail_does_not_capture_the_old_queue() {
        let (mut f, mut m, mut g) = setup_unmasked(&[1, 2]);
        f.set_pending(1, 0, &mut m);
        g.drain(&mut m, 0);
        assert_eq!(g.take(0), [1]);
        // port 1 is still queue (0, 7)'s remembered tail; move it to priority 3
        f.set_priority(1, 3).unwrap();
        assert_eq!(f.priority(1), 3);
        assert_eq!(f.set_pending(1, 0, &mut m), up(0));
        // port 2 on (0, 7) must start a new queue, not link behind 1 (now in queue 3)
        assert_eq!(f.set_pending(2, 0, &mut m), NEW);
        assert_eq!(word(&m, 1), PENDING | LINKED);
        let cb = f.control_block(0).unwrap();
        assert_eq!(m.get(cb.frame, cb.head_offset(3)), 1);
        assert_eq!(m.get(cb.frame, cb.head_offset(7)), 2);
        g.drain(&mut m, 0);
        assert_eq!(g.take(0), [1, 2]);
        // the same when moving to another vCPU
        f.set_pending(2, 0, &mut m);
        g.drain(&mut m, 0);
        assert_eq!(f.set_pending(2, 1, &mut m), up(1));
        assert_eq!(f.set_pending(1, 0, &mut m), NEW.with_upcall(0));
        f.set_priority(1, DEFAULT).unwrap();
        g.drain(&mut m, 0);
        g.drain(&mut m, 1);
        assert_eq!((g.take(0), g.take(1)), (vec![2, 1], vec![2]));
    }

    trait WithUpcall {
        fn with_upcall(self, v: u32) -> Raise;
    }
    impl WithUpcall for Raise {
        fn with_upcall(mut self, v: u32) -> Raise {
            self.upcall = Some(v);
            self
        }
    }

    #[test]
    fn busy_tail_and_hostile_compare_exchange() {
        let (mut f, mut m, mut g) = setup_unmasked(&[1, 2, 3]);
        f.set_pending(1, 0, &mut m);
        // the guest masks port 1 between the read and the exchange: BUSY, retry, linked
        m.meddle = 1;
        m.cmpxchgs = 0;
        assert_eq!(f.set_pending(2, 0, &mut m), NEW);
        assert_eq!(m.cmpxchgs, 2);
        assert_eq!(word(&m, 1), PENDING | LINKED | MASKED | 2); // BUSY cleared
                                                                // a guest that never stops changing the tail: 1 + 4 tries, then give up
        m.meddle = u32::MAX;
        m.cmpxchgs = 0;
        assert_eq!(f.set_pending(3, 0, &mut m), NEW);
        assert_eq!(m.cmpxchgs, 5);
        assert_eq!(word(&m, 2) & (BUSY | EVTCHN_FIFO_LINK_MASK), 0);
        assert_eq!(f.counters().link_gave_up, 1);
        m.meddle = 0;
        // 3 is lost (as in Xen: LINKED, on no queue), 1 and 2 are not; the "guest"
        // masked 2 (an odd number of toggles)
        assert_eq!(word(&m, 2), PENDING | LINKED | MASKED);
        assert_eq!(word(&m, 3), PENDING | LINKED);
        g.unmask(&mut m, &mut f, 1, 0);
        g.unmask(&mut m, &mut f, 2, 0);
        g.drain(&mut m, 0);
        assert_eq!(g.take(0), [1, 2]);
    }

    #[test]
    fn tail_unlinked_by_the_guest_means_empty_queue() {
        let (mut f, mut m, _g) = setup_unmasked(&[1, 2]);
        f.set_pending(1, 0, &mut m);
        // the guest consumed 1 (cleared LINKED) but has not looked at ready yet
        let w = word(&m, 1);
        m.set(ARRAYS[0], 4, w & !LINKED);
        // ready bit already set: no new upcall, head rewritten
        assert_eq!(f.set_pending(2, 0, &mut m), NEW);
        let cb = f.control_block(0).unwrap();
        assert_eq!(m.get(cb.frame, cb.head_offset(DEFAULT)), 2);
    }

    #[test]
    fn vcpu_without_control_block_drops() {
        let mut m = FakeMem::new(2);
        m.add_frame(100, 0);
        m.add_frame(200, 0);
        let mut f = FifoState::new(2);
        f.init_control(0, 100, 0).unwrap();
        f.expand_array(200, &mut m, |_| None).unwrap();
        assert_eq!(f.set_pending(5, 1, &mut m), Raise::default());
        assert_eq!(word(&m, 5), 0);
        assert_eq!(f.set_pending(5, 7, &mut m), Raise::default()); // no such vCPU
        assert_eq!(f.counters().no_control_block, 2);
        assert_eq!(f.set_pending(5, 0, &mut m), up(0));
    }

    #[test]
    fn ports_without_event_word_are_saved_until_expand() {
        let mut m = FakeMem::new(1);
        m.add_frame(100, 0);
        let mut f = FifoState::new(1);
        f.init_control(0, 100, 0).unwrap();
        assert!(f.is_masked(3, &m) && !f.is_pending(3, &m) && !f.is_busy(3, &m));
        assert_eq!(f.unmask(3, 0, &mut m), Raise::default());
        assert_eq!(f.set_pending(3, 0, &mut m), Raise::default());
        assert_eq!(f.set_pending(1500, 0, &mut m), Raise::default());
        assert_eq!(f.set_pending(7, 0, &mut m), Raise::default());
        f.clear_pending(7, &mut m); // closed before its page came
        assert_eq!(f.counters().saved, 3);
        // first page, zeroed (unmasked): 3 is raised and linked now
        m.add_frame(200, 0);
        assert_eq!(
            f.expand_array(200, &mut m, |_| Some(0)),
            Ok(vec![(3, up(0))])
        );
        assert_eq!(word(&m, 3), PENDING | LINKED);
        assert_eq!(word(&m, 7), 0);
        // second page masked (as Linux does it): pending only, until unmasked
        m.add_frame(201, MASKED);
        assert_eq!(
            f.expand_array(201, &mut m, |_| Some(0)),
            Ok(vec![(1500, NEW)])
        );
        assert_eq!(word(&m, 1500), PENDING | MASKED);
        // re-raised once only
        m.add_frame(202, 0);
        assert_eq!(f.expand_array(202, &mut m, |_| Some(0)), Ok(vec![]));
    }

    #[test]
    fn switch_from_2level_keeps_pending_ports() {
        let mut m = FakeMem::new(2);
        m.add_frame(100, 0);
        let mut f = FifoState::new(2);
        f.init_control(0, 100, 0).unwrap();
        f.switch_from_2level([0, 3, 5, 200_000]);
        f.init_control(1, 100, 72).unwrap();
        assert_eq!(f.priority(3), DEFAULT);
        m.add_frame(200, MASKED);
        let vcpu_of = |p| match p {
            3 => Some(1),
            _ => None, // 5 was closed meanwhile
        };
        assert_eq!(f.expand_array(200, &mut m, vcpu_of), Ok(vec![(3, NEW)]));
        assert_eq!(word(&m, 3), PENDING | MASKED);
        assert_eq!(word(&m, 5), MASKED);
        let mut g = Guest::new(
            vec![f.control_block(0).unwrap(), f.control_block(1).unwrap()],
            vec![200],
        );
        assert_eq!(g.unmask(&mut m, &mut f, 3, 1).upcall, Some(1));
        g.drain(&mut m, 1);
        assert_eq!(g.take(1), [3]);
    }

    #[test]
    fn close_clears_pending_and_priority() {
        let (mut f, mut m, mut g) = setup_unmasked(&[6]);
        f.set_priority(6, 2).unwrap();
        f.set_pending(6, 0, &mut m);
        f.close(6, &mut m);
        assert_eq!(f.priority(6), DEFAULT);
        assert!(!f.is_pending(6, &m));
        assert!(f.is_busy(6, &m)); // still on the queue until the guest unlinks it
        g.drain(&mut m, 0);
        assert_eq!(g.take(0), Vec::<u32>::new());
        assert!(!f.is_busy(6, &m));
    }

    #[test]
    fn set_priority_limits() {
        let mut f = FifoState::new(1);
        assert_eq!(f.priority(4), DEFAULT);
        assert_eq!(f.set_priority(4, 15), Ok(()));
        assert_eq!(f.set_priority(4, 0), Ok(()));
        assert_eq!(f.set_priority(4, 16), Err(EINVAL));
        assert_eq!(f.set_priority(4, u32::MAX), Err(EINVAL));
        assert_eq!(f.priority(4), 0);
        assert_eq!(f.set_priority(EVTCHN_FIFO_NR_CHANNELS, 1), Err(EINVAL));
        assert_eq!(f.set_priority(EVTCHN_FIFO_NR_CHANNELS - 1, 1), Ok(()));
        let mut m = FakeMem::new(1);
        assert_eq!(
            f.set_pending(EVTCHN_FIFO_NR_CHANNELS, 0, &mut m),
            Raise::default()
        );
        assert_eq!(f.set_pending(u32::MAX, 0, &mut m), Raise::default());
    }

    #[test]
    fn default_bit_operations_use_bounded_compare_exchange() {
        let mut m = CmpxchgOnly(FakeMem::new(1));
        m.0.add_frame(1, 0);
        assert_eq!(m.test_and_set_bit(1, 8, 31), Some(false));
        assert_eq!(m.test_and_set_bit(1, 8, 31), Some(true));
        assert_eq!(m.test_and_clear_bit(1, 8, 31), Some(true));
        assert_eq!(m.test_and_clear_bit(1, 8, 31), Some(false));
        assert_eq!(m.test_and_set_bit(2, 8, 3), None); // no such frame
        m.0.meddle = 3;
        assert_eq!(m.test_and_set_bit(1, 8, 29), Some(false));
        assert_eq!(m.0.get(1, 8), MASKED | LINKED);
        m.0.meddle = u32::MAX;
        m.0.cmpxchgs = 0;
        assert_eq!(m.test_and_clear_bit(1, 8, 29), None);
        assert_eq!(m.0.cmpxchgs, BIT_OP_TRIES);
        // the engine on top of it
        let (mut f, fm, mut g) = setup_unmasked(&[1, 2]);
        let mut m = CmpxchgOnly(fm);
        assert_eq!(f.set_pending(1, 0, &mut m), up(0));
        assert_eq!(f.set_pending(2, 0, &mut m), NEW);
        let mut fm = m.0;
        g.drain(&mut fm, 0);
        assert_eq!(g.take(0), [1, 2]);
    }

    #[test]
    fn two_level_engine_through_the_bridge() {
        let (mut f, mut m, mut g) = setup();
        let mut chans = EventChannels::new(1, NV, 1024);
        let ipi = chans.bind_ipi(1).unwrap();
        let free = 60; // valid (first bucket) but not in use
        g.unmask(&mut m, &mut f, ipi, 1);
        // send on an IPI port: the 2-level engine's raise is deferred, then done here
        let mut b = FifoEventMemory::new(&mut f, &mut m);
        assert_eq!(
            chans.send(ipi, &mut b),
            Ok(Delivery::Local(Raise::default()))
        );
        assert_eq!(b.finish(|p| chans.port_vcpu(p)), vec![(ipi, up(1))]);
        g.drain(&mut m, 1);
        assert_eq!(g.take(1), [ipi]);
        // masked: pending only; EVTCHNOP_unmask through the engine links it
        g.mask(&mut m, ipi);
        let mut b = FifoEventMemory::new(&mut f, &mut m);
        chans.send(ipi, &mut b).unwrap();
        assert_eq!(b.finish(|p| chans.port_vcpu(p)), vec![(ipi, NEW)]);
        let mut b = FifoEventMemory::new(&mut f, &mut m);
        assert!(b.is_pending(ipi) && b.is_masked(ipi));
        assert_eq!(chans.unmask(ipi, &mut b), Ok(None));
        assert_eq!(chans.unmask(free, &mut b), Ok(None));
        assert_eq!(
            b.finish(|p| chans.port_vcpu(p)),
            vec![(
                ipi,
                Raise {
                    newly_pending: false,
                    upcall: Some(1)
                }
            )]
        );
        g.drain(&mut m, 1);
        assert_eq!(g.take(1), [ipi]);
        // close: PENDING cleared, priority back to the default
        f.set_priority(ipi, 1).unwrap();
        f.set_pending(ipi, 1, &mut m);
        let mut b = FifoEventMemory::new(&mut f, &mut m);
        assert!(chans.close(ipi, &mut b).is_ok());
        assert_eq!(b.finish(|p| chans.port_vcpu(p)), vec![]);
        assert!(!f.is_pending(ipi, &m));
        assert_eq!(f.priority(ipi), DEFAULT);
        g.drain(&mut m, 1);
        assert_eq!(g.take(1), Vec::<u32>::new());
        // VIRQ raised through the engine
        let t = chans.bind_virq(0, 2).unwrap();
        g.unmask(&mut m, &mut f, t, 2);
        let mut b = FifoEventMemory::new(&mut f, &mut m);
        assert_eq!(chans.raise_virq(0, 2, &mut b), Some(Raise::default()));
        assert_eq!(b.finish(|p| chans.port_vcpu(p)), vec![(t, up(2))]);
    }

    /// The reference: abstract queues of ports per (vCPU, priority), the guest's ready
    /// bits and handler state mirrored step for step.
    #[derive(Clone, Debug)]
    struct Model {
        pending: Vec<bool>,
        masked: Vec<bool>,
        linked: Vec<bool>,
        vcpu_of: Vec<u32>,
        prio: Vec<u32>,
        queues: Vec<Vec<VecDeque<usize>>>,
        ready: Vec<u32>,
        local_ready: Vec<u32>,
        in_handler: Vec<bool>,
        upcall: Vec<bool>,
        delivered: Vec<Vec<u32>>,
    }

    /// Ports the model uses (two event-array pages).
    const PORTS: [u32; 7] = [1, 2, 3, 4, 5, 1029, 2047];

    impl Model {
        fn new() -> Model {
            let np = PORTS.len();
            let nv = NV as usize;
            Model {
                pending: vec![false; np],
                masked: vec![false; np],
                linked: vec![false; np],
                vcpu_of: vec![0; np],
                prio: vec![DEFAULT; np],
                queues: vec![vec![VecDeque::new(); 16]; nv],
                ready: vec![0; nv],
                local_ready: vec![0; nv],
                in_handler: vec![false; nv],
                upcall: vec![false; nv],
                delivered: vec![Vec::new(); nv],
            }
        }
        fn raise(&mut self, i: usize) -> Raise {
            let (v, q) = (self.vcpu_of[i] as usize, self.prio[i] as usize);
            let newly_pending = !self.pending[i];
            self.pending[i] = true;
            let mut upcall = None;
            if !self.masked[i] && !self.linked[i] {
                self.linked[i] = true;
                let empty = self.queues[v][q].is_empty();
                self.queues[v][q].push_back(i);
                if empty && self.ready[v] & (1 << q) == 0 {
                    self.ready[v] |= 1 << q;
                    if !self.upcall[v] {
                        self.upcall[v] = true;
                        upcall = Some(v as u32);
                    }
                }
            }
            Raise {
                newly_pending,
                upcall,
            }
        }
        fn unmask(&mut self, i: usize) -> Raise {
            if !self.masked[i] {
                return Raise::default();
            }
            self.masked[i] = false;
            if self.pending[i] {
                self.raise(i)
            } else {
                Raise::default()
            }
        }
        fn step(&mut self, v: usize) -> bool {
            if !self.in_handler[v] {
                if !self.upcall[v] {
                    return false;
                }
                self.upcall[v] = false;
                self.local_ready[v] = core::mem::take(&mut self.ready[v]);
                self.in_handler[v] = true;
                return true;
            }
            if self.local_ready[v] == 0 {
                self.in_handler[v] = false;
                return true;
            }
            let q = self.local_ready[v].trailing_zeros() as usize;
            let i = self.queues[v][q]
                .pop_front()
                .expect("ready bit, empty queue");
            self.linked[i] = false;
            if self.queues[v][q].is_empty() {
                self.local_ready[v] &= !(1 << q);
            }
            if self.pending[i] && !self.masked[i] {
                self.pending[i] = false;
                self.delivered[v].push(PORTS[i]);
            }
            self.local_ready[v] |= core::mem::take(&mut self.ready[v]);
            true
        }
    }

    #[derive(Clone, Debug)]
    enum Op {
        Raise(usize),
        Mask(usize),
        Unmask(usize),
        Priority(usize, u32),
        Rebind(usize, u32),
        Close(usize),
        Step(u32),
        Drain(u32),
    }

    fn op() -> impl Strategy<Value = Op> {
        let port = 0..PORTS.len();
        let vcpu = 0..NV;
        prop_oneof![
            5 => port.clone().prop_map(Op::Raise),
            1 => port.clone().prop_map(Op::Mask),
            2 => port.clone().prop_map(Op::Unmask),
            1 => (port.clone(), prop_oneof![Just(0u32), Just(3), Just(7), Just(15)])
                .prop_map(|(p, q)| Op::Priority(p, q)),
            1 => (port.clone(), vcpu.clone()).prop_map(|(p, v)| Op::Rebind(p, v)),
            1 => port.prop_map(Op::Close),
            4 => vcpu.clone().prop_map(Op::Step),
            1 => vcpu.prop_map(Op::Drain),
        ]
    }

    fn check_same(f: &FifoState, m: &FakeMem, g: &Guest, r: &Model) {
        for (i, &p) in PORTS.iter().enumerate() {
            let w = word(m, p);
            assert_eq!(
                (w & PENDING != 0, w & MASKED != 0, w & LINKED != 0),
                (r.pending[i], r.masked[i], r.linked[i]),
                "port {p}"
            );
            assert_eq!(w & BUSY, 0);
            assert_eq!(f.priority(p), r.prio[i]);
        }
        for v in 0..NV as usize {
            let cb = f.control_block(v as u32).unwrap();
            assert_eq!(m.get(cb.frame, cb.ready_offset()), r.ready[v], "ready {v}");
            assert_eq!(m.upcall[v], r.upcall[v], "upcall {v}");
            assert_eq!(g.local_ready[v], r.local_ready[v]);
            assert_eq!(g.in_handler[v], r.in_handler[v]);
            assert_eq!(g.delivered[v], r.delivered[v], "delivered on {v}");
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(400))]

        /// Engine + Linux consumer model against the abstract queues, op by op; at the
        /// end, with everything unmasked and drained, every event that became pending
        /// was delivered exactly once or cleared by a close.
        #[test]
        fn matches_reference_model(ops in proptest::collection::vec(op(), 1..120)) {
            let (mut f, mut m, mut g) = setup_unmasked(&PORTS);
            let mut r = Model::new();
            let mut owed = vec![0u32; PORTS.len()];
            let mut closed = vec![0u32; PORTS.len()];
            for op in ops {
                match op {
                    Op::Raise(i) => {
                        let got = f.set_pending(PORTS[i], r.vcpu_of[i], &mut m);
                        owed[i] += u32::from(got.newly_pending);
                        prop_assert_eq!(got, r.raise(i));
                    }
                    Op::Mask(i) => {
                        g.mask(&mut m, PORTS[i]);
                        r.masked[i] = true;
                    }
                    Op::Unmask(i) => {
                        let got = g.unmask(&mut m, &mut f, PORTS[i], r.vcpu_of[i]);
                        prop_assert!(!got.newly_pending);
                        prop_assert_eq!(got, r.unmask(i));
                    }
                    Op::Priority(i, q) => {
                        f.set_priority(PORTS[i], q).unwrap();
                        r.prio[i] = q;
                    }
                    Op::Rebind(i, v) => r.vcpu_of[i] = v,
                    Op::Close(i) => {
                        closed[i] += u32::from(f.is_pending(PORTS[i], &m));
                        f.close(PORTS[i], &mut m);
                        r.pending[i] = false;
                        r.prio[i] = DEFAULT;
                        r.vcpu_of[i] = 0;
                    }
                    Op::Step(v) => prop_assert_eq!(g.step(&mut m, v), r.step(v as usize)),
                    Op::Drain(v) => {
                        g.drain(&mut m, v);
                        while r.step(v as usize) {}
                    }
                }
                check_same(&f, &m, &g, &r);
            }
            for (i, &p) in PORTS.iter().enumerate() {
                prop_assert_eq!(g.unmask(&mut m, &mut f, p, r.vcpu_of[i]), r.unmask(i));
            }
            for _ in 0..4 {
                for v in 0..NV {
                    g.drain(&mut m, v);
                    while r.step(v as usize) {}
                }
            }
            check_same(&f, &m, &g, &r);
            for (i, &p) in PORTS.iter().enumerate() {
                prop_assert!(!f.is_pending(p, &m) && !f.is_busy(p, &m));
                let got: u32 = g.delivered.iter().flatten().filter(|&&d| d == p).count() as u32;
                prop_assert_eq!(got + closed[i], owed[i], "port {}", p);
            }
            for v in 0..NV as usize {
                prop_assert!(!m.upcall[v] && !g.in_handler[v]);
            }
        }
    }

    #[derive(Clone, Debug)]
    enum Hostile {
        Write(u64, u32, u32),
        Raise(u32, u32),
        Unmask(u32, u32),
        Priority(u32, u32),
        Clear(u32),
        Expand(u64),
        Init(u32, u64, u32),
        Meddle(u32),
    }

    fn hostile() -> impl Strategy<Value = Hostile> {
        let frame = 99u64..104;
        let port = prop_oneof![0u32..8, 1020u32..1030, 0u32..5000, any::<u32>()];
        prop_oneof![
            4 => (frame.clone(), 0u32..1024, any::<u32>())
                .prop_map(|(f, i, v)| Hostile::Write(f, i * 4, v)),
            4 => (port.clone(), 0u32..5).prop_map(|(p, v)| Hostile::Raise(p, v)),
            2 => (port.clone(), 0u32..5).prop_map(|(p, v)| Hostile::Unmask(p, v)),
            1 => (port.clone(), prop_oneof![0u32..20, any::<u32>()])
                .prop_map(|(p, q)| Hostile::Priority(p, q)),
            1 => port.prop_map(Hostile::Clear),
            1 => frame.clone().prop_map(Hostile::Expand),
            1 => (0u32..5, frame, prop_oneof![0u32..4100, any::<u32>()])
                .prop_map(|(v, f, o)| Hostile::Init(v, f, o)),
            1 => (0u32..8).prop_map(Hostile::Meddle),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(300))]

        /// Arbitrary guest writes to control blocks and event words, arbitrary ports,
        /// vCPUs, priorities and offsets: no panic, no access outside a page, bounded
        /// work, and the remembered tails stay ports with an event word.
        #[test]
        fn hostile_guest_memory_never_panics(ops in proptest::collection::vec(hostile(), 1..200)) {
            let mut m = FakeMem::new(4);
            for fr in 100..103 {
                m.add_frame(fr, 0);
            }
            let mut f = FifoState::new(4);
            f.init_control(0, 100, 0).unwrap();
            f.expand_array(101, &mut m, |_| Some(0)).unwrap();
            for op in ops {
                m.cmpxchgs = 0;
                match op {
                    Hostile::Write(fr, o, v) => {
                        if let Some(s) = m.slot(fr, o) {
                            *s = v;
                        }
                    }
                    Hostile::Raise(p, v) => {
                        f.set_pending(p, v, &mut m);
                    }
                    Hostile::Unmask(p, v) => {
                        f.unmask(p, v, &mut m);
                    }
                    Hostile::Priority(p, q) => {
                        let r = f.set_priority(p, q);
                        prop_assert_eq!(r.is_ok(), q <= 15 && p < EVTCHN_FIFO_NR_CHANNELS);
                    }
                    Hostile::Clear(p) => f.close(p, &mut m),
                    Hostile::Expand(fr) => {
                        let _ = f.expand_array(fr, &mut m, |p| Some(p % 5));
                    }
                    Hostile::Init(v, fr, o) => {
                        let ok = f.check_init_control(v, o).is_ok();
                        prop_assert_eq!(f.init_control(v, fr, o).is_ok(), ok);
                    }
                    Hostile::Meddle(n) => m.meddle = n,
                }
                prop_assert!(m.cmpxchgs <= 2 * (1 + SET_LINK_TRIES) + 2 * BIT_OP_TRIES);
                prop_assert!(f.ports.len() <= EVTCHN_FIFO_NR_CHANNELS as usize);
                for v in &f.vcpus {
                    for &t in &v.tail {
                        prop_assert!(t == 0 || t < f.nr_ports());
                    }
                }
            }
        }
    }
}
