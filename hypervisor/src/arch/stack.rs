//! Stack overflow detection and depth: the unused part of each CPU's stack is painted
//! with a pattern when the image registers the stack; the scheduler loop checks that
//! the lowest words still hold it (a stack that grew into its neighbour is reported
//! instead of corrupting memory silently: there are no guard pages, the identity map
//! uses 2 MiB pages), and the end of a run reports how deep each stack went.

use core::sync::atomic::{AtomicU64, Ordering};

use crate::smp::MAX_CPUS;

const PAINT: u64 = 0x5f4b_4341_5453_2d46; // "F-STACK_"
const CANARY_WORDS: usize = 8;

/// (lowest address, size) of each registered stack.
static STACKS: [(AtomicU64, AtomicU64); MAX_CPUS] =
    [const { (AtomicU64::new(0), AtomicU64::new(0)) }; MAX_CPUS];

/// Registers CPU `index`'s stack `bottom..bottom + size` and paints
/// `bottom..bottom + painted` (the part not in use yet).
///
/// # Safety
/// The range must be that CPU's stack, identity-mapped, 8-byte aligned, used for
/// nothing else for the rest of the run, and `bottom..bottom + painted` must not be in
/// use now (nor within the 128-byte red zone below the stack pointer).
pub unsafe fn register(index: usize, bottom: u64, size: u64, painted: u64) {
    let Some((b, s)) = STACKS.get(index) else {
        return;
    };
    for i in 0..(painted.min(size) / 8) as usize {
        // SAFETY: the caller guarantees the painted range is unused stack memory.
        unsafe { core::ptr::write_volatile((bottom as *mut u64).add(i), PAINT) };
    }
    s.store(size, Ordering::SeqCst);
    b.store(bottom, Ordering::SeqCst);
}

fn word(bottom: u64, i: usize) -> u64 {
    // SAFETY: `register`'s caller guaranteed the whole stack range stays mapped and
    // belongs to that stack; only its words are read.
    unsafe { core::ptr::read_volatile((bottom as *const u64).add(i)) }
}

/// False when CPU `index`'s stack has overwritten its lowest words (true when none was
/// registered).
pub fn intact(index: usize) -> bool {
    let bottom = STACKS
        .get(index)
        .map_or(0, |(b, _)| b.load(Ordering::Relaxed));
    bottom == 0 || (0..CANARY_WORDS).all(|i| word(bottom, i) == PAINT)
}

/// The deepest CPU `index`'s stack has been (bytes from its top), and its size.
pub fn depth(index: usize) -> Option<(u64, u64)> {
    let (b, s) = STACKS.get(index)?;
    let (bottom, size) = (b.load(Ordering::Relaxed), s.load(Ordering::Relaxed));
    if bottom == 0 {
        return None;
    }
    let untouched = (0..(size / 8) as usize)
        .take_while(|&i| word(bottom, i) == PAINT)
        .count() as u64;
    Some((size - untouched * 8, size))
}
