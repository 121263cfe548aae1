//! Per-mapping-domain handle table (Xen's maptrack).

use alloc::collections::VecDeque;
use alloc::vec::Vec;

use crate::DomId;

/// Handles per maptrack "frame" (Xen: 4096 / sizeof(struct grant_mapping) = 256).
pub const MAPTRACK_PER_FRAME: u32 = 256;

/// One live mapping of another domain's grant, owned by the mapping domain.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MaptrackEntry {
    /// The granting domain.
    pub dom: DomId,
    /// The grant reference in `dom`'s table.
    pub gref: u32,
    /// `GNTMAP_*` flags still held (`host_map` and/or `device_map`, `readonly`, ...).
    pub flags: u32,
    /// Machine frame mapped.
    pub mfn: u64,
    /// Where the host mapping was created (informational; unmap names its own address,
    /// as in Xen).
    pub host_addr: u64,
}

/// Handle allocator and table. Handles are indices; freed handles go to the back of a
/// FIFO free list (Xen puts them at the tail), so a stale handle is not immediately
/// reused. The table grows by [`MAPTRACK_PER_FRAME`] handles up to its limit.
#[derive(Debug)]
pub struct Maptrack {
    entries: Vec<Option<MaptrackEntry>>,
    free: VecDeque<u32>,
    max_entries: u32,
    in_use: u32,
}

impl Maptrack {
    pub(crate) fn new(max_frames: u32) -> Maptrack {
        Maptrack {
            entries: Vec::new(),
            free: VecDeque::new(),
            max_entries: max_frames.saturating_mul(MAPTRACK_PER_FRAME),
            in_use: 0,
        }
    }

    /// Handles that currently track a mapping.
    pub fn in_use(&self) -> u32 {
        self.in_use
    }

    /// Handles allocated so far (Xen's `maptrack_limit`): a handle at or above this is
    /// out of range.
    pub fn limit(&self) -> u32 {
        self.entries.len() as u32
    }

    /// Most handles this table may hold.
    pub fn max_entries(&self) -> u32 {
        self.max_entries
    }

    /// Reserves a handle (its entry stays empty until [`Maptrack::fill`]).
    pub(crate) fn get_handle(&mut self) -> Option<u32> {
        if let Some(h) = self.free.pop_front() {
            return Some(h);
        }
        let limit = self.limit();
        if limit >= self.max_entries {
            return None;
        }
        let grow = MAPTRACK_PER_FRAME.min(self.max_entries - limit);
        self.entries.resize((limit + grow) as usize, None);
        // The first new handle is used now; the rest go to the front of the list.
        for h in (limit + 1..limit + grow).rev() {
            self.free.push_front(h);
        }
        Some(limit)
    }

    /// Returns an unused reserved handle.
    pub(crate) fn put_handle(&mut self, h: u32) {
        self.free.push_back(h);
    }

    pub(crate) fn fill(&mut self, h: u32, e: MaptrackEntry) {
        self.entries[h as usize] = Some(e);
        self.in_use += 1;
    }

    /// The mapping tracked by `h`, if any.
    pub fn get(&self, h: u32) -> Option<&MaptrackEntry> {
        self.entries.get(h as usize)?.as_ref()
    }

    pub(crate) fn get_mut(&mut self, h: u32) -> Option<&mut MaptrackEntry> {
        self.entries.get_mut(h as usize)?.as_mut()
    }

    /// Ends the mapping tracked by `h` and frees the handle.
    pub(crate) fn release(&mut self, h: u32) -> Option<MaptrackEntry> {
        let e = self.entries.get_mut(h as usize)?.take()?;
        self.in_use -= 1;
        self.free.push_back(h);
        Some(e)
    }

    /// Every live (handle, entry).
    pub fn iter(&self) -> impl Iterator<Item = (u32, &MaptrackEntry)> {
        self.entries
            .iter()
            .enumerate()
            .filter_map(|(h, e)| e.as_ref().map(|e| (h as u32, e)))
    }

    /// Drops everything (domain destruction); returns the entries that were live.
    pub(crate) fn take_all(&mut self) -> Vec<(u32, MaptrackEntry)> {
        let out: Vec<_> = self.iter().map(|(h, e)| (h, *e)).collect();
        self.entries.clear();
        self.free.clear();
        self.in_use = 0;
        out
    }
}
