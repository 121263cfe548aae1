//! Grant-table engine (issue 4): grant tables v1 and v2 (shared entries, v2 status
//! frames, sub-page and transitive grants), `map_grant_ref` / `unmap_grant_ref` /
//! `unmap_and_replace` with per-domain maptrack handles, `copy`, `setup_table`,
//! `query_size`, `set_version` / `get_version`, `get_status_frames`, `swap_grant_ref`,
//! domain destruction, and the `GNTTABOP_*` hypercall dispatcher, following the rules
//! of Xen's `xen/common/grant_table.c` (order of checks, `GNTST_*` codes,
//! `GTF_reading`/`GTF_writing` pinning).
//!
//! It holds no hardware access: guest-shared memory, frame allocation, mappings and
//! flushes come through the traits in [`host`], so the whole engine is tested on the
//! host.
//!
//! # Shape
//! - [`GrantEngine`] owns every domain's [`GrantTable`] (frames, pins) and [`Maptrack`]
//!   (handles of the mappings that domain holds), plus [`Counters`].
//! - Guest-controlled entries are read once per use through [`host::GrantMemory`] and
//!   updated with compare-exchange (v1) or set-then-recheck (v2) as Xen does, so a
//!   granter changing its entry between check and use cannot make the engine act on a
//!   value it did not validate.
//! - Unmapping is two-phase: [`GrantEngine::unmap_begin`] removes the mapping and
//!   returns a [`PendingUnmap`]; the pins (and the grant) are only released by
//!   [`GrantEngine::unmap_complete`], which demands a [`Flushed`] token that only
//!   [`GrantEngine::flush`] makes, after the mapping domain's TLBs/IOTLB were flushed.
//!   The batch entry points do all of that in Xen's order.
#![cfg_attr(not(test), no_std)]
#![forbid(unsafe_code)]
#![deny(missing_docs)]

extern crate alloc;

pub mod dispatch;
mod engine;
pub mod guest;
pub mod host;
mod maptrack;
mod table;

#[cfg(test)]
mod tests;

pub use engine::{
    Counters, CreateError, DestroyReport, DomainConfig, DomainCounters, Flushed, GrantEngine,
    MapOutcome, MapRequest, PendingUnmap, Pins, SetVersionOutcome, UnmapRequest,
};
pub use maptrack::{Maptrack, MaptrackEntry, MAPTRACK_PER_FRAME};
pub use table::{
    GrantTable, PAGE_SIZE, SET_STATUS_ATTEMPTS, STATUS_PER_FRAME, V1_PER_FRAME, V2_PER_FRAME,
};

use abi::grant_table as gt;

/// A domain id (`domid_t`).
pub type DomId = u16;

/// Xen's default `gnttab_max_frames` (hypervisor command line default).
pub const DEFAULT_MAX_GRANT_FRAMES: u32 = 64;
/// Xen's default `gnttab_max_maptrack_frames`.
pub const DEFAULT_MAX_MAPTRACK_FRAMES: u32 = 1024;
/// Xen's `INITIAL_NR_GRANT_FRAMES` on x86: every table starts with one frame.
pub const INITIAL_NR_GRANT_FRAMES: u32 = 1;
/// Unmaps done between two flushes in a batch (Xen's `GNTTAB_UNMAP_BATCH_SIZE`).
pub const UNMAP_BATCH_SIZE: usize = 32;

/// A failed grant operation's `GNTST_*` status.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum GntSt {
    /// `GNTST_general_error` (-1).
    GeneralError,
    /// `GNTST_bad_domain` (-2).
    BadDomain,
    /// `GNTST_bad_gntref` (-3).
    BadGntref,
    /// `GNTST_bad_handle` (-4).
    BadHandle,
    /// `GNTST_bad_virt_addr` (-5).
    BadVirtAddr,
    /// `GNTST_bad_dev_addr` (-6).
    BadDevAddr,
    /// `GNTST_no_device_space` (-7).
    NoDeviceSpace,
    /// `GNTST_permission_denied` (-8).
    PermissionDenied,
    /// `GNTST_bad_page` (-9).
    BadPage,
    /// `GNTST_bad_copy_arg` (-10).
    BadCopyArg,
    /// `GNTST_address_too_big` (-11).
    AddressTooBig,
    /// `GNTST_eagain` (-12).
    Eagain,
    /// `GNTST_no_space` (-13).
    NoSpace,
}

impl GntSt {
    /// The wire value (negative).
    pub const fn code(self) -> i16 {
        match self {
            GntSt::GeneralError => gt::GNTST_GENERAL_ERROR,
            GntSt::BadDomain => gt::GNTST_BAD_DOMAIN,
            GntSt::BadGntref => gt::GNTST_BAD_GNTREF,
            GntSt::BadHandle => gt::GNTST_BAD_HANDLE,
            GntSt::BadVirtAddr => gt::GNTST_BAD_VIRT_ADDR,
            GntSt::BadDevAddr => gt::GNTST_BAD_DEV_ADDR,
            GntSt::NoDeviceSpace => gt::GNTST_NO_DEVICE_SPACE,
            GntSt::PermissionDenied => gt::GNTST_PERMISSION_DENIED,
            GntSt::BadPage => gt::GNTST_BAD_PAGE,
            GntSt::BadCopyArg => gt::GNTST_BAD_COPY_ARG,
            GntSt::AddressTooBig => gt::GNTST_ADDRESS_TOO_BIG,
            GntSt::Eagain => gt::GNTST_EAGAIN,
            GntSt::NoSpace => gt::GNTST_NO_SPACE,
        }
    }

    /// The status for a wire value; `None` for 0 (okay) and unknown values.
    pub const fn from_code(c: i16) -> Option<GntSt> {
        Some(match c {
            gt::GNTST_GENERAL_ERROR => GntSt::GeneralError,
            gt::GNTST_BAD_DOMAIN => GntSt::BadDomain,
            gt::GNTST_BAD_GNTREF => GntSt::BadGntref,
            gt::GNTST_BAD_HANDLE => GntSt::BadHandle,
            gt::GNTST_BAD_VIRT_ADDR => GntSt::BadVirtAddr,
            gt::GNTST_BAD_DEV_ADDR => GntSt::BadDevAddr,
            gt::GNTST_NO_DEVICE_SPACE => GntSt::NoDeviceSpace,
            gt::GNTST_PERMISSION_DENIED => GntSt::PermissionDenied,
            gt::GNTST_BAD_PAGE => GntSt::BadPage,
            gt::GNTST_BAD_COPY_ARG => GntSt::BadCopyArg,
            gt::GNTST_ADDRESS_TOO_BIG => GntSt::AddressTooBig,
            gt::GNTST_EAGAIN => GntSt::Eagain,
            gt::GNTST_NO_SPACE => GntSt::NoSpace,
            _ => return None,
        })
    }
}

/// The wire status of a result: 0 or the error's `GNTST_*` value.
pub fn status_code<T>(r: &Result<T, GntSt>) -> i16 {
    match r {
        Ok(_) => gt::GNTST_OKAY,
        Err(e) => e.code(),
    }
}
