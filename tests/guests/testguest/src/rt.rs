//! What a freestanding image must provide itself: the C memory functions the compiler
//! emits calls to (the linux-gnu `compiler_builtins` leaves them to libc) and the
//! personality symbol precompiled core refers to.
//!
//! The loops use volatile accesses so that LLVM cannot recognise them as a copy or fill
//! idiom and lower them back into a call to the very function being defined.

use core::ptr::{read_volatile, write_volatile};

/// C `memcpy`.
///
/// # Safety
/// `src` valid for `n` byte reads, `dst` for `n` byte writes, the two not overlapping.
#[no_mangle]
pub unsafe extern "C" fn memcpy(dst: *mut u8, src: *const u8, n: usize) -> *mut u8 {
    let mut i = 0;
    while i < n {
        // SAFETY: i < n and the caller guarantees both ranges (see `# Safety`).
        unsafe { write_volatile(dst.add(i), read_volatile(src.add(i))) };
        i += 1;
    }
    dst
}

/// C `memmove`.
///
/// # Safety
/// `src` valid for `n` byte reads, `dst` for `n` byte writes; they may overlap.
#[no_mangle]
pub unsafe extern "C" fn memmove(dst: *mut u8, src: *const u8, n: usize) -> *mut u8 {
    if (dst as usize) <= (src as usize) {
        let mut i = 0;
        while i < n {
            // SAFETY: i < n and the caller guarantees both ranges; copying upwards when
            // dst <= src never overwrites a source byte before it is read.
            unsafe { write_volatile(dst.add(i), read_volatile(src.add(i))) };
            i += 1;
        }
    } else {
        let mut i = n;
        while i > 0 {
            i -= 1;
            // SAFETY: i < n and the caller guarantees both ranges; copying downwards when
            // dst > src never overwrites a source byte before it is read.
            unsafe { write_volatile(dst.add(i), read_volatile(src.add(i))) };
        }
    }
    dst
}

/// C `memset`.
///
/// # Safety
/// `dst` valid for `n` byte writes.
#[no_mangle]
pub unsafe extern "C" fn memset(dst: *mut u8, c: i32, n: usize) -> *mut u8 {
    let mut i = 0;
    while i < n {
        // SAFETY: i < n and the caller guarantees the range (see `# Safety`).
        unsafe { write_volatile(dst.add(i), c as u8) };
        i += 1;
    }
    dst
}

/// C `memcmp`.
///
/// # Safety
/// `a` and `b` valid for `n` byte reads.
#[no_mangle]
pub unsafe extern "C" fn memcmp(a: *const u8, b: *const u8, n: usize) -> i32 {
    let mut i = 0;
    while i < n {
        // SAFETY: i < n and the caller guarantees both ranges (see `# Safety`).
        let (x, y) = unsafe { (read_volatile(a.add(i)), read_volatile(b.add(i))) };
        if x != y {
            return i32::from(x) - i32::from(y);
        }
        i += 1;
    }
    0
}

/// C `bcmp`: zero when equal.
///
/// # Safety
/// `a` and `b` valid for `n` byte reads.
#[no_mangle]
pub unsafe extern "C" fn bcmp(a: *const u8, b: *const u8, n: usize) -> i32 {
    // SAFETY: same contract as `memcmp`, passed on unchanged.
    unsafe { memcmp(a, b, n) }
}

/// Referred to by precompiled core's unwinding glue; never called (panic = abort).
#[no_mangle]
pub extern "C" fn rust_eh_personality() {}
