//! Running the domains of a boot bundle: parse their configs, build them all, run each
//! to its end, report, and release everything.

use alloc::format;
use alloc::string::String;
use alloc::vec::Vec;

use abi::hypercall::{shutdown_reason_name, SHUTDOWN_POWEROFF};

use crate::arch::svm::SvmCpu;
use crate::domain::{BuildError, Domain, DomainEnd};
use crate::exits::{self, Flow};
use crate::vcpu::{reg, GuestCpu};

/// The result of running every domain.
#[derive(Debug, Clone, Copy)]
pub struct Outcome {
    /// Domains that shut down with poweroff and failed no check.
    pub ok: u32,
    /// Domains that crashed, shut down otherwise, or failed a check.
    pub failed: u32,
}

/// Runs every domain in `bundle` (`domains/*.cfg`, in name order, domids from 1).
/// `Err` is a fatal error before any domain ran: the message says what and how to fix.
pub fn run_bundle(bundle: &[u8], cpu: &SvmCpu) -> Result<Outcome, String> {
    let mut cfgs = Vec::new();
    for e in crate::bundle::entries(bundle) {
        let e = e.map_err(|e| {
            format!("the boot bundle (the QEMU -initrd module) is not a valid cpio archive: {e}")
        })?;
        let name = e.name.trim_start_matches("./");
        if name.starts_with("domains/") && name.ends_with(".cfg") {
            cfgs.push((String::from(name), e.data));
        }
    }
    if cfgs.is_empty() {
        return Err(String::from(
            "the boot bundle has no domains/*.cfg: nothing to run (build one with `cargo xtask run`)",
        ));
    }
    cfgs.sort_by(|a, b| a.0.cmp(&b.0));

    let free_before = crate::frames::free_count();
    let mut domains = Vec::new();
    for (i, (path, data)) in cfgs.iter().enumerate() {
        let text = core::str::from_utf8(data)
            .map_err(|_| format!("domain config '{path}' is not UTF-8 text"))?;
        let config =
            crate::config::parse(text).map_err(|e| format!("domain config '{path}': {e}"))?;
        for w in &config.warnings {
            log::warn!("domain config '{path}': {w}");
        }
        let name = config.name.clone();
        let id = (i + 1) as u16;
        let d = Domain::build(id, config, bundle, cpu).map_err(|e| match e {
            BuildError::Kernel { path, error } => {
                format!("kernel '{path}' of domain '{name}' {error}")
            }
            other => format!("domain '{name}': {other}"),
        })?;
        domains.push(d);
    }

    let mut outcome = Outcome { ok: 0, failed: 0 };
    for mut d in domains {
        let end = run_domain(&mut d);
        d.core.flush_console_if_pending();
        let (id, name) = (d.core.id, String::from(d.core.name()));
        let c = &d.core.counters;
        let ok = match &end {
            DomainEnd::Shutdown(r) => {
                log::info!("d{id} ({name}) shut down: {}", shutdown_reason_name(*r));
                *r == SHUTDOWN_POWEROFF && c.checks_failed == 0
            }
            DomainEnd::Crashed(why) => {
                log::error!("d{id} ({name}) crashed: {why}");
                dump_vcpu(id, &d.vcpus[0]);
                false
            }
        };
        log::info!(
            "d{id} exits: hypercall {} cpuid {} io {} msr {} npf {} hlt {} xsetbv {} intr {} other {}; checks {} passed, {} failed",
            c.exits[0], c.exits[1], c.exits[2], c.exits[3], c.exits[4], c.exits[5], c.exits[6], c.exits[7], c.exits[8],
            c.checks_passed, c.checks_failed
        );
        if ok {
            outcome.ok += 1;
        } else {
            outcome.failed += 1;
        }
        d.destroy();
    }
    let free_after = crate::frames::free_count();
    if free_after == free_before {
        log::info!(
            "all domain memory returned: {} free frames before and after",
            free_after
        );
    } else {
        log::error!("frame leak: {free_before} free frames before the domains, {free_after} after");
        outcome.failed += 1;
    }
    Ok(outcome)
}

fn run_domain(d: &mut Domain) -> DomainEnd {
    let Domain { core, vcpus } = d;
    let cpu = &mut *vcpus[0];
    loop {
        let exit = cpu.run();
        if let Flow::End(end) = exits::handle(core, cpu, exit) {
            if let DomainEnd::Crashed(_) = end {
                let (code, i1, i2) = cpu.exit_info();
                log::debug!(
                    "d{}: last exit {} (code {code:#x} info1 {i1:#x} info2 {i2:#x})",
                    core.id,
                    exits::describe(&exit)
                );
            }
            return end;
        }
    }
}

fn dump_vcpu(id: u16, cpu: &crate::arch::svm::SvmVcpu) {
    let p = cpu.paging();
    log::error!(
        "d{id} vcpu0: rip {:#x} rsp {:#x} rax {:#x} rbx {:#x} rcx {:#x} rdx {:#x} cr0 {:#x} cr3 {:#x} cr4 {:#x} efer {:#x} cr2 {:#x} exitintinfo {:#x}",
        cpu.rip(), cpu.reg(reg::RSP), cpu.reg(reg::RAX), cpu.reg(reg::RBX), cpu.reg(reg::RCX), cpu.reg(reg::RDX),
        p.cr0, p.cr3, p.cr4, p.efer, cpu.cr2(), cpu.exit_int_info()
    );
}
