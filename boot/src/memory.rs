//! Physical memory at boot: the frame allocator over the loader's memory map, the heap,
//! and the identity map extended over RAM above 4 GiB.

use hypervisor::arch::phys::HostPhysMem;
use hypervisor::frames::{self, FrameAllocator, FRAME_SIZE};
use hypervisor::paging::{PageSize, PageTable, Perms, X86};

use crate::bootinfo::BootInfo;

/// Heap size. Domains' memory and page tables come from the frame allocator, not
/// from here; the heap holds VMCBs, bitmaps, configs and similar small objects.
pub const HEAP_SIZE: u64 = 32 << 20;

unsafe extern "C" {
    static __image_start: u8;
    static __image_end: u8;
}

#[global_allocator]
static HEAP: talc::TalcLock<spin::Mutex<()>, talc::source::Manual> =
    talc::TalcLock::new(talc::source::Manual);

/// Physical range of the image.
pub fn image_range() -> (u64, u64) {
    (
        (&raw const __image_start) as u64,
        (&raw const __image_end) as u64,
    )
}

/// Why memory could not be set up.
#[derive(Debug)]
pub enum MemError {
    /// The loader gave no usable memory map.
    MissingMemoryMap,
    /// No RAM region can hold the frame bitmap (its size in bytes).
    BitmapDoesNotFit(u64),
    /// Not enough RAM for the heap.
    HeapDoesNotFit,
}

impl core::fmt::Display for MemError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            MemError::MissingMemoryMap => {
                write!(f, "the boot loader passed no memory map with RAM in it")
            }
            MemError::BitmapDoesNotFit(b) => {
                write!(f, "no free RAM above 1 MiB holds the {b}-byte frame bitmap")
            }
            MemError::HeapDoesNotFit => {
                write!(
                    f,
                    "less than {} MiB of free RAM for the heap: give the machine more memory",
                    HEAP_SIZE >> 20
                )
            }
        }
    }
}

/// Ranges the allocator must never hand out: the low 1 MiB (firmware, real-mode
/// trampolines), the image, boot information, command line and modules.
fn reserved(bi: &BootInfo) -> [(u64, u64); 4 + crate::bootinfo::MAX_MODULES] {
    let mut r = [(0, 0); 4 + crate::bootinfo::MAX_MODULES];
    r[0] = (0, 0x10_0000);
    r[1] = image_range();
    r[2] = bi.info_range;
    r[3] = (bi.cmdline.0, bi.cmdline.0 + bi.cmdline.1 + 1);
    for (i, m) in bi.modules().iter().enumerate() {
        r[4 + i] = (m.start, m.start + m.len);
    }
    r
}

fn overlaps(a: (u64, u64), b: (u64, u64)) -> bool {
    a.0 < b.1 && b.0 < a.1
}

/// Sets up the frame allocator and the heap. Returns (top of RAM, free bytes).
pub fn init(bi: &BootInfo) -> Result<(u64, u64), MemError> {
    let ram = || {
        bi.regions()
            .iter()
            .filter(|r| r.kind == abi::start_info::MEMMAP_TYPE_RAM)
    };
    let top = ram()
        .map(|r| r.end)
        .max()
        .ok_or(MemError::MissingMemoryMap)?;
    let nframes = top / FRAME_SIZE;
    let words = FrameAllocator::words_for(nframes);
    let bytes = (words * 8) as u64;
    let res = reserved(bi);
    // Place the bitmap in the first RAM above 1 MiB that overlaps nothing reserved.
    let mut place = None;
    'regions: for r in ram() {
        let mut start = r.start.max(0x10_0000).next_multiple_of(FRAME_SIZE);
        while start + bytes <= r.end {
            let cand = (start, start + bytes);
            if let Some(hit) = res.iter().find(|x| overlaps(**x, cand)) {
                start = hit.1.next_multiple_of(FRAME_SIZE);
                continue;
            }
            place = Some(start);
            break 'regions;
        }
    }
    let at = place.ok_or(MemError::BitmapDoesNotFit(bytes))?;
    // [at, at+bytes) is the first fit above 1 MiB, so below 4 GiB: identity-mapped by
    // the boot page tables.
    // SAFETY: it is RAM (from the memory map) that overlaps nothing reserved, owned by
    // the allocator from here on.
    let bits: &'static mut [u64] =
        unsafe { core::slice::from_raw_parts_mut(at as *mut u64, words) };
    let mut fa = FrameAllocator::new(bits, nframes);
    for r in ram() {
        fa.add_free(r.start, r.end);
    }
    for (s, e) in res {
        if e > s {
            fa.reserve(s, e);
        }
    }
    fa.reserve(at, at + bytes);
    frames::install(fa);

    extend_identity_map(top);

    let heap = frames::alloc(HEAP_SIZE / FRAME_SIZE, 1).ok_or(MemError::HeapDoesNotFit)?;
    // SAFETY: the frames were just taken from the allocator for the heap alone and are
    // identity-mapped RAM.
    unsafe {
        HEAP.lock().claim(heap as *mut u8, HEAP_SIZE as usize);
    }
    Ok((top, frames::free_count() * FRAME_SIZE))
}

/// The entry code maps the first 4 GiB; RAM above that is added with 2 MiB pages.
fn extend_identity_map(top: u64) {
    const FOUR_GIB: u64 = 4 << 30;
    if top <= FOUR_GIB {
        return;
    }
    let mut pm = HostPhysMem;
    let mut pt = PageTable::<X86>::from_root(hypervisor::arch::x86::cr3() & !0xfff, 4);
    let rw = Perms::RWX;
    let len = top.next_multiple_of(2 << 20) - FOUR_GIB;
    if let Err(e) = pt.map_range(&mut pm, FOUR_GIB, FOUR_GIB, len, rw, PageSize::Size2M) {
        log::warn!("cannot identity-map RAM above 4 GiB ({e}); it stays unused");
    }
    // SAFETY: reloading CR3 with its own value flushes the TLB after adding mappings.
    unsafe { core::arch::asm!("mov rax, cr3", "mov cr3, rax", out("rax") _, options(nostack)) };
}
