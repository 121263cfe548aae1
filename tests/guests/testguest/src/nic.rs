//! `test=dma-granter` and `test=dma-nic`: a NIC's DMA lands in a granted page through
//! the IOMMU, and stops landing there once the grant is unmapped.
//!
//! The granter (domid 1) grants ref [`peer::GREF`] on one page to the NIC owner and
//! fills it with a pattern. The NIC owner (domid 2, `pci = [...]` in its config: an
//! e1000e on QEMU's intel-iommu) maps the grant (`GNTMAP_host_map`) at [`GRANT_GPA`], a
//! guest-physical address outside its RAM (as Linux backends map into ballooned-out
//! pages); its IOMMU tables mirror its physmap, so the NIC reaches the page there. It
//! drives the NIC, whose frames come back to it (QEMU's
//! `-netdev dgram` sends them to its own port), and:
//! 1. receives frame 1 into the grant mapping; the granter must find frame 1's bytes;
//! 2. unmaps the grant and receives frame 2 at the same address: the IOMMU must block
//!    the write (the hypervisor reports the fault) and the granter's page must still
//!    hold frame 1;
//! 3. receives frame 3 at [`NEVER_MAPPED_GPA`], an address it never mapped: blocked too.
//!
//! Each side reports its failed steps through the test interface.

use core::sync::atomic::{compiler_fence, AtomicU8, Ordering};

use abi::ferro::Check;

use crate::peer::{self, Page, Steps};
use crate::{arch, console_write, report, shutdown};

pub use abi::ferro::{DMA_GRANT_GPA as GRANT_GPA, DMA_NEVER_MAPPED_GPA as NEVER_MAPPED_GPA};
/// Length of each test frame (Ethernet header included, no FCS).
const FRAME_LEN: usize = 256;

/// Byte `i` of test frame `n`: broadcast destination, a locally administered source,
/// EtherType 0x88b5 (local experimental), then a pattern that differs per frame.
fn frame_byte(n: u8, i: usize) -> u8 {
    match i {
        0..=5 => 0xff,
        6..=11 => [0x02, 0x66, 0x65, 0x72, 0x72, n][i - 6],
        12 => 0x88,
        13 => 0xb5,
        _ => (i as u8).wrapping_mul(13).wrapping_add(n.wrapping_mul(71)),
    }
}

fn frame_matches(page: &Page, n: u8) -> bool {
    (0..FRAME_LEN).all(|i| page.byte(i) == frame_byte(n, i))
}

fn granter_pattern(i: usize) -> u8 {
    (i as u8) ^ 0xc3
}

/// The granter.
pub fn run_granter(peer_dom: u16) -> ! {
    let mut s = Steps::new("dma-granter");
    console_write("testguest: dma-granter: granting a page to the NIC owner\n");
    let (port, shared) = peer::grant_page_to(&mut s, peer_dom, granter_pattern);
    let rc = peer::wait(port);
    s.check("woken: frame 1 received", rc == 0, rc);
    s.check(
        "frame 1 is in the granted page (DMA through the IOMMU)",
        frame_matches(shared, 1),
        0,
    );
    s.check(
        "the rest of the page is untouched",
        (FRAME_LEN..4096).all(|i| shared.byte(i) == granter_pattern(i)),
        0,
    );
    let rc = peer::evtchn_send(port);
    s.check("event to the NIC owner", rc == 0, rc);
    let rc = peer::wait(port);
    s.check("woken: grant unmapped, frames 2 and 3 sent", rc == 0, rc);
    let changed = (0..4096)
        .filter(|&i| {
            let want = if i < FRAME_LEN {
                frame_byte(1, i)
            } else {
                granter_pattern(i)
            };
            shared.byte(i) != want
        })
        .count();
    s.check(
        "page unchanged after the unmap (bytes written)",
        changed == 0,
        changed as i64,
    );
    peer::end_access();
    let rc = peer::evtchn_send(port);
    s.check("last event to the NIC owner", rc == 0, rc);
    report(Check::DmaGranter, s.failed, s.done);
    shutdown(abi::hypercall::SHUTDOWN_POWEROFF)
}

// ---- PCI configuration space (ports 0xcf8/0xcfc) -------------------------------

fn pci_read32(bdf: u16, off: u8) -> u32 {
    arch::outl(
        0xcf8,
        0x8000_0000 | (u32::from(bdf) << 8) | u32::from(off & 0xfc),
    );
    arch::inl(0xcfc)
}

fn pci_write32(bdf: u16, off: u8, v: u32) {
    arch::outl(
        0xcf8,
        0x8000_0000 | (u32::from(bdf) << 8) | u32::from(off & 0xfc),
    );
    arch::outl(0xcfc, v);
}

/// The first e1000e (8086:10d3) on bus 0 the hypervisor lets this domain see.
fn find_e1000e() -> Option<u16> {
    (0u16..256).find(|&bdf| pci_read32(bdf, 0) == 0x10d3_8086)
}

// ---- e1000e registers --------------------------------------------------------------

const CTRL: u64 = 0x0000;
const STATUS: u64 = 0x0008;
const IMC: u64 = 0x00d8;
const RCTL: u64 = 0x0100;
const TCTL: u64 = 0x0400;
const RDBAL: u64 = 0x2800;
const RDBAH: u64 = 0x2804;
const RDLEN: u64 = 0x2808;
const RDH: u64 = 0x2810;
const RDT: u64 = 0x2818;
const TDBAL: u64 = 0x3800;
const TDBAH: u64 = 0x3804;
const TDLEN: u64 = 0x3808;
const TDH: u64 = 0x3810;
const TDT: u64 = 0x3818;
const RAL0: u64 = 0x5400;
const RAH0: u64 = 0x5404;

const CTRL_SLU: u32 = 1 << 6;
const CTRL_RST: u32 = 1 << 26;
const STATUS_LU: u32 = 1 << 1;
/// Enable, unicast + multicast promiscuous, broadcast accept, 2 KiB buffers, strip CRC.
const RCTL_VALUE: u32 = (1 << 1) | (1 << 3) | (1 << 4) | (1 << 15) | (1 << 26);
/// Enable, pad short packets, collision threshold 15, collision distance 64.
const TCTL_VALUE: u32 = (1 << 1) | (1 << 3) | (0x0f << 4) | (0x40 << 12);

/// Ring length in descriptors (128 bytes: the smallest ring the NIC takes).
const RING: usize = 8;

#[repr(C, align(4096))]
struct Rings {
    rx: [[AtomicU8; 16]; RING],
    _pad: [u8; 2048 - 16 * RING],
    tx: [[AtomicU8; 16]; RING],
}

static RINGS: Rings = Rings {
    rx: [const { [const { AtomicU8::new(0) }; 16] }; RING],
    _pad: [0; 2048 - 16 * RING],
    tx: [const { [const { AtomicU8::new(0) }; 16] }; RING],
};
/// Transmit buffer (the NIC reads it through the IOMMU's mirror of this domain's RAM).
static TX_BUF: Page = Page::new();

fn desc_write(d: &[AtomicU8; 16], addr: u64, word2: u64) {
    for (i, b) in addr.to_le_bytes().into_iter().enumerate() {
        d[i].store(b, Ordering::Relaxed);
    }
    for (i, b) in word2.to_le_bytes().into_iter().enumerate() {
        d[8 + i].store(b, Ordering::Relaxed);
    }
    compiler_fence(Ordering::SeqCst);
}

struct Nic {
    bar: u64,
    next: usize,
}

impl Nic {
    fn reg(&self, off: u64) -> u32 {
        // SAFETY: BAR0 of the assigned NIC lies below 4 GiB (checked when it was read),
        // in this guest's identity map; registers are 4-byte aligned.
        unsafe { arch::read32(self.bar + off) }
    }
    fn set(&self, off: u64, v: u32) {
        // SAFETY: as in `reg`.
        unsafe { arch::write32(self.bar + off, v) }
    }

    /// Resets the NIC and brings up its rings; `None` (with a console line) on failure.
    fn init(bdf: u16) -> Option<Nic> {
        let bar0 = pci_read32(bdf, 0x10);
        if bar0 & 1 != 0 || bar0 & !0xf == 0 {
            console_write("testguest: dma-nic: BAR0 is not an assigned memory BAR\n");
            return None;
        }
        let mut bar = u64::from(bar0 & !0xf);
        if (bar0 >> 1) & 3 == 2 {
            bar |= u64::from(pci_read32(bdf, 0x14)) << 32;
        }
        if bar >= 1 << 32 {
            console_write("testguest: dma-nic: BAR0 is above 4 GiB (not in the identity map)\n");
            return None;
        }
        // memory space + bus master
        let cmd = pci_read32(bdf, 4);
        pci_write32(bdf, 4, (cmd & 0xffff) | 0x6);
        let nic = Nic { bar, next: 0 };
        nic.set(IMC, !0);
        nic.set(CTRL, nic.reg(CTRL) | CTRL_RST);
        let mut ok = false;
        for _ in 0..100_000 {
            if nic.reg(CTRL) & CTRL_RST == 0 {
                ok = true;
                break;
            }
        }
        if !ok {
            console_write("testguest: dma-nic: the NIC did not come out of reset\n");
            return None;
        }
        nic.set(IMC, !0);
        nic.set(CTRL, nic.reg(CTRL) | CTRL_SLU);
        ok = false;
        for _ in 0..1_000_000 {
            if nic.reg(STATUS) & STATUS_LU != 0 {
                ok = true;
                break;
            }
        }
        if !ok {
            console_write("testguest: dma-nic: no link\n");
            return None;
        }
        nic.set(RAL0, 0x7265_6602);
        nic.set(RAH0, 0x0000_0172 | (1 << 31));
        let rings = &RINGS as *const Rings as u64;
        nic.set(RDBAL, rings as u32);
        nic.set(RDBAH, (rings >> 32) as u32);
        nic.set(RDLEN, (16 * RING) as u32);
        nic.set(RDH, 0);
        nic.set(RDT, 0);
        let tx = rings + 2048;
        nic.set(TDBAL, tx as u32);
        nic.set(TDBAH, (tx >> 32) as u32);
        nic.set(TDLEN, (16 * RING) as u32);
        nic.set(TDH, 0);
        nic.set(TDT, 0);
        nic.set(RCTL, RCTL_VALUE);
        nic.set(TCTL, TCTL_VALUE);
        Some(nic)
    }

    /// Posts one receive buffer at `rx_gpa`, sends frame `n`, and waits until the NIC
    /// is done with both descriptors. Returns (the frame went out, the receive
    /// descriptor's length and status).
    fn loop_frame(&mut self, n: u8, rx_gpa: u64) -> (bool, u16, u8) {
        let i = self.next;
        self.next = (i + 1) % RING;
        desc_write(&RINGS.rx[i], rx_gpa, 0);
        self.set(RDT, self.next as u32);
        TX_BUF.fill(|j| if j < FRAME_LEN { frame_byte(n, j) } else { 0 });
        // length, CSO 0, CMD = EOP | IFCS | RS
        let word2 = FRAME_LEN as u64 | (0x0b << 24);
        desc_write(&RINGS.tx[i], TX_BUF.addr(), word2);
        self.set(TDT, self.next as u32);
        let mut sent = false;
        for _ in 0..2_000_000 {
            if RINGS.tx[i][12].load(Ordering::SeqCst) & 1 != 0 {
                sent = true;
                break;
            }
        }
        // The frame comes back through QEMU's dgram socket: wait for the receive
        // descriptor (written back even when the buffer write was blocked). Mostly the
        // descriptor in RAM is polled, yielding in between: every register read takes
        // QEMU's device lock, which its network thread needs to deliver the frame.
        let mut status = 0;
        for n in 0..2_000_000u32 {
            status = RINGS.rx[i][12].load(Ordering::SeqCst);
            if status & 1 != 0 {
                break;
            }
            if n % 256 == 255 && self.reg(RDH) as usize == self.next {
                status = RINGS.rx[i][12].load(Ordering::SeqCst);
                break;
            }
            peer::yield_now();
        }
        let len = u16::from_le_bytes([
            RINGS.rx[i][8].load(Ordering::SeqCst),
            RINGS.rx[i][9].load(Ordering::SeqCst),
        ]);
        (sent, len, status)
    }
}

/// The NIC owner.
pub fn run_nic(peer_dom: u16) -> ! {
    let mut s = Steps::new("dma-nic");
    console_write("testguest: dma-nic: looking for the assigned e1000e\n");
    let port = peer::bind_to_peer(&mut s, peer_dom);
    let bdf = find_e1000e();
    s.check(
        "e1000e visible in config space",
        bdf.is_some(),
        i64::from(bdf.unwrap_or(0xffff)),
    );
    let Some(mut nic) = bdf.and_then(Nic::init) else {
        report(Check::DmaNic, s.failed + 1, s.done + 1);
        shutdown(abi::hypercall::SHUTDOWN_POWEROFF)
    };
    s.check("NIC reset, link up, rings set", true, 0);

    // GNTMAP_host_map only, as Linux backends running as PVH map: this domain's IOMMU
    // tables mirror its physmap, so the NIC reaches the page at the same address.
    let (st, handle) = peer::map_grant_at(GRANT_GPA, peer_dom, false);
    s.check("grant mapped into the physmap", st == 0, i64::from(st));
    let (sent, len, status) = nic.loop_frame(1, GRANT_GPA);
    s.check("frame 1 sent", sent, 0);
    s.check(
        "frame 1 received into the grant mapping (length)",
        status & 1 != 0 && usize::from(len) == FRAME_LEN,
        i64::from(len),
    );
    let rc = peer::evtchn_send(port);
    s.check("event to the granter", rc == 0, rc);
    let rc = peer::wait(port);
    s.check("woken by the granter", rc == 0, rc);

    let st = peer::unmap_grant_at(GRANT_GPA, handle);
    s.check("grant unmapped", st == 0, i64::from(st));
    console_write("testguest: dma-nic: frame 2 to the unmapped grant address\n");
    let (sent, _, _) = nic.loop_frame(2, GRANT_GPA);
    s.check("frame 2 sent", sent, 0);
    // Let the hypervisor read the unit's fault record before the next fault: QEMU folds
    // a fault into a pending record of the same device.
    for _ in 0..5 {
        peer::yield_now();
    }
    console_write("testguest: dma-nic: frame 3 to an address never mapped\n");
    let (sent, _, _) = nic.loop_frame(3, NEVER_MAPPED_GPA);
    s.check("frame 3 sent", sent, 0);
    let rc = peer::evtchn_send(port);
    s.check("event to the granter", rc == 0, rc);
    let rc = peer::wait(port);
    s.check("woken by the granter's last event", rc == 0, rc);
    report(Check::DmaNic, s.failed, s.done);
    shutdown(abi::hypercall::SHUTDOWN_POWEROFF)
}
