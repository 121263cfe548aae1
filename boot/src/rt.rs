//! What the freestanding image must provide itself: the mem* functions the compiler
//! calls (the linux-gnu compiler_builtins does not export them) and the unwinding
//! personality precompiled `core` refers to.
//!
//! They are written with `rep movsb`/`rep stosb` and volatile loops, which LLVM cannot
//! recognise and lower back into calls to themselves.

/// # Safety
/// As C's `memcpy`: valid, non-overlapping ranges of `n` bytes.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn memcpy(dest: *mut u8, src: *const u8, n: usize) -> *mut u8 {
    // SAFETY: the caller guarantees both ranges are valid for n bytes; `rep movsb`
    // copies forwards with the direction flag clear (the ABI keeps it clear).
    unsafe {
        core::arch::asm!("rep movsb", inout("rcx") n => _, inout("rdi") dest => _,
                         inout("rsi") src => _, options(nostack, preserves_flags))
    };
    dest
}

/// # Safety
/// As C's `memmove`: valid ranges of `n` bytes, possibly overlapping.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn memmove(dest: *mut u8, src: *const u8, n: usize) -> *mut u8 {
    if (dest as usize) <= (src as usize) || (dest as usize) >= (src as usize).wrapping_add(n) {
        // SAFETY: no harmful overlap for a forward copy.
        return unsafe { memcpy(dest, src, n) };
    }
    for i in (0..n).rev() {
        // SAFETY: the caller guarantees both ranges are valid; copying backwards is
        // correct when dest lies above src.
        unsafe { dest.add(i).write_volatile(src.add(i).read_volatile()) };
    }
    dest
}

/// # Safety
/// As C's `memset`: a valid range of `n` bytes.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn memset(dest: *mut u8, c: i32, n: usize) -> *mut u8 {
    // SAFETY: the caller guarantees the range is valid for n bytes.
    unsafe {
        core::arch::asm!("rep stosb", inout("rcx") n => _, inout("rdi") dest => _,
                         in("al") c as u8, options(nostack, preserves_flags))
    };
    dest
}

/// # Safety
/// As C's `memcmp`: valid ranges of `n` bytes.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn memcmp(a: *const u8, b: *const u8, n: usize) -> i32 {
    for i in 0..n {
        // SAFETY: the caller guarantees both ranges are valid for n bytes.
        let (x, y) = unsafe { (a.add(i).read_volatile(), b.add(i).read_volatile()) };
        if x != y {
            return i32::from(x) - i32::from(y);
        }
    }
    0
}

/// # Safety
/// As [`memcmp`].
#[unsafe(no_mangle)]
pub unsafe extern "C" fn bcmp(a: *const u8, b: *const u8, n: usize) -> i32 {
    // SAFETY: same contract as memcmp.
    unsafe { memcmp(a, b, n) }
}

/// Precompiled `core` references the personality routine; the image never unwinds.
#[unsafe(no_mangle)]
pub extern "C" fn rust_eh_personality() {}

/// Precompiled `alloc` was built with unwinding and references this; with
/// `panic = "abort"` no unwinding ever starts, so reaching it is a bug.
#[unsafe(no_mangle)]
pub extern "C" fn _Unwind_Resume() -> ! {
    crate::console::force_write_fmt(format_args!(
        "PANIC: _Unwind_Resume called in an abort-only image\n"
    ));
    crate::platform::exit(crate::platform::ExitCode::Crash)
}
