//! Error numbers as Xen returns them (`xen/include/public/errno.h`), negated in rax.

/// Operation not permitted.
pub const EPERM: i64 = 1;
/// No such file or directory.
pub const ENOENT: i64 = 2;
/// Out of memory.
pub const ENOMEM: i64 = 12;
/// Permission denied.
pub const EACCES: i64 = 13;
/// Bad address.
pub const EFAULT: i64 = 14;
/// Device or resource busy.
pub const EBUSY: i64 = 16;
/// File exists.
pub const EEXIST: i64 = 17;
/// Invalid argument.
pub const EINVAL: i64 = 22;
/// No space left.
pub const ENOSPC: i64 = 28;
/// No such process / domain.
pub const ESRCH: i64 = 3;
/// Timer expired.
pub const ETIME: i64 = 62;
/// Result out of range.
pub const ERANGE: i64 = 34;
/// Function not implemented.
pub const ENOSYS: i64 = 38;
/// Operation not supported.
pub const EOPNOTSUPP: i64 = 95;

/// The value a hypercall returns in rax for error `e` (Xen returns `-errno`).
pub const fn ret(e: i64) -> u64 {
    (-e) as u64
}
