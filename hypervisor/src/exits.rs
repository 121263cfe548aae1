//! Vendor-neutral exit handling: CPUID, port I/O, MSRs, nested page faults, HLT and
//! XSETBV. Hypercalls are in [`crate::hypercall`].

use alloc::format;
use alloc::string::String;

use crate::arch::x86;
use crate::cpuid::{self, GuestView};
use crate::domain::{DomainCore, DomainEnd};
use crate::emulate::{self, Access};
use crate::guest_walk::{self, Access as WalkAccess};
use crate::vcpu::{reg, Exit, GuestCpu, IoExit};

/// What to do after an exit.
#[derive(Debug, PartialEq, Eq)]
pub enum Flow {
    /// Re-enter the guest.
    Continue,
    /// The domain has ended.
    End(DomainEnd),
}

/// Log-once keys.
const LOG_MSR: u8 = 1;
const LOG_PORT: u8 = 2;
const LOG_EXIT: u8 = 3;
pub(crate) const LOG_HYPERCALL: u8 = 4;

const VEC_GP: u8 = 13;

/// Handles one exit of `cpu`, a vCPU of domain `d`.
pub fn handle(
    d: &mut DomainCore,
    others: &mut crate::domain::Others<'_>,
    vcpu: u32,
    cpu: &mut dyn GuestCpu,
    exit: Exit,
) -> Flow {
    let bucket = match exit {
        Exit::Hypercall => 0,
        Exit::Cpuid => 1,
        Exit::Io(_) => 2,
        Exit::Msr { .. } => 3,
        Exit::NestedPageFault { .. } => 4,
        Exit::Hlt => 5,
        Exit::Xsetbv => 6,
        Exit::ExternalInterrupt => 7,
        _ => 8,
    };
    d.counters.exits[bucket] += 1;
    match exit {
        Exit::Hypercall => {
            if !d.config.pci.is_empty() {
                // A device owner's hypercalls are where its DMA faults become visible
                // to it (events, polls): read the unit's records first.
                crate::devices::poll_faults();
            }
            crate::hypercall::handle(d, others, vcpu, cpu)
        }
        Exit::Cpuid => {
            let leaf = cpu.reg(reg::RAX) as u32;
            let sub = cpu.reg(reg::RCX) as u32;
            let view = GuestView {
                osxsave: cpu.paging().cr4 & (1 << 18) != 0,
                xcr0: cpu.xcr0(),
                apic_id: vcpu as u8,
                vcpu_id: vcpu,
                domid: d.id,
            };
            let r = cpuid::guest_cpuid(leaf, sub, view, x86::cpuid);
            for (i, reg) in [reg::RAX, reg::RBX, reg::RCX, reg::RDX]
                .into_iter()
                .enumerate()
            {
                cpu.set_reg(reg, u64::from(r[i]));
            }
            skip(d, cpu, None)
        }
        Exit::Io(io) => port_io(d, cpu, io),
        Exit::Msr { write } => msr(d, vcpu, cpu, write),
        Exit::NestedPageFault {
            gpa,
            write,
            fetch,
            present,
        } => npf(d, cpu, gpa, write, fetch, present),
        Exit::Hlt => {
            // Xen: halting with interrupts disabled can never be woken (no NMIs are
            // sent to guests), so it is taken as the vCPU going down; with every vCPU
            // down the domain powers off.
            if cpu_rflags_if(cpu) {
                // Waits for an interrupt: the scheduler wakes it on an event or timer.
                d.xen.vcpus[vcpu as usize].state = crate::xen::RunState::Blocked;
                skip(d, cpu, Some(1))
            } else {
                d.xen.vcpus[vcpu as usize].state = crate::xen::RunState::Down;
                if d.xen
                    .vcpus
                    .iter()
                    .all(|s| s.state == crate::xen::RunState::Down)
                {
                    Flow::End(DomainEnd::Shutdown(abi::hypercall::SHUTDOWN_POWEROFF))
                } else {
                    skip(d, cpu, Some(1))
                }
            }
        }
        Exit::Xsetbv => {
            let idx = cpu.reg(reg::RCX) as u32;
            let v = (cpu.reg(reg::RDX) << 32) | (cpu.reg(reg::RAX) & 0xffff_ffff);
            let ok = idx == 0
                && v & 1 != 0
                && v & !cpuid::GUEST_XCR0_MASK & !1 == 0
                && !(v & 4 != 0 && v & 2 == 0)
                && v & supported_xcr0() == v
                && cpu.cpl() == 0;
            if !ok {
                cpu.inject_exception(VEC_GP, Some(0));
                return Flow::Continue;
            }
            cpu.set_xcr0(v);
            skip(d, cpu, None)
        }
        Exit::TripleFault => Flow::End(DomainEnd::Crashed(format!(
            "triple fault (shutdown) at rip {:#x}",
            cpu.rip()
        ))),
        Exit::ExternalInterrupt => Flow::Continue,
        Exit::InvalidState(code) => Flow::End(DomainEnd::Crashed(format!(
            "the CPU refused to run the guest (VM entry code {code:#x}): invalid guest state"
        ))),
        Exit::Unhandled(code) => {
            if d.first_time(LOG_EXIT, code) {
                log::warn!(
                    "d{}: unhandled exit code {code:#x} at rip {:#x}",
                    d.id,
                    cpu.rip()
                );
            }
            Flow::End(DomainEnd::Crashed(format!(
                "unhandled exit {code:#x} at rip {:#x}",
                cpu.rip()
            )))
        }
    }
}

fn cpu_rflags_if(cpu: &dyn GuestCpu) -> bool {
    cpu.rflags() & (1 << 9) != 0
}

fn supported_xcr0() -> u64 {
    let [eax, _, _, edx] = x86::cpuid(0xd, 0);
    ((u64::from(edx) << 32) | u64::from(eax)) & cpuid::GUEST_XCR0_MASK
}

/// Fetches up to 15 bytes of the instruction at the guest's RIP (once) through the
/// guest's page tables.
pub fn fetch_instruction(d: &DomainCore, cpu: &dyn GuestCpu) -> ([u8; 15], usize) {
    let (_, base) = cpu.code_segment();
    let mut buf = [0u8; 15];
    let mut n = 0;
    let access = WalkAccess {
        write: false,
        user: cpu.cpl() == 3,
        fetch: true,
    };
    while n < buf.len() {
        let gva = base.wrapping_add(cpu.rip()).wrapping_add(n as u64);
        let Ok(gpa) = guest_walk::translate(&cpu.paging(), &d.mem, gva, access) else {
            break;
        };
        // stay within the page
        let room = (4096 - (gpa & 0xfff)) as usize;
        let take = room.min(buf.len() - n);
        if !d.mem.read(gpa, &mut buf[n..n + take]) {
            break;
        }
        n += take;
    }
    (buf, n)
}

/// Advances RIP past the current instruction: by the hardware's next RIP when it gave
/// one, else by `len`, else by decoding the instruction.
pub fn skip(d: &mut DomainCore, cpu: &mut dyn GuestCpu, len: Option<u64>) -> Flow {
    if let Some(next) = cpu.next_rip() {
        cpu.set_rip(next);
        return Flow::Continue;
    }
    let len = match len {
        Some(l) => l,
        None => {
            let (bytes, n) = fetch_instruction(d, cpu);
            match emulate::instruction_len(&bytes[..n], cpu.code_segment().0.bits()) {
                Some(l) => u64::from(l),
                None => {
                    return Flow::End(DomainEnd::Crashed(format!(
                        "cannot decode the instruction at rip {:#x} (bytes {:02x?})",
                        cpu.rip(),
                        &bytes[..n]
                    )))
                }
            }
        }
    };
    let (mode, _) = cpu.code_segment();
    let next = cpu.rip().wrapping_add(len);
    cpu.set_rip(if mode.bits() == 64 {
        next
    } else {
        next & 0xffff_ffff
    });
    Flow::Continue
}

fn port_io(d: &mut DomainCore, cpu: &mut dyn GuestCpu, io: IoExit) -> Flow {
    *d.counters.io_ports.entry(io.port).or_insert(0) += 1;
    if io.string {
        return Flow::End(DomainEnd::Crashed(format!(
            "string port I/O ({}S to port {:#x}) is not emulated",
            if io.input { "IN" } else { "OUT" },
            io.port
        )));
    }
    let m = emulate::mask(io.size);
    if !d.config.pci.is_empty() && (io.port == 0xcf8 || (0xcfc..=0xcff).contains(&io.port)) {
        pci_config(d, cpu, io, m);
    } else if io.input {
        // Nothing decodes guest ports yet: reads float high, as on an empty bus.
        d.counters.unclaimed_port_reads += 1;
        let rax = cpu.reg(reg::RAX);
        cpu.set_reg(
            reg::RAX,
            match io.size {
                4 => m,
                _ => (rax & !m) | m,
            },
        );
    } else if io.port == abi::ferro::DEBUG_PORT {
        let v = cpu.reg(reg::RAX) & m;
        let bytes = v.to_le_bytes();
        d.counters.debug_port_bytes += u64::from(io.size);
        d.console_write(&bytes[..io.size as usize]);
    } else if d.first_time(LOG_PORT, u64::from(io.port)) {
        log::debug!(
            "d{}: write to unclaimed port {:#x} dropped (logged once)",
            d.id,
            io.port
        );
    }
    cpu.set_rip(io.next_rip.unwrap_or(cpu.rip()));
    if io.next_rip.is_none() {
        return skip(d, cpu, None);
    }
    Flow::Continue
}

/// PCI configuration mechanism 1 for a domain that owns devices: the address latch at
/// 0xcf8 (dword accesses), data at 0xcfc-0xcff, filtered by [`crate::devices`].
fn pci_config(d: &mut DomainCore, cpu: &mut dyn GuestCpu, io: IoExit, m: u64) {
    let rax = cpu.reg(reg::RAX);
    if io.port == 0xcf8 {
        if io.size == 4 {
            if io.input {
                cpu.set_reg(reg::RAX, u64::from(d.pci_cf8));
            } else {
                d.pci_cf8 = rax as u32 & 0x80ff_fffc;
            }
        } else if io.input {
            cpu.set_reg(reg::RAX, (rax & !m) | m);
        }
        return;
    }
    let latch = d.pci_cf8;
    let off = (latch & 0xfc) as u16 + (io.port - 0xcfc);
    let bdf = iommu::pci::Bdf::from_source_id((latch >> 8) as u16);
    if latch & 0x8000_0000 == 0 || (latch >> 16) & 0xff != u32::from(bdf.bus) {
        if io.input {
            cpu.set_reg(reg::RAX, (rax & !m) | m);
        }
        return;
    }
    if io.input {
        let dword = crate::devices::config_read(d.id, bdf, off & !3);
        let v = u64::from(dword >> ((off & 3) * 8)) & m;
        cpu.set_reg(reg::RAX, if io.size == 4 { v } else { (rax & !m) | v });
    } else if !crate::devices::config_write(d.id, bdf, off, (rax & m) as u32, io.size)
        && d.first_time(LOG_PORT, 0x1_0000 | u64::from(off))
    {
        log::info!(
            "d{}: PCI {bdf} config write at {off:#x} dropped (only the command register's enables are writable; logged once)",
            d.id
        );
    }
}

fn msr(d: &mut DomainCore, vcpu: u32, cpu: &mut dyn GuestCpu, write: bool) -> Flow {
    let m = cpu.reg(reg::RCX) as u32;
    if write {
        let v = (cpu.reg(reg::RDX) << 32) | (cpu.reg(reg::RAX) & 0xffff_ffff);
        if m == HYPERCALL_PAGE_MSR {
            return hypercall_page(d, cpu, v);
        }
        if m == 0x8b {
            return skip(d, cpu, Some(2)); // microcode signature reset: nothing to do
        }
        if m == MISC_ENABLE_MSR {
            // Linux rewrites it only to clear bits (XD disable, CPUID limit) that are
            // never set here; any change is refused as Xen refuses it.
            if v == MISC_ENABLE {
                return skip(d, cpu, Some(2));
            }
            return gp_for_msr(d, cpu, m, "IA32_MISC_ENABLE is read-only");
        }
        if crate::xen::is_mtrr(m) {
            // types 0, 1, 4, 5, 6 only; MTRRdefType bits 10, 11 and the type
            let bad_type = |t: u64| !matches!(t & 0xff, 0 | 1 | 4 | 5 | 6);
            let ok = match m {
                0x2ff => v & !0xcff == 0 && !bad_type(v),
                0x200..=0x20f if m.is_multiple_of(2) => {
                    !bad_type(v) && v >> 52 == 0 && v & 0xf00 == 0
                }
                0x200..=0x20f => v >> 52 == 0 && v & 0x7ff == 0,
                _ => (0..8).all(|i| !bad_type(v >> (i * 8))),
            };
            if !ok {
                return gp_for_msr(d, cpu, m, "invalid MTRR value");
            }
            d.xen.vcpus[vcpu as usize].mtrr.insert(m, v);
            return skip(d, cpu, Some(2));
        }
        if m == x86::msr::APIC_BASE {
            if d.xen.vcpus[vcpu as usize].apic.set_base(v) {
                return skip(d, cpu, Some(2));
            }
            return gp_for_msr(d, cpu, m, "unsupported APIC base change");
        }
        if (crate::vlapic::MSR_BASE..=crate::vlapic::MSR_LAST).contains(&m) {
            let r = d.xen.vcpus[vcpu as usize]
                .apic
                .write(m, v, crate::time::now_ns());
            return match r {
                crate::vlapic::Access::Ok(_) => skip(d, cpu, Some(2)),
                crate::vlapic::Access::Sent(ipi) => {
                    d.send_ipi(vcpu, ipi);
                    skip(d, cpu, Some(2))
                }
                crate::vlapic::Access::Fault => {
                    gp_for_msr(d, cpu, m, "x2APIC register access refused")
                }
            };
        }
        match cpu.write_arch_msr(m, v) {
            Ok(true) => return skip(d, cpu, Some(2)),
            Ok(false) => {}
            Err(_) => return gp_for_msr(d, cpu, m, "invalid value"),
        }
        gp_for_msr(d, cpu, m, "write to an MSR that is not offered")
    } else {
        let v =
            match m {
                x86::msr::TSC => Some(x86::rdtsc()),
                x86::msr::APIC_BASE => Some(d.xen.vcpus[vcpu as usize].apic.base()),
                // microcode patch level / BIOS signature: none
                0x8b => Some(0),
                // Intel CPUs: Linux's early boot reads it unguarded (verify_cpu)
                MISC_ENABLE_MSR => Some(MISC_ENABLE),
                0xfe => Some(crate::xen::MTRR_CAP),
                m if crate::xen::is_mtrr(m) => {
                    Some(d.xen.vcpus[vcpu as usize].mtrr.get(&m).copied().unwrap_or(
                        if m == 0x2ff {
                            crate::xen::MTRR_DEF_TYPE
                        } else {
                            0
                        },
                    ))
                }
                crate::vlapic::MSR_BASE..=crate::vlapic::MSR_LAST => {
                    match d.xen.vcpus[vcpu as usize]
                        .apic
                        .read(m, crate::time::now_ns())
                    {
                        crate::vlapic::Access::Ok(v) => Some(v),
                        _ => None,
                    }
                }
                _ => cpu.read_arch_msr(m),
            };
        match v {
            Some(v) => {
                cpu.set_reg(reg::RAX, v & 0xffff_ffff);
                cpu.set_reg(reg::RDX, v >> 32);
                skip(d, cpu, Some(2))
            }
            None => gp_for_msr(d, cpu, m, "read of an MSR that is not offered"),
        }
    }
}

/// IA32_MISC_ENABLE.
const MISC_ENABLE_MSR: u32 = 0x1a0;
/// What guests read from IA32_MISC_ENABLE (as Xen offers it): branch trace store and
/// PEBS unavailable (bits 11, 12); no XD disable, no MONITOR, no CPUID limit.
const MISC_ENABLE: u64 = (1 << 11) | (1 << 12);

/// The MSR a guest writes its hypercall page's address to (CPUID 0x40000002 ebx).
pub const HYPERCALL_PAGE_MSR: u32 = 0x4000_0000;

/// Fills the guest page at `value & !0xfff` with hypercall stubs: 32 bytes each,
/// `mov eax, nr; vmmcall|vmcall; ret`, `ud2` for the PV-only `iret`.
fn hypercall_page(d: &mut DomainCore, cpu: &mut dyn GuestCpu, value: u64) -> Flow {
    if value & 0xfff != 0 {
        // only page index 0 exists (CPUID 0x40000002 eax = 1)
        return gp_for_msr(
            d,
            cpu,
            HYPERCALL_PAGE_MSR,
            "hypercall page index out of range",
        );
    }
    let insn = cpu.hypercall_instruction();
    let mut page = [0xccu8; 4096];
    for (nr, stub) in page.chunks_mut(32).enumerate() {
        if nr as u64 == abi::hypercall::IRET {
            stub[..2].copy_from_slice(&[0x0f, 0x0b]);
            continue;
        }
        stub[0] = 0xb8;
        stub[1..5].copy_from_slice(&(nr as u32).to_le_bytes());
        stub[5..8].copy_from_slice(&insn);
        stub[8] = 0xc3;
    }
    if !d.mem.write(value, &page) {
        return gp_for_msr(
            d,
            cpu,
            HYPERCALL_PAGE_MSR,
            "hypercall page outside guest RAM",
        );
    }
    log::debug!("d{}: hypercall page at {value:#x}", d.id);
    skip(d, cpu, Some(2))
}

fn gp_for_msr(d: &mut DomainCore, cpu: &mut dyn GuestCpu, m: u32, why: &str) -> Flow {
    if d.first_time(LOG_MSR, u64::from(m)) {
        log::info!("d{}: #GP for MSR {m:#x}: {why} (logged once per MSR)", d.id);
    }
    d.counters.msr_gp_injected += 1;
    d.counters.last_gp_msr = Some(m);
    cpu.inject_exception(VEC_GP, Some(0));
    Flow::Continue
}

fn npf(
    d: &mut DomainCore,
    cpu: &mut dyn GuestCpu,
    gpa: u64,
    write: bool,
    fetch: bool,
    present: bool,
) -> Flow {
    if present || gpa < d.mem.size() {
        return Flow::End(DomainEnd::Crashed(format!(
            "nested page fault on guest RAM at {gpa:#x} ({}): nested tables are inconsistent",
            if write { "write" } else { "read" }
        )));
    }
    if fetch {
        return Flow::End(DomainEnd::Crashed(format!(
            "instruction fetch from unbacked guest-physical address {gpa:#x} (rip {:#x})",
            cpu.rip()
        )));
    }
    let (bytes, n) = fetch_instruction(d, cpu);
    let decoded = match emulate::decode(&bytes[..n], cpu.code_segment().0.bits()) {
        Ok(x) => x,
        Err(e) => {
            return Flow::End(DomainEnd::Crashed(format!(
                "access to unbacked guest-physical address {gpa:#x} at rip {:#x}: {e}",
                cpu.rip()
            )))
        }
    };
    match decoded.access {
        Access::Load {
            size,
            dest,
            sign_extend,
        } => {
            d.counters.unbacked_reads += 1;
            let old = cpu.reg(dest.reg);
            cpu.set_reg(
                dest.reg,
                emulate::apply_load(old, emulate::mask(size), size, dest, sign_extend),
            );
        }
        Access::Store { .. } => d.counters.unbacked_writes += 1,
    }
    if d.first_time(LOG_EXIT, gpa | 1 << 63) {
        log::debug!(
            "d{}: access to unbacked gpa {gpa:#x} emulated (reads ~0, writes dropped)",
            d.id
        );
    }
    skip(d, cpu, Some(u64::from(decoded.len)))
}

/// Reads a guest-virtual buffer for a hypercall, once (an error means -EFAULT).
pub fn copy_from_guest(
    d: &DomainCore,
    cpu: &dyn GuestCpu,
    gva: u64,
    buf: &mut [u8],
) -> Result<(), guest_walk::WalkError> {
    guest_walk::copy_from_guest(&cpu.paging(), &d.mem, gva, buf)
}

/// Writes a guest-virtual buffer for a hypercall (an error means -EFAULT).
pub fn copy_to_guest(
    d: &mut DomainCore,
    cpu: &dyn GuestCpu,
    gva: u64,
    data: &[u8],
) -> Result<(), guest_walk::WalkError> {
    guest_walk::copy_to_guest(&cpu.paging(), &mut d.mem, gva, data)
}

/// Formats an exit for a crash report.
pub fn describe(exit: &Exit) -> String {
    format!("{exit:?}")
}
