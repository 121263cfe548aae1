//! Hypercall numbers and sub-operations (`xen.h`, `version.h`, `sched.h`).

/// `__HYPERVISOR_set_timer_op`
pub const SET_TIMER_OP: u64 = 15;
/// `__HYPERVISOR_memory_op`
pub const MEMORY_OP: u64 = 12;
/// `__HYPERVISOR_grant_table_op`
pub const GRANT_TABLE_OP: u64 = 20;
/// `__HYPERVISOR_vcpu_op`
pub const VCPU_OP: u64 = 24;
/// `__HYPERVISOR_event_channel_op`
pub const EVENT_CHANNEL_OP: u64 = 32;
/// `__HYPERVISOR_hvm_op`
pub const HVM_OP: u64 = 34;
/// `__HYPERVISOR_iret` (PV only; its hypercall-page slot is `ud2` for HVM guests)
pub const IRET: u64 = 23;

/// `XENVER_compile_info`
pub const XENVER_COMPILE_INFO: u64 = 2;
/// `XENVER_capabilities`
pub const XENVER_CAPABILITIES: u64 = 3;
/// `XENVER_changeset`
pub const XENVER_CHANGESET: u64 = 4;
/// `XENVER_get_features`
pub const XENVER_GET_FEATURES: u64 = 6;
/// `XENVER_pagesize`
pub const XENVER_PAGESIZE: u64 = 7;
/// `XENVER_guest_handle`: the domain's handle (its UUID, 16 bytes).
pub const XENVER_GUEST_HANDLE: u64 = 8;

/// `XENMEM_add_to_physmap`
pub const XENMEM_ADD_TO_PHYSMAP: u64 = 7;
/// `XENMEM_memory_map`
pub const XENMEM_MEMORY_MAP: u64 = 9;
/// `XENMAPSPACE_shared_info`
pub const XENMAPSPACE_SHARED_INFO: u32 = 0;
/// `XENMAPSPACE_grant_table`
pub const XENMAPSPACE_GRANT_TABLE: u32 = 1;

/// `HVMOP_set_param`
pub const HVMOP_SET_PARAM: u64 = 0;
/// `HVMOP_get_param`
pub const HVMOP_GET_PARAM: u64 = 1;
/// `HVMOP_set_evtchn_upcall_vector`
pub const HVMOP_SET_EVTCHN_UPCALL_VECTOR: u64 = 23;

/// `VCPUOP_up`
pub const VCPUOP_UP: u64 = 1;
/// `VCPUOP_down`
pub const VCPUOP_DOWN: u64 = 2;
/// `VCPUOP_is_up`
pub const VCPUOP_IS_UP: u64 = 3;
/// `VCPUOP_register_runstate_memory_area`
pub const VCPUOP_REGISTER_RUNSTATE_MEMORY_AREA: u64 = 5;
/// `VCPUOP_set_periodic_timer`
pub const VCPUOP_SET_PERIODIC_TIMER: u64 = 6;
/// `VCPUOP_stop_periodic_timer`
pub const VCPUOP_STOP_PERIODIC_TIMER: u64 = 7;
/// `VCPUOP_set_singleshot_timer`
pub const VCPUOP_SET_SINGLESHOT_TIMER: u64 = 8;
/// `VCPUOP_stop_singleshot_timer`
pub const VCPUOP_STOP_SINGLESHOT_TIMER: u64 = 9;
/// `VCPUOP_register_vcpu_info`
pub const VCPUOP_REGISTER_VCPU_INFO: u64 = 10;

/// `SCHEDOP_poll`
pub const SCHEDOP_POLL: u64 = 3;

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
