//! Xen hypercalls: argument fetch per guest mode, dispatch, and the calls implemented
//! so far. Everything else answers `-ENOSYS`, counted and logged once per number, as a
//! Xen without that hypercall would.

use abi::errno::{self, ret};
use abi::hypercall as hc;

use crate::domain::{DomainCore, DomainEnd};
use crate::exits::{copy_from_guest, copy_to_guest, skip, Flow, LOG_HYPERCALL};
use crate::vcpu::{reg, CodeMode, GuestCpu};

/// Length of VMMCALL/VMCALL, used when the hardware gives no next RIP.
const HYPERCALL_INSN_LEN: u64 = 3;

/// The largest console write handled in one call (Xen preempts long writes; we take
/// them whole up to this size and refuse bigger ones).
pub const CONSOLE_WRITE_MAX: u64 = 64 * 1024;

/// Handles a VMMCALL/VMCALL exit.
pub fn handle(d: &mut DomainCore, cpu: &mut dyn GuestCpu) -> Flow {
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
            hc::SCHED_OP => sched_op(d, cpu, args),
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
    match args[0] {
        hc::XENVER_VERSION => u64::from((abi::XEN_VERSION_MAJOR << 16) | abi::XEN_VERSION_MINOR),
        hc::XENVER_EXTRAVERSION => {
            let mut s = [0u8; 16];
            s[..12].copy_from_slice(b".0-ferrovis\0");
            match copy_to_guest(d, cpu, args[1], &s) {
                Ok(()) => 0,
                Err(_) => ret(errno::EFAULT),
            }
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

fn console_io(d: &mut DomainCore, cpu: &dyn GuestCpu, args: [u64; 5]) -> u64 {
    let (cmd, count, buf) = (args[0], args[1] & 0xffff_ffff, args[2]);
    match cmd {
        hc::CONSOLEIO_WRITE => {
            if count > CONSOLE_WRITE_MAX {
                return ret(errno::EINVAL);
            }
            let mut chunk = [0u8; 256];
            let mut done = 0;
            while done < count {
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

fn sched_op(d: &mut DomainCore, cpu: &dyn GuestCpu, args: [u64; 5]) -> Result<u64, DomainEnd> {
    match args[0] {
        hc::SCHEDOP_YIELD => Ok(0),
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
