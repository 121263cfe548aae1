//! `HYPERVISOR_event_channel_op` (hypercall 32): `EVTCHNOP_*` numbers, argument
//! structures, `EVTCHNSTAT_*`, `VIRQ_*` and the domain ids that appear in them.
//!
//! Sources read (xen-project/xen, staging, 2026): `xen/include/public/event_channel.h`
//! (operation numbers, argument structs, FIFO constants), `xen/include/public/xen.h`
//! (`VIRQ_*` with their V/D/G classification, `NR_VIRQS` = 24, `DOMID_*`),
//! `xen/arch/x86/include/asm/event.h` (every `VIRQ_ARCH_*` is global on x86),
//! `xen/include/public/arch-x86/xen-mca.h` (`VIRQ_MCA` = `VIRQ_ARCH_0`).
//!
//! Every argument struct has `SIZE`, `from_bytes(&[u8; SIZE])`, `to_bytes()` and
//! `read(&[u8])`: the hypervisor copies the guest's structure ONCE into a byte array,
//! decodes the copy, and writes back the encoding of the (updated) copy. Layouts are
//! x86_64 (`domid_t` = u16, `evtchn_port_t` = u32, natural alignment) and pinned by
//! `const` assertions on size and every field offset.

/// `__HYPERVISOR_event_channel_op`.
pub const HYPERVISOR_EVENT_CHANNEL_OP: u64 = 32;

/// `EVTCHNOP_bind_interdomain` ([`EvtchnBindInterdomain`]).
pub const EVTCHNOP_BIND_INTERDOMAIN: u32 = 0;
/// `EVTCHNOP_bind_virq` ([`EvtchnBindVirq`]).
pub const EVTCHNOP_BIND_VIRQ: u32 = 1;
/// `EVTCHNOP_bind_pirq` ([`EvtchnBindPirq`]).
pub const EVTCHNOP_BIND_PIRQ: u32 = 2;
/// `EVTCHNOP_close` ([`EvtchnClose`]).
pub const EVTCHNOP_CLOSE: u32 = 3;
/// `EVTCHNOP_send` ([`EvtchnSend`]).
pub const EVTCHNOP_SEND: u32 = 4;
/// `EVTCHNOP_status` ([`EvtchnStatus`]).
pub const EVTCHNOP_STATUS: u32 = 5;
/// `EVTCHNOP_alloc_unbound` ([`EvtchnAllocUnbound`]).
pub const EVTCHNOP_ALLOC_UNBOUND: u32 = 6;
/// `EVTCHNOP_bind_ipi` ([`EvtchnBindIpi`]).
pub const EVTCHNOP_BIND_IPI: u32 = 7;
/// `EVTCHNOP_bind_vcpu` ([`EvtchnBindVcpu`]).
pub const EVTCHNOP_BIND_VCPU: u32 = 8;
/// `EVTCHNOP_unmask` ([`EvtchnUnmask`]).
pub const EVTCHNOP_UNMASK: u32 = 9;
/// `EVTCHNOP_reset` ([`EvtchnReset`]).
pub const EVTCHNOP_RESET: u32 = 10;
/// `EVTCHNOP_init_control` ([`EvtchnInitControl`], FIFO ABI).
pub const EVTCHNOP_INIT_CONTROL: u32 = 11;
/// `EVTCHNOP_expand_array` ([`EvtchnExpandArray`], FIFO ABI).
pub const EVTCHNOP_EXPAND_ARRAY: u32 = 12;
/// `EVTCHNOP_set_priority` ([`EvtchnSetPriority`], FIFO ABI).
pub const EVTCHNOP_SET_PRIORITY: u32 = 13;
/// `EVTCHNOP_reset_cont`: Xen-internal continuation of `EVTCHNOP_reset` (defined only
/// under `__XEN__`; Xen accepts it from guests like `EVTCHNOP_reset`).
pub const EVTCHNOP_RESET_CONT: u32 = 14;

/// `EVTCHNSTAT_closed`: the channel is not in use.
pub const EVTCHNSTAT_CLOSED: u32 = 0;
/// `EVTCHNSTAT_unbound`: waiting for an interdomain connection.
pub const EVTCHNSTAT_UNBOUND: u32 = 1;
/// `EVTCHNSTAT_interdomain`: connected to a remote domain.
pub const EVTCHNSTAT_INTERDOMAIN: u32 = 2;
/// `EVTCHNSTAT_pirq`: bound to a physical IRQ.
pub const EVTCHNSTAT_PIRQ: u32 = 3;
/// `EVTCHNSTAT_virq`: bound to a virtual IRQ.
pub const EVTCHNSTAT_VIRQ: u32 = 4;
/// `EVTCHNSTAT_ipi`: bound to a virtual IPI.
pub const EVTCHNSTAT_IPI: u32 = 5;

/// `VIRQ_TIMER` (per-vCPU): timebase update or requested timeout.
pub const VIRQ_TIMER: u32 = 0;
/// `VIRQ_DEBUG` (per-vCPU): request to dump debug info.
pub const VIRQ_DEBUG: u32 = 1;
/// `VIRQ_CONSOLE` (global): bytes received on the emergency console.
pub const VIRQ_CONSOLE: u32 = 2;
/// `VIRQ_DOM_EXC` (global): exceptional event for some domain.
pub const VIRQ_DOM_EXC: u32 = 3;
/// `VIRQ_TBUF` (global): trace buffer has records.
pub const VIRQ_TBUF: u32 = 4;
/// `VIRQ_DEBUGGER` (global): a domain paused for debugging.
pub const VIRQ_DEBUGGER: u32 = 6;
/// `VIRQ_XENOPROF` (per-vCPU): oprofile sample.
pub const VIRQ_XENOPROF: u32 = 7;
/// `VIRQ_CON_RING` (global): bytes received on the console ring.
pub const VIRQ_CON_RING: u32 = 8;
/// `VIRQ_PCPU_STATE` (global): pCPU state changed.
pub const VIRQ_PCPU_STATE: u32 = 9;
/// `VIRQ_MEM_EVENT` (global): a memory event occurred.
pub const VIRQ_MEM_EVENT: u32 = 10;
/// `VIRQ_ARGO` (per-domain): Argo message notification.
pub const VIRQ_ARGO: u32 = 11;
/// `VIRQ_ENOMEM` (global): low on heap memory.
pub const VIRQ_ENOMEM: u32 = 12;
/// `VIRQ_XENPMU` (per-vCPU): PMC interrupt.
pub const VIRQ_XENPMU: u32 = 13;
/// `VIRQ_ARCH_0`, first architecture VIRQ (x86: `VIRQ_MCA`); `VIRQ_ARCH_0..=7` are 16..=23.
pub const VIRQ_ARCH_0: u32 = 16;
/// `VIRQ_MCA` (x86, global): machine-check event.
pub const VIRQ_MCA: u32 = VIRQ_ARCH_0;
/// `VIRQ_ARCH_7`, last architecture VIRQ.
pub const VIRQ_ARCH_7: u32 = 23;
/// `NR_VIRQS`.
pub const NR_VIRQS: usize = 24;

/// How a VIRQ may be bound (the V/D/G classification in xen.h, as `get_virq_type()` in
/// `xen/common/event_channel.c` applies it on x86).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum VirqKind {
    /// Bound once per vCPU, on that vCPU; cannot be moved (`VIRQ_VCPU`).
    PerVcpu,
    /// Bound once per domain on vCPU 0, may be moved with bind_vcpu (`VIRQ_DOMAIN`).
    PerDomain,
    /// Like per-domain, and only the domain designated as its handler may bind it
    /// (`VIRQ_GLOBAL`).
    Global,
}

/// Classifies `virq`; `None` when `virq >= NR_VIRQS`.
pub const fn virq_kind(virq: u32) -> Option<VirqKind> {
    match virq {
        VIRQ_TIMER | VIRQ_DEBUG | VIRQ_XENOPROF | VIRQ_XENPMU => Some(VirqKind::PerVcpu),
        VIRQ_ARGO => Some(VirqKind::PerDomain),
        v if (v as usize) < NR_VIRQS => Some(VirqKind::Global),
        _ => None,
    }
}

/// `DOMID_FIRST_RESERVED`: ids from here up are not ordinary domains.
pub const DOMID_FIRST_RESERVED: u16 = 0x7ff0;
/// `DOMID_SELF`: the calling domain.
pub const DOMID_SELF: u16 = 0x7ff0;
/// `DOMID_IO`.
pub const DOMID_IO: u16 = 0x7ff1;
/// `DOMID_XEN`: the hypervisor itself.
pub const DOMID_XEN: u16 = 0x7ff2;
/// `DOMID_COW`.
pub const DOMID_COW: u16 = 0x7ff3;
/// `DOMID_INVALID`.
pub const DOMID_INVALID: u16 = 0x7ff4;
/// `DOMID_IDLE`.
pub const DOMID_IDLE: u16 = 0x7fff;

/// `EVTCHN_2L_NR_CHANNELS` on x86_64: 64 words of 64 bits.
pub const EVTCHN_2L_NR_CHANNELS: u32 = 64 * 64;
/// `BIND_PIRQ__WILL_SHARE` ([`EvtchnBindPirq::flags`]).
pub const BIND_PIRQ_WILL_SHARE: u32 = 1;

/// `EVTCHN_FIFO_PRIORITY_MAX` (highest).
pub const EVTCHN_FIFO_PRIORITY_MAX: u32 = 0;
/// `EVTCHN_FIFO_PRIORITY_DEFAULT`.
pub const EVTCHN_FIFO_PRIORITY_DEFAULT: u32 = 7;
/// `EVTCHN_FIFO_PRIORITY_MIN` (lowest).
pub const EVTCHN_FIFO_PRIORITY_MIN: u32 = 15;
/// `EVTCHN_FIFO_MAX_QUEUES`.
pub const EVTCHN_FIFO_MAX_QUEUES: usize = 16;
/// `EVTCHN_FIFO_PENDING` bit of an event word.
pub const EVTCHN_FIFO_PENDING: u32 = 31;
/// `EVTCHN_FIFO_MASKED` bit of an event word.
pub const EVTCHN_FIFO_MASKED: u32 = 30;
/// `EVTCHN_FIFO_LINKED` bit of an event word.
pub const EVTCHN_FIFO_LINKED: u32 = 29;
/// `EVTCHN_FIFO_BUSY` bit of an event word.
pub const EVTCHN_FIFO_BUSY: u32 = 28;
/// `EVTCHN_FIFO_LINK_BITS`.
pub const EVTCHN_FIFO_LINK_BITS: u32 = 17;
/// `EVTCHN_FIFO_LINK_MASK`.
pub const EVTCHN_FIFO_LINK_MASK: u32 = (1 << EVTCHN_FIFO_LINK_BITS) - 1;
/// `EVTCHN_FIFO_NR_CHANNELS`.
pub const EVTCHN_FIFO_NR_CHANNELS: u32 = 1 << EVTCHN_FIFO_LINK_BITS;
/// Size of `struct evtchn_fifo_control_block` (ready u32, rsvd u32, head[16] u32).
pub const EVTCHN_FIFO_CONTROL_BLOCK_SIZE: usize = 72;
/// Offset of `ready` (one bit per priority queue) in the control block.
pub const EVTCHN_FIFO_CONTROL_READY_OFFSET: u32 = 0;
/// Offset of `head[0]` in the control block (after `ready` and `_rsvd`); `head[q]` is at
/// `EVTCHN_FIFO_CONTROL_HEAD_OFFSET + 4 * q`.
pub const EVTCHN_FIFO_CONTROL_HEAD_OFFSET: u32 = 8;
/// Required alignment of `evtchn_init_control.offset` (Xen: "must be 8-bytes aligned").
pub const EVTCHN_FIFO_CONTROL_ALIGN: u32 = 8;
/// Event words (`event_word_t`, u32) per event-array page (Xen's
/// `EVTCHN_FIFO_EVENT_WORDS_PER_PAGE`, 4096 / 4).
pub const EVTCHN_FIFO_EVENT_WORDS_PER_PAGE: u32 = 1024;
/// Most event-array pages a domain may add (Xen's `EVTCHN_FIFO_MAX_EVENT_ARRAY_PAGES`,
/// `EVTCHN_FIFO_NR_CHANNELS / EVTCHN_FIFO_EVENT_WORDS_PER_PAGE`).
pub const EVTCHN_FIFO_MAX_EVENT_ARRAY_PAGES: u32 =
    EVTCHN_FIFO_NR_CHANNELS / EVTCHN_FIFO_EVENT_WORDS_PER_PAGE;

const _: () = assert!(
    EVTCHN_FIFO_CONTROL_HEAD_OFFSET as usize + 4 * EVTCHN_FIFO_MAX_QUEUES
        == EVTCHN_FIFO_CONTROL_BLOCK_SIZE
);
const _: () = assert!(EVTCHN_FIFO_MAX_EVENT_ARRAY_PAGES == 128);

use crate::wire::wire_struct;

wire_struct! {
    /// `struct evtchn_alloc_unbound`: allocate a port in `dom` accepting a binding from
    /// `remote_dom` (`DOMID_SELF` allowed for both).
    EvtchnAllocUnbound, 8, {
        /// IN: domain to allocate in (unprivileged callers: `DOMID_SELF`).
        dom: u16 = 0,
        /// IN: domain allowed to bind the port.
        remote_dom: u16 = 2,
        /// OUT: the new port.
        port: u32 = 4,
    }
}

wire_struct! {
    /// `struct evtchn_bind_interdomain`: connect to an unbound port of `remote_dom`.
    EvtchnBindInterdomain, 12, {
        /// IN: remote domain (`DOMID_SELF` for loopback).
        remote_dom: u16 = 0,
        /// IN: remote port, unbound and accepting the caller.
        remote_port: u32 = 4,
        /// OUT: the new local port.
        local_port: u32 = 8,
    }
}

wire_struct! {
    /// `struct evtchn_bind_virq`.
    EvtchnBindVirq, 12, {
        /// IN: `VIRQ_*`.
        virq: u32 = 0,
        /// IN: vCPU to bind on (0 for per-domain and global VIRQs).
        vcpu: u32 = 4,
        /// OUT: the new port.
        port: u32 = 8,
    }
}

wire_struct! {
    /// `struct evtchn_bind_pirq`.
    EvtchnBindPirq, 12, {
        /// IN: physical IRQ.
        pirq: u32 = 0,
        /// IN: `BIND_PIRQ__*`.
        flags: u32 = 4,
        /// OUT: the new port.
        port: u32 = 8,
    }
}

wire_struct! {
    /// `struct evtchn_bind_ipi`.
    EvtchnBindIpi, 8, {
        /// IN: vCPU to notify.
        vcpu: u32 = 0,
        /// OUT: the new port.
        port: u32 = 4,
    }
}

wire_struct! {
    /// `struct evtchn_close`.
    EvtchnClose, 4, {
        /// IN: port to close.
        port: u32 = 0,
    }
}

wire_struct! {
    /// `struct evtchn_send`.
    EvtchnSend, 4, {
        /// IN: local port whose remote end is notified.
        port: u32 = 0,
    }
}

wire_struct! {
    /// `struct evtchn_status`. The union `u` is kept as raw bytes: use the accessors.
    /// Xen writes only the union member of the reported status and leaves the other
    /// bytes as the guest passed them; encoding an updated copy does the same.
    EvtchnStatus, 24, {
        /// IN: domain (`DOMID_SELF`, or another one for privileged callers).
        dom: u16 = 0,
        /// IN: port.
        port: u32 = 4,
        /// OUT: `EVTCHNSTAT_*`.
        status: u32 = 8,
        /// OUT: vCPU the channel notifies.
        vcpu: u32 = 12,
        /// OUT: union { unbound.dom u16; interdomain { dom u16, port u32 }; pirq u32; virq u32 }.
        u: [u8; 8] = 16,
    }
}

impl EvtchnStatus {
    /// `u.unbound.dom` / `u.interdomain.dom`.
    pub fn u_dom(&self) -> u16 {
        u16::from_le_bytes([self.u[0], self.u[1]])
    }
    /// Sets `u.unbound.dom` / `u.interdomain.dom`.
    pub fn set_u_dom(&mut self, dom: u16) {
        self.u[0..2].copy_from_slice(&dom.to_le_bytes());
    }
    /// `u.interdomain.port`.
    pub fn u_port(&self) -> u32 {
        u32::from_le_bytes([self.u[4], self.u[5], self.u[6], self.u[7]])
    }
    /// Sets `u.interdomain.port`.
    pub fn set_u_port(&mut self, port: u32) {
        self.u[4..8].copy_from_slice(&port.to_le_bytes());
    }
    /// `u.virq` / `u.pirq`.
    pub fn u_word(&self) -> u32 {
        u32::from_le_bytes([self.u[0], self.u[1], self.u[2], self.u[3]])
    }
    /// Sets `u.virq` / `u.pirq`.
    pub fn set_u_word(&mut self, v: u32) {
        self.u[0..4].copy_from_slice(&v.to_le_bytes());
    }
}

wire_struct! {
    /// `struct evtchn_bind_vcpu`.
    EvtchnBindVcpu, 8, {
        /// IN: port.
        port: u32 = 0,
        /// IN: vCPU to notify from now on.
        vcpu: u32 = 4,
    }
}

wire_struct! {
    /// `struct evtchn_unmask`.
    EvtchnUnmask, 4, {
        /// IN: port.
        port: u32 = 0,
    }
}

wire_struct! {
    /// `struct evtchn_reset`.
    EvtchnReset, 2, {
        /// IN: domain (`DOMID_SELF`, or another one for privileged callers).
        dom: u16 = 0,
    }
}

wire_struct! {
    /// `struct evtchn_init_control` (FIFO ABI).
    EvtchnInitControl, 24, {
        /// IN: guest frame of the control block.
        control_gfn: u64 = 0,
        /// IN: offset of the control block in that frame.
        offset: u32 = 8,
        /// IN: vCPU the control block belongs to.
        vcpu: u32 = 12,
        /// OUT: `EVTCHN_FIFO_LINK_BITS`.
        link_bits: u8 = 16,
        /// Padding.
        pad: [u8; 7] = 17,
    }
}

wire_struct! {
    /// `struct evtchn_expand_array` (FIFO ABI).
    EvtchnExpandArray, 8, {
        /// IN: guest frame of the next event-array page.
        array_gfn: u64 = 0,
    }
}

wire_struct! {
    /// `struct evtchn_set_priority` (FIFO ABI).
    EvtchnSetPriority, 8, {
        /// IN: port.
        port: u32 = 0,
        /// IN: priority, `EVTCHN_FIFO_PRIORITY_MAX..=MIN`.
        priority: u32 = 4,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bind_interdomain_has_padding_after_domid() {
        let mut b = [0u8; EvtchnBindInterdomain::SIZE];
        b[0..2].copy_from_slice(&1u16.to_le_bytes());
        b[2..4].copy_from_slice(&[0xaa, 0xbb]); // padding, ignored
        b[4..8].copy_from_slice(&7u32.to_le_bytes());
        b[8..12].copy_from_slice(&0xffff_ffffu32.to_le_bytes());
        let s = EvtchnBindInterdomain::from_bytes(&b);
        assert_eq!(
            s,
            EvtchnBindInterdomain {
                remote_dom: 1,
                remote_port: 7,
                local_port: u32::MAX
            }
        );
        let out = s.to_bytes();
        assert_eq!(&out[2..4], &[0, 0]);
        assert_eq!(&out[4..], &b[4..]);
    }

    #[test]
    fn alloc_unbound_and_virq_round_trip() {
        let a = EvtchnAllocUnbound {
            dom: DOMID_SELF,
            remote_dom: 0,
            port: 5,
        };
        assert_eq!(a.to_bytes(), [0xf0, 0x7f, 0, 0, 5, 0, 0, 0]);
        assert_eq!(EvtchnAllocUnbound::from_bytes(&a.to_bytes()), a);
        let v = EvtchnBindVirq {
            virq: VIRQ_TIMER,
            vcpu: 3,
            port: 0,
        };
        assert_eq!(EvtchnBindVirq::read(&v.to_bytes()), Some(v));
        assert_eq!(EvtchnBindVirq::read(&[0u8; 11]), None);
        assert_eq!(
            EvtchnBindVirq::read(&[1u8; 40]).map(|v| v.vcpu),
            Some(0x0101_0101)
        );
    }

    #[test]
    fn status_union_accessors() {
        let mut s = EvtchnStatus::from_bytes(&[0xee; 24]);
        s.status = EVTCHNSTAT_INTERDOMAIN;
        s.set_u_dom(3);
        s.set_u_port(9);
        let b = s.to_bytes();
        assert_eq!(&b[16..18], &3u16.to_le_bytes());
        assert_eq!(&b[18..20], &[0xee, 0xee]); // union padding untouched
        assert_eq!(&b[20..24], &9u32.to_le_bytes());
        assert_eq!((s.u_dom(), s.u_port()), (3, 9));
        s.set_u_word(VIRQ_DEBUG);
        assert_eq!(s.u_word(), VIRQ_DEBUG);
    }

    #[test]
    fn init_control_layout() {
        let c = EvtchnInitControl {
            control_gfn: 0x1234,
            offset: 8,
            vcpu: 1,
            link_bits: 17,
            pad: [0; 7],
        };
        let b = c.to_bytes();
        assert_eq!(b[16], 17);
        assert_eq!(EvtchnInitControl::from_bytes(&b), c);
    }

    #[test]
    fn fifo_structs_and_constants() {
        assert_eq!(EvtchnInitControl::SIZE, 24);
        assert_eq!(EvtchnExpandArray::SIZE, 8);
        assert_eq!(EvtchnSetPriority::SIZE, 8);
        let e = EvtchnExpandArray {
            array_gfn: 0x1_2345_6789,
        };
        assert_eq!(EvtchnExpandArray::from_bytes(&e.to_bytes()), e);
        let p = EvtchnSetPriority {
            port: 9,
            priority: EVTCHN_FIFO_PRIORITY_MIN,
        };
        assert_eq!(p.to_bytes(), [9, 0, 0, 0, 15, 0, 0, 0]);
        assert_eq!(EVTCHN_FIFO_LINK_MASK, 0x1ffff);
        assert_eq!(EVTCHN_FIFO_NR_CHANNELS, 131_072);
        assert_eq!(
            (
                EVTCHN_FIFO_PENDING,
                EVTCHN_FIFO_MASKED,
                EVTCHN_FIFO_LINKED,
                EVTCHN_FIFO_BUSY
            ),
            (31, 30, 29, 28)
        );
        assert_eq!(EVTCHN_FIFO_MAX_QUEUES, 16);
    }

    #[test]
    fn virq_kinds() {
        assert_eq!(virq_kind(VIRQ_TIMER), Some(VirqKind::PerVcpu));
        assert_eq!(virq_kind(VIRQ_DEBUG), Some(VirqKind::PerVcpu));
        assert_eq!(virq_kind(VIRQ_XENPMU), Some(VirqKind::PerVcpu));
        assert_eq!(virq_kind(VIRQ_ARGO), Some(VirqKind::PerDomain));
        assert_eq!(virq_kind(VIRQ_CONSOLE), Some(VirqKind::Global));
        assert_eq!(virq_kind(5), Some(VirqKind::Global)); // unnamed, still < NR_VIRQS
        assert_eq!(virq_kind(VIRQ_ARCH_7), Some(VirqKind::Global));
        assert_eq!(virq_kind(NR_VIRQS as u32), None);
        assert_eq!(virq_kind(u32::MAX), None);
    }
}
