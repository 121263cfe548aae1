//! Event channels of one domain: port table, bindings and 2-level delivery.
//!
//! Pure logic, host-tested. The guest-visible bits (shared_info's `evtchn_pending` /
//! `evtchn_mask`, each vcpu_info's `evtchn_pending_sel` / `evtchn_upcall_pending`) live
//! in guest memory and are reached only through [`EventMemory`], which the domain code
//! implements over the shared_info frame and wherever `VCPUOP_register_vcpu_info` put
//! each vcpu_info. Nothing here touches hardware or other domains: operations that
//! involve a second domain return what the caller must do to it.
//!
//! # Implemented (Xen's `xen/common/event_channel.c` and `event_2l.c` semantics)
//! - Port allocation: lowest free port, port 0 reserved, per-domain limit
//!   ([`EventChannels::max_ports`], at most 4096 = 64 × 64 for the 2-level ABI;
//!   `-ENOSPC` when exhausted). "Valid" ports, as in Xen, are those inside the allocated
//!   part of the table, which grows in buckets of [`PORT_BUCKET`] ports: an unused
//!   valid port reports `EVTCHNSTAT_closed`, a port beyond it gives `-EINVAL`.
//! - `alloc_unbound`, `bind_virq` (per-vCPU / per-domain / global classification,
//!   `-EEXIST`, `-EBUSY` for global VIRQs unless this domain is their handler),
//!   `bind_ipi`, `bind_vcpu`, `close` (clears the pending bit, resets the vCPU binding
//!   to 0), `status`, `unmask` (Xen's `evtchn_2l_unmask`: a pending event whose mask bit
//!   was set re-raises the selector and the upcall), `send`, `reset`, with Xen's error
//!   codes and their order of precedence.
//! - 2-level delivery ([`EventChannels::set_pending`], Xen's `evtchn_2l_set_pending` +
//!   `vcpu_mark_events_pending`): pending already set → nothing; masked → nothing more;
//!   else the selector bit `port / 64` of the bound vCPU, and if that was clear, the
//!   vCPU's `evtchn_upcall_pending`; a 0→1 change of the latter asks the caller to
//!   inject the callback vector. `evtchn_upcall_mask` is not consulted: Xen ignores it
//!   for HVM/PVH guests (`xen/arch/x86/hvm/irq.c`).
//! - Interdomain channels through a two-step protocol (below), loopback included, and
//!   ports whose peer is the hypervisor itself (console and xenstore rings).
//!
//! # Not here
//! - The FIFO ABI (`EVTCHNOP_init_control`, `expand_array`, `set_priority`): a later
//!   issue; it will swap the delivery half ([`EventChannels::set_pending`] /
//!   [`EventChannels::unmask`]) and raise the limit to 2^17 ports. Until then the
//!   caller answers those operations with `-ENOSYS` and Linux keeps the 2-level ABI.
//! - PIRQs (`EVTCHNOP_bind_pirq`: the caller answers `-EOPNOTSUPP`, as a Xen built
//!   without `CONFIG_HAS_PIRQ`), XSM, and the privilege checks on `dom` arguments
//!   (`-ESRCH`/`-EPERM`): the caller resolves domains before calling in.
//! - `SCHEDOP_poll` bookkeeping: [`Raise::newly_pending`] tells the caller when to
//!   wake pollers (Xen's `evtchn_check_pollers` runs exactly then).
//!
//! # Interdomain protocol
//! Both domains' engines are borrowed one after the other (for loopback, the same
//! engine twice); nothing else may run on the calling domain's engine in between.
//!
//! `EVTCHNOP_bind_interdomain` from domain L to (`remote_dom` R, `remote_port` rp):
//! 1. `lp = L.bind_interdomain_local(R, rp)?` — allocates the local port (`-ENOSPC`).
//! 2. `R.connect_remote(rp, L.domid(), lp)` — `-EINVAL` unless rp is unbound and
//!    accepts L; on error call `L.abort_interdomain(lp)` and fail with it.
//! 3. `L.set_pending(lp, mem_L)` — Xen always flags the new port, in case R signalled
//!    before the connection existed; inject if it asks for an upcall.
//!
//! `EVTCHNOP_send` on an interdomain port returns [`Delivery::Interdomain`]: call
//! `R.set_pending(remote_port, mem_R)`. `EVTCHNOP_close` (and [`EventChannels::reset`])
//! return [`Closed::Interdomain`]: call `R.peer_closed(remote_port, L.domid(), port)`,
//! which puts R's end back to unbound, accepting L again.

use alloc::vec;
use alloc::vec::Vec;

use abi::errno::{EBUSY, EEXIST, EINVAL, ENOENT, ENOSPC};
use abi::event_channel::{
    virq_kind, EvtchnStatus, VirqKind, DOMID_SELF, DOMID_XEN, EVTCHNSTAT_CLOSED,
    EVTCHNSTAT_INTERDOMAIN, EVTCHNSTAT_IPI, EVTCHNSTAT_UNBOUND, EVTCHNSTAT_VIRQ,
    EVTCHN_2L_NR_CHANNELS, NR_VIRQS,
};
use abi::shared_info::BITS_PER_EVTCHN_WORD;

/// A positive `abi::errno` value; the hypercall returns `abi::errno::ret(e)`.
pub type Errno = i64;

/// Default per-domain port limit: everything the 2-level ABI can name (ports 0..4096).
pub const DEFAULT_MAX_PORTS: u32 = EVTCHN_2L_NR_CHANNELS;

/// The port table grows in steps of this many ports (Xen's `EVTCHNS_PER_BUCKET`
/// analogue; it decides which unused ports are "valid").
pub const PORT_BUCKET: u32 = 64;

/// The guest-memory side of 2-level event channels. Every method is one
/// read-modify-write of a bit in guest memory (atomic with respect to the guest: use
/// locked bit operations on the page). The engine only passes ports below its limit
/// (< 4096) and vCPUs below its vCPU count.
pub trait EventMemory {
    /// Sets bit `port` of `shared_info.evtchn_pending`; returns its old value.
    fn test_and_set_pending(&mut self, port: u32) -> bool;
    /// Clears bit `port` of `shared_info.evtchn_pending`.
    fn clear_pending(&mut self, port: u32);
    /// Bit `port` of `shared_info.evtchn_pending`.
    fn is_pending(&self, port: u32) -> bool;
    /// Bit `port` of `shared_info.evtchn_mask`.
    fn is_masked(&self, port: u32) -> bool;
    /// Clears bit `port` of `shared_info.evtchn_mask`; returns its old value.
    fn test_and_clear_mask(&mut self, port: u32) -> bool;
    /// Sets bit `word` of vCPU `vcpu`'s `vcpu_info.evtchn_pending_sel`; returns its old
    /// value.
    fn test_and_set_sel(&mut self, vcpu: u32, word: u32) -> bool;
    /// Sets vCPU `vcpu`'s `vcpu_info.evtchn_upcall_pending`; returns whether it was
    /// already set.
    fn set_upcall_pending(&mut self, vcpu: u32) -> bool;
}

/// What one raise of a port did (the result of [`EventChannels::set_pending`]).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Raise {
    /// The pending bit went 0→1 (even if the port is masked): wake vCPUs of this domain
    /// blocked in `SCHEDOP_poll` on this port.
    pub newly_pending: bool,
    /// This vCPU's `evtchn_upcall_pending` went 0→1: inject the callback vector into it
    /// (now, or when it can take interrupts) and wake it if blocked.
    pub upcall: Option<u32>,
}

/// What the caller must do after a successful `EVTCHNOP_send`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Delivery {
    /// Delivered inside this domain (IPI port).
    Local(Raise),
    /// Raise `remote_port` in domain `remote_dom` with its engine's
    /// [`EventChannels::set_pending`] (the remote may be this domain: loopback).
    Interdomain {
        /// Peer domain.
        remote_dom: u16,
        /// Peer port.
        remote_port: u32,
    },
    /// The peer is the hypervisor (see [`EventChannels::alloc_unbound_for_hypervisor`]):
    /// look at whatever ring this port serves.
    ToHypervisor(u32),
    /// Unbound port: Xen drops the notification silently and returns 0.
    Dropped,
}

/// What the caller must do after a successful close.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Closed {
    /// Nothing outside this domain.
    Local,
    /// Call `peer_closed(remote_port, <this domid>, port)` on `remote_dom`'s engine.
    Interdomain {
        /// The closed local port.
        port: u32,
        /// Peer domain.
        remote_dom: u16,
        /// Peer port.
        remote_port: u32,
    },
    /// A hypervisor-peer port was closed by the guest: that ring is disconnected.
    Hypervisor(u32),
}

/// A port's binding as `EVTCHNOP_status` reports it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Binding {
    /// `EVTCHNSTAT_closed` (free or reserved).
    Closed,
    /// `EVTCHNSTAT_unbound`, accepting `remote_dom`.
    Unbound {
        /// Domain allowed to bind.
        remote_dom: u16,
    },
    /// `EVTCHNSTAT_interdomain`. Hypervisor-peer ports report `DOMID_XEN` and their own
    /// port number as the remote end.
    Interdomain {
        /// Peer domain.
        remote_dom: u16,
        /// Peer port.
        remote_port: u32,
    },
    /// `EVTCHNSTAT_virq`.
    Virq(u32),
    /// `EVTCHNSTAT_ipi`.
    Ipi,
}

/// Result of [`EventChannels::status`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Status {
    /// The binding.
    pub binding: Binding,
    /// vCPU the port notifies.
    pub vcpu: u32,
}

impl Status {
    /// The `EVTCHNSTAT_*` code.
    pub fn code(&self) -> u32 {
        match self.binding {
            Binding::Closed => EVTCHNSTAT_CLOSED,
            Binding::Unbound { .. } => EVTCHNSTAT_UNBOUND,
            Binding::Interdomain { .. } => EVTCHNSTAT_INTERDOMAIN,
            Binding::Virq(_) => EVTCHNSTAT_VIRQ,
            Binding::Ipi => EVTCHNSTAT_IPI,
        }
    }

    /// Fills the OUT fields of the guest's (copied) `evtchn_status` as Xen does: only
    /// the union member of the reported status is written.
    pub fn fill(&self, out: &mut EvtchnStatus) {
        out.status = self.code();
        out.vcpu = self.vcpu;
        match self.binding {
            Binding::Closed | Binding::Ipi => {}
            Binding::Unbound { remote_dom } => out.set_u_dom(remote_dom),
            Binding::Interdomain {
                remote_dom,
                remote_port,
            } => {
                out.set_u_dom(remote_dom);
                out.set_u_port(remote_port);
            }
            Binding::Virq(v) => out.set_u_word(v),
        }
    }
}

/// Event counters of one domain (they explain notification costs).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Counters {
    /// Successful `EVTCHNOP_send` calls.
    pub sends: u64,
    /// Sends on unbound ports (dropped, as Xen does).
    pub dropped_unbound: u64,
    /// Raises of a live port ([`EventChannels::set_pending`] calls that found one).
    pub raised: u64,
    /// Raises that found the pending bit already set (coalesced).
    pub suppressed_pending: u64,
    /// Raises that set the pending bit of a masked port (no selector, no upcall).
    pub suppressed_masked: u64,
    /// Raises that reached the selector (pending 0→1, unmasked).
    pub delivered: u64,
    /// `evtchn_upcall_pending` 0→1 transitions (callback vector injections asked for).
    pub upcalls: u64,
    /// Unmasks that re-raised a pending event.
    pub unmask_redeliveries: u64,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum State {
    Free,
    Reserved,
    Unbound { remote_dom: u16 },
    Interdomain { remote_dom: u16, remote_port: u32 },
    Virq(u32),
    Ipi,
    Hypervisor,
}

#[derive(Clone, Copy, Debug)]
struct Port {
    state: State,
    vcpu: u32,
}

const FREE: Port = Port {
    state: State::Free,
    vcpu: 0,
};

/// The event channels of one domain (2-level ABI).
#[derive(Clone, Debug)]
pub struct EventChannels {
    domid: u16,
    nr_vcpus: u32,
    max_ports: u32,
    ports: Vec<Port>,
    /// Per vCPU, the port bound to each VIRQ (per-domain and global VIRQs: vCPU 0's row).
    virq_to_port: Vec<[Option<u32>; NR_VIRQS]>,
    global_virq_handler: bool,
    active: u32,
    counters: Counters,
}

impl EventChannels {
    /// The event channels of domain `domid` with `nr_vcpus` vCPUs, allowing ports
    /// `0..max_ports` (clamped to 4096; port 0 is reserved, so `max_ports - 1` can be
    /// allocated; xl's default `event_channels = 1023` corresponds to 1024 here).
    pub fn new(domid: u16, nr_vcpus: u32, max_ports: u32) -> EventChannels {
        let mut ports = vec![FREE; PORT_BUCKET as usize];
        ports[0].state = State::Reserved;
        EventChannels {
            domid,
            nr_vcpus,
            max_ports: max_ports.min(EVTCHN_2L_NR_CHANNELS),
            ports,
            virq_to_port: vec![[None; NR_VIRQS]; nr_vcpus as usize],
            global_virq_handler: false,
            active: 0,
            counters: Counters::default(),
        }
    }

    /// The domain id given at creation.
    pub fn domid(&self) -> u16 {
        self.domid
    }

    /// Number of vCPUs.
    pub fn nr_vcpus(&self) -> u32 {
        self.nr_vcpus
    }

    /// The port limit (ports `0..max_ports`).
    pub fn max_ports(&self) -> u32 {
        self.max_ports
    }

    /// Ports in use (port 0 not counted): 0 after [`reset`](Self::reset).
    pub fn active_ports(&self) -> u32 {
        self.active
    }

    /// The counters.
    pub fn counters(&self) -> Counters {
        self.counters
    }

    /// Makes this domain the handler of global VIRQs (`VIRQ_CONSOLE`, `VIRQ_DOM_EXC`,
    /// ...), which it may then bind; otherwise binding one fails with `-EBUSY`, as in
    /// Xen for a domain that is not the hardware domain nor the designated handler.
    pub fn set_global_virq_handler(&mut self, on: bool) {
        self.global_virq_handler = on;
    }

    /// The vCPU a live port notifies.
    pub fn port_vcpu(&self, port: u32) -> Option<u32> {
        self.live(port).map(|p| p.vcpu)
    }

    /// The port bound to `virq` for `vcpu` (per-domain and global VIRQs: any `vcpu`
    /// looks at vCPU 0's binding, as Xen's `evtchn_virq_enabled`).
    pub fn virq_port(&self, virq: u32, vcpu: u32) -> Option<u32> {
        let row = match virq_kind(virq)? {
            VirqKind::PerVcpu => vcpu,
            VirqKind::PerDomain | VirqKind::Global => 0,
        };
        self.virq_to_port.get(row as usize)?[virq as usize]
    }

    /// Whether `port` is a hypervisor-peer port.
    pub fn is_hypervisor_port(&self, port: u32) -> bool {
        matches!(self.live(port).map(|p| p.state), Some(State::Hypervisor))
    }

    /// `EVTCHNOP_alloc_unbound` in this domain: a port accepting `remote_dom`
    /// (`DOMID_SELF` means this domain).
    pub fn alloc_unbound(&mut self, remote_dom: u16) -> Result<u32, Errno> {
        let remote_dom = self.resolve(remote_dom);
        self.alloc(State::Unbound { remote_dom }, 0)
    }

    /// A port whose peer is the hypervisor (console, xenstore): what a toolstack would
    /// allocate as unbound-to-dom0 and a backend would bind. Sends on it give
    /// [`Delivery::ToHypervisor`]; the hypervisor signals it with
    /// [`hypervisor_notify`](Self::hypervisor_notify). The guest may rebind it to
    /// another vCPU and may close it.
    pub fn alloc_unbound_for_hypervisor(&mut self) -> Result<u32, Errno> {
        self.alloc(State::Hypervisor, 0)
    }

    /// `EVTCHNOP_bind_virq`. Errors, in Xen's order: `-EINVAL` (virq out of range, or a
    /// per-domain/global VIRQ on a vCPU other than 0), `-ENOENT` (no such vCPU),
    /// `-EBUSY` (global VIRQ, not the handler), `-EEXIST` (already bound there),
    /// `-ENOSPC`.
    pub fn bind_virq(&mut self, virq: u32, vcpu: u32) -> Result<u32, Errno> {
        let kind = virq_kind(virq).ok_or(EINVAL)?;
        if kind != VirqKind::PerVcpu && vcpu != 0 {
            return Err(EINVAL);
        }
        if vcpu >= self.nr_vcpus {
            return Err(ENOENT);
        }
        if kind == VirqKind::Global && !self.global_virq_handler {
            return Err(EBUSY);
        }
        if self.virq_to_port[vcpu as usize][virq as usize].is_some() {
            return Err(EEXIST);
        }
        let port = self.alloc(State::Virq(virq), vcpu)?;
        self.virq_to_port[vcpu as usize][virq as usize] = Some(port);
        Ok(port)
    }

    /// `EVTCHNOP_bind_ipi`: `-ENOENT` (no such vCPU), `-ENOSPC`.
    pub fn bind_ipi(&mut self, vcpu: u32) -> Result<u32, Errno> {
        if vcpu >= self.nr_vcpus {
            return Err(ENOENT);
        }
        self.alloc(State::Ipi, vcpu)
    }

    /// `EVTCHNOP_bind_vcpu`: `-ENOENT` (no such vCPU, checked first), `-EINVAL` (port
    /// not valid, free, IPI or per-vCPU VIRQ). Pending state is not moved, as in Xen.
    pub fn bind_vcpu(&mut self, port: u32, vcpu: u32) -> Result<(), Errno> {
        if vcpu >= self.nr_vcpus {
            return Err(ENOENT);
        }
        let p = self.ports.get_mut(port as usize).ok_or(EINVAL)?;
        match p.state {
            State::Virq(v) if virq_kind(v) != Some(VirqKind::PerVcpu) => p.vcpu = vcpu,
            State::Unbound { .. } | State::Interdomain { .. } | State::Hypervisor => p.vcpu = vcpu,
            _ => return Err(EINVAL),
        }
        Ok(())
    }

    /// `EVTCHNOP_close`: `-EINVAL` for a port that is not valid or not in use. The
    /// pending bit is cleared and the port forgets its vCPU.
    pub fn close<M: EventMemory + ?Sized>(
        &mut self,
        port: u32,
        mem: &mut M,
    ) -> Result<Closed, Errno> {
        let p = *self.ports.get(port as usize).ok_or(EINVAL)?;
        let closed = match p.state {
            State::Free | State::Reserved => return Err(EINVAL),
            State::Unbound { .. } | State::Ipi => Closed::Local,
            State::Virq(virq) => {
                let row = match virq_kind(virq) {
                    Some(VirqKind::PerVcpu) => p.vcpu,
                    _ => 0,
                };
                if let Some(slot) = self
                    .virq_to_port
                    .get_mut(row as usize)
                    .and_then(|r| r.get_mut(virq as usize))
                {
                    if *slot == Some(port) {
                        *slot = None;
                    }
                }
                Closed::Local
            }
            State::Interdomain {
                remote_dom,
                remote_port,
            } => Closed::Interdomain {
                port,
                remote_dom,
                remote_port,
            },
            State::Hypervisor => Closed::Hypervisor(port),
        };
        mem.clear_pending(port);
        self.release(port);
        Ok(closed)
    }

    /// `EVTCHNOP_status` of one of this domain's ports: `-EINVAL` if not valid.
    pub fn status(&self, port: u32) -> Result<Status, Errno> {
        let p = self.ports.get(port as usize).ok_or(EINVAL)?;
        let binding = match p.state {
            State::Free | State::Reserved => Binding::Closed,
            State::Unbound { remote_dom } => Binding::Unbound { remote_dom },
            State::Interdomain {
                remote_dom,
                remote_port,
            } => Binding::Interdomain {
                remote_dom,
                remote_port,
            },
            State::Virq(v) => Binding::Virq(v),
            State::Ipi => Binding::Ipi,
            State::Hypervisor => Binding::Interdomain {
                remote_dom: DOMID_XEN,
                remote_port: port,
            },
        };
        Ok(Status {
            binding,
            vcpu: p.vcpu,
        })
    }

    /// `EVTCHNOP_unmask` (Xen's `evtchn_2l_unmask`): clears the mask bit; if it was set
    /// and the port is pending, sets the selector bit of the port's vCPU and, if that was
    /// clear, its upcall. Returns the vCPU to inject into, if any. `-EINVAL` only if the
    /// port is not valid (Xen unmasks any valid port, even a free one).
    pub fn unmask<M: EventMemory + ?Sized>(
        &mut self,
        port: u32,
        mem: &mut M,
    ) -> Result<Option<u32>, Errno> {
        let vcpu = self.ports.get(port as usize).ok_or(EINVAL)?.vcpu;
        if mem.test_and_clear_mask(port)
            && mem.is_pending(port)
            && !mem.test_and_set_sel(vcpu, port / BITS_PER_EVTCHN_WORD)
        {
            self.counters.unmask_redeliveries += 1;
            return Ok(self.mark_events_pending(vcpu, mem));
        }
        Ok(None)
    }

    /// `EVTCHNOP_send`: `-EINVAL` for a port that is not valid, free, or bound to a
    /// VIRQ. IPI ports are raised here; for the others see [`Delivery`].
    pub fn send<M: EventMemory + ?Sized>(
        &mut self,
        port: u32,
        mem: &mut M,
    ) -> Result<Delivery, Errno> {
        let p = *self.ports.get(port as usize).ok_or(EINVAL)?;
        let d = match p.state {
            State::Ipi => Delivery::Local(self.set_pending(port, mem)),
            State::Interdomain {
                remote_dom,
                remote_port,
            } => Delivery::Interdomain {
                remote_dom,
                remote_port,
            },
            State::Hypervisor => Delivery::ToHypervisor(port),
            State::Unbound { .. } => {
                self.counters.dropped_unbound += 1;
                Delivery::Dropped
            }
            State::Free | State::Reserved | State::Virq(_) => return Err(EINVAL),
        };
        self.counters.sends += 1;
        Ok(d)
    }

    /// Raises `port` (2-level delivery, see the module documentation) on the vCPU it is
    /// bound to. Ports that are not in use are ignored (nothing happens).
    pub fn set_pending<M: EventMemory + ?Sized>(&mut self, port: u32, mem: &mut M) -> Raise {
        let Some(vcpu) = self.live(port).map(|p| p.vcpu) else {
            return Raise::default();
        };
        self.counters.raised += 1;
        if mem.test_and_set_pending(port) {
            self.counters.suppressed_pending += 1;
            return Raise::default();
        }
        if mem.is_masked(port) {
            self.counters.suppressed_masked += 1;
            return Raise {
                newly_pending: true,
                upcall: None,
            };
        }
        self.counters.delivered += 1;
        let upcall = if mem.test_and_set_sel(vcpu, port / BITS_PER_EVTCHN_WORD) {
            None
        } else {
            self.mark_events_pending(vcpu, mem)
        };
        Raise {
            newly_pending: true,
            upcall,
        }
    }

    /// Raises `virq` (Xen's `send_guest_vcpu_virq` / `send_guest_domain_virq`): for a
    /// per-vCPU VIRQ the port bound on `vcpu`; otherwise the port bound on vCPU 0,
    /// delivered to whichever vCPU it is bound to now. `None` if nothing is bound.
    pub fn raise_virq<M: EventMemory + ?Sized>(
        &mut self,
        virq: u32,
        vcpu: u32,
        mem: &mut M,
    ) -> Option<Raise> {
        let port = self.virq_port(virq, vcpu)?;
        Some(self.set_pending(port, mem))
    }

    /// The hypervisor signals its end of a hypervisor-peer port. `None` if `port` is not
    /// one (the guest closed it).
    pub fn hypervisor_notify<M: EventMemory + ?Sized>(
        &mut self,
        port: u32,
        mem: &mut M,
    ) -> Option<Raise> {
        self.is_hypervisor_port(port)
            .then(|| self.set_pending(port, mem))
    }

    /// Step 1 of `EVTCHNOP_bind_interdomain` (see the module documentation): allocates
    /// the local port, already pointing at (`remote_dom`, `remote_port`); `DOMID_SELF`
    /// means this domain. `-ENOSPC` when full.
    pub fn bind_interdomain_local(
        &mut self,
        remote_dom: u16,
        remote_port: u32,
    ) -> Result<u32, Errno> {
        let remote_dom = self.resolve(remote_dom);
        self.alloc(
            State::Interdomain {
                remote_dom,
                remote_port,
            },
            0,
        )
    }

    /// Step 2, on the remote domain's engine: connects unbound `port` to (`peer_dom`,
    /// `peer_port`). `-EINVAL` if `port` is not valid, not unbound, or does not accept
    /// `peer_dom` (`DOMID_SELF` means this domain).
    pub fn connect_remote(
        &mut self,
        port: u32,
        peer_dom: u16,
        peer_port: u32,
    ) -> Result<(), Errno> {
        let peer_dom = self.resolve(peer_dom);
        let p = self.ports.get_mut(port as usize).ok_or(EINVAL)?;
        match p.state {
            State::Unbound { remote_dom } if remote_dom == peer_dom => {
                p.state = State::Interdomain {
                    remote_dom: peer_dom,
                    remote_port: peer_port,
                };
                Ok(())
            }
            _ => Err(EINVAL),
        }
    }

    /// Undoes step 1 when step 2 failed: frees `port` if it is an interdomain port.
    /// Returns whether it did.
    pub fn abort_interdomain(&mut self, port: u32) -> bool {
        if matches!(
            self.live(port).map(|p| p.state),
            Some(State::Interdomain { .. })
        ) {
            self.release(port);
            true
        } else {
            false
        }
    }

    /// The other end of `port` closed: if `port` is connected to (`peer_dom`,
    /// `peer_port`) it becomes unbound, accepting `peer_dom` again (its pending bit is
    /// left alone, as in Xen). Returns whether it changed.
    pub fn peer_closed(&mut self, port: u32, peer_dom: u16, peer_port: u32) -> bool {
        match self.ports.get_mut(port as usize) {
            Some(p)
                if p.state
                    == (State::Interdomain {
                        remote_dom: peer_dom,
                        remote_port: peer_port,
                    }) =>
            {
                p.state = State::Unbound {
                    remote_dom: peer_dom,
                };
                true
            }
            _ => false,
        }
    }

    /// `EVTCHNOP_reset` (and domain destruction): closes every port in use, hypervisor
    /// ports included. Returns what must be done outside this domain for each closed
    /// interdomain or hypervisor port.
    pub fn reset<M: EventMemory + ?Sized>(&mut self, mem: &mut M) -> Vec<Closed> {
        let mut out = Vec::new();
        for port in 1..self.ports.len() as u32 {
            if let Ok(c) = self.close(port, mem) {
                if c != Closed::Local {
                    out.push(c);
                }
            }
        }
        out
    }

    fn resolve(&self, dom: u16) -> u16 {
        if dom == DOMID_SELF {
            self.domid
        } else {
            dom
        }
    }

    fn live(&self, port: u32) -> Option<&Port> {
        self.ports
            .get(port as usize)
            .filter(|p| !matches!(p.state, State::Free | State::Reserved))
    }

    /// Xen's `vcpu_mark_events_pending`.
    fn mark_events_pending<M: EventMemory + ?Sized>(
        &mut self,
        vcpu: u32,
        mem: &mut M,
    ) -> Option<u32> {
        if mem.set_upcall_pending(vcpu) {
            None
        } else {
            self.counters.upcalls += 1;
            Some(vcpu)
        }
    }

    /// Lowest free port below the limit, growing the table by a bucket if needed.
    fn alloc(&mut self, state: State, vcpu: u32) -> Result<u32, Errno> {
        let limit = self.max_ports as usize;
        let port = match self
            .ports
            .iter()
            .take(limit)
            .position(|p| p.state == State::Free)
        {
            Some(i) => i,
            None if self.ports.len() < limit => {
                let i = self.ports.len();
                let grown = (i + PORT_BUCKET as usize).min(EVTCHN_2L_NR_CHANNELS as usize);
                self.ports.resize(grown, FREE);
                i
            }
            None => return Err(ENOSPC),
        };
        self.ports[port] = Port { state, vcpu };
        self.active += 1;
        Ok(port as u32)
    }

    fn release(&mut self, port: u32) {
        if let Some(p) = self.ports.get_mut(port as usize) {
            if !matches!(p.state, State::Free | State::Reserved) {
                *p = FREE;
                self.active -= 1;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use abi::event_channel::{
        VIRQ_ARGO, VIRQ_CONSOLE, VIRQ_DEBUG, VIRQ_DOM_EXC, VIRQ_TIMER, VIRQ_XENPMU,
    };
    use proptest::prelude::*;

    const DOM: u16 = 5;

    /// Guest memory as plain bitmaps: shared_info's pending/mask words, and per vCPU
    /// the selector and the upcall flag.
    #[derive(Clone, Debug, PartialEq, Eq)]
    struct FakeMem {
        pending: Vec<u64>,
        mask: Vec<u64>,
        sel: Vec<u64>,
        upcall: Vec<bool>,
    }

    fn bit(words: &[u64], i: u32) -> bool {
        words[(i / 64) as usize] & (1 << (i % 64)) != 0
    }

    fn put(words: &mut [u64], i: u32, on: bool) -> bool {
        let old = bit(words, i);
        if on {
            words[(i / 64) as usize] |= 1 << (i % 64);
        } else {
            words[(i / 64) as usize] &= !(1 << (i % 64));
        }
        old
    }

    impl FakeMem {
        fn new(nvcpus: u32) -> FakeMem {
            FakeMem {
                pending: vec![0; 64],
                mask: vec![0; 64],
                sel: vec![0; nvcpus as usize],
                upcall: vec![false; nvcpus as usize],
            }
        }
        fn pending(&self, port: u32) -> bool {
            bit(&self.pending, port)
        }
        fn mask(&mut self, port: u32) {
            put(&mut self.mask, port, true);
        }
        /// What the guest does when it takes the upcall: clears upcall_pending and the
        /// selector (it would then scan and clear pending bits).
        fn ack(&mut self, vcpu: u32) {
            self.upcall[vcpu as usize] = false;
            self.sel[vcpu as usize] = 0;
        }
    }

    impl EventMemory for FakeMem {
        fn test_and_set_pending(&mut self, port: u32) -> bool {
            put(&mut self.pending, port, true)
        }
        fn clear_pending(&mut self, port: u32) {
            put(&mut self.pending, port, false);
        }
        fn is_pending(&self, port: u32) -> bool {
            bit(&self.pending, port)
        }
        fn is_masked(&self, port: u32) -> bool {
            bit(&self.mask, port)
        }
        fn test_and_clear_mask(&mut self, port: u32) -> bool {
            put(&mut self.mask, port, false)
        }
        fn test_and_set_sel(&mut self, vcpu: u32, word: u32) -> bool {
            let s = &mut self.sel[vcpu as usize];
            let old = *s & (1 << word) != 0;
            *s |= 1 << word;
            old
        }
        fn set_upcall_pending(&mut self, vcpu: u32) -> bool {
            core::mem::replace(&mut self.upcall[vcpu as usize], true)
        }
    }

    fn setup(nvcpus: u32, max: u32) -> (EventChannels, FakeMem) {
        (EventChannels::new(DOM, nvcpus, max), FakeMem::new(nvcpus))
    }

    fn st(e: &EventChannels, port: u32) -> Binding {
        e.status(port).unwrap().binding
    }

    #[test]
    fn port_zero_is_reserved() {
        let (mut e, mut m) = setup(2, DEFAULT_MAX_PORTS);
        assert_eq!(
            e.status(0),
            Ok(Status {
                binding: Binding::Closed,
                vcpu: 0
            })
        );
        assert_eq!(e.close(0, &mut m), Err(EINVAL));
        assert_eq!(e.send(0, &mut m), Err(EINVAL));
        assert_eq!(e.bind_vcpu(0, 1), Err(EINVAL));
        assert_eq!(e.set_pending(0, &mut m), Raise::default());
        assert_eq!(e.alloc_unbound(0), Ok(1));
        assert_eq!(e.active_ports(), 1);
    }

    #[test]
    fn alloc_unbound_lowest_free_and_domid_self() {
        let (mut e, mut m) = setup(1, DEFAULT_MAX_PORTS);
        assert_eq!(e.alloc_unbound(DOMID_SELF), Ok(1));
        assert_eq!(e.alloc_unbound(3), Ok(2));
        assert_eq!(e.alloc_unbound(4), Ok(3));
        assert_eq!(st(&e, 1), Binding::Unbound { remote_dom: DOM });
        assert_eq!(st(&e, 2), Binding::Unbound { remote_dom: 3 });
        assert_eq!(e.close(2, &mut m), Ok(Closed::Local));
        assert_eq!(st(&e, 2), Binding::Closed);
        assert_eq!(e.alloc_unbound(7), Ok(2));
        assert_eq!(e.active_ports(), 3);
    }

    #[test]
    fn validity_follows_the_allocated_buckets() {
        let (mut e, _) = setup(1, DEFAULT_MAX_PORTS);
        assert_eq!(st(&e, 63), Binding::Closed);
        assert_eq!(e.status(64), Err(EINVAL));
        assert_eq!(e.status(u32::MAX), Err(EINVAL));
        for i in 1..64 {
            assert_eq!(e.bind_ipi(0), Ok(i));
        }
        assert_eq!(e.status(64), Err(EINVAL));
        assert_eq!(e.bind_ipi(0), Ok(64));
        assert_eq!(st(&e, 127), Binding::Closed);
        assert_eq!(e.status(128), Err(EINVAL));
    }

    #[test]
    fn ports_exhausted_at_the_limit() {
        let (mut e, mut m) = setup(2, 4);
        assert_eq!(e.max_ports(), 4);
        assert_eq!(e.bind_ipi(0), Ok(1));
        assert_eq!(e.bind_virq(VIRQ_TIMER, 0), Ok(2));
        assert_eq!(e.alloc_unbound(0), Ok(3));
        assert_eq!(e.alloc_unbound(0), Err(ENOSPC));
        assert_eq!(e.bind_ipi(1), Err(ENOSPC));
        assert_eq!(e.bind_virq(VIRQ_TIMER, 1), Err(ENOSPC));
        assert_eq!(e.bind_interdomain_local(1, 1), Err(ENOSPC));
        assert_eq!(e.alloc_unbound_for_hypervisor(), Err(ENOSPC));
        // a failed bind_virq leaves no binding behind
        assert_eq!(e.virq_port(VIRQ_TIMER, 1), None);
        e.close(1, &mut m).unwrap();
        assert_eq!(e.bind_virq(VIRQ_TIMER, 1), Ok(1));
    }

    #[test]
    fn full_2level_space_and_clamp() {
        let (mut e, _) = setup(1, u32::MAX);
        assert_eq!(e.max_ports(), 4096);
        for i in 1..4096 {
            assert_eq!(e.alloc_unbound(0), Ok(i));
        }
        assert_eq!(e.alloc_unbound(0), Err(ENOSPC));
        assert_eq!(e.active_ports(), 4095);
        assert_eq!(st(&e, 4095), Binding::Unbound { remote_dom: 0 });
        assert_eq!(e.status(4096), Err(EINVAL));
    }

    #[test]
    fn bind_virq_rules_and_errors() {
        let (mut e, mut m) = setup(2, DEFAULT_MAX_PORTS);
        assert_eq!(e.bind_virq(NR_VIRQS as u32, 0), Err(EINVAL));
        assert_eq!(e.bind_virq(u32::MAX, 0), Err(EINVAL));
        assert_eq!(e.bind_virq(VIRQ_TIMER, 2), Err(ENOENT));
        assert_eq!(e.bind_virq(VIRQ_TIMER, u32::MAX), Err(ENOENT));
        // non-per-vCPU VIRQs only on vCPU 0: EINVAL comes before ENOENT
        assert_eq!(e.bind_virq(VIRQ_ARGO, 1), Err(EINVAL));
        assert_eq!(e.bind_virq(VIRQ_CONSOLE, 7), Err(EINVAL));
        // global VIRQs need the handler role
        assert_eq!(e.bind_virq(VIRQ_CONSOLE, 0), Err(EBUSY));
        assert_eq!(e.bind_virq(VIRQ_TIMER, 0), Ok(1));
        assert_eq!(e.bind_virq(VIRQ_TIMER, 0), Err(EEXIST));
        assert_eq!(e.bind_virq(VIRQ_TIMER, 1), Ok(2));
        assert_eq!(e.bind_virq(VIRQ_DEBUG, 1), Ok(3));
        assert_eq!(e.bind_virq(VIRQ_ARGO, 0), Ok(4));
        assert_eq!(e.bind_virq(VIRQ_ARGO, 0), Err(EEXIST));
        e.set_global_virq_handler(true);
        assert_eq!(e.bind_virq(VIRQ_CONSOLE, 0), Ok(5));
        assert_eq!(e.bind_virq(VIRQ_CONSOLE, 0), Err(EEXIST));
        assert_eq!(
            e.status(2),
            Ok(Status {
                binding: Binding::Virq(VIRQ_TIMER),
                vcpu: 1
            })
        );
        assert_eq!(e.virq_port(VIRQ_TIMER, 1), Some(2));
        assert_eq!(e.virq_port(VIRQ_CONSOLE, 1), Some(5));
        // closing frees the binding
        assert_eq!(e.close(1, &mut m), Ok(Closed::Local));
        assert_eq!(e.virq_port(VIRQ_TIMER, 0), None);
        assert_eq!(e.bind_virq(VIRQ_TIMER, 0), Ok(1));
        // a moved global VIRQ is still "bound" for vCPU 0's row
        e.bind_vcpu(5, 1).unwrap();
        assert_eq!(e.bind_virq(VIRQ_CONSOLE, 0), Err(EEXIST));
        e.close(5, &mut m).unwrap();
        assert_eq!(e.bind_virq(VIRQ_CONSOLE, 0), Ok(5));
    }

    #[test]
    fn bind_ipi_and_errors() {
        let (mut e, _) = setup(3, DEFAULT_MAX_PORTS);
        assert_eq!(e.bind_ipi(3), Err(ENOENT));
        assert_eq!(e.bind_ipi(2), Ok(1));
        assert_eq!(
            e.status(1),
            Ok(Status {
                binding: Binding::Ipi,
                vcpu: 2
            })
        );
    }

    #[test]
    fn bind_vcpu_rules() {
        let (mut e, mut m) = setup(2, DEFAULT_MAX_PORTS);
        e.set_global_virq_handler(true);
        let timer = e.bind_virq(VIRQ_TIMER, 0).unwrap();
        let dom_exc = e.bind_virq(VIRQ_DOM_EXC, 0).unwrap();
        let ipi = e.bind_ipi(0).unwrap();
        let unbound = e.alloc_unbound(0).unwrap();
        let hyp = e.alloc_unbound_for_hypervisor().unwrap();
        assert_eq!(e.bind_vcpu(timer, 1), Err(EINVAL));
        assert_eq!(e.bind_vcpu(ipi, 1), Err(EINVAL));
        assert_eq!(e.bind_vcpu(dom_exc, 1), Ok(()));
        assert_eq!(e.bind_vcpu(unbound, 1), Ok(()));
        assert_eq!(e.bind_vcpu(hyp, 1), Ok(()));
        assert_eq!(e.port_vcpu(dom_exc), Some(1));
        assert_eq!(e.port_vcpu(hyp), Some(1));
        assert_eq!(e.bind_vcpu(40, 1), Err(EINVAL)); // free port
        assert_eq!(e.bind_vcpu(64, 1), Err(EINVAL)); // not valid
        assert_eq!(e.bind_vcpu(40, 2), Err(ENOENT)); // vCPU checked first
        assert_eq!(e.bind_vcpu(u32::MAX, u32::MAX), Err(ENOENT));
        // a freed port forgets its vCPU
        e.close(unbound, &mut m).unwrap();
        assert_eq!(e.status(unbound).unwrap().vcpu, 0);
        assert_eq!(e.alloc_unbound(0), Ok(unbound));
        assert_eq!(e.port_vcpu(unbound), Some(0));
    }

    #[test]
    fn close_errors_and_pending_cleared() {
        let (mut e, mut m) = setup(1, DEFAULT_MAX_PORTS);
        let p = e.bind_ipi(0).unwrap();
        e.send(p, &mut m).unwrap();
        assert!(m.pending(p));
        assert_eq!(e.close(p, &mut m), Ok(Closed::Local));
        assert!(!m.pending(p));
        assert_eq!(e.close(p, &mut m), Err(EINVAL)); // double close
        assert_eq!(e.close(64, &mut m), Err(EINVAL)); // out of range
        assert_eq!(e.close(u32::MAX, &mut m), Err(EINVAL));
        assert_eq!(e.active_ports(), 0);
    }

    #[test]
    fn send_by_state() {
        let (mut e, mut m) = setup(2, DEFAULT_MAX_PORTS);
        let ipi = e.bind_ipi(1).unwrap();
        let unbound = e.alloc_unbound(0).unwrap();
        let virq = e.bind_virq(VIRQ_TIMER, 0).unwrap();
        let hyp = e.alloc_unbound_for_hypervisor().unwrap();
        assert_eq!(
            e.send(ipi, &mut m),
            Ok(Delivery::Local(Raise {
                newly_pending: true,
                upcall: Some(1)
            }))
        );
        assert_eq!(e.send(unbound, &mut m), Ok(Delivery::Dropped));
        assert!(!m.pending(unbound));
        assert_eq!(e.send(virq, &mut m), Err(EINVAL));
        assert_eq!(e.send(hyp, &mut m), Ok(Delivery::ToHypervisor(hyp)));
        assert!(!m.pending(hyp));
        assert_eq!(e.send(30, &mut m), Err(EINVAL)); // free
        assert_eq!(e.send(5000, &mut m), Err(EINVAL)); // out of range
        let c = e.counters();
        assert_eq!((c.sends, c.dropped_unbound), (3, 1));
    }

    #[test]
    fn two_level_delivery_rules() {
        let (mut e, mut m) = setup(2, DEFAULT_MAX_PORTS);
        let a = e.alloc_unbound(0).unwrap(); // port 1, word 0
        let b = e.alloc_unbound(0).unwrap(); // port 2, word 0
        let hi = e.bind_interdomain_local(0, 0).unwrap(); // port 3
        e.bind_vcpu(hi, 1).unwrap();
        for _ in 4..70 {
            e.alloc_unbound(0).unwrap();
        }
        let far = 69; // word 1
                      // first event: pending, selector, upcall
        let up = Raise {
            newly_pending: true,
            upcall: Some(0),
        };
        assert_eq!(e.set_pending(a, &mut m), up);
        assert_eq!(m.sel[0], 1);
        assert!(m.upcall[0]);
        // same port again: coalesced
        assert_eq!(e.set_pending(a, &mut m), Raise::default());
        // another port of the same word: pending only (selector already set)
        let quiet = Raise {
            newly_pending: true,
            upcall: None,
        };
        assert_eq!(e.set_pending(b, &mut m), quiet);
        // another word while the upcall is still pending: selector bit, no new upcall
        assert_eq!(e.set_pending(far, &mut m), quiet);
        assert_eq!(m.sel[0], 0b11);
        // the guest acks; word 0 bits still pending don't re-raise by themselves
        m.ack(0);
        assert_eq!(e.set_pending(a, &mut m), Raise::default());
        // a masked port: pending set, nothing else
        m.mask(hi);
        assert_eq!(e.set_pending(hi, &mut m), quiet);
        assert!(m.pending(hi));
        assert_eq!(m.sel[1], 0);
        assert!(!m.upcall[1]);
        // selector set but upcall cleared by the guest: no upcall (Xen checks the
        // selector's old value only)
        put(&mut m.pending, a, false);
        m.sel[0] = 1;
        assert_eq!(e.set_pending(a, &mut m), quiet);
        assert!(!m.upcall[0]);
        // the port's vCPU decides
        let c = e.bind_ipi(1).unwrap();
        assert_eq!(
            e.set_pending(c, &mut m),
            Raise {
                newly_pending: true,
                upcall: Some(1)
            }
        );
        let k = e.counters();
        assert_eq!(k.raised, 8);
        assert_eq!(k.suppressed_pending, 2);
        assert_eq!(k.suppressed_masked, 1);
        assert_eq!(k.delivered, 5);
        assert_eq!(k.upcalls, 2);
        assert_eq!(
            k.raised,
            k.delivered + k.suppressed_masked + k.suppressed_pending
        );
    }

    #[test]
    fn unmask_redelivers_like_evtchn_2l_unmask() {
        let (mut e, mut m) = setup(2, DEFAULT_MAX_PORTS);
        let p = e.alloc_unbound(0).unwrap();
        e.bind_vcpu(p, 1).unwrap();
        m.mask(p);
        e.set_pending(p, &mut m);
        assert!(!m.upcall[1]);
        // unmask: mask cleared, selector + upcall raised on the port's vCPU
        assert_eq!(e.unmask(p, &mut m), Ok(Some(1)));
        assert!(!bit(&m.mask, p));
        assert_eq!(m.sel[1], 1);
        // mask already clear: Xen only re-raises when the mask bit was set
        m.ack(1);
        assert_eq!(e.unmask(p, &mut m), Ok(None));
        assert!(!m.upcall[1]);
        // masked but not pending: mask cleared, nothing raised
        put(&mut m.pending, p, false);
        m.mask(p);
        assert_eq!(e.unmask(p, &mut m), Ok(None));
        assert!(!bit(&m.mask, p));
        // masked, pending, selector already set: no upcall
        m.mask(p);
        put(&mut m.pending, p, true);
        m.sel[1] = 1;
        assert_eq!(e.unmask(p, &mut m), Ok(None));
        // any valid port may be unmasked, even a free one; invalid ones fail
        m.mask(40);
        assert_eq!(e.unmask(40, &mut m), Ok(None));
        assert!(!bit(&m.mask, 40));
        assert_eq!(e.unmask(64, &mut m), Err(EINVAL));
        assert_eq!(e.unmask(u32::MAX, &mut m), Err(EINVAL));
        assert_eq!(e.counters().unmask_redeliveries, 1);
    }

    #[test]
    fn raise_virq_per_vcpu_and_global() {
        let (mut e, mut m) = setup(3, DEFAULT_MAX_PORTS);
        e.set_global_virq_handler(true);
        let t1 = e.bind_virq(VIRQ_TIMER, 1).unwrap();
        let t2 = e.bind_virq(VIRQ_TIMER, 2).unwrap();
        let con = e.bind_virq(VIRQ_CONSOLE, 0).unwrap();
        assert_eq!(
            e.raise_virq(VIRQ_TIMER, 2, &mut m),
            Some(Raise {
                newly_pending: true,
                upcall: Some(2)
            })
        );
        assert!(m.pending(t2) && !m.pending(t1));
        assert_eq!(e.raise_virq(VIRQ_TIMER, 0, &mut m), None); // not bound on vCPU 0
        assert_eq!(e.raise_virq(VIRQ_XENPMU, 1, &mut m), None);
        assert_eq!(e.raise_virq(NR_VIRQS as u32, 0, &mut m), None);
        assert_eq!(e.raise_virq(VIRQ_TIMER, u32::MAX, &mut m), None);
        // a global VIRQ follows bind_vcpu, whatever vCPU the raiser names
        e.bind_vcpu(con, 1).unwrap();
        assert_eq!(
            e.raise_virq(VIRQ_CONSOLE, 2, &mut m),
            Some(Raise {
                newly_pending: true,
                upcall: Some(1)
            })
        );
        assert!(m.pending(con));
    }

    /// The documented two-step bind between two domains' engines.
    fn bind_interdomain(
        l: &mut EventChannels,
        lm: &mut FakeMem,
        r: &mut EventChannels,
        remote_port: u32,
    ) -> Result<(u32, Raise), Errno> {
        let lp = l.bind_interdomain_local(r.domid(), remote_port)?;
        if let Err(err) = r.connect_remote(remote_port, l.domid(), lp) {
            assert!(l.abort_interdomain(lp));
            return Err(err);
        }
        Ok((lp, l.set_pending(lp, lm)))
    }

    #[test]
    fn interdomain_between_two_engines() {
        let mut a = EventChannels::new(1, 1, DEFAULT_MAX_PORTS);
        let mut am = FakeMem::new(1);
        let mut b = EventChannels::new(2, 2, DEFAULT_MAX_PORTS);
        let mut bm = FakeMem::new(2);
        let pa = a.alloc_unbound(2).unwrap();
        let other = a.alloc_unbound(3).unwrap();
        // errors: wrong remote domain, not unbound, not valid; the local port is rolled back
        assert_eq!(
            bind_interdomain(&mut b, &mut bm, &mut a, other),
            Err(EINVAL)
        );
        assert_eq!(bind_interdomain(&mut b, &mut bm, &mut a, 40), Err(EINVAL));
        assert_eq!(bind_interdomain(&mut b, &mut bm, &mut a, 9999), Err(EINVAL));
        assert_eq!(b.active_ports(), 0);
        let (pb, raise) = bind_interdomain(&mut b, &mut bm, &mut a, pa).unwrap();
        assert_eq!(pb, 1);
        assert_eq!(
            raise,
            Raise {
                newly_pending: true,
                upcall: Some(0)
            }
        );
        assert_eq!(
            st(&a, pa),
            Binding::Interdomain {
                remote_dom: 2,
                remote_port: pb
            }
        );
        assert_eq!(
            st(&b, pb),
            Binding::Interdomain {
                remote_dom: 1,
                remote_port: pa
            }
        );
        // a connected port cannot be bound again
        assert_eq!(bind_interdomain(&mut b, &mut bm, &mut a, pa), Err(EINVAL));
        // send from B reaches A's port
        let d = b.send(pb, &mut bm).unwrap();
        assert_eq!(
            d,
            Delivery::Interdomain {
                remote_dom: 1,
                remote_port: pa
            }
        );
        assert_eq!(
            a.set_pending(pa, &mut am),
            Raise {
                newly_pending: true,
                upcall: Some(0)
            }
        );
        // A closes: B's end goes back to unbound, accepting A
        let c = a.close(pa, &mut am).unwrap();
        assert_eq!(
            c,
            Closed::Interdomain {
                port: pa,
                remote_dom: 2,
                remote_port: pb
            }
        );
        assert!(b.peer_closed(pb, 1, pa));
        assert!(!b.peer_closed(pb, 1, pa));
        assert_eq!(st(&b, pb), Binding::Unbound { remote_dom: 1 });
        assert!(bm.pending(pb)); // left alone
        assert_eq!(b.send(pb, &mut bm), Ok(Delivery::Dropped));
        // and A can connect to it again
        let (pa2, _) = bind_interdomain(&mut a, &mut am, &mut b, pb).unwrap();
        assert_eq!(pa2, pa);
        assert!(!a.abort_interdomain(other)); // only interdomain ports
    }

    #[test]
    fn loopback_on_one_engine() {
        let (mut e, mut m) = setup(1, DEFAULT_MAX_PORTS);
        let rp = e.alloc_unbound(DOMID_SELF).unwrap();
        let lp = e.bind_interdomain_local(DOMID_SELF, rp).unwrap();
        assert_eq!(e.connect_remote(rp, DOMID_SELF, lp), Ok(()));
        assert_eq!(
            e.send(lp, &mut m),
            Ok(Delivery::Interdomain {
                remote_dom: DOM,
                remote_port: rp
            })
        );
        e.set_pending(rp, &mut m);
        assert!(m.pending(rp) && !m.pending(lp));
        let c = e.close(rp, &mut m).unwrap();
        assert_eq!(
            c,
            Closed::Interdomain {
                port: rp,
                remote_dom: DOM,
                remote_port: lp
            }
        );
        assert!(e.peer_closed(lp, DOM, rp));
        assert_eq!(st(&e, lp), Binding::Unbound { remote_dom: DOM });
    }

    #[test]
    fn hypervisor_ports() {
        let (mut e, mut m) = setup(2, DEFAULT_MAX_PORTS);
        let store = e.alloc_unbound_for_hypervisor().unwrap();
        let console = e.alloc_unbound_for_hypervisor().unwrap();
        assert!(e.is_hypervisor_port(store));
        assert!(!e.is_hypervisor_port(0));
        assert_eq!(
            st(&e, store),
            Binding::Interdomain {
                remote_dom: DOMID_XEN,
                remote_port: store
            }
        );
        assert_eq!(e.send(console, &mut m), Ok(Delivery::ToHypervisor(console)));
        e.bind_vcpu(console, 1).unwrap();
        assert_eq!(
            e.hypervisor_notify(console, &mut m),
            Some(Raise {
                newly_pending: true,
                upcall: Some(1)
            })
        );
        assert_eq!(e.close(console, &mut m), Ok(Closed::Hypervisor(console)));
        assert_eq!(e.hypervisor_notify(console, &mut m), None);
        assert_eq!(e.hypervisor_notify(9999, &mut m), None);
        // the guest cannot connect to it as if it were unbound
        assert_eq!(e.connect_remote(store, DOM, 3), Err(EINVAL));
    }

    #[test]
    fn reset_closes_everything() {
        let (mut e, mut m) = setup(2, DEFAULT_MAX_PORTS);
        let t = e.bind_virq(VIRQ_TIMER, 1).unwrap();
        let i = e.bind_ipi(0).unwrap();
        let h = e.alloc_unbound_for_hypervisor().unwrap();
        let x = e.bind_interdomain_local(9, 4).unwrap();
        e.alloc_unbound(0).unwrap();
        e.send(i, &mut m).unwrap();
        let out = e.reset(&mut m);
        assert_eq!(
            out,
            vec![
                Closed::Hypervisor(h),
                Closed::Interdomain {
                    port: x,
                    remote_dom: 9,
                    remote_port: 4
                }
            ]
        );
        assert_eq!(e.active_ports(), 0);
        assert!(!m.pending(i));
        assert_eq!(e.virq_port(VIRQ_TIMER, 1), None);
        assert_eq!(st(&e, 0), Binding::Closed);
        assert_eq!(e.close(0, &mut m), Err(EINVAL));
        assert_eq!(e.bind_virq(VIRQ_TIMER, 1), Ok(t));
        assert_eq!(e.reset(&mut m), vec![]);
    }

    #[test]
    fn status_fills_the_wire_struct() {
        let (mut e, _) = setup(2, DEFAULT_MAX_PORTS);
        let v = e.bind_virq(VIRQ_DEBUG, 1).unwrap();
        let mut s = EvtchnStatus::from_bytes(&[0xcc; EvtchnStatus::SIZE]);
        e.status(v).unwrap().fill(&mut s);
        assert_eq!(
            (s.status, s.vcpu, s.u_word()),
            (EVTCHNSTAT_VIRQ, 1, VIRQ_DEBUG)
        );
        assert_eq!(&s.u[4..], &[0xcc; 4]);
        let u = e.alloc_unbound(7).unwrap();
        e.status(u).unwrap().fill(&mut s);
        assert_eq!((s.status, s.vcpu, s.u_dom()), (EVTCHNSTAT_UNBOUND, 0, 7));
        let x = e.bind_interdomain_local(3, 8).unwrap();
        e.status(x).unwrap().fill(&mut s);
        assert_eq!(
            (s.status, s.u_dom(), s.u_port()),
            (EVTCHNSTAT_INTERDOMAIN, 3, 8)
        );
        e.status(40).unwrap().fill(&mut s);
        assert_eq!(s.status, EVTCHNSTAT_CLOSED);
        let i = e.bind_ipi(1).unwrap();
        assert_eq!(e.status(i).unwrap().code(), EVTCHNSTAT_IPI);
    }

    // ---- reference model ----------------------------------------------------------

    #[derive(Clone, Copy, Debug, PartialEq, Eq)]
    enum MState {
        Free,
        Reserved,
        Unbound(u16),
        Inter(u16, u32),
        Virq(u32),
        Ipi,
        Hyp,
    }

    /// A deliberately naive model: a flat table, bindings found by scanning, bits in
    /// its own bitmaps.
    struct Model {
        domid: u16,
        nvcpus: u32,
        max: u32,
        handler: bool,
        st: Vec<(MState, u32)>,
        mem: FakeMem,
    }

    impl Model {
        fn new(nvcpus: u32, max: u32, handler: bool) -> Model {
            let mut st = vec![(MState::Free, 0); 64];
            st[0].0 = MState::Reserved;
            Model {
                domid: DOM,
                nvcpus,
                max: max.min(4096),
                handler,
                st,
                mem: FakeMem::new(nvcpus),
            }
        }
        fn live(&self, port: u32) -> Option<(MState, u32)> {
            let s = *self.st.get(port as usize)?;
            (!matches!(s.0, MState::Free | MState::Reserved)).then_some(s)
        }
        fn alloc(&mut self, s: MState, vcpu: u32) -> Result<u32, Errno> {
            for i in 0..self.max as usize {
                if i >= self.st.len() {
                    self.st
                        .resize((self.st.len() + 64).min(4096), (MState::Free, 0));
                }
                if self.st[i].0 == MState::Free {
                    self.st[i] = (s, vcpu);
                    return Ok(i as u32);
                }
            }
            Err(ENOSPC)
        }
        fn me(&self, d: u16) -> u16 {
            if d == DOMID_SELF {
                self.domid
            } else {
                d
            }
        }
        fn virq_bound(&self, virq: u32, vcpu: u32) -> Option<u32> {
            let per_vcpu = virq_kind(virq)? == VirqKind::PerVcpu;
            self.st
                .iter()
                .position(|&(s, v)| s == MState::Virq(virq) && (!per_vcpu || v == vcpu))
                .map(|p| p as u32)
        }
        fn raise(&mut self, port: u32) -> Raise {
            let Some((_, v)) = self.live(port) else {
                return Raise::default();
            };
            if put(&mut self.mem.pending, port, true) {
                return Raise::default();
            }
            let mut r = Raise {
                newly_pending: true,
                upcall: None,
            };
            if bit(&self.mem.mask, port) {
                return r;
            }
            let word = 1u64 << (port / 64);
            if self.mem.sel[v as usize] & word == 0 {
                self.mem.sel[v as usize] |= word;
                if !self.mem.upcall[v as usize] {
                    self.mem.upcall[v as usize] = true;
                    r.upcall = Some(v);
                }
            }
            r
        }
        fn bind_virq(&mut self, virq: u32, vcpu: u32) -> Result<u32, Errno> {
            let Some(kind) = virq_kind(virq) else {
                return Err(EINVAL);
            };
            if kind != VirqKind::PerVcpu && vcpu != 0 {
                return Err(EINVAL);
            }
            if vcpu >= self.nvcpus {
                return Err(ENOENT);
            }
            if kind == VirqKind::Global && !self.handler {
                return Err(EBUSY);
            }
            if self.virq_bound(virq, vcpu).is_some() {
                return Err(EEXIST);
            }
            self.alloc(MState::Virq(virq), vcpu)
        }
        fn bind_vcpu(&mut self, port: u32, vcpu: u32) -> Result<(), Errno> {
            if vcpu >= self.nvcpus {
                return Err(ENOENT);
            }
            let s = self.st.get_mut(port as usize).ok_or(EINVAL)?;
            let ok = match s.0 {
                MState::Virq(v) => virq_kind(v) != Some(VirqKind::PerVcpu),
                MState::Unbound(_) | MState::Inter(..) | MState::Hyp => true,
                _ => false,
            };
            if !ok {
                return Err(EINVAL);
            }
            s.1 = vcpu;
            Ok(())
        }
        fn close(&mut self, port: u32) -> Result<Closed, Errno> {
            let (s, _) = *self.st.get(port as usize).ok_or(EINVAL)?;
            let c = match s {
                MState::Free | MState::Reserved => return Err(EINVAL),
                MState::Inter(d, p) => Closed::Interdomain {
                    port,
                    remote_dom: d,
                    remote_port: p,
                },
                MState::Hyp => Closed::Hypervisor(port),
                _ => Closed::Local,
            };
            put(&mut self.mem.pending, port, false);
            self.st[port as usize] = (MState::Free, 0);
            Ok(c)
        }
        fn peer_closed(&mut self, port: u32, dom: u16, peer: u32) {
            if let Some(s) = self.st.get_mut(port as usize) {
                if s.0 == MState::Inter(dom, peer) {
                    s.0 = MState::Unbound(dom);
                }
            }
        }
        fn status(&self, port: u32) -> Result<Status, Errno> {
            let (s, vcpu) = *self.st.get(port as usize).ok_or(EINVAL)?;
            let binding = match s {
                MState::Free | MState::Reserved => Binding::Closed,
                MState::Unbound(d) => Binding::Unbound { remote_dom: d },
                MState::Inter(d, p) => Binding::Interdomain {
                    remote_dom: d,
                    remote_port: p,
                },
                MState::Hyp => Binding::Interdomain {
                    remote_dom: DOMID_XEN,
                    remote_port: port,
                },
                MState::Virq(v) => Binding::Virq(v),
                MState::Ipi => Binding::Ipi,
            };
            Ok(Status { binding, vcpu })
        }
        fn unmask(&mut self, port: u32) -> Result<Option<u32>, Errno> {
            let (_, v) = *self.st.get(port as usize).ok_or(EINVAL)?;
            if !put(&mut self.mem.mask, port, false) || !bit(&self.mem.pending, port) {
                return Ok(None);
            }
            let word = 1u64 << (port / 64);
            if self.mem.sel[v as usize] & word != 0 {
                return Ok(None);
            }
            self.mem.sel[v as usize] |= word;
            if self.mem.upcall[v as usize] {
                return Ok(None);
            }
            self.mem.upcall[v as usize] = true;
            Ok(Some(v))
        }
        fn send(&mut self, port: u32) -> Result<Delivery, Errno> {
            let (s, _) = *self.st.get(port as usize).ok_or(EINVAL)?;
            match s {
                MState::Ipi => Ok(Delivery::Local(self.raise(port))),
                MState::Inter(d, p) => Ok(Delivery::Interdomain {
                    remote_dom: d,
                    remote_port: p,
                }),
                MState::Hyp => Ok(Delivery::ToHypervisor(port)),
                MState::Unbound(_) => Ok(Delivery::Dropped),
                _ => Err(EINVAL),
            }
        }
        fn loopback(&mut self, rp: u32) -> Result<(u32, Raise), Errno> {
            let lp = self.alloc(MState::Free, 0)?; // reserve the number (grows the table)
            self.st[lp as usize].0 = MState::Free;
            if self.st.get(rp as usize).map(|s| s.0) != Some(MState::Unbound(self.domid)) {
                return Err(EINVAL);
            }
            self.st[lp as usize].0 = MState::Inter(self.domid, rp);
            self.st[rp as usize].0 = MState::Inter(self.domid, lp);
            Ok((lp, self.raise(lp)))
        }
    }

    #[derive(Clone, Debug)]
    enum Op {
        AllocUnbound(u16),
        AllocHyp,
        BindVirq(u32, u32),
        BindIpi(u32),
        BindVcpu(u32, u32),
        Loopback(u32),
        Close(u32),
        Status(u32),
        Unmask(u32),
        Send(u32),
        SetPending(u32),
        RaiseVirq(u32, u32),
        HypNotify(u32),
        GuestMask(u32),
        GuestUnmask(u32),
        GuestClearPending(u32),
        GuestSetPending(u32),
        GuestAck(u32),
        GuestClearUpcall(u32),
        GuestClearSel(u32),
        Reset,
    }

    fn port() -> impl Strategy<Value = u32> {
        prop_oneof![8 => 0u32..8, 3 => 0u32..72, 1 => 4088u32..4100, 1 => any::<u32>()]
    }
    fn vcpu() -> impl Strategy<Value = u32> {
        prop_oneof![4 => 0u32..4, 1 => any::<u32>()]
    }
    fn virq() -> impl Strategy<Value = u32> {
        prop_oneof![4 => 0u32..26, 1 => any::<u32>()]
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            1 => prop_oneof![Just(DOM), Just(DOMID_SELF), any::<u16>()].prop_map(Op::AllocUnbound),
            1 => Just(Op::AllocHyp),
            1 => (virq(), vcpu()).prop_map(|(a, b)| Op::BindVirq(a, b)),
            1 => vcpu().prop_map(Op::BindIpi),
            1 => (port(), vcpu()).prop_map(|(a, b)| Op::BindVcpu(a, b)),
            1 => port().prop_map(Op::Loopback),
            1 => port().prop_map(Op::Close),
            1 => port().prop_map(Op::Status),
            1 => port().prop_map(Op::Unmask),
            1 => port().prop_map(Op::Send),
            1 => port().prop_map(Op::SetPending),
            1 => (virq(), vcpu()).prop_map(|(a, b)| Op::RaiseVirq(a, b)),
            1 => port().prop_map(Op::HypNotify),
            2 => port().prop_map(Op::GuestMask),
            1 => port().prop_map(Op::GuestUnmask),
            1 => port().prop_map(Op::GuestClearPending),
            1 => port().prop_map(Op::GuestSetPending),
            2 => vcpu().prop_map(Op::GuestAck),
            1 => vcpu().prop_map(Op::GuestClearUpcall),
            1 => vcpu().prop_map(Op::GuestClearSel),
            1 => Just(Op::Reset),
        ]
    }

    const NV: u32 = 3;

    fn step(op: &Op, e: &mut EventChannels, m: &mut FakeMem, r: &mut Model) {
        match *op {
            Op::AllocUnbound(d) => {
                let d2 = r.me(d);
                assert_eq!(e.alloc_unbound(d), r.alloc(MState::Unbound(d2), 0));
            }
            Op::AllocHyp => assert_eq!(e.alloc_unbound_for_hypervisor(), r.alloc(MState::Hyp, 0)),
            Op::BindVirq(v, c) => assert_eq!(e.bind_virq(v, c), r.bind_virq(v, c)),
            Op::BindIpi(c) => {
                let want = if c >= NV {
                    Err(ENOENT)
                } else {
                    r.alloc(MState::Ipi, c)
                };
                assert_eq!(e.bind_ipi(c), want);
            }
            Op::BindVcpu(p, c) => assert_eq!(e.bind_vcpu(p, c), r.bind_vcpu(p, c)),
            Op::Loopback(rp) => {
                let got = (|| {
                    let lp = e.bind_interdomain_local(DOMID_SELF, rp)?;
                    if let Err(err) = e.connect_remote(rp, DOM, lp) {
                        assert!(e.abort_interdomain(lp));
                        return Err(err);
                    }
                    Ok((lp, e.set_pending(lp, m)))
                })();
                assert_eq!(got, r.loopback(rp));
            }
            Op::Close(p) => {
                let got = e.close(p, m);
                assert_eq!(got, r.close(p));
                if let Ok(Closed::Interdomain {
                    port,
                    remote_dom,
                    remote_port,
                }) = got
                {
                    assert_eq!(remote_dom, DOM);
                    e.peer_closed(remote_port, DOM, port);
                    r.peer_closed(remote_port, DOM, port);
                }
            }
            Op::Status(p) => assert_eq!(e.status(p), r.status(p)),
            Op::Unmask(p) => assert_eq!(e.unmask(p, m), r.unmask(p)),
            Op::Send(p) => {
                let got = e.send(p, m);
                assert_eq!(got, r.send(p));
                if let Ok(Delivery::Interdomain {
                    remote_dom,
                    remote_port,
                }) = got
                {
                    assert_eq!(remote_dom, DOM);
                    assert_eq!(e.set_pending(remote_port, m), r.raise(remote_port));
                }
            }
            Op::SetPending(p) => assert_eq!(e.set_pending(p, m), r.raise(p)),
            Op::RaiseVirq(v, c) => {
                let want = r.virq_bound(v, c).map(|p| r.raise(p));
                assert_eq!(e.raise_virq(v, c, m), want);
            }
            Op::HypNotify(p) => {
                let want = (r.live(p).map(|s| s.0) == Some(MState::Hyp)).then(|| r.raise(p));
                assert_eq!(e.hypervisor_notify(p, m), want);
            }
            Op::GuestMask(p)
            | Op::GuestUnmask(p)
            | Op::GuestClearPending(p)
            | Op::GuestSetPending(p)
                if p < 4096 =>
            {
                let (words, on) = match op {
                    Op::GuestMask(_) => (0, true),
                    Op::GuestUnmask(_) => (0, false),
                    Op::GuestClearPending(_) => (1, false),
                    _ => (1, true),
                };
                for mem in [&mut *m, &mut r.mem] {
                    let w = if words == 0 {
                        &mut mem.mask
                    } else {
                        &mut mem.pending
                    };
                    put(w, p, on);
                }
            }
            Op::GuestAck(c) if c < NV => {
                m.ack(c);
                r.mem.ack(c);
            }
            Op::GuestClearUpcall(c) if c < NV => {
                m.upcall[c as usize] = false;
                r.mem.upcall[c as usize] = false;
            }
            Op::GuestClearSel(c) if c < NV => {
                m.sel[c as usize] = 0;
                r.mem.sel[c as usize] = 0;
            }
            Op::Reset => {
                let got = e.reset(m);
                let mut want = Vec::new();
                for p in 1..r.st.len() as u32 {
                    if let Ok(c) = r.close(p) {
                        if c != Closed::Local {
                            want.push(c);
                        }
                    }
                }
                assert_eq!(got, want);
            }
            _ => {}
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(512))]

        #[test]
        fn engine_matches_reference_model(
            max in prop_oneof![Just(4u32), Just(8), Just(70), Just(4096), any::<u32>()],
            handler in any::<bool>(),
            ops in proptest::collection::vec(op(), 1..120),
        ) {
            let mut e = EventChannels::new(DOM, NV, max);
            e.set_global_virq_handler(handler);
            let mut m = FakeMem::new(NV);
            let mut r = Model::new(NV, max, handler);
            for op in &ops {
                step(op, &mut e, &mut m, &mut r);
                prop_assert_eq!(&m, &r.mem, "guest bits after {:?}", op);
                let live = r.st.iter().filter(|s| !matches!(s.0, MState::Free | MState::Reserved)).count();
                prop_assert_eq!(e.active_ports() as usize, live);
                let k = e.counters();
                prop_assert_eq!(k.raised, k.delivered + k.suppressed_masked + k.suppressed_pending);
                prop_assert!(k.upcalls <= k.delivered + k.unmask_redeliveries);
            }
            for p in 0..4100 {
                prop_assert_eq!(e.status(p), r.status(p));
            }
            for v in 0..NR_VIRQS as u32 {
                for c in 0..NV {
                    prop_assert_eq!(e.virq_port(v, c), r.virq_bound(v, c));
                }
            }
        }
    }
}
