//! Physical frame allocator: a bitmap over every 4 KiB frame below the top of RAM.
//!
//! One bit a frame (1 = free). Contiguous, aligned runs can be asked for, which guest
//! memory uses to get 2 MiB chunks that nested paging maps with large pages. The logic
//! is plain and host-tested; the image hands it a bitmap carved out of RAM.

/// Size of a frame.
pub const FRAME_SIZE: u64 = 4096;

/// The allocator's state. `bits` must hold one bit for each frame in `[0, frames)`.
pub struct FrameAllocator<'a> {
    bits: &'a mut [u64],
    frames: u64,
    free: u64,
    hint: usize,
}

impl<'a> FrameAllocator<'a> {
    /// An allocator with every frame in use; free RAM is added with [`Self::add_free`].
    pub fn new(bits: &'a mut [u64], frames: u64) -> Self {
        let frames = frames.min(bits.len() as u64 * 64);
        bits.fill(0);
        FrameAllocator {
            bits,
            frames,
            free: 0,
            hint: 0,
        }
    }

    /// Words of bitmap needed for `frames` frames.
    pub const fn words_for(frames: u64) -> usize {
        frames.div_ceil(64) as usize
    }

    /// Marks the whole frames inside `[start, end)` free (partial frames at the edges
    /// are left in use).
    pub fn add_free(&mut self, start: u64, end: u64) {
        let first = start.div_ceil(FRAME_SIZE);
        let last = (end / FRAME_SIZE).min(self.frames);
        for f in first..last {
            if !self.is_free(f) {
                self.set(f, true);
                self.free += 1;
            }
        }
    }

    /// Marks every frame touching `[start, end)` in use.
    pub fn reserve(&mut self, start: u64, end: u64) {
        let first = start / FRAME_SIZE;
        let last = end.div_ceil(FRAME_SIZE).min(self.frames);
        for f in first..last {
            if self.is_free(f) {
                self.set(f, false);
                self.free -= 1;
            }
        }
    }

    fn is_free(&self, f: u64) -> bool {
        self.bits[(f / 64) as usize] & (1 << (f % 64)) != 0
    }

    fn set(&mut self, f: u64, free: bool) {
        let w = &mut self.bits[(f / 64) as usize];
        if free {
            *w |= 1 << (f % 64);
        } else {
            *w &= !(1 << (f % 64));
        }
    }

    /// Allocates `count` contiguous frames whose first frame number is a multiple of
    /// `align` frames; returns the physical address of the first.
    pub fn alloc(&mut self, count: u64, align: u64) -> Option<u64> {
        if count == 0 || align == 0 || count > self.free {
            return None;
        }
        if count == 1 && align == 1 {
            let start = self.hint.min(self.bits.len());
            let order = (start..self.bits.len()).chain(0..start);
            for w in order {
                if self.bits[w] != 0 {
                    let f = w as u64 * 64 + u64::from(self.bits[w].trailing_zeros());
                    if f >= self.frames {
                        continue;
                    }
                    self.set(f, false);
                    self.free -= 1;
                    self.hint = w;
                    return Some(f * FRAME_SIZE);
                }
            }
            return None;
        }
        let mut f = 0;
        while f + count <= self.frames {
            if f % align != 0 {
                f = f.next_multiple_of(align);
                continue;
            }
            // skip whole used words quickly
            if f % 64 == 0 && self.bits[(f / 64) as usize] == 0 {
                f += 64;
                continue;
            }
            match (f..f + count).find(|&g| !self.is_free(g)) {
                None => {
                    for g in f..f + count {
                        self.set(g, false);
                    }
                    self.free -= count;
                    return Some(f * FRAME_SIZE);
                }
                Some(used) => f = (used + 1).next_multiple_of(align),
            }
        }
        None
    }

    /// Returns `count` frames starting at `pa` (which [`Self::alloc`] handed out).
    ///
    /// # Panics
    /// On a double free or an address outside the bitmap: both are hypervisor bugs.
    pub fn free(&mut self, pa: u64, count: u64) {
        let first = pa / FRAME_SIZE;
        assert!(
            pa.is_multiple_of(FRAME_SIZE) && first + count <= self.frames,
            "bad frame free {pa:#x}"
        );
        for f in first..first + count {
            assert!(
                !self.is_free(f),
                "double free of frame {:#x}",
                f * FRAME_SIZE
            );
            self.set(f, true);
        }
        self.free += count;
    }

    /// Number of free frames.
    pub fn free_frames(&self) -> u64 {
        self.free
    }
}

/// The machine's allocator, installed once by the image at boot.
static GLOBAL: spin::Mutex<Option<FrameAllocator<'static>>> = spin::Mutex::new(None);

/// Installs the machine-wide allocator.
pub fn install(a: FrameAllocator<'static>) {
    *GLOBAL.lock() = Some(a);
}

/// Allocates `count` contiguous frames aligned to `align` frames from the machine's
/// allocator; the memory is NOT zeroed.
pub fn alloc(count: u64, align: u64) -> Option<u64> {
    GLOBAL.lock().as_mut()?.alloc(count, align)
}

/// Returns frames to the machine's allocator.
pub fn free(pa: u64, count: u64) {
    if let Some(a) = GLOBAL.lock().as_mut() {
        a.free(pa, count);
    }
}

/// Free frames in the machine's allocator.
pub fn free_count() -> u64 {
    GLOBAL
        .lock()
        .as_ref()
        .map_or(0, FrameAllocator::free_frames)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn alloc_with(frames: u64) -> FrameAllocator<'static> {
        let bits = vec![0u64; FrameAllocator::words_for(frames)].leak();
        FrameAllocator::new(bits, frames)
    }

    #[test]
    fn free_regions_and_reservations() {
        let mut a = alloc_with(1024);
        a.add_free(0x1800, 0x10_0000); // partial first frame ignored
        assert_eq!(a.free_frames(), 256 - 2);
        a.reserve(0x5000, 0x5001);
        assert_eq!(a.free_frames(), 256 - 3);
        let f = a.alloc(1, 1).unwrap();
        assert_eq!(f, 0x2000);
        a.free(f, 1);
        assert_eq!(a.free_frames(), 256 - 3);
    }

    #[test]
    fn aligned_contiguous_runs() {
        let mut a = alloc_with(4096);
        a.add_free(0x1000, 4096 * FRAME_SIZE);
        let big = a.alloc(512, 512).unwrap();
        assert_eq!(big % (2 << 20), 0);
        assert_ne!(big, 0);
        let before = a.free_frames();
        let run = a.alloc(3, 1).unwrap();
        assert_eq!(a.free_frames(), before - 3);
        a.free(run, 3);
        a.free(big, 512);
        assert_eq!(a.free_frames(), 4095);
        assert!(a.alloc(4096, 1).is_none());
        assert!(a.alloc(0, 1).is_none());
    }

    #[test]
    fn exhaustion_returns_none() {
        let mut a = alloc_with(64);
        a.add_free(0, 4 * FRAME_SIZE);
        for _ in 0..4 {
            assert!(a.alloc(1, 1).is_some());
        }
        assert!(a.alloc(1, 1).is_none());
    }

    #[test]
    #[should_panic(expected = "double free")]
    fn double_free_is_caught() {
        let mut a = alloc_with(64);
        a.add_free(0, 4 * FRAME_SIZE);
        let f = a.alloc(1, 1).unwrap();
        a.free(f, 1);
        a.free(f, 1);
    }
}
