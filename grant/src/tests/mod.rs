//! Host tests: a fake hypervisor ([`fake`]), unit tests for every rule and error path
//! ([`unit`]), and property tests against a reference model ([`prop`]).

mod fake;
mod prop;
mod unit;

use abi::grant_table::{GNTMAP_HOST_MAP, GNTMAP_READONLY};

use crate::{guest, DomId, DomainConfig, GrantEngine, MapRequest, UnmapRequest};
pub use fake::{ram_mfn, Event, FakeHost, RAM_FRAMES};

/// An engine with `doms` created with `cfg`.
pub fn setup(doms: &[DomId], cfg: DomainConfig) -> (GrantEngine, FakeHost) {
    let mut e = GrantEngine::new();
    let mut h = FakeHost::default();
    for d in doms {
        e.create_domain(*d, cfg, &mut h).unwrap();
    }
    (e, h)
}

/// Granter `g` grants its `gfn` to `to` in entry `r` (v1 or v2, whichever is in force).
pub fn grant(e: &GrantEngine, h: &mut FakeHost, g: DomId, r: u32, to: DomId, gfn: u64, ro: bool) {
    let t = e.table(g).unwrap();
    let frames = t.shared_frames().to_vec();
    if t.version() == 1 {
        guest::grant_access_v1(h, &frames, r, to, gfn as u32, ro).unwrap();
    } else {
        guest::grant_access_v2(h, &frames, r, to, gfn, ro).unwrap();
    }
}

/// `GTF_reading | GTF_writing` of `g`'s entry `r` where they live for its version.
pub fn rw_bits(e: &GrantEngine, h: &FakeHost, g: DomId, r: u32) -> u16 {
    let t = e.table(g).unwrap();
    let rw = abi::grant_table::GTF_READING | abi::grant_table::GTF_WRITING;
    if t.version() == 1 {
        guest::entry_flags_v1(h, t.shared_frames(), r).unwrap() & rw
    } else {
        guest::status_v2(h, t.status_frames(), r).unwrap() & rw
    }
}

/// Whole flags word of `g`'s entry `r` (v1) / header flags (v2).
pub fn flags(e: &GrantEngine, h: &FakeHost, g: DomId, r: u32) -> u16 {
    let t = e.table(g).unwrap();
    if t.version() == 1 {
        guest::entry_flags_v1(h, t.shared_frames(), r).unwrap()
    } else {
        guest::entry_flags_v2(h, t.shared_frames(), r).unwrap()
    }
}

/// A host map request (read-only when `ro`) at `addr`.
pub fn hmap(dom: DomId, gref: u32, ro: bool, addr: u64) -> MapRequest {
    MapRequest {
        host_addr: addr,
        flags: GNTMAP_HOST_MAP | if ro { GNTMAP_READONLY } else { 0 },
        gref,
        dom,
    }
}

/// Unmap request for a host mapping.
pub fn hunmap(handle: u32, addr: u64) -> UnmapRequest {
    UnmapRequest {
        handle,
        host_addr: addr,
        dev_bus_addr: 0,
        new_addr: 0,
    }
}

/// Full unmap (begin, flush, complete) of one host mapping; returns the status.
pub fn unmap(
    e: &mut GrantEngine,
    h: &mut FakeHost,
    ld: DomId,
    handle: u32,
    addr: u64,
) -> Result<(), crate::GntSt> {
    let p = e.unmap_begin(ld, &hunmap(handle, addr), h);
    let st = p.status();
    let f = e.flush(ld, h);
    e.unmap_complete(p, &f, h).unwrap();
    st
}
