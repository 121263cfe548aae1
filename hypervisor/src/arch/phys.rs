//! Physical memory access through the image's identity map.
//!
//! The image maps all RAM (and the MMIO it uses) at virtual == physical, so a physical
//! address is a valid pointer once it is known to lie in RAM the caller owns. These are
//! the only functions that turn addresses into pointers.

/// Copies `buf.len()` bytes from host-physical `pa`.
///
/// # Safety
/// `[pa, pa + len)` must be identity-mapped RAM that no one else writes concurrently.
pub unsafe fn read(pa: u64, buf: &mut [u8]) {
    // SAFETY: the caller guarantees the range is mapped, readable RAM.
    unsafe { core::ptr::copy_nonoverlapping(pa as *const u8, buf.as_mut_ptr(), buf.len()) };
}

/// Copies `data` to host-physical `pa`.
///
/// # Safety
/// `[pa, pa + len)` must be identity-mapped RAM owned by the caller (e.g. a domain's
/// memory, a page table) and not part of the image.
pub unsafe fn write(pa: u64, data: &[u8]) {
    // SAFETY: the caller guarantees the range is mapped RAM it owns.
    unsafe { core::ptr::copy_nonoverlapping(data.as_ptr(), pa as *mut u8, data.len()) };
}

/// Fills `len` bytes at host-physical `pa` with zero.
///
/// # Safety
/// As [`write`].
pub unsafe fn zero(pa: u64, len: u64) {
    let head = len & !127;
    if pa.is_multiple_of(16) && head > 0 {
        // 128 bytes per iteration with aligned SSE stores: QEMU TCG runs `rep stos`
        // one element per step, so zeroing a Linux domain's 256 MiB this way is several
        // times faster than the `rep stosb` behind `write_bytes`.
        // SAFETY: the caller guarantees the range is mapped RAM it owns; `pa` is
        // 16-aligned and `head` a multiple of 128 within the range; xmm0 is declared
        // clobbered (SSE is enabled for the hypervisor at boot).
        unsafe {
            core::arch::asm!(
                "pxor xmm0, xmm0",
                "2:",
                "movdqa [{p}], xmm0",
                "movdqa [{p} + 16], xmm0",
                "movdqa [{p} + 32], xmm0",
                "movdqa [{p} + 48], xmm0",
                "movdqa [{p} + 64], xmm0",
                "movdqa [{p} + 80], xmm0",
                "movdqa [{p} + 96], xmm0",
                "movdqa [{p} + 112], xmm0",
                "add {p}, 128",
                "sub {n}, 128",
                "jnz 2b",
                p = inout(reg) pa => _,
                n = inout(reg) head => _,
                out("xmm0") _,
                options(nostack),
            );
        }
        if len > head {
            // SAFETY: the rest of the caller's range.
            unsafe { core::ptr::write_bytes((pa + head) as *mut u8, 0, (len - head) as usize) };
        }
    } else {
        // SAFETY: the caller guarantees the range is mapped RAM it owns.
        unsafe { core::ptr::write_bytes(pa as *mut u8, 0, len as usize) };
    }
}

/// Reads the aligned u64 at host-physical `pa`.
///
/// # Safety
/// As [`read`]; `pa` 8-aligned.
pub unsafe fn read_u64(pa: u64) -> u64 {
    // SAFETY: the caller guarantees an aligned, mapped address.
    unsafe { core::ptr::read_volatile(pa as *const u64) }
}

/// Writes the aligned u64 at host-physical `pa`.
///
/// # Safety
/// As [`write`]; `pa` 8-aligned.
pub unsafe fn write_u64(pa: u64, v: u64) {
    // SAFETY: the caller guarantees an aligned, mapped address it owns.
    unsafe { core::ptr::write_volatile(pa as *mut u64, v) };
}

/// A byte slice over host-physical memory.
///
/// # Safety
/// The range must be identity-mapped RAM that stays valid and unmodified for `'a`
/// (boot modules, which nothing frees while domains are built from them).
pub unsafe fn slice<'a>(pa: u64, len: u64) -> &'a [u8] {
    // SAFETY: the caller guarantees the range is valid and immutable for 'a.
    unsafe { core::slice::from_raw_parts(pa as *const u8, len as usize) }
}

/// Page-table memory for the walker in [`crate::paging`]: frames from the machine's
/// allocator, accessed through the identity map.
pub struct HostPhysMem;

impl crate::paging::PhysMem for HostPhysMem {
    fn read(&self, pa: u64) -> u64 {
        // SAFETY: the walker only reads entries of tables it allocated (or the image's
        // own identity map), all identity-mapped RAM, 8-aligned.
        unsafe { read_u64(pa) }
    }

    fn write(&mut self, pa: u64, value: u64) {
        // SAFETY: as in `read`; the tables belong to the caller's page table.
        unsafe { write_u64(pa, value) }
    }

    fn alloc_table(&mut self) -> Option<u64> {
        let pa = crate::frames::alloc(1, 1)?;
        // SAFETY: a frame just handed out by the allocator, identity-mapped.
        unsafe { zero(pa, 4096) };
        Some(pa)
    }

    fn free_table(&mut self, pa: u64) {
        crate::frames::free(pa, 1);
    }
}

/// Grant-table engine access to machine frames: the engine only names frames it got
/// from [`crate::grant_glue`] (a domain's RAM through `translate`, or table frames from
/// the frame allocator), all identity-mapped RAM that stays allocated while the engine
/// references it.
pub struct GrantFrames;

fn frame_ptr<T>(mfn: u64, offset: usize) -> *mut T {
    ((mfn << 12) + (offset as u64 % 4096)) as *mut T
}

impl grant::host::GrantMemory for GrantFrames {
    fn load_u16(&self, mfn: u64, offset: usize) -> u16 {
        // SAFETY: see the type's documentation; the engine keeps offsets inside the
        // frame and aligned for the access size.
        unsafe { core::ptr::read_volatile(frame_ptr(mfn, offset)) }
    }
    fn load_u32(&self, mfn: u64, offset: usize) -> u32 {
        // SAFETY: as in load_u16.
        unsafe { core::ptr::read_volatile(frame_ptr(mfn, offset)) }
    }
    fn load_u64(&self, mfn: u64, offset: usize) -> u64 {
        // SAFETY: as in load_u16.
        unsafe { core::ptr::read_volatile(frame_ptr(mfn, offset)) }
    }
    fn cmpxchg_u32(&mut self, mfn: u64, offset: usize, old: u32, new: u32) -> u32 {
        use core::sync::atomic::{AtomicU32, Ordering::SeqCst};
        // SAFETY: as in load_u16; the guest may touch the word concurrently, which is
        // what the atomic compare-exchange is for.
        let w = unsafe { AtomicU32::from_ptr(frame_ptr(mfn, offset)) };
        match w.compare_exchange(old, new, SeqCst, SeqCst) {
            Ok(v) | Err(v) => v,
        }
    }
    fn or_u16(&mut self, mfn: u64, offset: usize, bits: u16) {
        use core::sync::atomic::{AtomicU16, Ordering::SeqCst};
        // SAFETY: as in cmpxchg_u32.
        unsafe { AtomicU16::from_ptr(frame_ptr(mfn, offset)) }.fetch_or(bits, SeqCst);
    }
    fn and_u16(&mut self, mfn: u64, offset: usize, mask: u16) {
        use core::sync::atomic::{AtomicU16, Ordering::SeqCst};
        // SAFETY: as in cmpxchg_u32.
        unsafe { AtomicU16::from_ptr(frame_ptr(mfn, offset)) }.fetch_and(mask, SeqCst);
    }
    fn store_u16(&mut self, mfn: u64, offset: usize, v: u16) {
        // SAFETY: as in load_u16.
        unsafe { core::ptr::write_volatile(frame_ptr(mfn, offset), v) }
    }
    fn store_u32(&mut self, mfn: u64, offset: usize, v: u32) {
        // SAFETY: as in load_u16.
        unsafe { core::ptr::write_volatile(frame_ptr(mfn, offset), v) }
    }
    fn store_u64(&mut self, mfn: u64, offset: usize, v: u64) {
        // SAFETY: as in load_u16.
        unsafe { core::ptr::write_volatile(frame_ptr(mfn, offset), v) }
    }
    fn zero_frame(&mut self, mfn: u64) {
        // SAFETY: a whole frame the engine owns or has pinned.
        unsafe { zero(mfn << 12, 4096) }
    }
    fn copy_bytes(
        &mut self,
        dst_mfn: u64,
        dst_off: usize,
        src_mfn: u64,
        src_off: usize,
        len: usize,
    ) {
        if dst_off + len > 4096 || src_off + len > 4096 {
            return; // the engine checks this first (GNTST_bad_copy_arg)
        }
        // SAFETY: both ranges lie inside frames the engine pinned for this copy;
        // `copy` tolerates overlap.
        unsafe {
            core::ptr::copy(
                ((src_mfn << 12) + src_off as u64) as *const u8,
                ((dst_mfn << 12) + dst_off as u64) as *mut u8,
                len,
            )
        }
    }
}

/// The ACPI table at physical `pa` (its length from the header), when the header is
/// sane (at least 36 bytes, at most 1 MiB).
pub fn acpi_table(pa: u64) -> Option<&'static [u8]> {
    if pa == 0 || pa >= 1 << 32 {
        return None;
    }
    let mut len = [0u8; 4];
    // SAFETY: firmware ACPI tables lie below 4 GiB in the identity map (the address came
    // from the RSDT/XSDT); the header's length field is its bytes 4..8.
    unsafe { read(pa + 4, &mut len) };
    let len = u32::from_le_bytes(len) as u64;
    if !(36..=1 << 20).contains(&len) {
        return None;
    }
    // SAFETY: as above; firmware tables are never written after boot.
    Some(unsafe { slice(pa, len) })
}
