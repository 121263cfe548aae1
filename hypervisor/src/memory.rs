//! A domain's guest-physical memory: host frames in extents, with copy helpers that
//! never touch anything outside them.

use alloc::collections::BTreeMap;
use alloc::vec::Vec;

use crate::arch::phys;
use crate::frames::{self, FRAME_SIZE};

/// 2 MiB, the chunk guest memory is allocated in when it can be (nested paging then
/// maps it with large pages).
pub const CHUNK: u64 = 2 << 20;

/// A run of guest-physical memory backed by contiguous host memory.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Extent {
    /// First guest-physical address.
    pub gpa: u64,
    /// First host-physical address.
    pub hpa: u64,
    /// Length in bytes (a multiple of 4 KiB).
    pub len: u64,
}

/// Guest RAM `[0, size)`, plus frames the hypervisor gives the domain (shared_info,
/// grant frames) that the guest places in its physmap with `add_to_physmap`.
pub struct GuestMemory {
    extents: Vec<Extent>,
    size: u64,
    /// Hypervisor-provided frames this domain owns (freed with it).
    special: Vec<u64>,
    /// Guest frames whose translation is replaced by a special frame.
    overlay: BTreeMap<u64, u64>,
    /// Frames owned elsewhere (grant-table frames of the grant engine) that may be
    /// overlaid like special frames but are not freed with the domain.
    external: Vec<u64>,
    /// Grant mappings of other domains' frames: guest frame -> (host frame, read-only).
    foreign: BTreeMap<u64, (u64, bool)>,
}

/// The machine has too little free memory for a domain.
#[derive(Clone, Copy, Debug)]
pub struct OutOfMemory {
    /// Bytes asked for.
    pub wanted: u64,
    /// Free bytes left in the machine when allocation failed.
    pub free: u64,
}

impl GuestMemory {
    /// Allocates `size` bytes (rounded up to 4 KiB), zeroed, in 2 MiB chunks where the
    /// machine has them and single frames otherwise.
    pub fn allocate(size: u64) -> Result<GuestMemory, OutOfMemory> {
        let mut a = GuestMemory::start_allocation(size);
        while !a.step(u64::MAX)? {}
        Ok(a.finish())
    }

    /// Starts allocating `size` bytes in steps ([`Allocation::step`]), so that a
    /// scheduler can run other domains between steps: zeroing a Linux domain's 256 MiB
    /// takes about half a second under QEMU TCG.
    pub fn start_allocation(size: u64) -> Allocation {
        Allocation {
            m: GuestMemory {
                extents: Vec::new(),
                size: 0,
                special: Vec::new(),
                overlay: BTreeMap::new(),
                external: Vec::new(),
                foreign: BTreeMap::new(),
            },
            size: size.next_multiple_of(FRAME_SIZE),
        }
    }

    fn push(&mut self, e: Extent) {
        if let Some(last) = self.extents.last_mut() {
            if last.gpa + last.len == e.gpa && last.hpa + last.len == e.hpa {
                last.len += e.len;
                return;
            }
        }
        self.extents.push(e);
    }

    /// Size in bytes.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// The extents, in guest-physical order.
    pub fn extents(&self) -> &[Extent] {
        &self.extents
    }

    /// Host-physical address of `gpa` and how many bytes from there are contiguous.
    pub fn translate(&self, gpa: u64) -> Option<(u64, u64)> {
        if let Some(&hpa) = self.overlay.get(&(gpa >> 12)) {
            return Some((hpa + (gpa & 0xfff), FRAME_SIZE - (gpa & 0xfff)));
        }
        if let Some(&(hpa, _)) = self.foreign.get(&(gpa >> 12)) {
            return Some((hpa + (gpa & 0xfff), FRAME_SIZE - (gpa & 0xfff)));
        }
        let (hpa, avail) = self.translate_ram(gpa)?;
        // stop at the next overlaid page
        let next_page = (gpa | 0xfff) + 1;
        let next_special = [
            self.overlay
                .range(next_page >> 12..)
                .next()
                .map(|(g, _)| *g),
            self.foreign
                .range(next_page >> 12..)
                .next()
                .map(|(g, _)| *g),
        ]
        .into_iter()
        .flatten()
        .min();
        match next_special {
            Some(gfn) if (gfn << 12) < gpa + avail => Some((hpa, (gfn << 12) - gpa)),
            _ => Some((hpa, avail)),
        }
    }

    fn translate_ram(&self, gpa: u64) -> Option<(u64, u64)> {
        let i = self.extents.partition_point(|e| e.gpa + e.len <= gpa);
        let e = self.extents.get(i)?;
        (gpa >= e.gpa).then(|| (e.hpa + (gpa - e.gpa), e.len - (gpa - e.gpa)))
    }

    /// Copies guest memory at `gpa` into `buf`; false if any byte is outside RAM.
    pub fn read(&self, mut gpa: u64, buf: &mut [u8]) -> bool {
        let mut done = 0;
        while done < buf.len() {
            let Some((hpa, avail)) = self.translate(gpa) else {
                return false;
            };
            let n = (avail.min((buf.len() - done) as u64)) as usize;
            // SAFETY: [hpa, hpa+n) lies inside one of this domain's extents.
            unsafe { phys::read(hpa, &mut buf[done..done + n]) };
            done += n;
            gpa += n as u64;
        }
        true
    }

    /// Copies `data` into guest memory at `gpa`; false (nothing written) if any byte is
    /// outside the domain's memory or read-only.
    pub fn write(&mut self, gpa: u64, data: &[u8]) -> bool {
        let Some(end) = gpa.checked_add(data.len() as u64) else {
            return false;
        };
        // all of it must be there (RAM, special frames, grant mappings), and read-only
        // grant mappings are not written through
        let last = end.saturating_sub(1);
        if (gpa..end)
            .step_by(4096)
            .chain([last])
            .any(|a| self.translate(a).is_none())
            || self
                .foreign
                .range(gpa >> 12..=last >> 12)
                .any(|(_, (_, ro))| *ro)
        {
            return false;
        }
        let (mut gpa, mut done) = (gpa, 0);
        while done < data.len() {
            let Some((hpa, avail)) = self.translate(gpa) else {
                return false;
            };
            let n = (avail.min((data.len() - done) as u64)) as usize;
            // SAFETY: [hpa, hpa+n) lies inside one of this domain's extents.
            unsafe { phys::write(hpa, &data[done..done + n]) };
            done += n;
            gpa += n as u64;
        }
        true
    }

    /// Zeroes `len` bytes at `gpa`; false if the range leaves RAM.
    pub fn zero(&mut self, gpa: u64, len: u64) -> bool {
        if gpa.checked_add(len).is_none_or(|end| end > self.size) {
            return false;
        }
        let (mut gpa, mut left) = (gpa, len);
        while left > 0 {
            let Some((hpa, avail)) = self.translate(gpa) else {
                return false;
            };
            let n = avail.min(left);
            // SAFETY: [hpa, hpa+n) lies inside one of this domain's extents.
            unsafe { phys::zero(hpa, n) };
            left -= n;
            gpa += n;
        }
        true
    }
}

impl GuestMemory {
    /// Allocates a zeroed frame owned by the domain (not yet in its physmap).
    pub fn add_special_frame(&mut self) -> Option<u64> {
        let hpa = frames::alloc(1, 1)?;
        // SAFETY: a frame just allocated for this domain, identity-mapped.
        unsafe { phys::zero(hpa, FRAME_SIZE) };
        self.special.push(hpa);
        Some(hpa)
    }

    /// Makes guest frame `gfn` translate to the domain's special frame `hpa` (the RAM
    /// frame underneath, if any, is no longer reachable by the guest, as when Xen
    /// replaces a page with `add_to_physmap`). A frame lives at one place: the guest
    /// frame it was at before (returned) gets back what was there (RAM, or nothing).
    /// `None` if `hpa` is not owned.
    pub fn overlay(&mut self, gfn: u64, hpa: u64) -> Option<Option<u64>> {
        if !self.special.contains(&hpa) && !self.external.contains(&hpa) {
            return None;
        }
        let old = self
            .overlay
            .iter()
            .find(|(_, h)| **h == hpa)
            .map(|(g, _)| *g);
        if let Some(g) = old {
            self.overlay.remove(&g);
        }
        self.overlay.insert(gfn, hpa);
        Some(old.filter(|&g| g != gfn))
    }

    /// Lets `hpa`, a frame owned elsewhere (a grant-table frame), be overlaid.
    pub fn adopt_external(&mut self, hpa: u64) {
        if !self.external.contains(&hpa) {
            self.external.push(hpa);
        }
    }

    /// The guest frame a special or external frame is placed at, if any.
    pub fn placed_at(&self, hpa: u64) -> Option<u64> {
        self.overlay
            .iter()
            .find(|(_, h)| **h == hpa)
            .map(|(g, _)| *g)
    }

    /// Is guest frame `gfn` ordinary RAM of this domain (no overlay, no grant mapping)?
    pub fn is_plain_ram(&self, gfn: u64) -> bool {
        !self.overlay.contains_key(&gfn)
            && !self.foreign.contains_key(&gfn)
            && self.ram_frame(gfn).is_some()
    }

    /// Records a grant mapping of another domain's frame at `gfn`.
    pub fn map_foreign(&mut self, gfn: u64, hpa: u64, readonly: bool) -> bool {
        if self.overlay.contains_key(&gfn) || self.foreign.contains_key(&gfn) {
            return false;
        }
        self.foreign.insert(gfn, (hpa, readonly));
        true
    }

    /// Removes the grant mapping of `hpa` at `gfn`; false if that is not what is there.
    pub fn unmap_foreign(&mut self, gfn: u64, hpa: u64) -> bool {
        match self.foreign.get(&gfn) {
            Some(&(h, _)) if h == hpa => {
                self.foreign.remove(&gfn);
                true
            }
            _ => false,
        }
    }

    /// The RAM frame behind guest frame `gfn`, ignoring overlays.
    pub fn ram_frame(&self, gfn: u64) -> Option<u64> {
        self.translate_ram(gfn << 12).map(|(h, _)| h)
    }

    /// Atomically compares the aligned 32-bit word at `gpa` with `old` and, if equal,
    /// replaces it with `new`; returns the value found (`None` outside memory or
    /// unaligned). Used for words the guest updates concurrently (FIFO events).
    pub fn cmpxchg_u32(&mut self, gpa: u64, old: u32, new: u32) -> Option<u32> {
        if !gpa.is_multiple_of(4) {
            return None;
        }
        let (hpa, _) = self.translate(gpa)?;
        // SAFETY: hpa is a 4-aligned address inside one of this domain's frames
        // (translate checked it), identity-mapped; AtomicU32 has u32's layout, and the
        // guest touching the word concurrently is what the atomic operation is for.
        let word = unsafe { core::sync::atomic::AtomicU32::from_ptr(hpa as *mut u32) };
        Some(
            match word.compare_exchange(
                old,
                new,
                core::sync::atomic::Ordering::SeqCst,
                core::sync::atomic::Ordering::SeqCst,
            ) {
                Ok(v) | Err(v) => v,
            },
        )
    }

    /// Reads from one of the domain's special frames.
    pub fn special_read(&self, hpa: u64, offset: u64, buf: &mut [u8]) -> bool {
        if !self.special.contains(&hpa) || offset + buf.len() as u64 > FRAME_SIZE {
            return false;
        }
        // SAFETY: the frame is owned by this domain and the range lies inside it.
        unsafe { phys::read(hpa + offset, buf) };
        true
    }

    /// Writes to one of the domain's special frames.
    pub fn special_write(&mut self, hpa: u64, offset: u64, data: &[u8]) -> bool {
        if !self.special.contains(&hpa) || offset + data.len() as u64 > FRAME_SIZE {
            return false;
        }
        // SAFETY: the frame is owned by this domain and the range lies inside it.
        unsafe { phys::write(hpa + offset, data) };
        true
    }
}

/// Guest memory being allocated and zeroed step by step ([`GuestMemory::start_allocation`]).
/// Dropping it returns what was allocated so far.
pub struct Allocation {
    m: GuestMemory,
    size: u64,
}

impl Allocation {
    /// Allocates and zeroes at least `budget` more bytes (at least one chunk); returns
    /// whether the allocation is complete.
    pub fn step(&mut self, budget: u64) -> Result<bool, OutOfMemory> {
        let m = &mut self.m;
        let goal = m.size.saturating_add(budget.max(1)).min(self.size);
        while m.size < goal {
            let left = self.size - m.size;
            let (hpa, len) = if left >= CHUNK && m.size.is_multiple_of(CHUNK) {
                match frames::alloc(CHUNK / FRAME_SIZE, CHUNK / FRAME_SIZE) {
                    Some(hpa) => (hpa, CHUNK),
                    None => match frames::alloc(1, 1) {
                        Some(hpa) => (hpa, FRAME_SIZE),
                        None => {
                            return Err(OutOfMemory {
                                wanted: self.size,
                                free: frames::free_count() * FRAME_SIZE,
                            })
                        }
                    },
                }
            } else {
                match frames::alloc(1, 1) {
                    Some(hpa) => (hpa, FRAME_SIZE),
                    None => {
                        return Err(OutOfMemory {
                            wanted: self.size,
                            free: frames::free_count() * FRAME_SIZE,
                        })
                    }
                }
            };
            // SAFETY: the frames were just allocated for this domain and are identity-mapped.
            unsafe { phys::zero(hpa, len) };
            m.push(Extent {
                gpa: m.size,
                hpa,
                len,
            });
            m.size += len;
        }
        Ok(m.size == self.size)
    }

    /// The allocated memory (complete once [`Self::step`] said so).
    pub fn finish(self) -> GuestMemory {
        self.m
    }
}

impl Drop for GuestMemory {
    fn drop(&mut self) {
        for hpa in self.special.drain(..) {
            frames::free(hpa, 1);
        }
        for e in self.extents.drain(..) {
            frames::free(e.hpa, e.len / FRAME_SIZE);
        }
    }
}

impl crate::guest_walk::GuestPhys for GuestMemory {
    fn read_u64(&self, gpa: u64) -> Option<u64> {
        let mut b = [0u8; 8];
        GuestMemory::read(self, gpa, &mut b).then(|| u64::from_le_bytes(b))
    }
}

impl crate::guest_walk::GuestPhysBytes for GuestMemory {
    fn read(&self, gpa: u64, buf: &mut [u8]) -> Option<()> {
        GuestMemory::read(self, gpa, buf).then_some(())
    }
    fn write(&mut self, gpa: u64, buf: &[u8]) -> Option<()> {
        GuestMemory::write(self, gpa, buf).then_some(())
    }
}

impl crate::loader::GuestMemWrite for GuestMemory {
    fn write(&mut self, gpa: u64, data: &[u8]) -> bool {
        GuestMemory::write(self, gpa, data)
    }
    fn zero(&mut self, gpa: u64, len: u64) -> bool {
        GuestMemory::zero(self, gpa, len)
    }
}

/// A temporary buffer of whole frames outside the heap (e.g. a decompressed kernel,
/// tens of MiB), returned to the frame allocator when dropped.
pub struct ScratchBuffer {
    hpa: u64,
    frames: u64,
    len: usize,
}

impl ScratchBuffer {
    /// `len` bytes of contiguous physical memory, or `None` when the machine has no
    /// such run free.
    pub fn new(len: usize) -> Option<ScratchBuffer> {
        let frames = (len as u64).div_ceil(FRAME_SIZE).max(1);
        let hpa = frames::alloc(frames, 1)?;
        Some(ScratchBuffer { hpa, frames, len })
    }

    /// The buffer, read-only.
    pub fn as_slice(&self) -> &[u8] {
        // SAFETY: as for `as_mut_slice`; `&self` allows only shared borrows.
        unsafe { core::slice::from_raw_parts(self.hpa as *const u8, self.len) }
    }

    /// The buffer.
    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        // SAFETY: the frames were allocated for this buffer alone, are contiguous and
        // identity-mapped, and live until drop; `&mut self` makes the borrow unique.
        unsafe { core::slice::from_raw_parts_mut(self.hpa as *mut u8, self.len) }
    }
}

impl Drop for ScratchBuffer {
    fn drop(&mut self) {
        frames::free(self.hpa, self.frames);
    }
}
