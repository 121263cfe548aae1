//! What the engine needs from the hypervisor, as three narrow traits.
//!
//! The engine never holds a reference into guest memory: every access to a shared grant
//! frame, a status frame or a copied page goes through [`GrantMemory`] by (machine frame,
//! byte offset), one value at a time, so each guest-writable word is fetched exactly
//! once per use and updated with compare-exchange where Xen does so. Frames come from
//! [`FrameAlloc`]; mappings, translations and flushes from [`MapHost`].

use crate::{DomId, GntSt};

/// Access to machine memory: the grant-table frames the engine allocated (shared by the
/// granting guest, which may write them at any time) and guest pages being copied.
///
/// The engine only passes offsets with `offset + size <= 4096` that are aligned to the
/// access size. Implementations on real hardware must use single atomic accesses (the
/// guest may race them); the compare-exchange and the and/or updates must be atomic
/// read-modify-writes confined to the named bytes (Xen uses `lock cmpxchg` on the 32-bit
/// entry header and `lock andw` on the 16-bit flags / status word).
pub trait GrantMemory {
    /// One 16-bit load.
    fn load_u16(&self, mfn: u64, offset: usize) -> u16;
    /// One 32-bit load.
    fn load_u32(&self, mfn: u64, offset: usize) -> u32;
    /// One 64-bit load.
    fn load_u64(&self, mfn: u64, offset: usize) -> u64;
    /// Atomic compare-exchange of a 32-bit word: stores `new` if the word equals `old`.
    /// Returns the value found (equal to `old` exactly when the store happened).
    fn cmpxchg_u32(&mut self, mfn: u64, offset: usize, old: u32, new: u32) -> u32;
    /// Atomic `*p |= bits` on a 16-bit word.
    fn or_u16(&mut self, mfn: u64, offset: usize, bits: u16);
    /// Atomic `*p &= mask` on a 16-bit word.
    fn and_u16(&mut self, mfn: u64, offset: usize, mask: u16);
    /// One 16-bit store.
    fn store_u16(&mut self, mfn: u64, offset: usize, v: u16);
    /// One 32-bit store.
    fn store_u32(&mut self, mfn: u64, offset: usize, v: u32);
    /// One 64-bit store.
    fn store_u64(&mut self, mfn: u64, offset: usize, v: u64);
    /// Fills the frame with zeroes.
    fn zero_frame(&mut self, mfn: u64);
    /// Copies `len` bytes (`src_off + len <= 4096`, `dst_off + len <= 4096`, the frames
    /// may be the same) for `GNTTABOP_copy`.
    fn copy_bytes(
        &mut self,
        dst_mfn: u64,
        dst_off: usize,
        src_mfn: u64,
        src_off: usize,
        len: usize,
    );
}

/// Hypervisor frames for grant tables (shared frames and v2 status frames).
pub trait FrameAlloc {
    /// A free machine frame (its contents are zeroed by the engine), or `None`.
    fn alloc_frame(&mut self) -> Option<u64>;
    /// Gives a frame back. The hypervisor must remove any guest mapping of the frame
    /// (a `XENMAPSPACE_grant_table` physmap entry) before the frame is reused.
    fn free_frame(&mut self, mfn: u64);
}

/// Translations, mappings and flushes, done by the hypervisor on the engine's behalf.
pub trait MapHost {
    /// Xen's `get_paged_frame()`: the machine frame behind guest frame `gfn` of `dom`,
    /// which must be ordinary RAM owned by `dom` (not a foreign or grant mapping), and
    /// writable by it when `writable`. Errors: `BadPage` (no such RAM), `Eagain` (paged
    /// out), `GeneralError` (not writable).
    fn translate(&mut self, dom: DomId, gfn: u64, writable: bool) -> Result<u64, GntSt>;

    /// Xen's `create_grant_host_mapping()`: maps `mfn` into `dom`'s address space at
    /// `host_addr` (HVM/PVH: the guest-physical address; the nested page-table entry
    /// and, when the domain has devices, the IOMMU entry), read-only when `flags`
    /// has `GNTMAP_readonly`. `cache` holds the entry's `GTF_PAT|GTF_PCD|GTF_PWT` bits
    /// (always 0 for translated domains: the engine rejects others first).
    fn add_host_mapping(
        &mut self,
        dom: DomId,
        host_addr: u64,
        mfn: u64,
        flags: u32,
        cache: u16,
    ) -> Result<(), GntSt>;

    /// Xen's `replace_grant_host_mapping()`: removes the grant mapping of `mfn` at
    /// `host_addr` (fails with `GeneralError` if that address does not hold a grant
    /// mapping of `mfn`). `new_addr` is non-zero only for PV `unmap_and_replace`. The
    /// engine calls [`MapHost::flush`] before the grant is released.
    fn remove_host_mapping(
        &mut self,
        dom: DomId,
        host_addr: u64,
        mfn: u64,
        new_addr: u64,
        flags: u32,
    ) -> Result<(), GntSt>;

    /// IOMMU entry `dfn = mfn` for a non-translated domain with `iommu_sync` (Xen's
    /// `iommu_legacy_map`), read-only or read-write; replaces an existing entry.
    fn iommu_map(&mut self, dom: DomId, mfn: u64, writable: bool) -> Result<(), GntSt>;

    /// Removes that IOMMU entry (Xen's `iommu_legacy_unmap`).
    fn iommu_unmap(&mut self, dom: DomId, mfn: u64) -> Result<(), GntSt>;

    /// Makes every removed mapping of `dom` unreachable: CPU TLBs / nested-paging
    /// caches of its vCPUs and its IOTLB. Called after a batch of removals and before
    /// the pins that kept the frames granted are dropped.
    fn flush(&mut self, dom: DomId);

    /// The frame number `dom` knows table frame `mfn` by (the GFN where it placed the
    /// frame with `add_to_physmap`, or `u64::MAX` when it has not), for the lists that
    /// `setup_table` and `get_status_frames` return.
    fn guest_frame_of(&self, dom: DomId, mfn: u64) -> u64;

    /// Writes `frames` as an array of little-endian u64 at guest handle `list` of `dom`;
    /// `false` if any of it cannot be written (the op then reports `GNTST_bad_virt_addr`).
    fn write_frame_list(&mut self, dom: DomId, list: u64, frames: &[u64]) -> bool;
}

/// Everything the engine needs, for functions that use all of it.
pub trait GrantHost: GrantMemory + FrameAlloc + MapHost {}

impl<T: GrantMemory + FrameAlloc + MapHost> GrantHost for T {}
