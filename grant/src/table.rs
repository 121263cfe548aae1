//! One domain's grant table: its shared and status frames, the hypervisor-private
//! active entries (pins), and the entry protocol (`_set_status_v1/v2`,
//! `reduce_status_for_pin`) exactly as `xen/common/grant_table.c` runs it.

use alloc::vec::Vec;

use abi::grant_table::{
    GTF_PERMIT_ACCESS, GTF_READING, GTF_READONLY, GTF_SUB_PAGE, GTF_TRANSITIVE, GTF_TYPE_MASK,
    GTF_WRITING,
};

use crate::host::GrantMemory;
use crate::{DomId, GntSt};

/// Bytes in a frame.
pub const PAGE_SIZE: u32 = 4096;
/// v1 entries per frame.
pub const V1_PER_FRAME: u32 = PAGE_SIZE / 8;
/// v2 entries per frame.
pub const V2_PER_FRAME: u32 = PAGE_SIZE / 16;
/// v2 status words per frame.
pub const STATUS_PER_FRAME: u32 = PAGE_SIZE / 2;

/// Pin counters, one byte each as in Xen's `active_grant_entry.pin`.
pub(crate) const PIN_HSTW: u32 = 1;
pub(crate) const PIN_HSTR: u32 = 1 << 8;
pub(crate) const PIN_DEVW: u32 = 1 << 16;
pub(crate) const PIN_DEVR: u32 = 1 << 24;
pub(crate) const PIN_HSTW_MASK: u32 = 0xff;
pub(crate) const PIN_DEVW_MASK: u32 = 0xff << 16;
pub(crate) const PIN_WRITE_MASK: u32 = PIN_HSTW_MASK | PIN_DEVW_MASK;

/// Xen's `GNTPIN_incr2oflow_mask`: refuse an increment once the counter's top bit is set.
pub(crate) const fn pin_would_overflow(pin: u32, incr: u32) -> bool {
    pin & (incr << 7) != 0
}

/// How many times the header compare-exchange is retried before the entry is declared
/// unstable (`retries++ == 4` in `_set_status_v1`: five attempts).
pub const SET_STATUS_ATTEMPTS: u32 = 5;

/// Status frames needed for `grant_frames` v2 shared frames.
pub(crate) const fn grant_to_status_frames(grant_frames: u32) -> u32 {
    (grant_frames * V2_PER_FRAME).div_ceil(STATUS_PER_FRAME)
}

/// Hypervisor-private state of one grant reference (`struct active_grant_entry`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct Active {
    /// Four byte-wide pin counters (host write, host read, device write, device read).
    pub pin: u32,
    /// The domain the pins belong to (only one at a time).
    pub domid: DomId,
    /// Domain that really owns the frame (differs for transitive grants).
    pub src_domid: DomId,
    /// Reference in `src_domid`'s table (differs for transitive grants).
    pub trans_gref: u32,
    /// Machine frame, captured when the first pin was taken.
    pub mfn: u64,
    /// The granter's frame number as read then (informational).
    pub gfn: u64,
    /// Sub-page grants: first byte.
    pub start: u32,
    /// Sub-page grants: length (`PAGE_SIZE` otherwise).
    pub length: u32,
    /// Sub-page (or transitive) grant: copy only, never mapped.
    pub is_sub_page: bool,
}

/// Per-domain grant table state.
#[derive(Debug)]
pub struct GrantTable {
    pub(crate) version: u32,
    pub(crate) max_version: u32,
    pub(crate) max_frames: u32,
    pub(crate) shared: Vec<u64>,
    pub(crate) status: Vec<u64>,
    /// Sized for v1 entries of every shared frame (as Xen sizes its active table).
    pub(crate) active: Vec<Active>,
}

impl GrantTable {
    pub(crate) fn new(max_frames: u32, max_version: u32) -> GrantTable {
        GrantTable {
            version: 1,
            max_version,
            max_frames,
            shared: Vec::new(),
            status: Vec::new(),
            active: Vec::new(),
        }
    }

    /// Version in effect (1 or 2).
    pub fn version(&self) -> u32 {
        self.version
    }
    /// Shared frames in use.
    pub fn nr_frames(&self) -> u32 {
        self.shared.len() as u32
    }
    /// Status frames in use (v2 only).
    pub fn nr_status_frames(&self) -> u32 {
        self.status.len() as u32
    }
    /// Most shared frames this table may grow to.
    pub fn max_frames(&self) -> u32 {
        self.max_frames
    }
    /// Shared frames (machine frame numbers), by index.
    pub fn shared_frames(&self) -> &[u64] {
        &self.shared
    }
    /// Status frames (machine frame numbers), by index.
    pub fn status_frames(&self) -> &[u64] {
        &self.status
    }

    /// Entries addressable with the current version (`nr_grant_entries`).
    pub fn nr_entries(&self) -> u32 {
        let per = if self.version == 1 {
            V1_PER_FRAME
        } else {
            V2_PER_FRAME
        };
        self.nr_frames() * per
    }

    /// Frame and offset of entry `r`'s header (caller checked `r < nr_entries()`).
    pub(crate) fn entry_loc(&self, r: u32) -> (u64, usize) {
        if self.version == 1 {
            (
                self.shared[(r / V1_PER_FRAME) as usize],
                ((r % V1_PER_FRAME) * 8) as usize,
            )
        } else {
            (
                self.shared[(r / V2_PER_FRAME) as usize],
                ((r % V2_PER_FRAME) * 16) as usize,
            )
        }
    }

    /// Where entry `r`'s `GTF_reading`/`GTF_writing` live: the v1 flags, or the v2 status
    /// word (`None` when `r` is out of range, as in Xen's completion paths).
    pub(crate) fn status_loc(&self, r: u32) -> Option<(u64, usize)> {
        if r >= self.nr_entries() {
            return None;
        }
        if self.version == 1 {
            Some(self.entry_loc(r))
        } else {
            let f = (r / STATUS_PER_FRAME) as usize;
            Some((*self.status.get(f)?, ((r % STATUS_PER_FRAME) * 2) as usize))
        }
    }

    /// The pinned entries (any pin), for version switching and reaping.
    pub(crate) fn any_pinned_from(&self, first: u32) -> bool {
        self.active.iter().skip(first as usize).any(|a| a.pin != 0)
    }
}

/// Splits a header word into (flags, domid).
pub(crate) const fn split_hdr(raw: u32) -> (u16, DomId) {
    (raw as u16, (raw >> 16) as u16)
}

/// Xen's `_set_status_v1` / `_set_status_v2`: validates entry `r` for `ldom` (only when
/// `pin == 0`: pinned entries were validated when the first pin was taken) and sets
/// `GTF_reading` (and `GTF_writing` unless `readonly`). `mapflag` also refuses sub-page
/// entries, and (v2) transitive ones.
pub(crate) fn set_status<M: GrantMemory + ?Sized>(
    mem: &mut M,
    t: &GrantTable,
    r: u32,
    pin: u32,
    readonly: bool,
    mapflag: bool,
    ldom: DomId,
) -> Result<(), GntSt> {
    let mask = if mapflag {
        GTF_TYPE_MASK | GTF_SUB_PAGE
    } else {
        GTF_TYPE_MASK
    };
    let (mfn, off) = t.entry_loc(r);
    if t.version == 1 {
        // One copy of the header; every decision below is made on that copy, and the
        // update only lands if the header still equals it.
        let mut seen = mem.load_u32(mfn, off);
        let mut attempt = 1;
        loop {
            let (flags, domid) = split_hdr(seen);
            if pin == 0 && ((flags & mask) != GTF_PERMIT_ACCESS || domid != ldom) {
                return Err(GntSt::GeneralError);
            }
            let mut new = flags | GTF_READING;
            if !readonly {
                new |= GTF_WRITING;
                if flags & GTF_READONLY != 0 {
                    return Err(GntSt::GeneralError);
                }
            }
            let new_raw = (seen & 0xffff_0000) | u32::from(new);
            let prev = mem.cmpxchg_u32(mfn, off, seen, new_raw);
            if prev == seen {
                return Ok(());
            }
            if attempt == SET_STATUS_ATTEMPTS {
                return Err(GntSt::GeneralError);
            }
            attempt += 1;
            seen = prev;
        }
    }

    // v2: status bits live in the status frame; the header is checked, the status set,
    // then the header fetched AGAIN and checked again (the granter may have changed it in
    // between); any change undoes the status update.
    let (smfn, soff) = t.status_loc(r).ok_or(GntSt::GeneralError)?;
    let bad = |flags: u16, domid: DomId| {
        ((flags & mask) != GTF_PERMIT_ACCESS && (mapflag || (flags & mask) != GTF_TRANSITIVE))
            || domid != ldom
    };
    let (flags, domid) = split_hdr(mem.load_u32(mfn, off));
    if pin == 0 && bad(flags, domid) {
        return Err(GntSt::GeneralError);
    }
    if readonly {
        mem.or_u16(smfn, soff, GTF_READING);
    } else {
        if flags & GTF_READONLY != 0 {
            return Err(GntSt::GeneralError);
        }
        mem.or_u16(smfn, soff, GTF_READING | GTF_WRITING);
    }
    let (flags, domid) = split_hdr(mem.load_u32(mfn, off));
    if pin == 0 {
        if bad(flags, domid) || (!readonly && flags & GTF_READONLY != 0) {
            mem.and_u16(smfn, soff, !(GTF_READING | GTF_WRITING));
            return Err(GntSt::GeneralError);
        }
    } else if flags & GTF_READONLY != 0 {
        mem.and_u16(smfn, soff, !GTF_WRITING);
        return Err(GntSt::GeneralError);
    }
    Ok(())
}

/// Xen's `reduce_status_for_pin`: drops `GTF_reading` once nothing is pinned and
/// `GTF_writing` once no write pin is left (after a writable use).
pub(crate) fn reduce_status_for_pin<M: GrantMemory + ?Sized>(
    mem: &mut M,
    t: &GrantTable,
    r: u32,
    pin: u32,
    readonly: bool,
) {
    let Some((mfn, off)) = t.status_loc(r) else {
        return;
    };
    let mut clear = if pin == 0 { GTF_READING } else { 0 };
    if !readonly && pin & PIN_WRITE_MASK == 0 {
        clear |= GTF_WRITING;
    }
    if clear != 0 {
        mem.and_u16(mfn, off, !clear);
    }
}
