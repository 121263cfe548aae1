//! The granting guest's side of the protocol, over the same [`GrantMemory`], as Linux's
//! `drivers/xen/grant-table.c` does it. Used by the host tests to play the granter, and
//! usable by the project's Rust test guests once they reach their table through a
//! `GrantMemory` of their own.
//!
//! `frames` are the table's shared frames (and `status` its v2 status frames) in the
//! numbering `mem` understands. The functions return `None` when `r` lies outside them.

use abi::grant_table::{GTF_PERMIT_ACCESS, GTF_READING, GTF_READONLY, GTF_WRITING};

use crate::host::GrantMemory;
use crate::{DomId, STATUS_PER_FRAME, V1_PER_FRAME, V2_PER_FRAME};

fn v1_loc(frames: &[u64], r: u32) -> Option<(u64, usize)> {
    Some((
        *frames.get((r / V1_PER_FRAME) as usize)?,
        ((r % V1_PER_FRAME) * 8) as usize,
    ))
}

fn v2_loc(frames: &[u64], r: u32) -> Option<(u64, usize)> {
    Some((
        *frames.get((r / V2_PER_FRAME) as usize)?,
        ((r % V2_PER_FRAME) * 16) as usize,
    ))
}

fn status_loc(status: &[u64], r: u32) -> Option<(u64, usize)> {
    Some((
        *status.get((r / STATUS_PER_FRAME) as usize)?,
        ((r % STATUS_PER_FRAME) * 2) as usize,
    ))
}

/// `gnttab_grant_foreign_access_ref` (v1): domid and frame first, then the flags.
/// Writes the flags half with a compare-exchange that keeps whatever the hypervisor
/// owns, so a (misbehaving) reuse of a busy entry cannot erase its `GTF_reading` /
/// `GTF_writing`.
pub fn grant_access_v1<M: GrantMemory + ?Sized>(
    mem: &mut M,
    frames: &[u64],
    r: u32,
    domid: DomId,
    gfn: u32,
    readonly: bool,
) -> Option<()> {
    let (m, o) = v1_loc(frames, r)?;
    let flags = GTF_PERMIT_ACCESS | if readonly { GTF_READONLY } else { 0 };
    // domid, then frame, then the flags (the order Linux uses).
    mem.store_u16(m, o + 2, domid);
    mem.store_u32(m, o + 4, gfn);
    loop {
        let cur = mem.load_u32(m, o);
        let keep = cur as u16 & (GTF_READING | GTF_WRITING);
        let new = (cur & 0xffff_0000) | u32::from(flags | keep);
        if mem.cmpxchg_u32(m, o, cur, new) == cur {
            return Some(());
        }
    }
}

/// `gnttab_end_foreign_access_ref_v1`: clears the entry unless it is mapped or being
/// copied (`GTF_reading` / `GTF_writing`). `Some(false)`: still in use, untouched.
pub fn end_access_v1<M: GrantMemory + ?Sized>(mem: &mut M, frames: &[u64], r: u32) -> Option<bool> {
    let (m, o) = v1_loc(frames, r)?;
    loop {
        let cur = mem.load_u32(m, o);
        if cur as u16 & (GTF_READING | GTF_WRITING) != 0 {
            return Some(false);
        }
        if mem.cmpxchg_u32(m, o, cur, cur & 0xffff_0000) == cur {
            return Some(true);
        }
    }
}

/// `gnttab_update_entry_v2` for a full-page grant.
pub fn grant_access_v2<M: GrantMemory + ?Sized>(
    mem: &mut M,
    frames: &[u64],
    r: u32,
    domid: DomId,
    gfn: u64,
    readonly: bool,
) -> Option<()> {
    let (m, o) = v2_loc(frames, r)?;
    let flags = GTF_PERMIT_ACCESS | if readonly { GTF_READONLY } else { 0 };
    mem.store_u16(m, o + 2, domid);
    mem.store_u64(m, o + 8, gfn);
    mem.store_u16(m, o, flags);
    Some(())
}

/// `gnttab_end_foreign_access_ref_v2`: clears the flags first, then checks the status
/// word. `Some(false)`: the entry was still in use (Linux then defers freeing it).
pub fn end_access_v2<M: GrantMemory + ?Sized>(
    mem: &mut M,
    frames: &[u64],
    status: &[u64],
    r: u32,
) -> Option<bool> {
    let (m, o) = v2_loc(frames, r)?;
    let (sm, so) = status_loc(status, r)?;
    mem.and_u16(m, o, 0);
    Some(mem.load_u16(sm, so) & (GTF_READING | GTF_WRITING) == 0)
}

/// The flags word of v1 entry `r` (or the v2 header flags).
pub fn entry_flags_v1<M: GrantMemory + ?Sized>(mem: &M, frames: &[u64], r: u32) -> Option<u16> {
    let (m, o) = v1_loc(frames, r)?;
    Some(mem.load_u16(m, o))
}

/// The v2 status word of entry `r`.
pub fn status_v2<M: GrantMemory + ?Sized>(mem: &M, status: &[u64], r: u32) -> Option<u16> {
    let (m, o) = status_loc(status, r)?;
    Some(mem.load_u16(m, o))
}

/// The flags of v2 entry `r`'s header.
pub fn entry_flags_v2<M: GrantMemory + ?Sized>(mem: &M, frames: &[u64], r: u32) -> Option<u16> {
    let (m, o) = v2_loc(frames, r)?;
    Some(mem.load_u16(m, o))
}
