//! Unit tests: each rule, each error path, the hostile cases.

use abi::errno;
use abi::event_channel::DOMID_SELF;
use abi::grant_table::*;

use super::*;
use crate::{
    guest, CreateError, DestroyReport, DomainConfig, GntSt, MapRequest, UnmapRequest,
    MAPTRACK_PER_FRAME, SET_STATUS_ATTEMPTS,
};

const RW: u16 = GTF_READING | GTF_WRITING;
const A: u64 = 0x8000_0000; // a host address in the mapper's physmap

fn cfg() -> DomainConfig {
    DomainConfig::default()
}

fn pv_cfg() -> DomainConfig {
    DomainConfig {
        translated: false,
        iommu_sync: true,
        ..DomainConfig::default()
    }
}

// ---------------------------------------------------------------- map / unmap basics

#[test]
fn map_then_unmap_v1_sets_and_clears_flags() {
    let (mut e, mut h) = setup(&[1, 2], cfg());
    grant(&e, &mut h, 1, 10, 2, 5, false);
    let o = e.map(2, &hmap(1, 10, false, A), &mut h).unwrap();
    assert_eq!(o.mfn, ram_mfn(1, 5));
    assert_eq!(o.gfn, 5);
    assert_eq!(o.dev_bus_addr, ram_mfn(1, 5) << 12);
    assert!(o.host_map && !o.device_map && !o.readonly);
    assert_eq!(rw_bits(&e, &h, 1, 10), RW);
    assert_eq!(
        h.host_maps.get(&(2, A)),
        Some(&(ram_mfn(1, 5), GNTMAP_HOST_MAP))
    );
    let p = e.pins(1, 10).unwrap();
    assert_eq!((p.host_write, p.host_read, p.domid), (1, 0, 2));
    assert_eq!(e.domain_counters(2).unwrap().live_mappings, 1);

    unmap(&mut e, &mut h, 2, o.handle, A).unwrap();
    assert_eq!(rw_bits(&e, &h, 1, 10), 0);
    assert_eq!(flags(&e, &h, 1, 10), GTF_PERMIT_ACCESS);
    assert!(h.host_maps.is_empty());
    assert!(!e.pins(1, 10).unwrap().any());
    let c = e.counters();
    assert_eq!((c.maps, c.unmaps), (1, 1));
    let dc = e.domain_counters(2).unwrap();
    assert_eq!((dc.maps, dc.unmaps, dc.live_mappings), (1, 1, 0));
}

#[test]
fn readonly_map_sets_only_reading_and_write_upgrade_adds_writing() {
    let (mut e, mut h) = setup(&[1, 2], cfg());
    grant(&e, &mut h, 1, 3, 2, 7, false);
    let ro = e.map(2, &hmap(1, 3, true, A), &mut h).unwrap();
    assert!(ro.readonly);
    assert_eq!(rw_bits(&e, &h, 1, 3), GTF_READING);
    let rw = e.map(2, &hmap(1, 3, false, A + 0x1000), &mut h).unwrap();
    assert_eq!(rw_bits(&e, &h, 1, 3), RW);
    unmap(&mut e, &mut h, 2, rw.handle, A + 0x1000).unwrap();
    assert_eq!(
        rw_bits(&e, &h, 1, 3),
        GTF_READING,
        "writing dropped with the last write pin"
    );
    unmap(&mut e, &mut h, 2, ro.handle, A).unwrap();
    assert_eq!(rw_bits(&e, &h, 1, 3), 0);
}

#[test]
fn v2_map_uses_status_frame() {
    let (mut e, mut h) = setup(&[1, 2], cfg());
    assert_eq!(e.set_version(1, 2, &mut h).ret, 0);
    assert_eq!(e.table(1).unwrap().nr_status_frames(), 1);
    grant(&e, &mut h, 1, 200, 2, 9, false);
    let o = e.map(2, &hmap(1, 200, false, A), &mut h).unwrap();
    assert_eq!(o.mfn, ram_mfn(1, 9));
    assert_eq!(rw_bits(&e, &h, 1, 200), RW);
    assert_eq!(
        flags(&e, &h, 1, 200),
        GTF_PERMIT_ACCESS,
        "v2 header carries no status"
    );
    unmap(&mut e, &mut h, 2, o.handle, A).unwrap();
    assert_eq!(rw_bits(&e, &h, 1, 200), 0);
    // 256 entries per v2 frame: ref 256 exists, 512 does not.
    grant(&e, &mut h, 1, 255, 2, 9, true);
    assert!(e.map(2, &hmap(1, 255, true, A), &mut h).is_ok());
    assert_eq!(
        e.map(2, &hmap(1, 256, true, A + 0x1000), &mut h),
        Err(GntSt::BadGntref)
    );
}

// ---------------------------------------------------------------- map error paths, in Xen's order

#[test]
fn map_without_host_or_device_flag_is_bad_gntref_before_anything_else() {
    let (mut e, mut h) = setup(&[1, 2], cfg());
    let r = MapRequest {
        host_addr: A,
        flags: GNTMAP_READONLY,
        gref: u32::MAX,
        dom: 99,
    };
    assert_eq!(e.map(2, &r, &mut h), Err(GntSt::BadGntref));
}

#[test]
fn translated_domains_may_not_device_application_or_pte_map() {
    let (mut e, mut h) = setup(&[1, 2], cfg());
    grant(&e, &mut h, 1, 0, 2, 1, false);
    for extra in [
        GNTMAP_DEVICE_MAP,
        GNTMAP_APPLICATION_MAP,
        GNTMAP_CONTAINS_PTE,
    ] {
        let r = MapRequest {
            flags: GNTMAP_HOST_MAP | extra,
            ..hmap(99, 0, false, A)
        };
        // general_error comes before the bad domain.
        assert_eq!(e.map(2, &r, &mut h), Err(GntSt::GeneralError));
    }
    // Unknown flag bits fail in the p2m mapping step (after pinning), and are undone.
    let r = MapRequest {
        flags: GNTMAP_HOST_MAP | 1 << 5,
        ..hmap(1, 0, false, A)
    };
    assert_eq!(e.map(2, &r, &mut h), Err(GntSt::GeneralError));
    assert_eq!(rw_bits(&e, &h, 1, 0), 0);
    assert!(!e.pins(1, 0).unwrap().any());
}

#[test]
fn map_bad_domain() {
    let (mut e, mut h) = setup(&[1, 2], cfg());
    assert_eq!(
        e.map(2, &hmap(7, 0, false, A), &mut h),
        Err(GntSt::BadDomain)
    );
    // DOMID_SELF is not a domain id for map (rcu_lock_domain_by_id).
    assert_eq!(
        e.map(2, &hmap(DOMID_SELF, 0, false, A), &mut h),
        Err(GntSt::BadDomain)
    );
    assert_eq!(
        e.map(2, &hmap(0xffff, 0, false, A), &mut h),
        Err(GntSt::BadDomain)
    );
}

#[test]
fn map_bad_ref_out_of_range_guest_indices() {
    let (mut e, mut h) = setup(&[1, 2], cfg());
    for r in [512, 513, 4096, 0x7fff_ffff, u32::MAX] {
        assert_eq!(
            e.map(2, &hmap(1, r, false, A), &mut h),
            Err(GntSt::BadGntref)
        );
    }
    // The handle reserved for the failed op was given back.
    assert_eq!(e.maptrack(2).unwrap().in_use(), 0);
    assert_eq!(e.counters().map_failures, 5);
}

#[test]
fn map_wrong_grantee_or_type_is_general_error() {
    let (mut e, mut h) = setup(&[1, 2, 3], cfg());
    grant(&e, &mut h, 1, 4, 3, 1, false);
    assert_eq!(
        e.map(2, &hmap(1, 4, false, A), &mut h),
        Err(GntSt::GeneralError)
    );
    // Invalid entry.
    assert_eq!(
        e.map(2, &hmap(1, 5, true, A), &mut h),
        Err(GntSt::GeneralError)
    );
    // accept_transfer is not access.
    let t = e.table(1).unwrap().shared_frames()[0];
    h.mem
        .set_u32(t, 6 * 8, u32::from(GTF_ACCEPT_TRANSFER) | 2 << 16);
    assert_eq!(
        e.map(2, &hmap(1, 6, true, A), &mut h),
        Err(GntSt::GeneralError)
    );
    assert_eq!(rw_bits(&e, &h, 1, 4), 0);
}

#[test]
fn writable_map_of_readonly_grant_is_refused() {
    let (mut e, mut h) = setup(&[1, 2], cfg());
    grant(&e, &mut h, 1, 4, 2, 1, true);
    assert_eq!(
        e.map(2, &hmap(1, 4, false, A), &mut h),
        Err(GntSt::GeneralError)
    );
    assert_eq!(flags(&e, &h, 1, 4), GTF_PERMIT_ACCESS | GTF_READONLY);
    let o = e.map(2, &hmap(1, 4, true, A), &mut h).unwrap();
    // Still refused once read-pinned.
    assert_eq!(
        e.map(2, &hmap(1, 4, false, A + 0x1000), &mut h),
        Err(GntSt::GeneralError)
    );
    assert_eq!(rw_bits(&e, &h, 1, 4), GTF_READING);
    unmap(&mut e, &mut h, 2, o.handle, A).unwrap();
}

#[test]
fn granter_frame_must_be_its_ram() {
    let (mut e, mut h) = setup(&[1, 2], cfg());
    grant(&e, &mut h, 1, 1, 2, RAM_FRAMES + 5, false);
    assert_eq!(e.map(2, &hmap(1, 1, false, A), &mut h), Err(GntSt::BadPage));
    assert_eq!(rw_bits(&e, &h, 1, 1), 0, "status undone");
    h.paged_out.insert((1, 3));
    grant(&e, &mut h, 1, 2, 2, 3, false);
    assert_eq!(e.map(2, &hmap(1, 2, false, A), &mut h), Err(GntSt::Eagain));
    h.readonly_gfns.insert((1, 4));
    grant(&e, &mut h, 1, 3, 2, 4, false);
    assert_eq!(
        e.map(2, &hmap(1, 3, false, A), &mut h),
        Err(GntSt::GeneralError)
    );
    assert!(e.map(2, &hmap(1, 3, true, A), &mut h).is_ok());
}

#[test]
fn entry_in_use_by_another_domain() {
    // The granter (hostile) re-targets a mapped entry at another domain: that domain
    // cannot map it while the first holds it (one active domid per entry).
    let (mut e, mut h) = setup(&[1, 2, 3], cfg());
    grant(&e, &mut h, 1, 8, 2, 1, false);
    let o = e.map(2, &hmap(1, 8, false, A), &mut h).unwrap();
    grant(&e, &mut h, 1, 8, 3, 2, false);
    assert_eq!(
        e.map(3, &hmap(1, 8, false, A), &mut h),
        Err(GntSt::GeneralError)
    );
    // d2 keeps mapping the frame it pinned, not the rewritten one.
    let o2 = e.map(2, &hmap(1, 8, true, A + 0x1000), &mut h).unwrap();
    assert_eq!(o2.mfn, o.mfn);
    unmap(&mut e, &mut h, 2, o.handle, A).unwrap();
    unmap(&mut e, &mut h, 2, o2.handle, A + 0x1000).unwrap();
    // Now free: d3 may map it.
    let o3 = e.map(3, &hmap(1, 8, false, A), &mut h).unwrap();
    assert_eq!(o3.mfn, ram_mfn(1, 2));
}

#[test]
fn pin_counter_overflow_is_refused() {
    let (mut e, mut h) = setup(&[1, 2], cfg());
    grant(&e, &mut h, 1, 0, 2, 1, false);
    for i in 0..128u64 {
        e.map(2, &hmap(1, 0, false, A + i * 0x1000), &mut h)
            .unwrap();
    }
    assert_eq!(
        e.map(2, &hmap(1, 0, false, A + 200 * 0x1000), &mut h),
        Err(GntSt::GeneralError)
    );
    // The read counter is separate.
    assert!(e
        .map(2, &hmap(1, 0, true, A + 201 * 0x1000), &mut h)
        .is_ok());
    assert_eq!(e.pins(1, 0).unwrap().host_write, 128);
}

#[test]
fn maptrack_exhaustion_is_no_space_and_recovers() {
    let c = DomainConfig {
        max_maptrack_frames: 1,
        ..cfg()
    };
    let (mut e, mut h) = setup(&[1, 2], c);
    for r in 0..3 {
        grant(&e, &mut h, 1, r, 2, 1, true);
    }
    let mut handles = Vec::new();
    for i in 0..MAPTRACK_PER_FRAME {
        let o = e
            .map(2, &hmap(1, i % 3, true, A + u64::from(i) * 0x1000), &mut h)
            .unwrap();
        handles.push(o.handle);
    }
    handles.sort();
    handles.dedup();
    assert_eq!(handles.len() as u32, MAPTRACK_PER_FRAME);
    assert_eq!(
        e.map(2, &hmap(1, 0, true, A + 0x1000_0000), &mut h),
        Err(GntSt::NoSpace)
    );
    // no_space is reported before the ref is even looked at (Xen's order).
    assert_eq!(
        e.map(2, &hmap(1, u32::MAX, true, 0), &mut h),
        Err(GntSt::NoSpace)
    );
    unmap(&mut e, &mut h, 2, 7, A + 7 * 0x1000).unwrap();
    assert!(e.map(2, &hmap(1, 0, true, A + 0x1000_0000), &mut h).is_ok());
}

#[test]
fn freed_handles_are_reused_last() {
    let (mut e, mut h) = setup(&[1, 2], cfg());
    grant(&e, &mut h, 1, 0, 2, 1, true);
    let a = e.map(2, &hmap(1, 0, true, A), &mut h).unwrap().handle;
    unmap(&mut e, &mut h, 2, a, A).unwrap();
    let b = e.map(2, &hmap(1, 0, true, A), &mut h).unwrap().handle;
    assert_ne!(a, b, "a stale handle is not handed out again at once");
}

#[test]
fn sub_page_and_transitive_entries_cannot_be_mapped() {
    let (mut e, mut h) = setup(&[1, 2, 3], cfg());
    e.set_version(1, 2, &mut h);
    let t = e.table(1).unwrap().shared_frames()[0];
    // sub-page grant of gfn 1 bytes [0, 100)
    h.mem.write(t, 16 * 4 + 2, &2u16.to_le_bytes());
    h.mem.write(t, 16 * 4 + 4, &(100u32 << 16).to_le_bytes());
    h.mem.write(t, 16 * 4 + 8, &1u64.to_le_bytes());
    h.mem
        .write(t, 16 * 4, &(GTF_PERMIT_ACCESS | GTF_SUB_PAGE).to_le_bytes());
    assert_eq!(
        e.map(2, &hmap(1, 4, true, A), &mut h),
        Err(GntSt::GeneralError)
    );
    // transitive
    h.mem.write(t, 16 * 5 + 2, &2u16.to_le_bytes());
    h.mem.write(t, 16 * 5, &GTF_TRANSITIVE.to_le_bytes());
    assert_eq!(
        e.map(2, &hmap(1, 5, true, A), &mut h),
        Err(GntSt::GeneralError)
    );
    assert_eq!(rw_bits(&e, &h, 1, 4) | rw_bits(&e, &h, 1, 5), 0);
}

#[test]
fn cache_attribute_grants_are_refused_for_translated_mappers() {
    let (mut e, mut h) = setup(&[1, 2], cfg());
    grant(&e, &mut h, 1, 0, 2, 1, false);
    let t = e.table(1).unwrap().shared_frames()[0];
    let f = h.mem.get_u16(t, 0) | GTF_PAT;
    h.mem.write(t, 0, &f.to_le_bytes());
    assert_eq!(
        e.map(2, &hmap(1, 0, false, A), &mut h),
        Err(GntSt::GeneralError)
    );
    assert_eq!(rw_bits(&e, &h, 1, 0), 0);
    assert!(!e.pins(1, 0).unwrap().any());
    assert_eq!(e.maptrack(2).unwrap().in_use(), 0);
}

#[test]
fn host_mapping_failure_undoes_pin_status_and_handle() {
    let (mut e, mut h) = setup(&[1, 2], cfg());
    grant(&e, &mut h, 1, 0, 2, 1, false);
    h.fail_add_host = true;
    assert_eq!(
        e.map(2, &hmap(1, 0, false, A), &mut h),
        Err(GntSt::GeneralError)
    );
    assert_eq!(rw_bits(&e, &h, 1, 0), 0);
    assert!(!e.pins(1, 0).unwrap().any());
    assert_eq!(e.maptrack(2).unwrap().in_use(), 0);
    h.fail_add_host = false;
    assert!(e.map(2, &hmap(1, 0, false, A), &mut h).is_ok());
}

#[test]
fn map_of_own_grant_follows_the_entry() {
    // Xen has no special case: a domain may map its own grant if the entry names it.
    let (mut e, mut h) = setup(&[1, 2], cfg());
    grant(&e, &mut h, 1, 0, 1, 3, false);
    let o = e.map(1, &hmap(1, 0, false, A), &mut h).unwrap();
    assert_eq!(o.mfn, ram_mfn(1, 3));
    assert_eq!(rw_bits(&e, &h, 1, 0), RW);
    // Its own grant to somebody else: refused like any stranger.
    grant(&e, &mut h, 1, 1, 2, 3, false);
    assert_eq!(
        e.map(1, &hmap(1, 1, false, A + 0x1000), &mut h),
        Err(GntSt::GeneralError)
    );
    // Destroying it drops its own pins and frees everything.
    let rep = e.destroy_domain(1, &mut h).unwrap();
    assert_eq!(
        rep,
        DestroyReport {
            mappings_released: 1,
            table_freed: true
        }
    );
    assert!(e.table(1).is_none());
}

// ---------------------------------------------------------------- PV: device maps and the IOMMU

#[test]
fn pv_device_map_and_iommu_refcounts() {
    let (mut e, mut h) = setup(&[1, 2], pv_cfg());
    grant(&e, &mut h, 1, 0, 2, 1, false);
    let mfn = ram_mfn(1, 1);
    let rw = e
        .map(
            2,
            &MapRequest {
                host_addr: 0,
                flags: GNTMAP_DEVICE_MAP,
                gref: 0,
                dom: 1,
            },
            &mut h,
        )
        .unwrap();
    assert!(rw.device_map && !rw.host_map);
    assert_eq!(h.iommu.get(&(2, mfn)), Some(&true));
    let ro = e
        .map(
            2,
            &MapRequest {
                host_addr: 0,
                flags: GNTMAP_DEVICE_MAP | GNTMAP_READONLY,
                gref: 0,
                dom: 1,
            },
            &mut h,
        )
        .unwrap();
    assert_eq!(e.pins(1, 0).unwrap().dev_write, 1);
    assert_eq!(e.pins(1, 0).unwrap().dev_read, 1);
    // Wrong bus address.
    let bad = UnmapRequest {
        handle: rw.handle,
        host_addr: 0,
        dev_bus_addr: (mfn + 1) << 12,
        new_addr: 0,
    };
    let p = e.unmap_begin(2, &bad, &mut h);
    assert_eq!(p.status(), Err(GntSt::BadDevAddr));
    assert!(p.is_noop());
    let f = e.flush(2, &mut h);
    e.unmap_complete(p, &f, &mut h).unwrap();
    // Right one: the writable IOMMU entry becomes read-only (a read mapping remains).
    let ok = UnmapRequest {
        dev_bus_addr: mfn << 12,
        ..bad
    };
    let p = e.unmap_begin(2, &ok, &mut h);
    assert!(p.status().is_ok() && p.device_unmapped() && !p.host_unmapped());
    assert_eq!(h.iommu.get(&(2, mfn)), Some(&false));
    let f = e.flush(2, &mut h);
    e.unmap_complete(p, &f, &mut h).unwrap();
    assert_eq!(rw_bits(&e, &h, 1, 0), GTF_READING);
    let p = e.unmap_begin(
        2,
        &UnmapRequest {
            handle: ro.handle,
            ..ok
        },
        &mut h,
    );
    assert!(h.iommu.is_empty());
    let f = e.flush(2, &mut h);
    e.unmap_complete(p, &f, &mut h).unwrap();
    assert_eq!(rw_bits(&e, &h, 1, 0), 0);
}

#[test]
fn pv_partial_unmap_keeps_the_other_half() {
    let (mut e, mut h) = setup(&[1, 2], pv_cfg());
    grant(&e, &mut h, 1, 0, 2, 1, false);
    let o = e
        .map(
            2,
            &MapRequest {
                host_addr: A,
                flags: GNTMAP_DEVICE_MAP | GNTMAP_HOST_MAP,
                gref: 0,
                dom: 1,
            },
            &mut h,
        )
        .unwrap();
    let p = e.unmap_begin(2, &hunmap(o.handle, A), &mut h);
    assert!(p.host_unmapped() && !p.device_unmapped());
    let f = e.flush(2, &mut h);
    e.unmap_complete(p, &f, &mut h).unwrap();
    assert_eq!(e.mapping(2, o.handle).unwrap().flags, GNTMAP_DEVICE_MAP);
    assert_eq!(e.pins(1, 0).unwrap().dev_write, 1);
    assert_eq!(rw_bits(&e, &h, 1, 0), RW);
}

#[test]
fn iommu_failure_fails_the_map_cleanly() {
    let (mut e, mut h) = setup(&[1, 2], pv_cfg());
    grant(&e, &mut h, 1, 0, 2, 1, false);
    h.fail_iommu = true;
    assert_eq!(
        e.map(2, &hmap(1, 0, false, A), &mut h),
        Err(GntSt::GeneralError)
    );
    assert!(h.host_maps.is_empty(), "host mapping removed again");
    assert_eq!(rw_bits(&e, &h, 1, 0), 0);
    assert!(!e.pins(1, 0).unwrap().any());
}

// ---------------------------------------------------------------- unmap error paths, two phases

#[test]
fn unmap_bad_handles() {
    let (mut e, mut h) = setup(&[1, 2, 3], cfg());
    grant(&e, &mut h, 1, 0, 2, 1, false);
    let o = e.map(2, &hmap(1, 0, false, A), &mut h).unwrap();
    // Beyond the maptrack limit, a never-used handle, another domain's handle.
    for (ld, hd) in [(2, 256), (2, u32::MAX), (2, o.handle + 1), (3, o.handle)] {
        let p = e.unmap_begin(ld, &hunmap(hd, A), &mut h);
        assert_eq!(p.status(), Err(GntSt::BadHandle), "{ld} {hd}");
        assert!(p.is_noop());
        let f = e.flush(ld, &mut h);
        e.unmap_complete(p, &f, &mut h).unwrap();
    }
    unmap(&mut e, &mut h, 2, o.handle, A).unwrap();
    // Unmapping twice.
    assert_eq!(unmap(&mut e, &mut h, 2, o.handle, A), Err(GntSt::BadHandle));
    assert_eq!(e.counters().unmap_failures, 5);
}

#[test]
fn unmap_with_wrong_address_fails_and_keeps_the_mapping() {
    let (mut e, mut h) = setup(&[1, 2], cfg());
    grant(&e, &mut h, 1, 0, 2, 1, false);
    let o = e.map(2, &hmap(1, 0, false, A), &mut h).unwrap();
    assert_eq!(
        unmap(&mut e, &mut h, 2, o.handle, A + 0x1000),
        Err(GntSt::GeneralError)
    );
    assert!(e.mapping(2, o.handle).is_some());
    assert_eq!(rw_bits(&e, &h, 1, 0), RW);
    unmap(&mut e, &mut h, 2, o.handle, A).unwrap();
}

#[test]
fn unmap_with_zero_addresses_does_nothing_and_succeeds() {
    let (mut e, mut h) = setup(&[1, 2], cfg());
    grant(&e, &mut h, 1, 0, 2, 1, false);
    let o = e.map(2, &hmap(1, 0, false, A), &mut h).unwrap();
    assert_eq!(unmap(&mut e, &mut h, 2, o.handle, 0), Ok(()));
    assert!(e.mapping(2, o.handle).is_some());
    assert_eq!(e.counters().unmaps, 0);
}

#[test]
fn unmap_releases_the_grant_only_after_a_flush() {
    let (mut e, mut h) = setup(&[1, 2, 3], cfg());
    grant(&e, &mut h, 1, 0, 2, 1, false);
    let o = e.map(2, &hmap(1, 0, false, A), &mut h).unwrap();
    let old = e.flush(2, &mut h);
    let p = e.unmap_begin(2, &hunmap(o.handle, A), &mut h);
    assert!(p.status().is_ok() && p.host_unmapped());
    // Mapping gone, handle free, but the grant is still pinned and flagged.
    assert!(e.mapping(2, o.handle).is_none());
    assert_eq!(rw_bits(&e, &h, 1, 0), RW);
    let ts = e.table(1).unwrap().shared_frames().to_vec();
    assert_eq!(guest::end_access_v1(&mut h, &ts, 0), Some(false));
    // A flush older than the token, or for another domain, does not do.
    let p = e.unmap_complete(p, &old, &mut h).unwrap_err();
    let other = e.flush(3, &mut h);
    let p = e.unmap_complete(p, &other, &mut h).unwrap_err();
    h.events.clear();
    let f = e.flush(2, &mut h);
    e.unmap_complete(p, &f, &mut h).unwrap();
    assert_eq!(rw_bits(&e, &h, 1, 0), 0);
    // Order: flush, then the flags are cleared.
    assert_eq!(h.events[0], Event::Flush(2));
    assert!(matches!(h.events[1], Event::Clear { .. }));
    assert_eq!(guest::end_access_v1(&mut h, &ts, 0), Some(true));
}

#[test]
fn batch_unmap_removes_flushes_then_releases() {
    let (mut e, mut h) = setup(&[1, 2], cfg());
    let mut ops = Vec::new();
    for r in 0..40u32 {
        grant(&e, &mut h, 1, r, 2, u64::from(r), false);
        let addr = A + u64::from(r) * 0x1000;
        let o = e.map(2, &hmap(1, r, false, addr), &mut h).unwrap();
        ops.push(GnttabUnmapGrantRef {
            host_addr: addr,
            dev_bus_addr: 0,
            handle: o.handle,
            status: 99,
        });
    }
    ops[5].handle = 9999;
    h.events.clear();
    e.unmap_grant_refs(2, &mut ops, &mut h);
    assert!(ops
        .iter()
        .enumerate()
        .all(|(i, o)| o.status == if i == 5 { GNTST_BAD_HANDLE } else { GNTST_OKAY }));
    // Two batches (32 + 8): removals, one flush, clears; again.
    let kinds: Vec<u8> = h
        .events
        .iter()
        .map(|ev| match ev {
            Event::RemoveHost { .. } => b'R',
            Event::Flush(_) => b'F',
            Event::Clear { .. } => b'C',
            _ => b'?',
        })
        .collect();
    let mut want = Vec::new();
    want.extend([b'R'; 31]);
    want.push(b'F');
    want.extend([b'C'; 31]);
    want.extend([b'R'; 8]);
    want.push(b'F');
    want.extend([b'C'; 8]);
    assert_eq!(
        String::from_utf8(kinds).unwrap(),
        String::from_utf8(want).unwrap()
    );
    assert_eq!(
        rw_bits(&e, &h, 1, 5),
        RW,
        "the bad-handle op left ref 5 mapped"
    );
}

#[test]
fn unmap_and_replace_on_translated_domains() {
    let (mut e, mut h) = setup(&[1, 2], cfg());
    grant(&e, &mut h, 1, 0, 2, 1, false);
    let o = e.map(2, &hmap(1, 0, false, A), &mut h).unwrap();
    let mut ops = [GnttabUnmapAndReplace {
        host_addr: A,
        new_addr: A + 0x1000,
        handle: o.handle,
        status: 0,
    }];
    e.unmap_and_replace(2, &mut ops, &mut h);
    assert_eq!(ops[0].status, GNTST_GENERAL_ERROR);
    assert!(e.mapping(2, o.handle).is_some());
    ops[0].new_addr = 0;
    e.unmap_and_replace(2, &mut ops, &mut h);
    assert_eq!(ops[0].status, GNTST_OKAY);
    assert!(e.mapping(2, o.handle).is_none());
    assert_eq!(rw_bits(&e, &h, 1, 0), 0);
}

// ---------------------------------------------------------------- hostile granter: double fetch

#[test]
fn v1_entry_retargeted_between_check_and_update_is_refused() {
    let (mut e, mut h) = setup(&[1, 2, 3], cfg());
    grant(&e, &mut h, 1, 0, 2, 1, false);
    let t = e.table(1).unwrap().shared_frames()[0];
    // Between the engine's read and its compare-exchange the granter re-targets the
    // entry at domain 3 (a real race on hardware).
    h.before_cmpxchg = Some(Box::new(move |m, mfn, off| {
        if mfn == t && off == 0 {
            let v = m.get_u32(mfn, 0);
            m.set_u32(mfn, 0, (v & 0xffff) | 3 << 16);
        }
    }));
    assert_eq!(
        e.map(2, &hmap(1, 0, false, A), &mut h),
        Err(GntSt::GeneralError)
    );
    h.before_cmpxchg = None;
    assert_eq!(
        rw_bits(&e, &h, 1, 0),
        0,
        "no flag landed on the rewritten entry"
    );
    assert!(!e.pins(1, 0).unwrap().any());
    assert!(h.host_maps.is_empty());
}

#[test]
fn v1_entry_made_readonly_during_write_map_is_refused() {
    let (mut e, mut h) = setup(&[1, 2], cfg());
    grant(&e, &mut h, 1, 0, 2, 1, false);
    h.before_cmpxchg = Some(Box::new(|m, mfn, off| {
        let v = m.get_u32(mfn, off);
        m.set_u32(mfn, off, v | u32::from(GTF_READONLY));
    }));
    assert_eq!(
        e.map(2, &hmap(1, 0, false, A), &mut h),
        Err(GntSt::GeneralError)
    );
    assert_eq!(rw_bits(&e, &h, 1, 0), 0);
}

#[test]
fn v1_benign_concurrent_change_is_retried() {
    let (mut e, mut h) = setup(&[1, 2], cfg());
    grant(&e, &mut h, 1, 0, 2, 1, false);
    let mut once = true;
    h.before_cmpxchg = Some(Box::new(move |m, mfn, off| {
        if once {
            once = false;
            // The granter sets an unused flag bit of its own at the worst moment.
            let v = m.get_u32(mfn, off);
            m.set_u32(mfn, off, v | 1 << 12);
        }
    }));
    h.cmpxchg_calls = 0;
    let o = e.map(2, &hmap(1, 0, true, A), &mut h).unwrap();
    assert_eq!(
        h.cmpxchg_calls, 2,
        "first compare-exchange missed, the retry landed"
    );
    assert_eq!(
        flags(&e, &h, 1, 0),
        GTF_PERMIT_ACCESS | GTF_READING | 1 << 12
    );
    h.before_cmpxchg = None;
    unmap(&mut e, &mut h, 2, o.handle, A).unwrap();
    assert_eq!(flags(&e, &h, 1, 0), GTF_PERMIT_ACCESS | 1 << 12);
}

#[test]
fn v1_entry_that_never_settles_fails_after_bounded_retries() {
    let (mut e, mut h) = setup(&[1, 2], cfg());
    grant(&e, &mut h, 1, 0, 2, 1, false);
    h.before_cmpxchg = Some(Box::new(|m, mfn, off| {
        let v = m.get_u32(mfn, off);
        m.set_u32(mfn, off, v ^ 1 << 12);
    }));
    h.cmpxchg_calls = 0;
    assert_eq!(
        e.map(2, &hmap(1, 0, true, A), &mut h),
        Err(GntSt::GeneralError)
    );
    assert_eq!(h.cmpxchg_calls, SET_STATUS_ATTEMPTS);
    assert_eq!(rw_bits(&e, &h, 1, 0), 0);
}

#[test]
fn v2_entry_changed_after_status_set_is_undone() {
    let (mut e, mut h) = setup(&[1, 2, 3], cfg());
    e.set_version(1, 2, &mut h);
    grant(&e, &mut h, 1, 0, 2, 1, false);
    let t = e.table(1).unwrap().shared_frames()[0];
    // Right after the engine publishes GTF_reading|GTF_writing in the status frame, the
    // granter re-targets the entry: the engine's second read catches it.
    h.after_or = Some(Box::new(move |m, _, _| {
        let v = m.get_u32(t, 0);
        m.set_u32(t, 0, (v & 0xffff) | 3 << 16);
    }));
    assert_eq!(
        e.map(2, &hmap(1, 0, false, A), &mut h),
        Err(GntSt::GeneralError)
    );
    assert_eq!(rw_bits(&e, &h, 1, 0), 0, "status cleared again");
    assert!(!e.pins(1, 0).unwrap().any());

    // Made read-only instead: also caught.
    h.after_or = None;
    grant(&e, &mut h, 1, 1, 2, 1, false);
    h.after_or = Some(Box::new(move |m, _, _| {
        let v = m.get_u32(t, 16);
        m.set_u32(t, 16, v | u32::from(GTF_READONLY));
    }));
    assert_eq!(
        e.map(2, &hmap(1, 1, false, A), &mut h),
        Err(GntSt::GeneralError)
    );
    assert_eq!(rw_bits(&e, &h, 1, 1), 0);
}

#[test]
fn frame_changed_while_pinned_is_ignored_by_map_and_refused_by_copy_upgrade() {
    let (mut e, mut h) = setup(&[1, 2], cfg());
    grant(&e, &mut h, 1, 0, 2, 1, false);
    let o = e.map(2, &hmap(1, 0, true, A), &mut h).unwrap();
    // The granter points the entry at another frame while it is mapped.
    let t = e.table(1).unwrap().shared_frames()[0];
    h.mem.set_u32(t, 4, 2);
    let o2 = e.map(2, &hmap(1, 0, false, A + 0x1000), &mut h).unwrap();
    assert_eq!(o2.mfn, o.mfn, "the pinned frame is used, not the new one");
    unmap(&mut e, &mut h, 2, o2.handle, A + 0x1000).unwrap();
    // A copy that needs a write upgrade re-reads the frame and refuses the mismatch.
    let op = GnttabCopy {
        source_u: 0,
        source_domid: DOMID_SELF,
        dest_u: 0,
        dest_domid: 1,
        len: 8,
        flags: GNTCOPY_DEST_GREF,
        ..Default::default()
    };
    assert_eq!(e.copy(2, &op, &mut h), Err(GntSt::GeneralError));
    assert_eq!(rw_bits(&e, &h, 1, 0), GTF_READING);
    unmap(&mut e, &mut h, 2, o.handle, A).unwrap();
    assert_eq!(rw_bits(&e, &h, 1, 0), 0);
}

// ---------------------------------------------------------------- revocation by the granter

#[test]
fn granter_cannot_end_access_while_mapped_v1() {
    let (mut e, mut h) = setup(&[1, 2], cfg());
    grant(&e, &mut h, 1, 0, 2, 1, false);
    let ts = e.table(1).unwrap().shared_frames().to_vec();
    let o = e.map(2, &hmap(1, 0, true, A), &mut h).unwrap();
    assert_eq!(guest::end_access_v1(&mut h, &ts, 0), Some(false));
    assert_eq!(
        flags(&e, &h, 1, 0),
        GTF_PERMIT_ACCESS | GTF_READING,
        "untouched"
    );
    unmap(&mut e, &mut h, 2, o.handle, A).unwrap();
    assert_eq!(guest::end_access_v1(&mut h, &ts, 0), Some(true));
    assert_eq!(flags(&e, &h, 1, 0), 0);
    assert_eq!(
        e.map(2, &hmap(1, 0, true, A), &mut h),
        Err(GntSt::GeneralError)
    );
}

#[test]
fn granter_revoking_in_use_v2_entry_is_told_it_is_busy() {
    let (mut e, mut h) = setup(&[1, 2], cfg());
    e.set_version(1, 2, &mut h);
    grant(&e, &mut h, 1, 0, 2, 1, false);
    let t = e.table(1).unwrap();
    let (ts, ss) = (t.shared_frames().to_vec(), t.status_frames().to_vec());
    let o = e.map(2, &hmap(1, 0, false, A), &mut h).unwrap();
    // Linux v2: clear the flags, then look at the status: busy.
    assert_eq!(guest::end_access_v2(&mut h, &ts, &ss, 0), Some(false));
    // The existing mapping stays valid and unmaps cleanly; a new map is refused.
    assert_eq!(
        e.map(2, &hmap(1, 1, false, A + 0x1000), &mut h),
        Err(GntSt::GeneralError)
    );
    unmap(&mut e, &mut h, 2, o.handle, A).unwrap();
    assert_eq!(guest::end_access_v2(&mut h, &ts, &ss, 0), Some(true));
}

#[test]
fn granter_scribbling_over_a_mapped_entry_cannot_break_unmap() {
    let (mut e, mut h) = setup(&[1, 2], cfg());
    grant(&e, &mut h, 1, 0, 2, 1, false);
    let o = e.map(2, &hmap(1, 0, false, A), &mut h).unwrap();
    let t = e.table(1).unwrap().shared_frames()[0];
    h.mem.write(t, 0, &[0xff; 8]);
    unmap(&mut e, &mut h, 2, o.handle, A).unwrap();
    assert!(!e.pins(1, 0).unwrap().any());
    // Only GTF_reading / GTF_writing were touched by the engine.
    assert_eq!(h.mem.get_u16(t, 0), !RW);
}

// ---------------------------------------------------------------- copy

fn copy_op(src: (bool, u16, u64, u16), dst: (bool, u16, u64, u16), len: u16) -> GnttabCopy {
    GnttabCopy {
        source_u: src.2,
        source_domid: src.1,
        source_offset: src.3,
        dest_u: dst.2,
        dest_domid: dst.1,
        dest_offset: dst.3,
        dest_pad: 0,
        len,
        flags: if src.0 { GNTCOPY_SOURCE_GREF } else { 0 }
            | if dst.0 { GNTCOPY_DEST_GREF } else { 0 },
        status: 0,
    }
}

#[test]
fn copy_between_grants_and_frames() {
    let (mut e, mut h) = setup(&[1, 2, 3], cfg());
    grant(&e, &mut h, 1, 0, 2, 4, true); // source, read-only grant
    grant(&e, &mut h, 3, 0, 2, 6, false); // destination
    let src = h.mem.read(ram_mfn(1, 4), 100, 300);
    let op = copy_op((true, 1, 0, 100), (true, 3, 0, 1000), 300);
    e.copy(2, &op, &mut h).unwrap();
    assert_eq!(h.mem.read(ram_mfn(3, 6), 1000, 300), src);
    assert_eq!(
        rw_bits(&e, &h, 1, 0) | rw_bits(&e, &h, 3, 0),
        0,
        "pins released"
    );
    // gref -> own frame, own frame -> gref.
    let op = copy_op((true, 1, 0, 0), (false, DOMID_SELF, 9, 0), 4096);
    e.copy(2, &op, &mut h).unwrap();
    assert_eq!(
        h.mem.read(ram_mfn(2, 9), 0, 4096),
        h.mem.read(ram_mfn(1, 4), 0, 4096)
    );
    let op = copy_op((false, DOMID_SELF, 9, 10), (true, 3, 0, 20), 1);
    e.copy(2, &op, &mut h).unwrap();
    let c = e.counters();
    assert_eq!((c.copies, c.bytes_copied), (3, 300 + 4096 + 1));
    assert_eq!(e.domain_counters(2).unwrap().bytes_copied, 4397);
}

#[test]
fn copy_error_paths_in_xen_order() {
    let (mut e, mut h) = setup(&[1, 2, 3], cfg());
    grant(&e, &mut h, 1, 0, 2, 4, true);
    grant(&e, &mut h, 3, 0, 2, 6, false);
    let ok_src = (true, 1, 0, 0);
    let ok_dst = (true, 3, 0, 0);
    let cases: Vec<(GnttabCopy, Result<(), GntSt>)> = vec![
        // len 0 is a no-op, whatever else is wrong.
        (copy_op((true, 77, 0, 5000), (false, 9, 0, 0), 0), Ok(())),
        // A frame may only be named for DOMID_SELF (even by its own numeric id).
        (
            copy_op((false, 1, 4, 0), ok_dst, 8),
            Err(GntSt::PermissionDenied),
        ),
        (
            copy_op((false, 2, 4, 0), ok_dst, 8),
            Err(GntSt::PermissionDenied),
        ),
        (
            copy_op(ok_src, (false, 3, 4, 0), 8),
            Err(GntSt::PermissionDenied),
        ),
        (copy_op((true, 77, 0, 0), ok_dst, 8), Err(GntSt::BadDomain)),
        (copy_op(ok_src, (true, 77, 0, 0), 8), Err(GntSt::BadDomain)),
        (copy_op((true, 1, 512, 0), ok_dst, 8), Err(GntSt::BadGntref)),
        (
            copy_op(ok_src, (true, 3, u32::MAX as u64, 0), 8),
            Err(GntSt::BadGntref),
        ),
        // Acquisition comes before the offset checks.
        (
            copy_op((true, 1, 1, 4095), ok_dst, 8),
            Err(GntSt::GeneralError),
        ),
        // The read-only grant cannot be a destination.
        (
            copy_op(ok_dst, (true, 1, 0, 0), 8),
            Err(GntSt::GeneralError),
        ),
        // Longer than a page, or crossing the end of one.
        (copy_op(ok_src, ok_dst, 4097), Err(GntSt::BadCopyArg)),
        (copy_op(ok_src, ok_dst, u16::MAX), Err(GntSt::BadCopyArg)),
        (
            copy_op((true, 1, 0, 4000), ok_dst, 97),
            Err(GntSt::BadCopyArg),
        ),
        (
            copy_op(ok_src, (true, 3, 0, 4095), 2),
            Err(GntSt::BadCopyArg),
        ),
        (
            copy_op((false, DOMID_SELF, RAM_FRAMES, 0), ok_dst, 8),
            Err(GntSt::BadPage),
        ),
        (
            copy_op(ok_src, (false, DOMID_SELF, u64::MAX, 0), 8),
            Err(GntSt::BadPage),
        ),
    ];
    for (i, (op, want)) in cases.iter().enumerate() {
        assert_eq!(e.copy(2, op, &mut h), *want, "case {i}");
        assert_eq!(rw_bits(&e, &h, 1, 0) | rw_bits(&e, &h, 3, 0), 0, "case {i}");
        assert!(!e.pins(1, 0).unwrap().any() && !e.pins(3, 0).unwrap().any());
    }
    // Batch through one call: per-op status.
    let mut ops: Vec<GnttabCopy> = cases.iter().map(|(o, _)| *o).collect();
    e.copy_batch(2, &mut ops, &mut h);
    for (op, (_, want)) in ops.iter().zip(&cases) {
        assert_eq!(op.status, crate::status_code(want));
    }
}

#[test]
fn copy_sub_page_and_transitive_v2() {
    let (mut e, mut h) = setup(&[1, 2, 3], cfg());
    e.set_version(1, 2, &mut h);
    let t = e.table(1).unwrap().shared_frames()[0];
    // Entry 4: sub-page grant to d2 of gfn 5, bytes [100, 300).
    h.mem.write(t, 64 + 2, &2u16.to_le_bytes());
    h.mem.write(t, 64 + 4, &(100u32 | 200 << 16).to_le_bytes());
    h.mem.write(t, 64 + 8, &5u64.to_le_bytes());
    h.mem
        .write(t, 64, &(GTF_PERMIT_ACCESS | GTF_SUB_PAGE).to_le_bytes());
    let inside = copy_op((true, 1, 4, 100), (false, DOMID_SELF, 1, 0), 200);
    e.copy(2, &inside, &mut h).unwrap();
    let outside = copy_op((true, 1, 4, 99), (false, DOMID_SELF, 1, 0), 10);
    assert_eq!(e.copy(2, &outside, &mut h), Err(GntSt::GeneralError));

    // d3 (v1) grants its gfn 7 to d1; d1 grants d2 transitive access to it.
    grant(&e, &mut h, 3, 2, 1, 7, false);
    h.mem.write(t, 16 * 6 + 2, &2u16.to_le_bytes());
    h.mem.write(t, 16 * 6 + 4, &3u32.to_le_bytes());
    h.mem.write(t, 16 * 6 + 8, &2u64.to_le_bytes());
    h.mem.write(t, 16 * 6, &GTF_TRANSITIVE.to_le_bytes());
    let tr = copy_op((false, DOMID_SELF, 1, 0), (true, 1, 6, 8), 16);
    let want = h.mem.read(ram_mfn(2, 1), 0, 16);
    e.copy(2, &tr, &mut h).unwrap();
    assert_eq!(h.mem.read(ram_mfn(3, 7), 8, 16), want);
    assert_eq!(rw_bits(&e, &h, 3, 2) | rw_bits(&e, &h, 1, 6), 0);
    assert!(!e.pins(3, 2).unwrap().any() && !e.pins(1, 6).unwrap().any());
    // Transitive grants can be switched off, and cannot point back at themselves.
    e.set_transitive_grants(false);
    assert_eq!(e.copy(2, &tr, &mut h), Err(GntSt::GeneralError));
    e.set_transitive_grants(true);
    h.mem.write(t, 16 * 6 + 4, &1u32.to_le_bytes());
    assert_eq!(e.copy(2, &tr, &mut h), Err(GntSt::GeneralError));
    assert_eq!(rw_bits(&e, &h, 1, 6), 0);
}

#[test]
fn copy_to_and_from_the_same_grant() {
    let (mut e, mut h) = setup(&[1, 2], cfg());
    grant(&e, &mut h, 1, 0, 2, 4, false);
    let before = h.mem.read(ram_mfn(1, 4), 0, 100);
    e.copy(
        2,
        &copy_op((true, 1, 0, 0), (true, 1, 0, 2000), 100),
        &mut h,
    )
    .unwrap();
    assert_eq!(h.mem.read(ram_mfn(1, 4), 2000, 100), before);
    assert_eq!(rw_bits(&e, &h, 1, 0), 0);
}

// ---------------------------------------------------------------- table size, versions

#[test]
fn setup_table_grows_to_max_and_no_further() {
    let c = DomainConfig {
        max_grant_frames: 4,
        ..cfg()
    };
    let (mut e, mut h) = setup(&[1, 2], c);
    assert_eq!(e.query_size(1, DOMID_SELF), Ok((1, 4)));
    let f = e.setup_table(1, DOMID_SELF, 3, &mut h).unwrap();
    assert_eq!(f.len(), 3);
    assert_eq!(e.query_size(1, 1), Ok((3, 4)));
    assert_eq!(e.table(1).unwrap().nr_entries(), 3 * 512);
    assert_eq!(
        e.setup_table(1, DOMID_SELF, 5, &mut h),
        Err(GntSt::GeneralError)
    );
    assert_eq!(
        e.setup_table(1, DOMID_SELF, u32::MAX, &mut h),
        Err(GntSt::GeneralError)
    );
    // Asking for fewer returns fewer; the table never shrinks.
    assert_eq!(
        e.setup_table(1, DOMID_SELF, 1, &mut h).unwrap(),
        f[..1].to_vec()
    );
    assert_eq!(e.query_size(1, 1), Ok((3, 4)));
    // Other domains' tables need privilege; unknown ones are bad_domain.
    assert_eq!(e.setup_table(2, 1, 1, &mut h), Err(GntSt::PermissionDenied));
    assert_eq!(e.query_size(2, 1), Err(GntSt::PermissionDenied));
    assert_eq!(e.query_size(2, 9), Err(GntSt::BadDomain));
    assert_eq!(e.setup_table(2, 9, 1, &mut h), Err(GntSt::BadDomain));
    // A grant in a grown frame is mappable.
    grant(&e, &mut h, 1, 1100, 2, 3, false);
    assert!(e.map(2, &hmap(1, 1100, false, A), &mut h).is_ok());
}

#[test]
fn growth_is_all_or_nothing_when_frames_run_out() {
    let (mut e, mut h) = setup(&[1], cfg());
    h.alloc_budget = Some(2);
    let before = h.allocated.len();
    assert_eq!(
        e.setup_table(1, DOMID_SELF, 5, &mut h),
        Err(GntSt::GeneralError)
    );
    assert_eq!(h.allocated.len(), before, "nothing leaked");
    assert_eq!(e.query_size(1, 1), Ok((1, 64)));
    h.alloc_budget = Some(2);
    assert!(e.setup_table(1, DOMID_SELF, 3, &mut h).is_ok());
}

#[test]
fn physmap_frames_grow_on_demand() {
    let c = DomainConfig {
        max_grant_frames: 4,
        ..cfg()
    };
    let (mut e, mut h) = setup(&[1], c);
    // Linux asks for the highest index first so the table grows once.
    let f3 = e.table_frame(1, 3, &mut h).unwrap();
    assert_eq!(e.table(1).unwrap().nr_frames(), 4);
    assert_eq!(e.table(1).unwrap().shared_frames()[3], f3);
    assert_eq!(e.table_frame(1, 4, &mut h), Err(-errno::EINVAL));
    assert_eq!(e.table_frame(1, u32::MAX, &mut h), Err(-errno::EINVAL));
    // Status frames only in v2.
    assert_eq!(
        e.table_frame(1, XENMAPIDX_GRANT_TABLE_STATUS, &mut h),
        Err(-errno::EINVAL)
    );
    assert_eq!(e.set_version(1, 2, &mut h).ret, 0);
    let s0 = e
        .table_frame(1, XENMAPIDX_GRANT_TABLE_STATUS, &mut h)
        .unwrap();
    assert_eq!(e.table(1).unwrap().status_frames(), &[s0]);
    assert_eq!(
        e.table_frame(1, XENMAPIDX_GRANT_TABLE_STATUS | 1, &mut h),
        Err(-errno::EINVAL),
        "a second status frame needs 9 shared frames, beyond the maximum"
    );
}

#[test]
fn version_rules() {
    let c1 = DomainConfig {
        max_version: 1,
        ..cfg()
    };
    let (mut e, mut h) = setup(&[1, 2], cfg());
    e.create_domain(3, c1, &mut h).unwrap();
    assert_eq!(e.get_version(1, DOMID_SELF), Ok(1));
    for v in [0, 3, u32::MAX] {
        let o = e.set_version(1, v, &mut h);
        assert_eq!((o.version, o.ret), (1, -errno::EINVAL));
    }
    let o = e.set_version(3, 2, &mut h);
    assert_eq!((o.version, o.ret), (1, -errno::ENOSYS));
    assert_eq!(
        e.set_version(1, 1, &mut h).ret,
        0,
        "same version: nothing to do"
    );
    // A pinned entry beyond the reserved ones blocks the switch.
    grant(&e, &mut h, 1, 8, 2, 1, false);
    let o = e.map(2, &hmap(1, 8, false, A), &mut h).unwrap();
    let r = e.set_version(1, 2, &mut h);
    assert_eq!((r.version, r.ret), (1, -errno::EBUSY));
    unmap(&mut e, &mut h, 2, o.handle, A).unwrap();
    // Reserved entries may stay mapped across a switch; their status moves.
    grant(&e, &mut h, 1, 1, 2, 3, false);
    let o = e.map(2, &hmap(1, 1, false, A), &mut h).unwrap();
    assert_eq!(e.set_version(1, 2, &mut h).ret, 0);
    assert_eq!(e.get_version(2, 1), Err(-errno::EPERM));
    assert_eq!(e.get_version(2, 42), Err(-errno::ESRCH));
    assert_eq!(e.get_version(1, 1), Ok(2));
    assert_eq!(flags(&e, &h, 1, 1), GTF_PERMIT_ACCESS);
    assert_eq!(rw_bits(&e, &h, 1, 1), RW);
    assert_eq!(flags(&e, &h, 1, 8), 0, "non-reserved entries cleared");
    assert_eq!(e.get_status_frames(1, DOMID_SELF, 1).unwrap().len(), 1);
    assert_eq!(
        e.get_status_frames(1, DOMID_SELF, 2),
        Err(GntSt::GeneralError)
    );
    // And back: status bits return to the v1 flags; status frames are freed.
    let frames_before = h.allocated.len();
    assert_eq!(e.set_version(1, 1, &mut h).ret, 0);
    assert_eq!(h.allocated.len(), frames_before - 1);
    assert_eq!(flags(&e, &h, 1, 1), GTF_PERMIT_ACCESS | RW);
    assert_eq!(
        e.get_status_frames(1, DOMID_SELF, 1),
        Err(GntSt::GeneralError)
    );
    assert_eq!(e.get_status_frames(1, DOMID_SELF, 0), Ok(vec![]));
    unmap(&mut e, &mut h, 2, o.handle, A).unwrap();
    assert_eq!(flags(&e, &h, 1, 1), GTF_PERMIT_ACCESS);
}

#[test]
fn v2_to_v1_refuses_unrepresentable_reserved_entries() {
    let (mut e, mut h) = setup(&[1, 2], cfg());
    e.set_version(1, 2, &mut h);
    grant(&e, &mut h, 1, 2, 2, 1 << 32, false);
    let r = e.set_version(1, 1, &mut h);
    assert_eq!((r.version, r.ret), (2, -errno::ERANGE));
    grant(&e, &mut h, 1, 2, 2, 5, false);
    let t = e.table(1).unwrap().shared_frames()[0];
    h.mem.write(t, 16 * 3, &GTF_TRANSITIVE.to_le_bytes());
    assert_eq!(e.set_version(1, 1, &mut h).ret, -errno::ERANGE);
    h.mem.write(t, 16 * 3, &0u16.to_le_bytes());
    assert_eq!(e.set_version(1, 1, &mut h).ret, 0);
    assert_eq!(flags(&e, &h, 1, 2), GTF_PERMIT_ACCESS);
    let ts = e.table(1).unwrap().shared_frames().to_vec();
    assert_eq!(
        h.mem.get_u64(ts[0], 16),
        u64::from(GTF_PERMIT_ACCESS) | 2 << 16 | 5 << 32
    );
}

#[test]
fn swap_grant_ref_rules() {
    let (mut e, mut h) = setup(&[1, 2], cfg());
    grant(&e, &mut h, 1, 10, 2, 1, false);
    grant(&e, &mut h, 1, 11, 2, 2, true);
    e.swap_grant_ref(1, 10, 11, &mut h).unwrap();
    assert_eq!(flags(&e, &h, 1, 10), GTF_PERMIT_ACCESS | GTF_READONLY);
    assert_eq!(e.swap_grant_ref(1, 10, 512, &mut h), Err(GntSt::BadGntref));
    assert_eq!(
        e.swap_grant_ref(1, u32::MAX, 10, &mut h),
        Err(GntSt::BadGntref)
    );
    assert_eq!(e.swap_grant_ref(1, 10, 10, &mut h), Ok(()));
    let o = e.map(2, &hmap(1, 11, false, A), &mut h).unwrap();
    assert_eq!(o.mfn, ram_mfn(1, 1));
    assert_eq!(e.swap_grant_ref(1, 10, 11, &mut h), Err(GntSt::Eagain));
    assert_eq!(e.swap_grant_ref(1, 11, 12, &mut h), Err(GntSt::Eagain));
}

// ---------------------------------------------------------------- domain destruction

#[test]
fn destroying_a_mapper_releases_everything_it_holds() {
    let (mut e, mut h) = setup(&[1, 2], cfg());
    for r in 0..5 {
        grant(&e, &mut h, 1, r, 2, u64::from(r), r % 2 == 0);
        e.map(
            2,
            &hmap(1, r, r % 2 == 0, A + u64::from(r) * 0x1000),
            &mut h,
        )
        .unwrap();
    }
    assert_eq!(e.domain_counters(2).unwrap().live_mappings, 5);
    h.events.clear();
    let rep = e.destroy_domain(2, &mut h).unwrap();
    assert_eq!(
        rep,
        DestroyReport {
            mappings_released: 5,
            table_freed: true
        }
    );
    assert_eq!(
        h.events[0],
        Event::Flush(2),
        "flushed before any grant is released"
    );
    for r in 0..5 {
        assert_eq!(rw_bits(&e, &h, 1, r), 0);
        assert!(!e.pins(1, r).unwrap().any());
    }
    assert_eq!(e.counters().released_on_destroy, 5);
    assert!(e.destroy_domain(2, &mut h).is_none());
    // d1's table survives (it is alive), and its frame is the only one left.
    assert_eq!(h.allocated.len(), 1);
}

#[test]
fn destroying_a_granter_keeps_its_mapped_grants_until_unmapped() {
    let (mut e, mut h) = setup(&[1, 2, 3], cfg());
    grant(&e, &mut h, 1, 0, 2, 1, false);
    grant(&e, &mut h, 1, 1, 3, 2, false);
    let o = e.map(2, &hmap(1, 0, false, A), &mut h).unwrap();
    e.setup_table(1, DOMID_SELF, 2, &mut h).unwrap();
    let rep = e.destroy_domain(1, &mut h).unwrap();
    assert!(!rep.table_freed);
    assert_eq!(e.is_dying(1), Some(true));
    // New uses of the dying domain's grants are refused.
    assert_eq!(
        e.map(3, &hmap(1, 1, false, A), &mut h),
        Err(GntSt::BadDomain)
    );
    let op = copy_op((true, 1, 1, 0), (false, DOMID_SELF, 0, 0), 8);
    assert_eq!(e.copy(3, &op, &mut h), Err(GntSt::BadDomain));
    assert_eq!(e.create_domain(1, cfg(), &mut h), Err(CreateError::Exists));
    // The existing mapping is still valid and can be unmapped; then d1 is freed.
    assert_eq!(h.host_maps.get(&(2, A)).unwrap().0, ram_mfn(1, 1));
    assert_eq!(e.table(1).unwrap().nr_frames(), 2);
    unmap(&mut e, &mut h, 2, o.handle, A).unwrap();
    assert!(e.table(1).is_none());
    assert_eq!(h.allocated.len(), 2, "only d2's and d3's frames remain");
    e.destroy_domain(2, &mut h).unwrap();
    e.destroy_domain(3, &mut h).unwrap();
    assert!(h.allocated.is_empty());
    // The id can be used again.
    e.create_domain(1, cfg(), &mut h).unwrap();
}

#[test]
fn destroy_both_ends_counts_back_to_zero() {
    let (mut e, mut h) = setup(&[1, 2], cfg());
    grant(&e, &mut h, 1, 0, 2, 1, false);
    grant(&e, &mut h, 2, 0, 1, 1, false);
    e.map(2, &hmap(1, 0, false, A), &mut h).unwrap();
    e.map(1, &hmap(2, 0, false, A), &mut h).unwrap();
    assert!(!e.destroy_domain(1, &mut h).unwrap().table_freed);
    let rep = e.destroy_domain(2, &mut h).unwrap();
    assert!(rep.table_freed);
    assert!(
        e.table(1).is_none(),
        "d1 reaped once d2's mapping of it was released"
    );
    assert!(h.allocated.is_empty());
}

#[test]
fn create_domain_errors() {
    let (mut e, mut h) = setup(&[1], cfg());
    assert_eq!(e.create_domain(1, cfg(), &mut h), Err(CreateError::Exists));
    assert_eq!(
        e.create_domain(DOMID_SELF, cfg(), &mut h),
        Err(CreateError::BadId)
    );
    let bad = DomainConfig {
        max_grant_frames: 0,
        ..cfg()
    };
    assert_eq!(e.create_domain(2, bad, &mut h), Err(CreateError::BadConfig));
    let bad = DomainConfig {
        max_version: 3,
        ..cfg()
    };
    assert_eq!(e.create_domain(2, bad, &mut h), Err(CreateError::BadConfig));
    h.alloc_budget = Some(0);
    assert_eq!(
        e.create_domain(2, cfg(), &mut h),
        Err(CreateError::NoMemory)
    );
}

// ---------------------------------------------------------------- the hypercall

fn bytes<const N: usize>(ops: &[[u8; N]]) -> Vec<u8> {
    ops.iter().flatten().copied().collect()
}

#[test]
fn hypercall_map_batch_per_op_status() {
    let (mut e, mut h) = setup(&[1, 2], cfg());
    grant(&e, &mut h, 1, 0, 2, 1, false);
    let good = GnttabMapGrantRef {
        host_addr: A,
        flags: GNTMAP_HOST_MAP,
        r#ref: 0,
        dom: 1,
        ..Default::default()
    };
    let bad_ref = GnttabMapGrantRef {
        r#ref: 9999,
        host_addr: A + 0x1000,
        ..good
    };
    let bad_dom = GnttabMapGrantRef {
        dom: 5,
        host_addr: A + 0x2000,
        ..good
    };
    let mut buf = bytes(&[good.to_bytes(), bad_ref.to_bytes(), bad_dom.to_bytes()]);
    assert_eq!(
        e.grant_table_op(2, GNTTABOP_MAP_GRANT_REF, &mut buf, 3, &mut h),
        0
    );
    let out: Vec<_> = buf
        .chunks(32)
        .map(|c| GnttabMapGrantRef::read(c).unwrap())
        .collect();
    assert_eq!(out[0].status, GNTST_OKAY);
    assert_eq!(out[0].dev_bus_addr, ram_mfn(1, 1) << 12);
    assert_eq!(out[1].status, GNTST_BAD_GNTREF);
    assert_eq!(out[2].status, GNTST_BAD_DOMAIN);
    // Unmap it through the hypercall too.
    let u = GnttabUnmapGrantRef {
        host_addr: A,
        dev_bus_addr: 0,
        handle: out[0].handle,
        status: 7,
    };
    let mut buf = u.to_bytes().to_vec();
    assert_eq!(
        e.grant_table_op(2, GNTTABOP_UNMAP_GRANT_REF, &mut buf, 1, &mut h),
        0
    );
    assert_eq!(GnttabUnmapGrantRef::read(&buf).unwrap().status, GNTST_OKAY);
    assert_eq!(rw_bits(&e, &h, 1, 0), 0);
}

#[test]
fn hypercall_errnos() {
    let (mut e, mut h) = setup(&[1, 2], cfg());
    let mut buf = vec![0u8; 64];
    let neg = (-1i32) as u32;
    assert_eq!(
        e.grant_table_op(2, GNTTABOP_MAP_GRANT_REF, &mut buf, neg, &mut h),
        -errno::EINVAL
    );
    assert_eq!(
        e.grant_table_op(2, GNTTABOP_COPY | 1 << 12, &mut buf, 1, &mut h),
        -errno::EINVAL
    );
    for cmd in [GNTTABOP_DUMP_TABLE, GNTTABOP_CACHE_FLUSH, 13, 0xfff] {
        assert_eq!(
            e.grant_table_op(2, cmd, &mut buf, 1, &mut h),
            -errno::ENOSYS,
            "{cmd}"
        );
    }
    assert_eq!(
        e.grant_table_op(2, GNTTABOP_TRANSFER, &mut buf, 1, &mut h),
        -errno::EOPNOTSUPP
    );
    for cmd in [
        GNTTABOP_SETUP_TABLE,
        GNTTABOP_QUERY_SIZE,
        GNTTABOP_GET_STATUS_FRAMES,
    ] {
        assert_eq!(
            e.grant_table_op(2, cmd, &mut buf, 2, &mut h),
            -errno::EINVAL
        );
        assert_eq!(
            e.grant_table_op(2, cmd, &mut buf, 0, &mut h),
            -errno::EINVAL
        );
    }
    // Too short an argument array: the ops that fit are done, then -EFAULT.
    let mut short = vec![0u8; 40 + 10];
    assert_eq!(
        e.grant_table_op(2, GNTTABOP_COPY, &mut short, 2, &mut h),
        -errno::EFAULT
    );
    assert_eq!(
        e.grant_table_op(2, GNTTABOP_MAP_GRANT_REF, &mut [], 1, &mut h),
        -errno::EFAULT
    );
    assert_eq!(
        e.grant_table_op(2, GNTTABOP_MAP_GRANT_REF, &mut [], 0, &mut h),
        0
    );
    // set_version / get_version ignore count.
    let mut sv = GnttabSetVersion { version: 2 }.to_bytes().to_vec();
    assert_eq!(
        e.grant_table_op(2, GNTTABOP_SET_VERSION, &mut sv, 0, &mut h),
        0
    );
    let mut gv = GnttabGetVersion {
        dom: DOMID_SELF,
        pad: 0,
        version: 0,
    }
    .to_bytes()
    .to_vec();
    assert_eq!(
        e.grant_table_op(2, GNTTABOP_GET_VERSION, &mut gv, 77, &mut h),
        0
    );
    assert_eq!(GnttabGetVersion::read(&gv).unwrap().version, 2);
    let mut sv = GnttabSetVersion { version: 9 }.to_bytes().to_vec();
    assert_eq!(
        e.grant_table_op(2, GNTTABOP_SET_VERSION, &mut sv, 1, &mut h),
        -errno::EINVAL
    );
    assert_eq!(
        GnttabSetVersion::read(&sv).unwrap().version,
        2,
        "current version reported"
    );
}

#[test]
fn hypercall_setup_query_status_frames() {
    let (mut e, mut h) = setup(&[1], cfg());
    let mut st = GnttabSetupTable {
        dom: DOMID_SELF,
        nr_frames: 2,
        status: 5,
        frame_list: 0x7000,
    }
    .to_bytes()
    .to_vec();
    assert_eq!(
        e.grant_table_op(1, GNTTABOP_SETUP_TABLE, &mut st, 1, &mut h),
        0
    );
    assert_eq!(GnttabSetupTable::read(&st).unwrap().status, GNTST_OKAY);
    let shared = e.table(1).unwrap().shared_frames().to_vec();
    assert_eq!(
        h.frame_lists.last().unwrap(),
        &(1, 0x7000, vec![shared[0] + 0xf_0000, shared[1] + 0xf_0000])
    );
    h.fail_frame_list = true;
    assert_eq!(
        e.grant_table_op(1, GNTTABOP_SETUP_TABLE, &mut st, 1, &mut h),
        0
    );
    assert_eq!(
        GnttabSetupTable::read(&st).unwrap().status,
        GNTST_BAD_VIRT_ADDR
    );
    h.fail_frame_list = false;
    let mut q = GnttabQuerySize {
        dom: DOMID_SELF,
        ..Default::default()
    }
    .to_bytes()
    .to_vec();
    assert_eq!(
        e.grant_table_op(1, GNTTABOP_QUERY_SIZE, &mut q, 1, &mut h),
        0
    );
    let q = GnttabQuerySize::read(&q).unwrap();
    assert_eq!((q.nr_frames, q.max_nr_frames, q.status), (2, 64, 0));
    let mut sf = GnttabGetStatusFrames {
        nr_frames: 1,
        dom: DOMID_SELF,
        status: 0,
        frame_list: 0x8000,
    }
    .to_bytes()
    .to_vec();
    assert_eq!(
        e.grant_table_op(1, GNTTABOP_GET_STATUS_FRAMES, &mut sf, 1, &mut h),
        0
    );
    assert_eq!(
        GnttabGetStatusFrames::read(&sf).unwrap().status,
        GNTST_GENERAL_ERROR
    );
    e.set_version(1, 2, &mut h);
    assert_eq!(
        e.grant_table_op(1, GNTTABOP_GET_STATUS_FRAMES, &mut sf, 1, &mut h),
        0
    );
    assert_eq!(GnttabGetStatusFrames::read(&sf).unwrap().status, GNTST_OKAY);
}
