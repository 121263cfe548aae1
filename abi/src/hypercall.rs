//! Hypercall numbers and sub-operations (`xen.h`, `version.h`, `sched.h`).

/// `__HYPERVISOR_console_io`
pub const CONSOLE_IO: u64 = 18;
/// `__HYPERVISOR_xen_version`
pub const XEN_VERSION: u64 = 17;
/// `__HYPERVISOR_sched_op`
pub const SCHED_OP: u64 = 29;
/// Xen's hypercall table has 64 slots; numbers at or above are always `-ENOSYS`.
pub const NR_HYPERCALLS: u64 = 64;

/// `CONSOLEIO_write`: (count, guest-virtual buffer).
pub const CONSOLEIO_WRITE: u64 = 0;
/// `CONSOLEIO_read`: (count, guest-virtual buffer).
pub const CONSOLEIO_READ: u64 = 1;

/// `XENVER_version`: returns major << 16 | minor.
pub const XENVER_VERSION: u64 = 0;
/// `XENVER_extraversion`: fills a 16-byte string.
pub const XENVER_EXTRAVERSION: u64 = 1;

/// `SCHEDOP_yield`
pub const SCHEDOP_YIELD: u64 = 0;
/// `SCHEDOP_block`
pub const SCHEDOP_BLOCK: u64 = 1;
/// `SCHEDOP_shutdown`: argument points at `struct sched_shutdown { unsigned int reason; }`.
pub const SCHEDOP_SHUTDOWN: u64 = 2;

/// `SHUTDOWN_poweroff`
pub const SHUTDOWN_POWEROFF: u32 = 0;
/// `SHUTDOWN_reboot`
pub const SHUTDOWN_REBOOT: u32 = 1;
/// `SHUTDOWN_suspend`
pub const SHUTDOWN_SUSPEND: u32 = 2;
/// `SHUTDOWN_crash`
pub const SHUTDOWN_CRASH: u32 = 3;
/// `SHUTDOWN_watchdog`
pub const SHUTDOWN_WATCHDOG: u32 = 4;

/// Xen's name for a shutdown reason, for logs.
pub fn shutdown_reason_name(reason: u32) -> &'static str {
    match reason {
        SHUTDOWN_POWEROFF => "poweroff",
        SHUTDOWN_REBOOT => "reboot",
        SHUTDOWN_SUSPEND => "suspend",
        SHUTDOWN_CRASH => "crash",
        SHUTDOWN_WATCHDOG => "watchdog",
        _ => "unknown",
    }
}
