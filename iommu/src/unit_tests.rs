//! The unit driver against the simulated unit in `sim.rs`.

use std::collections::BTreeMap;

use pagetable::{PageSize, Perms};
use proptest::prelude::*;

use crate::dmar::Bdf;
use crate::regs::{GSTS_QIES, GSTS_RTPS, GSTS_TES};
use crate::sim::*;
use crate::unit::*;

const NIC: Bdf = Bdf::new(0, 2, 0);
const NIC2: Bdf = Bdf::new(0, 3, 0);
const RAM: u64 = 0x4000_0000;
const K4: u64 = 4096;
const M2: u64 = 1 << 21;
const CM: u64 = 1 << 7;
const PSI: u64 = 1 << 39;
const RWBF: u64 = 1 << 4;
const ECAP_C: u64 = 1;
const ECAP_QI: u64 = 1 << 1;
const ECAP_SC: u64 = 1 << 7;
/// `aw-bits=48`: SAGAW 3- and 4-level, MGAW 48.
const CAP48: u64 = (QEMU_CAP & !(0x3f << 16)) | 47 << 16 | 4 << 8;

fn cfg() -> UnitConfig {
    UnitConfig {
        timeout_us: 1000,
        ..UnitConfig::new(0xfed9_0000, 39)
    }
}

fn unit_with(cap: u64, ecap: u64, cfg: UnitConfig) -> (Shared, SimUnit) {
    let sim = Sim::new(cap, ecap);
    let u = SimUnit::new(
        SimRegs(sim.clone()),
        SimMem(sim.clone()),
        SimHost(sim.clone()),
        cfg,
    )
    .map_err(|e| e.0)
    .unwrap();
    (sim, u)
}

fn qemu_unit() -> (Shared, SimUnit) {
    unit_with(QEMU_CAP, QEMU_ECAP, cfg())
}

/// A unit with one domain, `NIC` attached, translation on.
fn ready(cap: u64, ecap: u64) -> (Shared, SimUnit, DomainId) {
    let (sim, mut u) = unit_with(cap, ecap, cfg());
    let d = u.create_domain(48).unwrap();
    u.attach(d, NIC).unwrap();
    u.enable_translation().unwrap();
    (sim, u, d)
}

fn dma_write(sim: &Shared, dev: Bdf, iova: u64, data: &[u8]) -> Result<u64, u8> {
    let mut buf = data.to_vec();
    sim.borrow_mut().dma(dev.source_id(), iova, true, &mut buf)
}

fn dma_read(sim: &Shared, dev: Bdf, iova: u64, len: usize) -> Result<Vec<u8>, u8> {
    let mut buf = vec![0; len];
    sim.borrow_mut()
        .dma(dev.source_id(), iova, false, &mut buf)
        .map(|_| buf)
}

fn ram_bytes(sim: &Shared, pa: u64, len: usize) -> Vec<u8> {
    let mut b = vec![0; len];
    sim.borrow_mut().hw_read(pa, &mut b);
    b
}

#[test]
fn init_sequence_follows_vtd_md() {
    let (sim, mut u) = qemu_unit();
    assert!(u.queued_invalidation());
    {
        let s = sim.borrow();
        assert_eq!(s.gsts & (GSTS_QIES | GSTS_RTPS), GSTS_QIES | GSTS_RTPS);
        assert_eq!(s.gsts & GSTS_TES, 0, "TE only when asked");
        assert!(s.root.is_some());
        // GCMD: QIE, then QIE|SRTP; never anything echoed from GSTS.
        let gcmds: Vec<u32> = s
            .events
            .iter()
            .filter_map(|e| match e {
                Event::Gcmd(v) => Some(*v),
                _ => None,
            })
            .collect();
        assert_eq!(gcmds, [1 << 26, 1 << 26 | 1 << 30]);
        let after_srtp: Vec<Event> = s
            .events
            .iter()
            .skip_while(|e| **e != Event::Srtp)
            .skip(1)
            .copied()
            .collect();
        assert!(matches!(
            after_srtp[..],
            [
                Event::Cc {
                    g: 1,
                    queued: true,
                    ..
                },
                Event::Iotlb {
                    g: 1,
                    queued: true,
                    ..
                },
                Event::Wait { .. }
            ]
        ));
    }
    u.enable_translation().unwrap();
    assert!(u.translation_enabled());
    let s = sim.borrow();
    assert_eq!(s.events.last(), Some(&Event::Gcmd(1 << 31 | 1 << 26)));
    assert_eq!(s.events.iter().filter(|e| **e == Event::Srtp).count(), 1);
    assert_eq!(u.stats().waits, 1);
    assert_eq!(u.stats().flush_descriptors, 2);
}

#[test]
fn firmware_enables_are_turned_off_first() {
    let sim = Sim::new(QEMU_CAP, QEMU_ECAP | 1 << 3);
    sim.borrow_mut().gsts = GSTS_TES | GSTS_QIES | 1 << 25;
    let u = SimUnit::new(
        SimRegs(sim.clone()),
        SimMem(sim.clone()),
        SimHost(sim.clone()),
        cfg(),
    )
    .map_err(|e| e.0)
    .unwrap();
    let s = sim.borrow();
    let gcmds: Vec<u32> = s
        .events
        .iter()
        .filter_map(|e| match e {
            Event::Gcmd(v) => Some(*v),
            _ => None,
        })
        .collect();
    let ire = 1 << 25;
    // TE off (QIE, IRE kept), QIE off, QIE on, SRTP: IRE stays as found.
    assert_eq!(
        gcmds,
        [1 << 26 | ire, ire, ire | 1 << 26, ire | 1 << 26 | 1 << 30]
    );
    assert!(u.interrupt_remapping_enabled());
}

#[test]
fn register_invalidation_without_qi() {
    let (sim, mut u, d) = ready(QEMU_CAP, QEMU_ECAP & !ECAP_QI);
    assert!(!u.queued_invalidation());
    u.map(d, 0x10_0000, RAM, 2 * K4, Perms::RW).unwrap();
    dma_write(&sim, NIC, 0x10_0000, b"abc").unwrap();
    let from = sim.borrow().events.len();
    let r = u.unmap(d, 0x10_0000, 2 * K4).unwrap();
    assert_eq!(r.descriptors, 1);
    let s = sim.borrow();
    assert_eq!(
        s.iotlb_events(from),
        [Event::Iotlb {
            g: 3,
            did: d.did(),
            addr: 0x10_0000,
            am: 1,
            queued: false
        }]
    );
    assert_eq!(s.waits(0), 0);
    drop(s);
    assert_eq!(dma_write(&sim, NIC, 0x10_0000, b"x"), Err(5));
    // Every context invalidation went through CCMD too.
    assert!(sim
        .borrow()
        .events
        .iter()
        .all(|e| !matches!(e, Event::Cc { queued: true, .. })));
}

#[test]
fn map_dma_unmap_fault() {
    let (sim, mut u, d) = ready(QEMU_CAP, QEMU_ECAP);
    assert_eq!(u.domain_levels(d), Some(3));
    assert_eq!(u.domain_limit(d), Some(1 << 39));
    let iova = 0x8000_0000;
    u.map(d, iova, RAM, K4, Perms::RW).unwrap();
    assert_eq!(dma_write(&sim, NIC, iova + 0x10, b"frame!"), Ok(RAM + 0x10));
    assert_eq!(ram_bytes(&sim, RAM + 0x10, 6), b"frame!");
    assert_eq!(dma_read(&sim, NIC, iova + 0x10, 6).unwrap(), b"frame!");
    // Another device, not attached: context entry not present.
    assert_eq!(dma_read(&sim, NIC2, iova, 4), Err(2));
    u.poll_faults();
    let r = u.unmap(d, iova, K4).unwrap();
    assert_eq!(r.pages, 1);
    assert_eq!(
        r.released,
        [crate::refcount::FrameRange {
            start: RAM / K4,
            count: 1
        }]
    );
    // The same DMA now faults and writes nothing.
    assert_eq!(dma_write(&sim, NIC, iova + 0x10, b"AFTER!"), Err(5));
    assert_eq!(ram_bytes(&sim, RAM + 0x10, 6), b"frame!");
    let f = u.poll_faults();
    assert_eq!(f.records.len(), 1);
    let rec = f.records[0];
    assert_eq!(rec.source, NIC);
    assert_eq!(rec.addr, iova);
    assert_eq!(rec.reason, 5);
    assert!(rec.write);
    assert!(!f.overflow);
    assert_eq!(u.stats().faults, 2);
    assert_eq!(u.domain_stats(d).unwrap().faults, 1);
    assert_eq!(sim.borrow_mut().fsts_value_for_test(), 0);
    let st = u.domain_stats(d).unwrap();
    assert_eq!(
        (st.maps, st.mapped_pages, st.unmaps, st.unmapped_pages),
        (1, 1, 1, 1)
    );
    assert_eq!((st.flush_descriptors, st.waits), (1, 1));
    // Read-only mapping: reads work, writes fault with reason 5.
    u.map(d, iova, RAM, K4, Perms::R).unwrap();
    assert!(dma_read(&sim, NIC, iova, 4).is_ok());
    assert_eq!(dma_write(&sim, NIC, iova, b"no"), Err(5));
}

/// The simulated IOTLB is real: an entry cleared without invalidation keeps
/// translating, so a driver that forgot the flush would fail these tests.
#[test]
fn missing_flush_would_leave_a_stale_translation() {
    let (sim, mut u, d) = ready(QEMU_CAP, QEMU_ECAP);
    u.map(d, 0x20_0000, RAM, K4, Perms::RW).unwrap();
    dma_write(&sim, NIC, 0x20_0000, b"1").unwrap();
    // Clear the leaf behind the unit's back (written back to memory, no flush).
    let (pt_entry, _) = find_leaf_slot(&sim, &u, d, 0x20_0000);
    {
        let mut s = sim.borrow_mut();
        s.cpu_write(pt_entry, &0u64.to_le_bytes());
        s.writeback(pt_entry, 8);
    }
    assert_eq!(
        dma_write(&sim, NIC, 0x20_0000, b"2"),
        Ok(RAM),
        "stale IOTLB entry"
    );
    // A page-selective invalidation with another domain id does not drop it; one
    // with the context entry's domain id does.
    sim.borrow_mut()
        .iotlb_invalidate(3, d.did() + 1, 0x20_0000, 0, true);
    assert!(dma_read(&sim, NIC, 0x20_0000, 1).is_ok());
    sim.borrow_mut()
        .iotlb_invalidate(3, d.did(), 0x20_0000, 0, true);
    assert_eq!(dma_read(&sim, NIC, 0x20_0000, 1), Err(6));
}

/// Address of the 8-byte leaf entry mapping `iova` (walking the CPU view).
fn find_leaf_slot(sim: &Shared, u: &SimUnit, d: DomainId, iova: u64) -> (u64, u64) {
    let levels = u.domain_levels(d).unwrap();
    let root = {
        let s = sim.borrow();
        s.root.unwrap()
    };
    let mut s = sim.borrow_mut();
    let re = s.hw_read_u64(root + u64::from(NIC.bus) * 16);
    let ce = s.hw_read_u64((re & !0xfff) + u64::from(NIC.devfn()) * 16);
    let mut table = ce & !0xfff;
    for level in (1..=levels).rev() {
        let slot = table + ((iova >> (12 + 9 * (u32::from(level) - 1))) & 511) * 8;
        let e = s.hw_read_u64(slot);
        if level == 1 || e & (1 << 7) != 0 {
            return (slot, e);
        }
        table = e & 0x000f_ffff_ffff_f000;
    }
    unreachable!()
}

#[test]
fn batched_unmap_is_n_page_descriptors_and_one_wait() {
    let (sim, mut u, d) = ready(QEMU_CAP, QEMU_ECAP);
    let pages: Vec<u64> = [3u64, 9, 4, 5, 6, 100, 7, 2000]
        .iter()
        .map(|p| 0x100_0000 + p * K4)
        .collect();
    for (i, &iova) in pages.iter().enumerate() {
        u.map(d, iova, RAM + i as u64 * K4, K4, Perms::RW).unwrap();
        dma_write(&sim, NIC, iova, &[i as u8]).unwrap();
    }
    let from = sim.borrow().events.len();
    let before = u.stats();
    let r = u.unmap_pages(d, &pages).unwrap();
    assert_eq!(r.pages, 8);
    assert!(!r.domain_flush);
    // Runs: 3..=7 (blocks 3, 4..8), 9, 100, 2000.
    let s = sim.borrow();
    let ev: Vec<Event> = s.events[from..].to_vec();
    let want_blocks = [(3u64, 0u8), (4, 2), (9, 0), (100, 0), (2000, 0)];
    assert_eq!(ev.len(), want_blocks.len() + 1);
    for (e, &(p, am)) in ev.iter().zip(&want_blocks) {
        assert_eq!(
            *e,
            Event::Iotlb {
                g: 3,
                did: d.did(),
                addr: 0x100_0000 + p * K4,
                am,
                queued: true
            }
        );
    }
    assert!(matches!(ev.last(), Some(Event::Wait { .. })));
    drop(s);
    assert_eq!(r.descriptors, 5);
    assert_eq!(u.stats().waits - before.waits, 1);
    assert_eq!(u.stats().flush_descriptors - before.flush_descriptors, 5);
    for &iova in &pages {
        assert_eq!(dma_write(&sim, NIC, iova, b"x"), Err(5));
        u.poll_faults();
    }
    // Duplicates and unmapped pages are refused before anything changes.
    u.map(d, 0x100_0000, RAM, K4, Perms::RW).unwrap();
    assert_eq!(
        u.unmap_pages(d, &[0x100_0000, 0x100_0000]),
        Err(IommuError::NotMapped { iova: 0x100_0000 })
    );
    assert_eq!(
        u.unmap_pages(d, &[0x100_0000, 0x200_0000]),
        Err(IommuError::NotMapped { iova: 0x200_0000 })
    );
    assert!(u.translate(d, 0x100_0000).is_some());
}

#[test]
fn domain_selective_fallbacks() {
    // Range longer than 2^MAMV pages.
    let cap_small_mamv = (QEMU_CAP & !(0x3f << 48)) | 2 << 48;
    let (sim, mut u, d) = ready(cap_small_mamv, QEMU_ECAP);
    u.map(d, 0, RAM, 8 * K4, Perms::RW).unwrap();
    let from = sim.borrow().events.len();
    let r = u.unmap(d, 0, 5 * K4).unwrap();
    assert!(r.domain_flush);
    assert_eq!(
        sim.borrow().iotlb_events(from),
        [Event::Iotlb {
            g: 2,
            did: d.did(),
            addr: 0,
            am: 0,
            queued: true
        }]
    );
    // Within MAMV: page-selective, blocks of at most 2^2 pages.
    let from = sim.borrow().events.len();
    let r = u.unmap(d, 5 * K4, 3 * K4).unwrap();
    assert!(!r.domain_flush);
    assert_eq!(sim.borrow().iotlb_events(from).len(), 2);
    // No PSI at all.
    let (sim, mut u, d) = ready(QEMU_CAP & !PSI, QEMU_ECAP);
    u.map(d, 0, RAM, K4, Perms::RW).unwrap();
    let from = sim.borrow().events.len();
    assert!(u.unmap(d, 0, K4).unwrap().domain_flush);
    assert!(matches!(
        sim.borrow().iotlb_events(from)[..],
        [Event::Iotlb { g: 2, .. }]
    ));
    // Too many descriptors.
    let (_, mut u) = unit_with(
        QEMU_CAP,
        QEMU_ECAP,
        UnitConfig {
            max_flush_descriptors: 3,
            ..cfg()
        },
    );
    let d = u.create_domain(39).unwrap();
    let pages: Vec<u64> = (0..4).map(|i| i * 2 * K4).collect();
    for &p in &pages {
        u.map(d, p, RAM, K4, Perms::RW).unwrap();
    }
    assert!(u.unmap_pages(d, &pages).unwrap().domain_flush);
}

#[test]
fn caching_mode_flushes_on_map() {
    let (sim, mut u, d) = ready(QEMU_CAP | CM, QEMU_ECAP);
    let iova = 0x30_0000;
    // A DMA before the map faults and, with CM=1, the miss is cached.
    assert_eq!(dma_write(&sim, NIC, iova, b"early"), Err(5));
    u.poll_faults();
    let from = sim.borrow().events.len();
    u.map(d, iova, RAM, K4, Perms::RW).unwrap();
    assert_eq!(
        sim.borrow().events[from..],
        [
            Event::Iotlb {
                g: 3,
                did: d.did(),
                addr: iova,
                am: 0,
                queued: true
            },
            Event::Wait {
                data: sim_last_wait_data(&sim),
                addr: sim_last_wait_addr(&sim)
            }
        ]
    );
    assert_eq!(dma_write(&sim, NIC, iova, b"late"), Ok(RAM));
    // Without that flush the cached miss would still fault: map another page behind
    // the driver's back (through a second domain's walker is not possible, so flip
    // the leaf by hand) and look.
    assert_eq!(dma_write(&sim, NIC, iova + K4, b"x"), Err(5));
    u.poll_faults();
    let (slot, e) = find_leaf_slot(&sim, &u, d, iova);
    {
        let mut s = sim.borrow_mut();
        s.cpu_write(slot + 8, &((RAM + K4) | (e & 3)).to_le_bytes());
        s.writeback(slot + 8, 8);
    }
    assert_eq!(dma_write(&sim, NIC, iova + K4, b"x"), Err(5), "cached miss");
    u.poll_faults();
    // With CM=0 no flush is issued on map.
    let (sim, mut u, d) = ready(QEMU_CAP, QEMU_ECAP);
    let from = sim.borrow().events.len();
    u.map(d, iova, RAM, K4, Perms::RW).unwrap();
    assert!(sim.borrow().events[from..].is_empty());
    // Attach with CM=1: device-selective context invalidation with DID 0, then the
    // domain's IOTLB entries.
    let (sim, mut u) = unit_with(QEMU_CAP | CM, QEMU_ECAP, cfg());
    let d = u.create_domain(39).unwrap();
    let from = sim.borrow().events.len();
    u.attach(d, NIC).unwrap();
    assert!(matches!(
        sim.borrow().events[from..],
        [
            Event::Cc {
                g: 3,
                did: 0,
                sid: 0x10,
                queued: true
            },
            Event::Iotlb { g: 2, did: 1, .. },
            Event::Wait { .. }
        ]
    ));
}

fn sim_last_wait_data(sim: &Shared) -> u32 {
    match sim.borrow().events.last() {
        Some(Event::Wait { data, .. }) => *data,
        _ => 0,
    }
}

fn sim_last_wait_addr(sim: &Shared) -> u64 {
    match sim.borrow().events.last() {
        Some(Event::Wait { addr, .. }) => *addr,
        _ => 0,
    }
}

#[test]
fn rwbf_flushes_the_write_buffer_on_map_and_attach() {
    let (sim, mut u, d) = ready(QEMU_CAP | RWBF, QEMU_ECAP);
    let from = sim.borrow().events.len();
    u.map(d, 0, RAM, K4, Perms::RW).unwrap();
    assert!(sim.borrow().events[from..].contains(&Event::Wbf));
    // GCMD for WBF carries the persistent bits (TE, QIE) and WBF only.
    assert!(sim.borrow().events[from..].contains(&Event::Gcmd(1 << 31 | 1 << 26 | 1 << 27)));
}

#[test]
fn non_coherent_and_coherent_units() {
    // QEMU's unit is non-coherent (C=0): every table write must be flushed; the sim
    // walks memory only, so the DMA below fails if one was missed.
    for ecap in [QEMU_ECAP, QEMU_ECAP | ECAP_C] {
        let (sim, mut u, d) = ready(QEMU_CAP, ecap);
        for i in 0..40u64 {
            u.map(d, i * 0x20_1000, RAM + i * K4, K4, Perms::RW)
                .unwrap();
        }
        for i in 0..40u64 {
            assert_eq!(
                dma_read(&sim, NIC, i * 0x20_1000, 1).map(|_| ()),
                Ok(()),
                "{i} {ecap:#x}"
            );
        }
        if ecap & ECAP_C == 0 {
            // And the sim really hides unflushed writes.
            let (slot, _) = find_leaf_slot(&sim, &u, d, 0);
            let mut s = sim.borrow_mut();
            s.cpu_write(slot, &0u64.to_le_bytes());
            assert_ne!(s.hw_read_u64(slot), 0);
        }
    }
}

#[test]
fn large_pages_and_splitting() {
    let (sim, mut u, d) = ready(QEMU_CAP, QEMU_ECAP);
    let iova = 0x4000_0000;
    u.map(d, iova, RAM, 2 * M2, Perms::RW).unwrap();
    assert_eq!(u.translate(d, iova + M2).unwrap().2, PageSize::Size2M);
    assert_eq!(
        dma_write(&sim, NIC, iova + M2 + 0x1234, b"big"),
        Ok(RAM + M2 + 0x1234)
    );
    // Unmapping one 4 KiB page inside a 2 MiB leaf splits it; the cached 2 MiB IOTLB
    // entry is dropped by the page-selective invalidation of that page.
    u.unmap(d, iova + M2 + K4, K4).unwrap();
    assert_eq!(dma_write(&sim, NIC, iova + M2 + K4, b"x"), Err(5));
    u.poll_faults();
    assert_eq!(
        dma_write(&sim, NIC, iova + M2 + 0x1234 - K4, b"y"),
        Ok(RAM + M2 + 0x234)
    );
    assert_eq!(
        dma_write(&sim, NIC, iova + M2 + 2 * K4, b"z"),
        Ok(RAM + M2 + 2 * K4)
    );
    assert_eq!(u.live_pages(d), Some(1023));
    assert_eq!(u.frame_refcount((RAM + M2 + K4) / K4), 0);
    assert_eq!(u.frame_refcount((RAM + M2) / K4), 1);
    // 1 GiB leaf.
    u.map(d, 1 << 32, 1 << 32, 1 << 30, Perms::R).unwrap();
    assert_eq!(u.translate(d, (1 << 32) + 5).unwrap().2, PageSize::Size1G);
    assert!(dma_read(&sim, NIC, (1 << 32) + (1 << 29), 8).is_ok());
    // A unit without SLLPS: 4 KiB leaves only, the sim would fault a PS bit.
    let no_lp = QEMU_CAP & !(0xf << 34);
    let (sim, mut u, d) = ready(no_lp, QEMU_ECAP);
    u.map(d, iova, RAM, M2, Perms::RW).unwrap();
    assert_eq!(u.translate(d, iova).unwrap().2, PageSize::Size4K);
    assert!(dma_read(&sim, NIC, iova + M2 - 8, 8).is_ok());
}

#[test]
fn snoop_bit_only_with_snoop_control() {
    for (ecap, force) in [
        (QEMU_ECAP | ECAP_SC, true),
        (QEMU_ECAP, true),
        (QEMU_ECAP | ECAP_SC, false),
    ] {
        let (sim, mut u) = unit_with(
            QEMU_CAP,
            ecap,
            UnitConfig {
                force_snoop: force,
                ..cfg()
            },
        );
        let d = u.create_domain(39).unwrap();
        u.attach(d, NIC).unwrap();
        u.enable_translation().unwrap();
        u.map(d, 0, RAM, K4, Perms::RW).unwrap();
        let (_, e) = find_leaf_slot(&sim, &u, d, 0);
        assert_eq!(e & (1 << 11) != 0, ecap & ECAP_SC != 0 && force);
        // The sim refuses SNP without SC (reason 0xc): never hit.
        assert!(dma_read(&sim, NIC, 0, 4).is_ok());
    }
}

#[test]
fn bounds_and_argument_errors() {
    let (_, mut u, d) = ready(QEMU_CAP, QEMU_ECAP);
    let e = u.map(d, 0xfee0_0000, RAM, K4, Perms::RW).unwrap_err();
    assert_eq!(
        e,
        IommuError::InterruptWindow {
            iova: 0xfee0_0000,
            len: K4
        }
    );
    assert!(e.to_string().contains("interrupt window"));
    assert!(u.map(d, 0xfed0_0000, RAM, 0x10_1000, Perms::RW).is_err());
    assert!(u.map(d, 0xfeef_f000, RAM, K4, Perms::RW).is_err());
    u.map(d, 0xfedf_f000, RAM, K4, Perms::RW).unwrap();
    u.map(d, 0xfef0_0000, RAM, K4, Perms::RW).unwrap();
    assert_eq!(
        u.map(d, (1 << 39) - K4, RAM, 2 * K4, Perms::RW),
        Err(IommuError::OutOfRange {
            iova: (1 << 39) - K4,
            len: 2 * K4,
            limit: 1 << 39
        })
    );
    u.map(d, (1 << 39) - K4, RAM, K4, Perms::RW).unwrap();
    assert!(matches!(
        u.map(d, u64::MAX - 0xfff, RAM, 2 * K4, Perms::RW),
        Err(IommuError::OutOfRange { .. })
    ));
    assert_eq!(
        u.map(d, 0, 1 << 39, K4, Perms::RW),
        Err(IommuError::HostAddressTooHigh {
            hpa: 1 << 39,
            len: K4,
            width: 39
        })
    );
    for (iova, hpa, len) in [
        (0x800, RAM, K4),
        (0, RAM + 8, K4),
        (0, RAM, 100),
        (0, RAM, 0),
    ] {
        assert!(matches!(
            u.map(d, iova, hpa, len, Perms::RW),
            Err(IommuError::Misaligned { .. })
        ));
    }
    let none = Perms {
        read: false,
        write: false,
        exec: true,
        user: true,
    };
    assert_eq!(u.map(d, 0, RAM, K4, none), Err(IommuError::NoAccess));
    u.map(d, 0x10_0000, RAM, 4 * K4, Perms::RW).unwrap();
    let live = u.live_pages(d).unwrap();
    let refs = u.total_refs();
    assert_eq!(
        u.map(d, 0x10_0000 - K4, RAM, 2 * K4, Perms::RW),
        Err(IommuError::AlreadyMapped { iova: 0x10_0000 })
    );
    assert_eq!(u.translate(d, 0x10_0000 - K4), None, "all or nothing");
    assert_eq!(u.total_refs(), refs);
    assert_eq!(
        u.unmap(d, 0x10_0000, 5 * K4),
        Err(IommuError::NotMapped { iova: 0x10_4000 })
    );
    assert!(u.translate(d, 0x10_0000).is_some(), "nothing changed");
    assert_eq!(u.live_pages(d), Some(live));
    let ghost = DomainId::clone(&d);
    u.destroy_domain(d).unwrap();
    assert_eq!(
        u.map(ghost, 0, RAM, K4, Perms::RW),
        Err(IommuError::NoSuchDomain(ghost))
    );
}

#[test]
fn out_of_memory_leaves_nothing_behind() {
    let (sim, mut u, d) = ready(QEMU_CAP, QEMU_ECAP);
    let live = live_frames(&sim);
    sim.borrow_mut().alloc_limit = Some(live + 1);
    assert_eq!(
        u.map(d, 0x4000_0000, RAM, K4, Perms::RW),
        Err(IommuError::OutOfMemory)
    );
    assert_eq!(live_frames(&sim), live);
    assert_eq!(u.total_refs(), 0);
    assert_eq!(u.live_pages(d), Some(0));
    sim.borrow_mut().alloc_limit = None;
    u.map(d, 0x4000_0000, RAM, K4, Perms::RW).unwrap();
}

#[test]
fn refcounts_across_iovas_and_domains() {
    let (_, mut u, d) = ready(QEMU_CAP, QEMU_ECAP);
    let d2 = u.create_domain(39).unwrap();
    assert_eq!((d.did(), d2.did()), (1, 2));
    let frame = RAM / K4;
    u.map(d, 0x1000, RAM, K4, Perms::RW).unwrap();
    u.map(d, 0x9000, RAM, K4, Perms::R).unwrap();
    u.map(d2, 0x1000, RAM, K4, Perms::RW).unwrap();
    assert_eq!(u.frame_refcount(frame), 3);
    assert!(u.unmap(d, 0x1000, K4).unwrap().released.is_empty());
    assert!(u.unmap(d2, 0x1000, K4).unwrap().released.is_empty());
    assert_eq!(u.frame_refcount(frame), 1);
    let r = u.unmap(d, 0x9000, K4).unwrap();
    assert_eq!(
        r.released,
        [crate::refcount::FrameRange {
            start: frame,
            count: 1
        }]
    );
    assert_eq!(u.total_refs(), 0);
}

#[test]
fn destroy_with_live_mappings_returns_counts_to_zero() {
    let (sim, mut u) = qemu_unit();
    let base_frames = live_frames(&sim);
    let d = u.create_domain(39).unwrap();
    u.attach(d, NIC).unwrap();
    u.attach(d, NIC2).unwrap();
    u.enable_translation().unwrap();
    let d2 = u.create_domain(39).unwrap();
    u.map(d, 0, RAM, 4 * M2, Perms::RW).unwrap();
    u.map(d, 0x1000_0000, RAM, 3 * K4, Perms::R).unwrap();
    for i in 0..20 {
        u.map(d, 0x2000_0000 + i * 0x40_0000, RAM + i * K4, K4, Perms::RW)
            .unwrap();
    }
    u.map(d2, 0, RAM, K4, Perms::RW).unwrap();
    assert!(dma_read(&sim, NIC2, 0x2000_0000, 4).is_ok());
    let live = u.live_pages(d).unwrap();
    assert_eq!(live, 4 * 512 + 3 + 20);
    let r = u.destroy_domain(d).unwrap();
    assert_eq!(r.live_pages, live);
    assert_eq!(r.devices_detached, 2);
    // Frames shared with d2 (RAM) stay referenced; the rest are released.
    assert_eq!(u.frame_refcount(RAM / K4), 1);
    assert_eq!(u.total_refs(), 1);
    assert_eq!(
        r.released.iter().map(|f| f.count).sum::<u64>(),
        4 * 512 - 1,
        "{:?}",
        r.released
    );
    // Detached devices fault (context entry cleared and invalidated).
    assert_eq!(dma_read(&sim, NIC2, 0x2000_0000, 4), Err(2));
    u.destroy_domain(d2).unwrap();
    assert_eq!(u.total_refs(), 0);
    // Only the unit's own frames remain: root, queue, status and bus 0's context table.
    assert_eq!(live_frames(&sim), base_frames + 1);
    // Domain ids are reused, never 0.
    assert_eq!(u.create_domain(39).unwrap().did(), 1);
    let (_, _, _, left) = u.shutdown().unwrap();
    assert_eq!(left, 0);
    assert_eq!(live_frames(&sim), 0, "shutdown frees every table");
    assert_eq!(sim.borrow().gsts & (GSTS_TES | GSTS_QIES), 0);
}

#[test]
fn faults_decode_and_overflow() {
    let (sim, mut u, d) = ready(QEMU_CAP, QEMU_ECAP);
    // Beyond the 39-bit width: reason 4.
    assert_eq!(dma_read(&sim, NIC, 1 << 40, 4), Err(4));
    // A second fault from another source while the only record is full: PFO.
    assert_eq!(dma_read(&sim, NIC2, 0x5000, 4), Err(2));
    let f = u.poll_faults();
    assert_eq!(f.records.len(), 1);
    assert_eq!(f.records[0].reason, 4);
    assert_eq!(
        f.records[0].reason_name(),
        "address beyond the guest address width"
    );
    assert!(!f.records[0].write);
    assert!(f.overflow);
    assert_eq!(u.stats().fault_overflows, 1);
    assert_eq!(u.poll_faults(), FaultReport::default(), "all cleared");
    // Recording works again after clearing.
    assert_eq!(dma_read(&sim, NIC2, 0x5000, 4), Err(2));
    let f = u.poll_faults();
    assert_eq!(f.records[0].source, NIC2);
    assert_eq!(f.records[0].reason, 2);
    assert_eq!(u.domain_stats(d).unwrap().faults, 1);
    // Several records (NFR = 4): read from FRI on, wrapping.
    let cap4 = QEMU_CAP | 3 << 40;
    let (sim, mut u, _) = ready(cap4, QEMU_ECAP);
    sim.borrow_mut().next_frcd = 2;
    for (i, dev) in [Bdf::new(0, 4, 0), Bdf::new(0, 5, 0), Bdf::new(0, 6, 0)]
        .iter()
        .enumerate()
    {
        assert_eq!(dma_read(&sim, *dev, i as u64 * K4, 1), Err(2));
    }
    let f = u.poll_faults();
    assert_eq!(
        f.records
            .iter()
            .map(|r| (r.index, r.source.dev))
            .collect::<Vec<_>>(),
        [(2, 4), (3, 5), (0, 6)]
    );
    // Fault interrupt programming uses 32-bit writes only (64-bit ones panic in the
    // sim).
    u.set_fault_interrupt(Some((0x41, 0xfee0_0000)));
    assert_eq!(sim.borrow().fectl, 0);
    assert_eq!(sim.borrow().fedata, 0x41);
    u.set_fault_interrupt(None);
    assert_eq!(sim.borrow().fectl, 1 << 31);
}

#[test]
fn hung_hardware_times_out() {
    let (sim, mut u) = qemu_unit();
    sim.borrow_mut().stuck = GSTS_TES;
    let e = u.enable_translation().unwrap_err();
    assert_eq!(
        e,
        IommuError::Timeout {
            unit: 0xfed9_0000,
            what: "enabling translation (TE)"
        }
    );
    assert!(e.to_string().contains("0xfed90000"));
    sim.borrow_mut().stuck = 0;
    let d = u.create_domain(39).unwrap();
    u.map(d, 0, RAM, K4, Perms::RW).unwrap();
    sim.borrow_mut().drop_waits = true;
    assert!(matches!(u.unmap(d, 0, K4), Err(IommuError::Timeout { .. })));
    // Init on a unit that never sets QIES fails cleanly and hands the parts back.
    let sim = Sim::new(QEMU_CAP, QEMU_ECAP);
    sim.borrow_mut().stuck = GSTS_QIES;
    let r = SimUnit::new(
        SimRegs(sim.clone()),
        SimMem(sim.clone()),
        SimHost(sim.clone()),
        cfg(),
    );
    assert!(matches!(
        r.map_err(|e| e.0),
        Err(IommuError::Timeout { .. })
    ));
}

#[test]
fn queue_error_is_reported_and_recovered() {
    let (sim, mut u, d) = ready(QEMU_CAP, QEMU_ECAP);
    u.map(d, 0, RAM, K4, Perms::RW).unwrap();
    sim.borrow_mut().reject_iotlb = true;
    let e = u.unmap(d, 0, K4).unwrap_err();
    let IommuError::QueueError { descriptor, .. } = e else {
        panic!("{e:?}");
    };
    assert_eq!(descriptor[0] & 0xf, 2);
    sim.borrow_mut().reject_iotlb = false;
    assert_eq!(sim.borrow().fsts & (1 << 4), 0, "IQE cleared");
    // The queue runs again.
    u.map(d, K4, RAM, K4, Perms::RW).unwrap();
    u.unmap(d, K4, K4).unwrap();
}

#[test]
fn attach_detach_rules_and_domain_ids() {
    let (sim, mut u) = qemu_unit();
    let a = u.create_domain(39).unwrap();
    let b = u.create_domain(39).unwrap();
    u.attach(a, NIC).unwrap();
    u.attach(a, NIC).unwrap();
    assert_eq!(
        u.attach(b, NIC),
        Err(IommuError::DeviceBusy {
            device: NIC,
            domain: a
        })
    );
    assert_eq!(u.device_domain(NIC), Some(a));
    u.enable_translation().unwrap();
    u.map(a, 0, RAM, K4, Perms::RW).unwrap();
    assert!(dma_read(&sim, NIC, 0, 1).is_ok());
    let from = sim.borrow().events.len();
    assert_eq!(u.detach(NIC), Ok(a));
    assert!(matches!(
        sim.borrow().events[from..],
        [
            Event::Cc {
                g: 3,
                did: 1,
                sid: 0x10,
                ..
            },
            Event::Iotlb { g: 2, did: 1, .. },
            Event::Wait { .. }
        ]
    ));
    assert_eq!(
        dma_read(&sim, NIC, 0, 1),
        Err(2),
        "context cache and IOTLB dropped"
    );
    assert_eq!(u.detach(NIC), Err(IommuError::NotAttached(NIC)));
    u.attach(b, NIC).unwrap();
    u.map(b, 0, RAM + K4, K4, Perms::RW).unwrap();
    assert_eq!(dma_read(&sim, NIC, 0, 1).map(|_| ()), Ok(()));
    assert_eq!(
        sim.borrow_mut().dma(NIC.source_id(), 0, true, &mut [1]),
        Ok(RAM + K4)
    );
    // A device on another bus gets its own context table.
    let far = Bdf::new(5, 0, 0);
    let frames = live_frames(&sim);
    u.attach(b, far).unwrap();
    assert_eq!(live_frames(&sim), frames + 1);
    assert!(dma_read(&sim, far, 0, 1).is_ok());
    // ND = 0: 16 domain ids, 15 usable.
    let (_, mut u) = unit_with(QEMU_CAP & !7, QEMU_ECAP, cfg());
    for i in 1..16u16 {
        assert_eq!(u.create_domain(39).unwrap().did(), i);
    }
    assert_eq!(u.create_domain(39), Err(IommuError::NoDomainIds));
}

#[test]
fn table_depth_from_sagaw_and_mgaw() {
    let (sim, mut u) = unit_with(CAP48, QEMU_ECAP, cfg());
    let d48 = u.create_domain(48).unwrap();
    let d39 = u.create_domain(39).unwrap();
    assert_eq!(u.domain_levels(d48), Some(4));
    assert_eq!(u.domain_limit(d48), Some(1 << 48));
    assert_eq!(u.domain_levels(d39), Some(3));
    u.attach(d48, NIC).unwrap();
    u.enable_translation().unwrap();
    u.map(d48, 1 << 40, RAM, K4, Perms::RW).unwrap();
    assert_eq!(dma_write(&sim, NIC, (1 << 40) + 8, b"4lvl"), Ok(RAM + 8));
    // QEMU's default unit caps everything at 39 bits / 3 levels.
    let (_, mut u) = qemu_unit();
    let d = u.create_domain(48).unwrap();
    assert_eq!(
        (u.domain_levels(d), u.domain_limit(d)),
        (Some(3), Some(1 << 39))
    );
    // A unit without any usable depth is refused.
    let sim = Sim::new(QEMU_CAP & !(0x1f << 8), QEMU_ECAP);
    let r = SimUnit::new(
        SimRegs(sim.clone()),
        SimMem(sim.clone()),
        SimHost(sim),
        cfg(),
    );
    assert!(matches!(
        r.map_err(|e| e.0),
        Err(IommuError::Unsupported { .. })
    ));
}

// ---- model-based -----------------------------------------------------------

#[derive(Clone, Debug)]
enum Op {
    Map {
        page: u64,
        pages: u64,
        frame: u64,
        write: bool,
    },
    Unmap {
        page: u64,
        pages: u64,
    },
    UnmapPages {
        pages: Vec<u64>,
    },
    Dma {
        page: u64,
        write: bool,
    },
}

fn op() -> impl Strategy<Value = Op> {
    // IOVA pages 0..1100 (some 2 MiB-aligned runs); frames in a small set so that
    // frames are shared.
    prop_oneof![
        4 => (0..1100u64, 1..600u64, 0..4u64, any::<bool>()).prop_map(|(page, pages, f, write)| Op::Map {
            page, pages, frame: f * 512, write
        }),
        2 => (0..1100u64, 1..40u64).prop_map(|(page, pages)| Op::Unmap { page, pages }),
        2 => proptest::collection::vec(0..1100u64, 1..12).prop_map(|pages| Op::UnmapPages { pages }),
        4 => (0..1100u64, any::<bool>()).prop_map(|(page, write)| Op::Dma { page, write }),
    ]
}

/// DMA-reads every page (filling the IOTLB with what is mapped), then drops the
/// faults this caused.
fn warm(sim: &Shared, iovas: impl Iterator<Item = u64>) {
    for v in iovas {
        let _ = sim
            .borrow_mut()
            .dma(NIC.source_id(), v, false, &mut [0u8; 1]);
        let mut s = sim.borrow_mut();
        for r in s.frcd.iter_mut() {
            r[1] = 0;
        }
        s.fsts = 0;
    }
}

/// Every page must fault now, and write nothing.
fn gone(
    sim: &Shared,
    u: &mut SimUnit,
    iovas: impl Iterator<Item = u64>,
) -> Result<(), TestCaseError> {
    for v in iovas {
        let r = sim
            .borrow_mut()
            .dma(NIC.source_id(), v, true, &mut [0xee; 1]);
        prop_assert_eq!(r, Err(5), "iova {:#x} still translates after unmap", v);
        u.poll_faults();
    }
    Ok(())
}

fn run_model(cap: u64, ecap: u64, ops: &[Op]) -> Result<(), TestCaseError> {
    let (sim, mut u, d) = ready(cap, ecap);
    let base = live_frames(&sim);
    // page -> (frame, writable)
    let mut model: BTreeMap<u64, (u64, bool)> = BTreeMap::new();
    let mut refs: BTreeMap<u64, u32> = BTreeMap::new();
    let iova = |p: u64| 0x100_0000 + p * K4;
    for o in ops {
        match o {
            Op::Map {
                page,
                pages,
                frame,
                write,
            } => {
                let perms = if *write { Perms::RW } else { Perms::R };
                let free = (*page..page + pages).all(|p| !model.contains_key(&p));
                let hpa = RAM + frame * K4;
                let r = u.map(d, iova(*page), hpa, pages * K4, perms);
                prop_assert_eq!(r.is_ok(), free, "{:?}: {:?}", o, r);
                if free {
                    for i in 0..*pages {
                        model.insert(page + i, (frame + i, *write));
                        *refs.entry(frame + i).or_default() += 1;
                    }
                }
            }
            Op::Unmap { page, pages } => {
                let all = (*page..page + pages).all(|p| model.contains_key(&p));
                warm(&sim, (*page..page + pages).map(iova));
                let r = u.unmap(d, iova(*page), pages * K4);
                prop_assert_eq!(r.is_ok(), all, "{:?}: {:?}", o, r);
                if all {
                    let mut released = Vec::new();
                    for p in *page..page + pages {
                        let (f, _) = model.remove(&p).unwrap();
                        let c = refs.get_mut(&f).unwrap();
                        *c -= 1;
                        if *c == 0 {
                            refs.remove(&f);
                            released.push(RAM / K4 + f);
                        }
                    }
                    released.sort_unstable();
                    gone(&sim, &mut u, (*page..page + pages).map(iova))?;
                    let mut got: Vec<u64> = r
                        .unwrap()
                        .released
                        .iter()
                        .flat_map(|f| f.start..f.start + f.count)
                        .collect();
                    got.sort_unstable();
                    prop_assert_eq!(got, released);
                }
            }
            Op::UnmapPages { pages } => {
                let mut s = pages.clone();
                s.sort_unstable();
                s.dedup();
                let ok = s.len() == pages.len() && s.iter().all(|p| model.contains_key(p));
                let v: Vec<u64> = pages.iter().map(|&p| iova(p)).collect();
                warm(&sim, v.iter().copied());
                let r = u.unmap_pages(d, &v);
                prop_assert_eq!(r.is_ok(), ok, "{:?}: {:?}", o, r);
                if ok {
                    gone(&sim, &mut u, v.iter().copied())?;
                    for p in pages {
                        let (f, _) = model.remove(p).unwrap();
                        let c = refs.get_mut(&f).unwrap();
                        *c -= 1;
                        if *c == 0 {
                            refs.remove(&f);
                        }
                    }
                }
            }
            Op::Dma { page, write } => {
                let r =
                    sim.borrow_mut()
                        .dma(NIC.source_id(), iova(*page) + 8, *write, &mut [7u8; 4]);
                let want = match model.get(page) {
                    Some(&(f, w)) if w || !*write => Ok(RAM + f * K4 + 8),
                    _ => Err(if *write { 5 } else { 6 }),
                };
                prop_assert_eq!(r, want, "{:?}", o);
                u.poll_faults();
            }
        }
        prop_assert_eq!(u.live_pages(d), Some(model.len() as u64));
        for (&f, &c) in &refs {
            prop_assert_eq!(u.frame_refcount(RAM / K4 + f), c);
        }
        prop_assert_eq!(
            u.total_refs(),
            refs.values().map(|&c| u64::from(c)).sum::<u64>()
        );
    }
    // Every mapped page translates for the device as modelled (through whatever
    // the IOTLB holds).
    for (&p, &(f, _)) in &model {
        let r = sim
            .borrow_mut()
            .dma(NIC.source_id(), iova(p), false, &mut [0u8; 1]);
        prop_assert_eq!(r, Ok(RAM + f * K4));
    }
    let r = u.destroy_domain(d).unwrap();
    prop_assert_eq!(r.live_pages, model.len() as u64);
    prop_assert_eq!(u.total_refs(), 0);
    prop_assert_eq!(
        live_frames(&sim),
        base - 1,
        "the domain's root table is gone too"
    );
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(48))]

    #[test]
    fn model_qemu_default(ops in proptest::collection::vec(op(), 1..30)) {
        run_model(QEMU_CAP, QEMU_ECAP, &ops)?;
    }

    #[test]
    fn model_caching_mode(ops in proptest::collection::vec(op(), 1..30)) {
        run_model(QEMU_CAP | CM, QEMU_ECAP, &ops)?;
    }

    #[test]
    fn model_register_invalidation_4level(ops in proptest::collection::vec(op(), 1..30)) {
        run_model(CAP48, QEMU_ECAP & !ECAP_QI, &ops)?;
    }

    #[test]
    fn model_small_mamv_no_large_pages(ops in proptest::collection::vec(op(), 1..30)) {
        run_model((QEMU_CAP & !(0x3f << 48) & !(0xf << 34)) | 1 << 48, QEMU_ECAP | ECAP_C, &ops)?;
    }
}
