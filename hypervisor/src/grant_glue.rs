//! The grant engine's view of the machine ([`grant::host::GrantHost`]): frames of the
//! running domains, their nested page tables and TLB flushes.
//!
//! Every domain is translated (PVH): a grant is mapped with `GNTMAP_host_map` at a
//! guest-physical address, and the engine's IOMMU path (for non-translated domains) is
//! never taken here. A domain that owns PCI devices has IOMMU tables mirroring its
//! physmap instead ([`crate::devices`]): host mappings go into them too, and leave
//! them (invalidation completed) in `flush`, before the grant is released.

use grant::host::{FrameAlloc, GrantMemory, MapHost};
use grant::{DomId, GntSt};

use crate::arch::phys::GrantFrames;
use crate::domain::{Domain, DomainCore};
use crate::vcpu::GuestCpu;

/// Frame access and allocation only: what creating a domain's grant table needs.
pub struct FramesOnly;

/// The grant table every domain gets: Xen's defaults (64 frames, 1024 maptrack
/// frames), versions 1 and 2, translated.
pub fn domain_config() -> grant::DomainConfig {
    grant::DomainConfig {
        max_grant_frames: grant::DEFAULT_MAX_GRANT_FRAMES,
        max_maptrack_frames: grant::DEFAULT_MAX_MAPTRACK_FRAMES,
        max_version: 2,
        translated: true,
        iommu_sync: false,
        privileged: false,
    }
}

/// The grant engine's host while domain `cur` (its vCPU `cpu`) is in a hypercall.
pub struct Host<'a, 'b> {
    /// The calling domain.
    pub cur: &'a mut DomainCore,
    /// The running domains before it.
    pub before: &'b mut [Domain],
    /// The running domains after it.
    pub after: &'b mut [Domain],
    /// The calling vCPU (guest-virtual handles are translated with its paging).
    pub cpu: Option<&'a dyn GuestCpu>,
}

impl Host<'_, '_> {
    fn dom(&mut self, id: DomId) -> Option<&mut DomainCore> {
        if id == self.cur.id {
            Some(self.cur)
        } else {
            self.before
                .iter_mut()
                .chain(self.after.iter_mut())
                .map(|d| &mut d.core)
                .find(|c| c.id == id)
        }
    }
}

/// Frame access and allocation are the same for every host here: machine frames
/// through the identity map ([`GrantFrames`]) and the machine's frame allocator.
macro_rules! frames_host {
    ($t:ty) => {
        impl GrantMemory for $t {
            fn load_u16(&self, mfn: u64, offset: usize) -> u16 {
                GrantFrames.load_u16(mfn, offset)
            }
            fn load_u32(&self, mfn: u64, offset: usize) -> u32 {
                GrantFrames.load_u32(mfn, offset)
            }
            fn load_u64(&self, mfn: u64, offset: usize) -> u64 {
                GrantFrames.load_u64(mfn, offset)
            }
            fn cmpxchg_u32(&mut self, mfn: u64, offset: usize, old: u32, new: u32) -> u32 {
                GrantFrames.cmpxchg_u32(mfn, offset, old, new)
            }
            fn or_u16(&mut self, mfn: u64, offset: usize, bits: u16) {
                GrantFrames.or_u16(mfn, offset, bits)
            }
            fn and_u16(&mut self, mfn: u64, offset: usize, mask: u16) {
                GrantFrames.and_u16(mfn, offset, mask)
            }
            fn store_u16(&mut self, mfn: u64, offset: usize, v: u16) {
                GrantFrames.store_u16(mfn, offset, v)
            }
            fn store_u32(&mut self, mfn: u64, offset: usize, v: u32) {
                GrantFrames.store_u32(mfn, offset, v)
            }
            fn store_u64(&mut self, mfn: u64, offset: usize, v: u64) {
                GrantFrames.store_u64(mfn, offset, v)
            }
            fn zero_frame(&mut self, mfn: u64) {
                GrantFrames.zero_frame(mfn)
            }
            fn copy_bytes(
                &mut self,
                dst_mfn: u64,
                dst_off: usize,
                src_mfn: u64,
                src_off: usize,
                len: usize,
            ) {
                GrantFrames.copy_bytes(dst_mfn, dst_off, src_mfn, src_off, len)
            }
        }

        impl FrameAlloc for $t {
            fn alloc_frame(&mut self) -> Option<u64> {
                crate::frames::alloc(1, 1).map(|hpa| hpa >> 12)
            }
            fn free_frame(&mut self, mfn: u64) {
                crate::frames::free(mfn << 12, 1);
            }
        }
    };
}

frames_host!(FramesOnly);
frames_host!(Host<'_, '_>);

impl MapHost for Host<'_, '_> {
    fn translate(&mut self, dom: DomId, gfn: u64, _writable: bool) -> Result<u64, GntSt> {
        let d = self.dom(dom).ok_or(GntSt::BadDomain)?;
        if gfn >= (1 << 40) || !d.mem.is_plain_ram(gfn) {
            return Err(GntSt::BadPage);
        }
        d.mem
            .ram_frame(gfn)
            .map(|hpa| hpa >> 12)
            .ok_or(GntSt::BadPage)
    }

    fn add_host_mapping(
        &mut self,
        dom: DomId,
        host_addr: u64,
        mfn: u64,
        flags: u32,
        _cache: u16,
    ) -> Result<(), GntSt> {
        let d = self.dom(dom).ok_or(GntSt::BadDomain)?;
        if host_addr & 0xfff != 0 || host_addr >= (1 << 52) {
            return Err(GntSt::GeneralError);
        }
        let readonly = flags & abi::grant_table::GNTMAP_READONLY != 0;
        d.map_foreign(host_addr >> 12, mfn << 12, readonly)
            .map_err(|_| GntSt::GeneralError)?;
        // A domain owning devices: its IOMMU tables mirror its physmap, so the frame
        // becomes reachable by its devices at the same address (read-only grants
        // read-only). This is the path instead of a copy: the NIC DMAs into the page.
        if let Err(e) = crate::devices::map_grant(dom, host_addr, mfn << 12, readonly) {
            log::warn!("d{dom}: grant mapping at {host_addr:#x} refused: IOMMU entry: {e}");
            let _ = d.unmap_foreign(host_addr >> 12, mfn << 12);
            return Err(GntSt::GeneralError);
        }
        Ok(())
    }

    fn remove_host_mapping(
        &mut self,
        dom: DomId,
        host_addr: u64,
        mfn: u64,
        new_addr: u64,
        _flags: u32,
    ) -> Result<(), GntSt> {
        if new_addr != 0 {
            return Err(GntSt::GeneralError);
        }
        let d = self.dom(dom).ok_or(GntSt::BadDomain)?;
        d.unmap_foreign(host_addr >> 12, mfn << 12)
            .map_err(|_| GntSt::GeneralError)?;
        // The IOMMU entry goes in `flush`, which the engine calls before it releases
        // the grant: one batch of invalidations and one wait for all of them.
        crate::devices::unmap_grant(dom, host_addr);
        Ok(())
    }

    fn iommu_map(&mut self, dom: DomId, _mfn: u64, _writable: bool) -> Result<(), GntSt> {
        log::warn!("d{dom}: IOMMU grant mapping requested, but every domain here is translated");
        Err(GntSt::GeneralError)
    }

    fn iommu_unmap(&mut self, dom: DomId, _mfn: u64) -> Result<(), GntSt> {
        log::warn!("d{dom}: IOMMU grant unmapping requested, but every domain here is translated");
        Err(GntSt::GeneralError)
    }

    fn flush(&mut self, dom: DomId) {
        // Devices first: IOTLB invalidations for the unmapped grants, completed (wait
        // descriptor) before this returns and so before the engine releases them.
        crate::devices::flush(dom);
        // The flag makes every vCPU of `dom` flush at its next entry, on whichever
        // physical CPU (the scheduler turns it into a TLB generation); vCPUs inside
        // the guest on other CPUs right now are kicked out and waited for, so nothing
        // uses the old translation once this returns.
        if let Some(d) = self.dom(dom) {
            d.tlb_flush_needed = true;
            crate::smp::sync_domain(dom);
        }
    }

    fn guest_frame_of(&self, dom: DomId, mfn: u64) -> u64 {
        let d = if dom == self.cur.id {
            Some(&*self.cur)
        } else {
            self.before
                .iter()
                .chain(self.after.iter())
                .map(|d| &d.core)
                .find(|c| c.id == dom)
        };
        d.and_then(|d| d.mem.placed_at(mfn << 12))
            .unwrap_or(u64::MAX)
    }

    fn write_frame_list(&mut self, dom: DomId, list: u64, frames: &[u64]) -> bool {
        let (Some(cpu), true) = (self.cpu, dom == self.cur.id) else {
            return false;
        };
        let bytes: alloc::vec::Vec<u8> = frames.iter().flat_map(|f| f.to_le_bytes()).collect();
        crate::exits::copy_to_guest(self.cur, cpu, list, &bytes).is_ok()
    }
}
