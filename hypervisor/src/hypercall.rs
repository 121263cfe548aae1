//! Xen hypercalls: argument fetch per guest mode, dispatch, and the calls implemented
//! so far. Everything else answers `-ENOSYS`, counted and logged once per number, as a
//! Xen without that hypercall would.

use abi::errno::{self, ret};
use abi::hypercall as hc;

use crate::domain::{DomainCore, DomainEnd};
use crate::exits::{copy_from_guest, copy_to_guest, skip, Flow, LOG_HYPERCALL};
use crate::vcpu::{reg, CodeMode, GuestCpu};
use crate::xen::{param, RunState, VcpuInfoLoc};

/// Length of VMMCALL/VMCALL, used when the hardware gives no next RIP.
const HYPERCALL_INSN_LEN: u64 = 3;

/// The most console bytes written in one go; longer writes continue (the hypercall is
/// restarted with the remaining count), as Xen preempts them.
pub const CONSOLE_WRITE_MAX: u64 = 64 * 1024;

/// Internal marker: the hypercall was preempted and will be re-executed. Never
/// returned to a guest (rax is left alone).
const CONTINUATION: u64 = u64::MAX - 0xfff;

/// Handles a VMMCALL/VMCALL exit.
pub fn handle(
    d: &mut DomainCore,
    others: &mut crate::domain::Others<'_>,
    vcpu: u32,
    cpu: &mut dyn GuestCpu,
) -> Flow {
    let nr = cpu.reg(reg::RAX);
    // 64-bit guests pass arguments in rdi, rsi, rdx, r10, r8; 32-bit ones in
    // ebx, ecx, edx, esi, edi (Xen's HVM hypercall ABI).
    let args = if cpu.code_segment().0 == CodeMode::Bits64 {
        [reg::RDI, reg::RSI, reg::RDX, reg::R10, reg::R8].map(|r| cpu.reg(r))
    } else {
        [reg::RBX, reg::RCX, reg::RDX, reg::RSI, reg::RDI].map(|r| cpu.reg(r) & 0xffff_ffff)
    };
    *d.counters.hypercalls.entry(nr).or_insert(0) += 1;
    let result = if cpu.cpl() != 0 {
        // Xen refuses hypercalls from guest user mode.
        Ok(ret(errno::EPERM))
    } else {
        match nr {
            hc::XEN_VERSION => Ok(xen_version(d, cpu, args)),
            hc::CONSOLE_IO => Ok(console_io(d, cpu, args)),
            hc::SCHED_OP => sched_op(d, vcpu, cpu, args),
            hc::MEMORY_OP => Ok(memory_op(d, others, cpu, args)),
            hc::GRANT_TABLE_OP => Ok(grant_table_op(d, others, cpu, args)),
            hc::HVM_OP => Ok(hvm_op(d, cpu, args)),
            hc::VCPU_OP => Ok(vcpu_op(d, vcpu, cpu, args)),
            hc::SET_TIMER_OP => Ok(set_timer_op(d, vcpu, args)),
            hc::EVENT_CHANNEL_OP => Ok(event_channel_op(d, others, vcpu, cpu, args)),
            abi::ferro::TEST_HYPERCALL if d.config.test_interface => {
                Ok(crate::testiface::report(d, cpu, args))
            }
            _ => {
                if d.first_time(LOG_HYPERCALL, nr) {
                    log::info!(
                        "d{}: hypercall {nr} is not implemented: -ENOSYS (logged once)",
                        d.id
                    );
                }
                Ok(ret(errno::ENOSYS))
            }
        }
    };
    match result {
        // A long operation did part of its work and rewrote its arguments: the guest
        // re-executes the hypercall (Xen's HVM hypercall continuation).
        Ok(CONTINUATION) => Flow::Continue,
        Ok(v) => {
            let v = if cpu.code_segment().0 == CodeMode::Bits64 {
                v
            } else {
                v & 0xffff_ffff
            };
            cpu.set_reg(reg::RAX, v);
            skip(d, cpu, Some(HYPERCALL_INSN_LEN))
        }
        Err(end) => Flow::End(end),
    }
}

fn xen_version(d: &mut DomainCore, cpu: &dyn GuestCpu, args: [u64; 5]) -> u64 {
    let put = |d: &mut DomainCore, data: &[u8]| match copy_to_guest(d, cpu, args[1], data) {
        Ok(()) => 0,
        Err(_) => ret(errno::EFAULT),
    };
    match args[0] {
        hc::XENVER_GET_FEATURES => {
            let mut fi = [0u8; 8];
            if copy_from_guest(d, cpu, args[1], &mut fi).is_err() {
                return ret(errno::EFAULT);
            }
            let idx = u32::from_le_bytes([fi[0], fi[1], fi[2], fi[3]]);
            let map = if idx == 0 { XEN_FEATURES } else { 0 };
            fi[4..8].copy_from_slice(&map.to_le_bytes());
            put(d, &fi)
        }
        hc::XENVER_PAGESIZE => 4096,
        hc::XENVER_GUEST_HANDLE => {
            let uuid = d.config.uuid;
            put(d, &uuid)
        }
        hc::XENVER_COMPILE_INFO => {
            // struct xen_compile_info: compiler[64], compile_by[16], compile_domain[32], compile_date[32]
            let mut ci = [0u8; 144];
            ci[..6].copy_from_slice(b"rustc\0");
            ci[64..74].copy_from_slice(b"ferrovisor");
            put(d, &ci)
        }
        hc::XENVER_CAPABILITIES => {
            let mut caps = [0u8; 1024];
            let c = b"hvm-3.0-x86_64 hvm-3.0-x86_32 hvm-3.0-x86_32p";
            caps[..c.len()].copy_from_slice(c);
            put(d, &caps)
        }
        hc::XENVER_CHANGESET => {
            let mut cs = [0u8; 64];
            cs[..10].copy_from_slice(b"ferrovisor");
            put(d, &cs)
        }
        hc::XENVER_VERSION => u64::from((abi::XEN_VERSION_MAJOR << 16) | abi::XEN_VERSION_MINOR),
        hc::XENVER_EXTRAVERSION => {
            let mut s = [0u8; 16];
            s[..12].copy_from_slice(b".0-ferrovis\0");
            put(d, &s)
        }
        other => {
            if d.first_time(LOG_HYPERCALL, 0x1_0000 | other) {
                log::info!(
                    "d{}: xen_version sub-op {other} is not implemented: -ENOSYS",
                    d.id
                );
            }
            ret(errno::ENOSYS)
        }
    }
}

fn console_io(d: &mut DomainCore, cpu: &mut dyn GuestCpu, args: [u64; 5]) -> u64 {
    let (cmd, count, buf) = (args[0], args[1] & 0xffff_ffff, args[2]);
    match cmd {
        hc::CONSOLEIO_WRITE => {
            let mut chunk = [0u8; 256];
            let mut done = 0;
            while done < count {
                if done == CONSOLE_WRITE_MAX {
                    // continue with the rest: advance the buffer, shrink the count
                    let (rc, rb) = if cpu.code_segment().0 == CodeMode::Bits64 {
                        (reg::RSI, reg::RDX)
                    } else {
                        (reg::RCX, reg::RDX)
                    };
                    cpu.set_reg(rc, count - done);
                    cpu.set_reg(rb, buf.wrapping_add(done));
                    return CONTINUATION;
                }
                let n = (count - done).min(chunk.len() as u64) as usize;
                if copy_from_guest(d, cpu, buf.wrapping_add(done), &mut chunk[..n]).is_err() {
                    return ret(errno::EFAULT);
                }
                d.console_write(&chunk[..n]);
                done += n as u64;
            }
            0
        }
        // No console input reaches guests yet: a read returns 0 characters.
        hc::CONSOLEIO_READ => 0,
        _ => ret(errno::EINVAL),
    }
}

fn sched_op(
    d: &mut DomainCore,
    vcpu: u32,
    cpu: &dyn GuestCpu,
    args: [u64; 5],
) -> Result<u64, DomainEnd> {
    match args[0] {
        hc::SCHEDOP_YIELD => Ok(0),
        hc::SCHEDOP_BLOCK => {
            // Linux blocks with events enabled; it wakes when an upcall is pending
            // or a timer fires (the scheduler checks both).
            if let Some(s) = d.xen.vcpus.get_mut(vcpu as usize) {
                s.state = RunState::Blocked;
            }
            Ok(0)
        }
        hc::SCHEDOP_SHUTDOWN => {
            let mut r = [0u8; 4];
            if copy_from_guest(d, cpu, args[1], &mut r).is_err() {
                return Ok(ret(errno::EFAULT));
            }
            let reason = u32::from_le_bytes(r);
            if reason > hc::SHUTDOWN_WATCHDOG {
                return Ok(ret(errno::EINVAL));
            }
            Err(DomainEnd::Shutdown(reason))
        }
        hc::SCHEDOP_POLL => {
            let mut a = [0u8; 24];
            if copy_from_guest(d, cpu, args[1], &mut a).is_err() {
                return Ok(ret(errno::EFAULT));
            }
            let (list, nr, timeout) = (le_u64(&a, 0), le_u32(&a, 8), le_u64(&a, 16));
            if nr > 128 {
                return Ok(ret(errno::EINVAL)); // Xen caps the list at 128 ports
            }
            let mut raw = alloc::vec![0u8; nr as usize * 4];
            if copy_from_guest(d, cpu, list, &mut raw).is_err() {
                return Ok(ret(errno::EFAULT));
            }
            let ports: alloc::vec::Vec<u32> = raw
                .chunks(4)
                .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect();
            if ports.iter().any(|&p| p >= d.evtchn.max_ports()) {
                return Ok(ret(errno::EINVAL));
            }
            if ports.iter().any(|&p| d.port_pending(p)) {
                return Ok(0);
            }
            let deadline = (timeout != 0).then_some(timeout);
            if let Some(s) = d.xen.vcpus.get_mut(vcpu as usize) {
                s.state = RunState::Polling { ports, deadline };
            }
            Ok(0)
        }
        other => {
            if d.first_time(LOG_HYPERCALL, 0x2_0000 | other) {
                log::info!(
                    "d{}: sched_op {other} is not implemented: -ENOSYS (logged once)",
                    d.id
                );
            }
            Ok(ret(errno::ENOSYS))
        }
    }
}

/// XENFEAT_* bits reported in submap 0: auto_translated_physmap (2),
/// hvm_callback_vector (8), hvm_safe_pvclock (9), the set Linux requires of a PVH host.
pub const XEN_FEATURES: u32 = (1 << 2) | (1 << 8) | (1 << 9);

/// `DOMID_SELF`
const DOMID_SELF: u16 = 0x7ff0;

fn le_u16(b: &[u8], o: usize) -> u16 {
    u16::from_le_bytes([b[o], b[o + 1]])
}
fn le_u32(b: &[u8], o: usize) -> u32 {
    u32::from_le_bytes(b[o..o + 4].try_into().expect("4 bytes"))
}
fn le_u64(b: &[u8], o: usize) -> u64 {
    u64::from_le_bytes(b[o..o + 8].try_into().expect("8 bytes"))
}

fn self_domid(d: &DomainCore, domid: u16) -> bool {
    domid == DOMID_SELF || domid == d.id
}

fn memory_op(
    d: &mut DomainCore,
    others: &mut crate::domain::Others<'_>,
    cpu: &dyn GuestCpu,
    args: [u64; 5],
) -> u64 {
    // The low bits carry the sub-op; bits above MEMOP_EXTENT_SHIFT (6) are a
    // continuation start, which a first call never has.
    let cmd = args[0] & 0x3f;
    match cmd {
        hc::XENMEM_ADD_TO_PHYSMAP => {
            let mut a = [0u8; 24];
            if copy_from_guest(d, cpu, args[1], &mut a).is_err() {
                return ret(errno::EFAULT);
            }
            let (domid, space, idx, gpfn) =
                (le_u16(&a, 0), le_u32(&a, 4), le_u64(&a, 8), le_u64(&a, 16));
            if !self_domid(d, domid) {
                return ret(errno::EPERM);
            }
            if gpfn >= (1 << 40) {
                return ret(errno::EINVAL);
            }
            match space {
                hc::XENMAPSPACE_SHARED_INFO if idx == 0 => {
                    let hpa = d.xen.shared_info;
                    match d.map_special(gpfn, hpa) {
                        Ok(()) => {
                            log::debug!("d{}: shared_info mapped at gfn {gpfn:#x}", d.id);
                            0
                        }
                        Err(e) => {
                            log::warn!(
                                "d{}: add_to_physmap(shared_info, gfn {gpfn:#x}) failed: {e}",
                                d.id
                            );
                            ret(errno::ENOMEM)
                        }
                    }
                }
                hc::XENMAPSPACE_SHARED_INFO => ret(errno::EINVAL),
                hc::XENMAPSPACE_GRANT_TABLE => {
                    // idx: the shared frame (bit 31: a v2 status frame), grown on demand
                    if idx > u64::from(u32::MAX) {
                        return ret(errno::EINVAL);
                    }
                    let id = d.id;
                    let mfn = match others.grants.table_frame(
                        id,
                        idx as u32,
                        &mut crate::grant_glue::FramesOnly,
                    ) {
                        Ok(m) => m,
                        Err(e) => return e as u64, // a negative errno
                    };
                    let hpa = mfn << 12;
                    d.mem.adopt_external(hpa);
                    match d.map_special(gpfn, hpa) {
                        Ok(()) => 0,
                        Err(e) => {
                            log::warn!(
                                "d{}: add_to_physmap(grant frame {idx}, gfn {gpfn:#x}) failed: {e}",
                                d.id
                            );
                            ret(errno::ENOMEM)
                        }
                    }
                }
                other => {
                    if d.first_time(LOG_HYPERCALL, 0x3_0000 | u64::from(other)) {
                        log::info!("d{}: add_to_physmap space {other} is not implemented: -ENOSYS (logged once)", d.id);
                    }
                    ret(errno::ENOSYS)
                }
            }
        }
        hc::XENMEM_MEMORY_MAP => {
            let mut a = [0u8; 16];
            if copy_from_guest(d, cpu, args[1], &mut a).is_err() {
                return ret(errno::EFAULT);
            }
            let (nr, buf) = (le_u32(&a, 0), le_u64(&a, 8));
            let map = d.e820.clone();
            if (nr as usize) < map.len() {
                return ret(errno::EINVAL);
            }
            let mut out = alloc::vec::Vec::new();
            for (addr, size, ty) in &map {
                out.extend_from_slice(&addr.to_le_bytes());
                out.extend_from_slice(&size.to_le_bytes());
                out.extend_from_slice(&ty.to_le_bytes());
            }
            if copy_to_guest(d, cpu, buf, &out).is_err()
                || copy_to_guest(d, cpu, args[1], &(map.len() as u32).to_le_bytes()).is_err()
            {
                return ret(errno::EFAULT);
            }
            0
        }
        other => {
            if d.first_time(LOG_HYPERCALL, 0x4_0000 | other) {
                log::info!(
                    "d{}: memory_op {other} is not implemented: -ENOSYS (logged once)",
                    d.id
                );
            }
            ret(errno::ENOSYS)
        }
    }
}

fn hvm_op(d: &mut DomainCore, cpu: &dyn GuestCpu, args: [u64; 5]) -> u64 {
    match args[0] {
        hc::HVMOP_SET_EVTCHN_UPCALL_VECTOR => set_upcall_vector(d, cpu, args),
        hc::HVMOP_SET_PARAM | hc::HVMOP_GET_PARAM => {
            let mut a = [0u8; 16];
            if copy_from_guest(d, cpu, args[1], &mut a).is_err() {
                return ret(errno::EFAULT);
            }
            let (domid, index, value) = (le_u16(&a, 0), le_u32(&a, 4), le_u64(&a, 8));
            if !self_domid(d, domid) {
                return ret(errno::EPERM);
            }
            if index >= param::NR {
                return ret(errno::EINVAL);
            }
            if args[0] == hc::HVMOP_SET_PARAM {
                // A domU may only set the callback; the rest belong to the toolstack.
                if index != param::CALLBACK_IRQ {
                    return ret(errno::EPERM);
                }
                let via = value >> 56;
                if via == 2 && !(0x10..=0xff).contains(&(value & 0xff)) {
                    return ret(errno::EINVAL);
                }
                d.xen.params[index as usize] = value;
                log::debug!("d{}: HVM callback set to {value:#x}", d.id);
                0
            } else {
                let v = d.xen.params[index as usize];
                a[8..16].copy_from_slice(&v.to_le_bytes());
                match copy_to_guest(d, cpu, args[1], &a) {
                    Ok(()) => 0,
                    Err(_) => ret(errno::EFAULT),
                }
            }
        }
        other => {
            if d.first_time(LOG_HYPERCALL, 0x5_0000 | other) {
                log::info!(
                    "d{}: hvm_op {other} is not implemented: -ENOSYS (logged once)",
                    d.id
                );
            }
            ret(errno::ENOSYS)
        }
    }
}

fn set_upcall_vector(d: &mut DomainCore, cpu: &dyn GuestCpu, args: [u64; 5]) -> u64 {
    let mut a = [0u8; 8];
    if copy_from_guest(d, cpu, args[1], &mut a).is_err() {
        return ret(errno::EFAULT);
    }
    let (vcpu, vector) = (le_u32(&a, 0), a[4]);
    if vector < 0x10 {
        return ret(errno::EINVAL);
    }
    match d.xen.vcpus.get_mut(vcpu as usize) {
        Some(s) => {
            s.upcall_vector = Some(vector);
            0
        }
        None => ret(errno::ENOENT),
    }
}

fn vcpu_op(d: &mut DomainCore, vcpu: u32, cpu: &dyn GuestCpu, args: [u64; 5]) -> u64 {
    let (cmd, target) = (args[0], args[1] as u32);
    let Some(state) = d.xen.vcpus.get(target as usize) else {
        return ret(errno::ENOENT);
    };
    let _ = state;
    match cmd {
        hc::VCPUOP_IS_UP => u64::from(d.xen.vcpus[target as usize].state != RunState::Down),
        hc::VCPUOP_REGISTER_VCPU_INFO => {
            let mut a = [0u8; 16];
            if copy_from_guest(d, cpu, args[2], &mut a).is_err() {
                return ret(errno::EFAULT);
            }
            let (mfn, offset) = (le_u64(&a, 0), u64::from(le_u32(&a, 8)));
            let gpa = (mfn << 12).wrapping_add(offset);
            if offset + crate::xen::VCPU_INFO_SIZE > 4096 || mfn >= (1 << 40) {
                return ret(errno::EINVAL);
            }
            if matches!(
                d.xen.vcpus[target as usize].vcpu_info,
                VcpuInfoLoc::Guest(_)
            ) {
                return ret(errno::EINVAL); // Xen allows registering once
            }
            // Move the current contents, then point the vCPU there.
            let mut cur = [0u8; 64];
            let had = d.xen.vcpu_info_read(&d.mem, target, 0, &mut cur);
            if !d.mem.write(gpa, if had { &cur } else { &[0u8; 64] }) {
                return ret(errno::EINVAL);
            }
            d.xen.vcpus[target as usize].vcpu_info = VcpuInfoLoc::Guest(gpa);
            d.xen.write_time_info(&mut d.mem, target);
            log::debug!("d{}: vcpu{target} vcpu_info at {gpa:#x}", d.id);
            0
        }
        hc::VCPUOP_REGISTER_RUNSTATE_MEMORY_AREA => {
            let mut a = [0u8; 8];
            if copy_from_guest(d, cpu, args[2], &mut a).is_err() {
                return ret(errno::EFAULT);
            }
            let area = le_u64(&a, 0);
            d.xen.vcpus[target as usize].runstate_area = (area != 0).then_some(area);
            if target == vcpu && area != 0 {
                crate::xen::write_runstate(d, vcpu, cpu);
            }
            0
        }
        hc::VCPUOP_SET_SINGLESHOT_TIMER => {
            if target != vcpu {
                return ret(errno::EINVAL);
            }
            let mut a = [0u8; 16];
            if copy_from_guest(d, cpu, args[2], &mut a).is_err() {
                return ret(errno::EFAULT);
            }
            let (deadline, flags) = (le_u64(&a, 0), le_u32(&a, 8));
            if flags & 1 != 0 && deadline < crate::time::now_ns() {
                return ret(errno::ETIME);
            }
            d.xen.vcpus[vcpu as usize].singleshot = Some(deadline);
            0
        }
        hc::VCPUOP_STOP_SINGLESHOT_TIMER => {
            if target != vcpu {
                return ret(errno::EINVAL);
            }
            d.xen.vcpus[vcpu as usize].singleshot = None;
            0
        }
        hc::VCPUOP_SET_PERIODIC_TIMER => {
            if target != vcpu {
                return ret(errno::EINVAL);
            }
            let mut a = [0u8; 8];
            if copy_from_guest(d, cpu, args[2], &mut a).is_err() {
                return ret(errno::EFAULT);
            }
            let period = le_u64(&a, 0);
            if period < 1_000_000 {
                return ret(errno::EINVAL); // Xen refuses periods below 1 ms
            }
            d.xen.vcpus[vcpu as usize].periodic = Some((period, crate::time::now_ns() + period));
            0
        }
        hc::VCPUOP_STOP_PERIODIC_TIMER => {
            if target != vcpu {
                return ret(errno::EINVAL);
            }
            d.xen.vcpus[vcpu as usize].periodic = None;
            0
        }
        other => {
            if d.first_time(LOG_HYPERCALL, 0x6_0000 | other) {
                log::info!(
                    "d{}: vcpu_op {other} is not implemented: -ENOSYS (logged once)",
                    d.id
                );
            }
            ret(errno::ENOSYS)
        }
    }
}

fn event_channel_op(
    d: &mut DomainCore,
    others: &mut crate::domain::Others<'_>,
    vcpu: u32,
    cpu: &dyn GuestCpu,
    args: [u64; 5],
) -> u64 {
    use crate::evtchn::Delivery;
    use abi::event_channel as ec;
    let cmd = args[0] as u32;
    let size = match cmd {
        ec::EVTCHNOP_BIND_VIRQ => ec::EvtchnBindVirq::SIZE,
        ec::EVTCHNOP_BIND_IPI => ec::EvtchnBindIpi::SIZE,
        ec::EVTCHNOP_ALLOC_UNBOUND => ec::EvtchnAllocUnbound::SIZE,
        ec::EVTCHNOP_BIND_INTERDOMAIN => ec::EvtchnBindInterdomain::SIZE,
        ec::EVTCHNOP_SEND | ec::EVTCHNOP_CLOSE | ec::EVTCHNOP_UNMASK => 4,
        ec::EVTCHNOP_STATUS => ec::EvtchnStatus::SIZE,
        ec::EVTCHNOP_BIND_VCPU => 8,
        ec::EVTCHNOP_RESET => 2,
        ec::EVTCHNOP_BIND_PIRQ => return ret(errno::EOPNOTSUPP),
        ec::EVTCHNOP_INIT_CONTROL if d.config.evtchn_fifo => ec::EvtchnInitControl::SIZE,
        ec::EVTCHNOP_EXPAND_ARRAY if d.fifo.is_some() => ec::EvtchnExpandArray::SIZE,
        ec::EVTCHNOP_EXPAND_ARRAY => return ret(errno::EOPNOTSUPP),
        ec::EVTCHNOP_SET_PRIORITY if d.fifo.is_some() => ec::EvtchnSetPriority::SIZE,
        other => {
            // FIFO (init_control, expand_array, set_priority) comes later: Linux then
            // keeps the 2-level ABI.
            if d.first_time(LOG_HYPERCALL, 0x7_0000 | u64::from(other)) {
                log::info!(
                    "d{}: event_channel_op {other} is not implemented: -ENOSYS (logged once)",
                    d.id
                );
            }
            return ret(errno::ENOSYS);
        }
    };
    let mut a = [0u8; 24];
    if copy_from_guest(d, cpu, args[1], &mut a[..size]).is_err() {
        return ret(errno::EFAULT);
    }
    let out = |d: &mut DomainCore, bytes: &[u8]| match copy_to_guest(d, cpu, args[1], bytes) {
        Ok(()) => 0,
        Err(_) => ret(errno::EFAULT),
    };
    let err = |e: crate::evtchn::Errno| ret(e);
    match cmd {
        ec::EVTCHNOP_BIND_VIRQ => {
            let mut b = ec::EvtchnBindVirq::read(&a).expect("size");
            match d.evtchn.bind_virq(b.virq, b.vcpu) {
                Ok(p) => {
                    b.port = p;
                    out(d, &b.to_bytes())
                }
                Err(e) => err(e),
            }
        }
        ec::EVTCHNOP_BIND_IPI => {
            let mut b = ec::EvtchnBindIpi::read(&a).expect("size");
            match d.evtchn.bind_ipi(b.vcpu) {
                Ok(p) => {
                    b.port = p;
                    out(d, &b.to_bytes())
                }
                Err(e) => err(e),
            }
        }
        ec::EVTCHNOP_ALLOC_UNBOUND => {
            let mut b = ec::EvtchnAllocUnbound::read(&a).expect("size");
            if !self_domid(d, b.dom) {
                return ret(errno::EPERM);
            }
            let remote = if b.remote_dom == DOMID_SELF {
                d.id
            } else {
                b.remote_dom
            };
            match d.evtchn.alloc_unbound(remote) {
                Ok(p) => {
                    b.port = p;
                    out(d, &b.to_bytes())
                }
                Err(e) => err(e),
            }
        }
        ec::EVTCHNOP_BIND_INTERDOMAIN => {
            let mut b = ec::EvtchnBindInterdomain::read(&a).expect("size");
            let remote = if b.remote_dom == DOMID_SELF {
                d.id
            } else {
                b.remote_dom
            };
            if remote != d.id && others.get(remote).is_none() {
                return ret(errno::ESRCH);
            }
            let lp = match d.evtchn.bind_interdomain_local(remote, b.remote_port) {
                Ok(p) => p,
                Err(e) => return err(e),
            };
            let my_id = d.id;
            let connected = if remote == my_id {
                d.evtchn.connect_remote(b.remote_port, my_id, lp)
            } else {
                let r = others.get(remote).expect("checked above");
                r.evtchn.connect_remote(b.remote_port, my_id, lp)
            };
            if let Err(e) = connected {
                d.evtchn.abort_interdomain(lp);
                return err(e);
            }
            let r = d.evtchn_op(|ch, m| ch.set_pending(lp, m));
            d.apply_raise(lp, r);
            b.local_port = lp;
            out(d, &b.to_bytes())
        }
        ec::EVTCHNOP_SEND => {
            let port = le_u32(&a, 0);
            match d.evtchn_op(|ch, m| ch.send(port, m)) {
                Ok(Delivery::Local(r)) => {
                    d.apply_raise(port, r);
                    0
                }
                Ok(Delivery::Interdomain {
                    remote_dom,
                    remote_port,
                }) if remote_dom == d.id => {
                    let r = d.evtchn_op(|ch, m| ch.set_pending(remote_port, m));
                    d.apply_raise(remote_port, r);
                    0
                }
                Ok(Delivery::Interdomain {
                    remote_dom,
                    remote_port,
                }) => {
                    // the peer may have gone; Xen then finds the port closed
                    if let Some(r) = others.get(remote_dom) {
                        r.deliver_port(remote_port);
                    }
                    0
                }
                Ok(Delivery::ToHypervisor(p)) => {
                    let port = d.xen.params[param::CONSOLE_EVTCHN as usize] as u32;
                    if p == port && d.service_console() {
                        d.notify_console();
                    }
                    if p == d.store_port() {
                        d.store_kicked = true; // served by the scheduler after this exit
                    }
                    0
                }
                Ok(Delivery::Dropped) => 0,
                Err(e) => err(e),
            }
        }
        ec::EVTCHNOP_CLOSE => {
            let port = le_u32(&a, 0);
            match d.evtchn_op(|ch, m| ch.close(port, m)) {
                Ok(crate::evtchn::Closed::Interdomain {
                    port,
                    remote_dom,
                    remote_port,
                }) => {
                    let my_id = d.id;
                    if remote_dom == my_id {
                        d.evtchn.peer_closed(remote_port, my_id, port);
                    } else if let Some(r) = others.get(remote_dom) {
                        r.evtchn.peer_closed(remote_port, my_id, port);
                    }
                    0
                }
                Ok(_) => 0,
                Err(e) => err(e),
            }
        }
        ec::EVTCHNOP_UNMASK => {
            let port = le_u32(&a, 0);
            match d.evtchn_op(|ch, m| ch.unmask(port, m)) {
                Ok(Some(v)) => {
                    let r = crate::evtchn::Raise {
                        newly_pending: false,
                        upcall: Some(v),
                    };
                    d.apply_raise(port, r);
                    0
                }
                Ok(None) => 0,
                Err(e) => err(e),
            }
        }
        ec::EVTCHNOP_STATUS => {
            let mut b = ec::EvtchnStatus::read(&a).expect("size");
            if !self_domid(d, b.dom) {
                return ret(errno::ESRCH);
            }
            match d.evtchn.status(b.port) {
                Ok(s) => {
                    s.fill(&mut b);
                    out(d, &b.to_bytes())
                }
                Err(e) => err(e),
            }
        }
        ec::EVTCHNOP_INIT_CONTROL => {
            let b = ec::EvtchnInitControl::read(&a).expect("size");
            let first = d.fifo.is_none();
            let mut state = d
                .fifo
                .take()
                .unwrap_or_else(|| crate::evtchn_fifo::FifoState::new(d.xen.vcpus.len() as u32));
            let mut result = state.check_init_control(b.vcpu, b.offset);
            if result.is_ok()
                && (b.control_gfn >= (1 << 40) || d.mem.translate(b.control_gfn << 12).is_none())
            {
                result = Err(errno::EINVAL);
            }
            if result.is_ok() {
                result = state.init_control(b.vcpu, b.control_gfn, b.offset);
            }
            if let Err(e) = result {
                if !first {
                    d.fifo = Some(state);
                }
                return err(e);
            }
            if first {
                // Xen's setup_ports: events pending under 2-level stay pending.
                let m = crate::xen::GuestEventMemory {
                    xen: &d.xen,
                    mem: &mut d.mem,
                };
                let pending: alloc::vec::Vec<u32> = (1..d.evtchn.max_ports())
                    .take_while(|&p| d.evtchn.status(p).is_ok())
                    .filter(|&p| crate::evtchn::EventMemory::is_pending(&m, p))
                    .collect();
                state.switch_from_2level(pending);
                log::info!("d{}: event channels switched to the FIFO ABI", d.id);
            }
            d.fifo = Some(state);
            let mut out_b = b;
            out_b.link_bits = crate::evtchn_fifo::LINK_BITS;
            out(d, &out_b.to_bytes())
        }
        ec::EVTCHNOP_EXPAND_ARRAY => {
            let gfn = le_u64(&a, 0);
            let fifo = d.fifo.as_mut().expect("checked above");
            if let Err(e) = fifo.check_expand_array() {
                return err(e);
            }
            if gfn >= (1 << 40) || d.mem.translate(gfn << 12).is_none() {
                return ret(errno::EINVAL);
            }
            let mut words = crate::xen::GuestFifoMemory {
                xen: &d.xen,
                mem: &mut d.mem,
            };
            let ch = &d.evtchn;
            match fifo.expand_array(gfn, &mut words, |p| ch.port_vcpu(p)) {
                Ok(raised) => {
                    for (port, r) in raised {
                        d.apply_raise(port, r);
                    }
                    0
                }
                Err(e) => err(e),
            }
        }
        ec::EVTCHNOP_SET_PRIORITY => {
            let (port, priority) = (le_u32(&a, 0), le_u32(&a, 4));
            if d.evtchn.status(port).is_err() {
                return ret(errno::EINVAL);
            }
            if d.evtchn.port_vcpu(port).is_none() {
                return ret(errno::EACCES);
            }
            match d
                .fifo
                .as_mut()
                .expect("checked above")
                .set_priority(port, priority)
            {
                Ok(()) => 0,
                Err(e) => err(e),
            }
        }
        ec::EVTCHNOP_BIND_VCPU => match d.evtchn.bind_vcpu(le_u32(&a, 0), le_u32(&a, 4)) {
            Ok(()) => 0,
            Err(e) => err(e),
        },
        ec::EVTCHNOP_RESET => {
            if !self_domid(d, le_u16(&a, 0)) {
                return ret(errno::ESRCH);
            }
            let _ = d.evtchn_op(|ch, m| ch.reset(m));
            d.fifo = None; // EVTCHNOP_reset returns the domain to the 2-level ABI

            // the console and xenstore ends are the hypervisor's: give them ports again
            if let Ok(p) = d.evtchn.alloc_unbound_for_hypervisor() {
                d.xen.params[param::CONSOLE_EVTCHN as usize] = u64::from(p);
            }
            if let Ok(p) = d.evtchn.alloc_unbound_for_hypervisor() {
                d.xen.params[param::STORE_EVTCHN as usize] = u64::from(p);
            }
            let _ = vcpu;
            0
        }
        _ => ret(errno::ENOSYS),
    }
}

/// The most grant operations handled in one go; longer batches continue (the
/// hypercall is restarted with the rest), as Xen preempts them.
pub const GRANT_BATCH: u32 = 128;

fn grant_table_op(
    d: &mut DomainCore,
    others: &mut crate::domain::Others<'_>,
    cpu: &mut dyn GuestCpu,
    args: [u64; 5],
) -> u64 {
    let (cmd, uop, count) = (args[0] as u32, args[1], args[2] as u32);
    if (count as i32) < 0 {
        return ret(errno::EINVAL);
    }
    let Some(size) = grant::dispatch::arg_size(cmd) else {
        // dump_table, transfer, cache_flush and unknown: the engine answers
        let mut host = crate::grant_glue::Host {
            cur: d,
            before: &mut *others.before,
            after: &mut *others.after,
            cpu: Some(&*cpu),
        };
        let id = host.cur.id;
        return others
            .grants
            .grant_table_op(id, cmd, &mut [], count, &mut host) as u64;
    };
    let batch = match grant::dispatch::args_len(cmd, 1) {
        Some(n) if n == size => count.min(GRANT_BATCH),
        _ => count, // set_version / get_version: one structure whatever the count
    };
    let len = grant::dispatch::args_len(cmd, batch).unwrap_or(0);
    let mut buf = alloc::vec![0u8; len];
    if copy_from_guest(d, cpu, uop, &mut buf).is_err() {
        return ret(errno::EFAULT);
    }
    let id = d.id;
    let rc = {
        let mut host = crate::grant_glue::Host {
            cur: d,
            before: &mut *others.before,
            after: &mut *others.after,
            cpu: Some(&*cpu),
        };
        others
            .grants
            .grant_table_op(id, cmd, &mut buf, batch, &mut host)
    };
    if copy_to_guest(d, cpu, uop, &buf).is_err() {
        return ret(errno::EFAULT);
    }
    if rc == 0 && batch < count && buf.len() == size * batch as usize {
        // continue with the rest of the batch
        let (rb, rc_reg) = if cpu.code_segment().0 == CodeMode::Bits64 {
            (reg::RSI, reg::RDX)
        } else {
            (reg::RCX, reg::RDX)
        };
        cpu.set_reg(rb, uop.wrapping_add(buf.len() as u64));
        cpu.set_reg(rc_reg, u64::from(count - batch));
        return CONTINUATION;
    }
    rc as u64
}

fn set_timer_op(d: &mut DomainCore, vcpu: u32, args: [u64; 5]) -> u64 {
    let t = &mut d.xen.vcpus[vcpu as usize].singleshot;
    *t = (args[0] != 0).then_some(args[0]);
    0
}
