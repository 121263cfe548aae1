//! A fake hypervisor for the host tests: byte-addressed frames, a frame allocator that
//! can run dry, per-domain RAM, host mappings, IOMMU entries, and an event log to check
//! the order of removals, flushes and flag clears. Hooks let a test play a granter that
//! rewrites its entry between the engine's read and its update.

use std::collections::{BTreeMap, BTreeSet};

use crate::host::{FrameAlloc, GrantMemory, MapHost};
use crate::{DomId, GntSt};

/// Guest RAM frames per domain: gfn 0..RAM_FRAMES.
pub const RAM_FRAMES: u64 = 64;

/// The machine frame behind (dom, gfn) in the fake's RAM.
pub fn ram_mfn(dom: DomId, gfn: u64) -> u64 {
    ((u64::from(dom) + 1) << 20) | gfn
}

/// Byte memory.
#[derive(Default)]
pub struct Mem {
    pub frames: BTreeMap<u64, Vec<u8>>,
}

impl Mem {
    fn frame(&mut self, mfn: u64) -> &mut Vec<u8> {
        self.frames.entry(mfn).or_insert_with(|| {
            // Guest RAM gets a recognisable pattern; table frames are zeroed by the
            // engine anyway.
            (0..4096)
                .map(|i| (mfn as usize * 31 + i * 7) as u8)
                .collect()
        })
    }
    pub fn read(&mut self, mfn: u64, off: usize, len: usize) -> Vec<u8> {
        self.frame(mfn)[off..off + len].to_vec()
    }
    pub fn write(&mut self, mfn: u64, off: usize, b: &[u8]) {
        self.frame(mfn)[off..off + b.len()].copy_from_slice(b);
    }
    pub fn get_u16(&mut self, mfn: u64, off: usize) -> u16 {
        u16::from_le_bytes(self.read(mfn, off, 2).try_into().unwrap())
    }
    pub fn get_u32(&mut self, mfn: u64, off: usize) -> u32 {
        u32::from_le_bytes(self.read(mfn, off, 4).try_into().unwrap())
    }
    pub fn get_u64(&mut self, mfn: u64, off: usize) -> u64 {
        u64::from_le_bytes(self.read(mfn, off, 8).try_into().unwrap())
    }
    pub fn set_u32(&mut self, mfn: u64, off: usize, v: u32) {
        self.write(mfn, off, &v.to_le_bytes());
    }
}

/// What the engine asked the host to do, in order.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Event {
    AddHost {
        dom: DomId,
        addr: u64,
        mfn: u64,
    },
    RemoveHost {
        dom: DomId,
        addr: u64,
        mfn: u64,
    },
    Flush(DomId),
    /// A 16-bit and (flag / status clear) at (mfn, off) with this mask.
    Clear {
        mfn: u64,
        off: usize,
        mask: u16,
    },
    IommuMap {
        dom: DomId,
        mfn: u64,
        writable: bool,
    },
    IommuUnmap {
        dom: DomId,
        mfn: u64,
    },
}

type Hook = Box<dyn FnMut(&mut Mem, u64, usize)>;

/// The fake.
pub struct FakeHost {
    pub mem: Mem,
    next_frame: u64,
    /// Table frames handed out and not yet freed.
    pub allocated: BTreeSet<u64>,
    /// Frames the allocator may still hand out (`None`: unlimited).
    pub alloc_budget: Option<usize>,
    /// (dom, gfn) that are read-only to their owner.
    pub readonly_gfns: BTreeSet<(DomId, u64)>,
    /// (dom, gfn) that are "paged out".
    pub paged_out: BTreeSet<(DomId, u64)>,
    /// Host mappings: (dom, addr) -> (mfn, flags).
    pub host_maps: BTreeMap<(DomId, u64), (u64, u32)>,
    /// IOMMU entries: (dom, dfn) -> writable.
    pub iommu: BTreeMap<(DomId, u64), bool>,
    pub fail_add_host: bool,
    pub fail_iommu: bool,
    pub fail_frame_list: bool,
    pub events: Vec<Event>,
    pub frame_lists: Vec<(DomId, u64, Vec<u64>)>,
    /// Runs before every compare-exchange (with the target frame and offset).
    pub before_cmpxchg: Option<Hook>,
    /// Runs after every 16-bit or (the v2 status update), before the engine re-reads.
    pub after_or: Option<Hook>,
    pub cmpxchg_calls: u32,
}

impl Default for FakeHost {
    fn default() -> Self {
        FakeHost {
            mem: Mem::default(),
            next_frame: 0x1000,
            allocated: BTreeSet::new(),
            alloc_budget: None,
            readonly_gfns: BTreeSet::new(),
            paged_out: BTreeSet::new(),
            host_maps: BTreeMap::new(),
            iommu: BTreeMap::new(),
            fail_add_host: false,
            fail_iommu: false,
            fail_frame_list: false,
            events: Vec::new(),
            frame_lists: Vec::new(),
            before_cmpxchg: None,
            after_or: None,
            cmpxchg_calls: 0,
        }
    }
}

impl GrantMemory for FakeHost {
    fn load_u16(&self, mfn: u64, offset: usize) -> u16 {
        match self.mem.frames.get(&mfn) {
            Some(f) => u16::from_le_bytes(f[offset..offset + 2].try_into().unwrap()),
            None => 0,
        }
    }
    fn load_u32(&self, mfn: u64, offset: usize) -> u32 {
        match self.mem.frames.get(&mfn) {
            Some(f) => u32::from_le_bytes(f[offset..offset + 4].try_into().unwrap()),
            None => 0,
        }
    }
    fn load_u64(&self, mfn: u64, offset: usize) -> u64 {
        match self.mem.frames.get(&mfn) {
            Some(f) => u64::from_le_bytes(f[offset..offset + 8].try_into().unwrap()),
            None => 0,
        }
    }
    fn cmpxchg_u32(&mut self, mfn: u64, offset: usize, old: u32, new: u32) -> u32 {
        self.cmpxchg_calls += 1;
        if let Some(h) = self.before_cmpxchg.as_mut() {
            h(&mut self.mem, mfn, offset);
        }
        let cur = self.mem.get_u32(mfn, offset);
        if cur == old {
            self.mem.set_u32(mfn, offset, new);
        }
        cur
    }
    fn or_u16(&mut self, mfn: u64, offset: usize, bits: u16) {
        let v = self.mem.get_u16(mfn, offset) | bits;
        self.mem.write(mfn, offset, &v.to_le_bytes());
        if let Some(h) = self.after_or.as_mut() {
            h(&mut self.mem, mfn, offset);
        }
    }
    fn and_u16(&mut self, mfn: u64, offset: usize, mask: u16) {
        self.events.push(Event::Clear {
            mfn,
            off: offset,
            mask,
        });
        let v = self.mem.get_u16(mfn, offset) & mask;
        self.mem.write(mfn, offset, &v.to_le_bytes());
    }
    fn store_u16(&mut self, mfn: u64, offset: usize, v: u16) {
        self.mem.write(mfn, offset, &v.to_le_bytes());
    }
    fn store_u32(&mut self, mfn: u64, offset: usize, v: u32) {
        self.mem.write(mfn, offset, &v.to_le_bytes());
    }
    fn store_u64(&mut self, mfn: u64, offset: usize, v: u64) {
        self.mem.write(mfn, offset, &v.to_le_bytes());
    }
    fn zero_frame(&mut self, mfn: u64) {
        self.mem.frames.insert(mfn, vec![0; 4096]);
    }
    fn copy_bytes(
        &mut self,
        dst_mfn: u64,
        dst_off: usize,
        src_mfn: u64,
        src_off: usize,
        len: usize,
    ) {
        let b = self.mem.read(src_mfn, src_off, len);
        self.mem.write(dst_mfn, dst_off, &b);
    }
}

impl FrameAlloc for FakeHost {
    fn alloc_frame(&mut self) -> Option<u64> {
        if let Some(b) = self.alloc_budget.as_mut() {
            if *b == 0 {
                return None;
            }
            *b -= 1;
        }
        let f = self.next_frame;
        self.next_frame += 1;
        self.allocated.insert(f);
        Some(f)
    }
    fn free_frame(&mut self, mfn: u64) {
        assert!(self.allocated.remove(&mfn), "double free of {mfn:#x}");
        self.mem.frames.remove(&mfn);
    }
}

impl MapHost for FakeHost {
    fn translate(&mut self, dom: DomId, gfn: u64, writable: bool) -> Result<u64, GntSt> {
        if self.paged_out.contains(&(dom, gfn)) {
            return Err(GntSt::Eagain);
        }
        if gfn >= RAM_FRAMES {
            return Err(GntSt::BadPage);
        }
        if writable && self.readonly_gfns.contains(&(dom, gfn)) {
            return Err(GntSt::GeneralError);
        }
        Ok(ram_mfn(dom, gfn))
    }
    fn add_host_mapping(
        &mut self,
        dom: DomId,
        host_addr: u64,
        mfn: u64,
        flags: u32,
        _cache: u16,
    ) -> Result<(), GntSt> {
        if self.fail_add_host || self.host_maps.contains_key(&(dom, host_addr)) {
            return Err(GntSt::GeneralError);
        }
        self.host_maps.insert((dom, host_addr), (mfn, flags));
        self.events.push(Event::AddHost {
            dom,
            addr: host_addr,
            mfn,
        });
        Ok(())
    }
    fn remove_host_mapping(
        &mut self,
        dom: DomId,
        host_addr: u64,
        mfn: u64,
        _new_addr: u64,
        _flags: u32,
    ) -> Result<(), GntSt> {
        match self.host_maps.get(&(dom, host_addr)) {
            Some((m, _)) if *m == mfn => {
                self.host_maps.remove(&(dom, host_addr));
                self.events.push(Event::RemoveHost {
                    dom,
                    addr: host_addr,
                    mfn,
                });
                Ok(())
            }
            _ => Err(GntSt::GeneralError),
        }
    }
    fn iommu_map(&mut self, dom: DomId, mfn: u64, writable: bool) -> Result<(), GntSt> {
        if self.fail_iommu {
            return Err(GntSt::GeneralError);
        }
        self.iommu.insert((dom, mfn), writable);
        self.events.push(Event::IommuMap { dom, mfn, writable });
        Ok(())
    }
    fn iommu_unmap(&mut self, dom: DomId, mfn: u64) -> Result<(), GntSt> {
        if self.fail_iommu {
            return Err(GntSt::GeneralError);
        }
        self.iommu.remove(&(dom, mfn));
        self.events.push(Event::IommuUnmap { dom, mfn });
        Ok(())
    }
    fn flush(&mut self, dom: DomId) {
        self.events.push(Event::Flush(dom));
    }
    fn guest_frame_of(&self, _dom: DomId, mfn: u64) -> u64 {
        mfn + 0xf_0000
    }
    fn write_frame_list(&mut self, dom: DomId, list: u64, frames: &[u64]) -> bool {
        if self.fail_frame_list {
            return false;
        }
        self.frame_lists.push((dom, list, frames.to_vec()));
        true
    }
}
