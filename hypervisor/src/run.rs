//! Running the domains of a boot bundle: parse their configs, build them all, then
//! schedule every runnable vCPU of every domain round-robin on this CPU until all
//! domains have ended; report each end and release everything.
//!
//! A vCPU runs until it exits or its time slice ends (the host APIC timer preempts
//! it); blocked vCPUs wake on a pending event upcall or a timer; when nothing can run
//! the CPU sleeps until the earliest timer.

use alloc::format;
use alloc::string::String;
use alloc::vec::Vec;

use abi::hypercall::{shutdown_reason_name, SHUTDOWN_POWEROFF};

use crate::arch::cpu::HostCpu;
use crate::arch::lapic;
use crate::config::Action;
use crate::console::{Focus, InputSwitch, Typed};
use crate::domain::{BuildError, Domain, DomainEnd};
use crate::exits::{self, Flow};
use crate::time;
use crate::vcpu::{reg, GuestCpu};
use crate::xen::{self, RunState};

/// Guest memory a restarting domain allocates and zeroes between two time slices
/// (about 30 ms under QEMU TCG).
const REBUILD_STEP_BYTES: u64 = 16 << 20;

/// A domain being restarted: its new memory is allocated step by step, then it is built.
struct Rebuild {
    old_id: u16,
    new_id: u16,
    config: crate::config::DomainConfig,
    restarts: u32,
    memory: crate::memory::Allocation,
}

/// Longest a vCPU runs before another runnable vCPU gets the CPU.
pub const TIME_SLICE_NS: u64 = 10_000_000;

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
pub fn run_bundle(bundle: &[u8], cpu: &HostCpu) -> Result<Outcome, String> {
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
    let mut grants = grant::GrantEngine::new();
    let mut xs = crate::xenstore::Xenstore::new();
    // what a toolstack creates at boot: the parent of every domain's home
    let home = crate::xenstore::Op::Mkdir {
        path: String::from("/local/domain"),
    };
    xs.request(crate::xenstore::PRIV_DOMID, 0, &home)
        .map_err(|e| format!("xenstore: cannot create /local/domain: {e:?}"))?;
    let xs_entries_before = xs.total_entries();
    let mut domains = Vec::new();
    // Like xl, a restarted domain is a new domain with the next free id (the old id may
    // still be held by a zombie whose grants are mapped elsewhere).
    let mut next_id = cfgs.len() as u16 + 1;
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
        let mut d = Domain::build(id, config, bundle, cpu).map_err(|e| match e {
            BuildError::Kernel { path, error } => {
                format!("kernel '{path}' of domain '{name}' {error}")
            }
            BuildError::KernelImage { path, error } => {
                format!("kernel '{path}' of domain '{name}' {error}")
            }
            other => format!("domain '{name}': {other}"),
        })?;
        grants
            .create_domain(
                id,
                crate::grant_glue::domain_config(),
                &mut crate::grant_glue::FramesOnly,
            )
            .map_err(|e| format!("domain '{name}': no grant table: {e:?}"))?;
        introduce(&mut xs, &mut d).map_err(|e| format!("domain '{name}': xenstore: {e:?}"))?;
        domains.push(d);
    }
    // Domains that ended while others still map their grants: their memory stays until
    // the last mapping is gone (as Xen keeps granted pages alive).
    let mut zombies: Vec<Domain> = Vec::new();
    let mut input = InputSwitch::new();
    // Domains whose config says `preserve`: kept, not run, released at the end.
    let mut preserved: Vec<Domain> = Vec::new();

    let mut outcome = Outcome { ok: 0, failed: 0 };
    // start just before the first vCPU of the first domain
    let mut cursor = domains
        .iter()
        .map(|d| d.vcpus.len())
        .sum::<usize>()
        .saturating_sub(1);
    // Restarted domains whose memory is being allocated and zeroed a step at a time
    // between time slices, so that the other domains keep running meanwhile.
    let mut rebuilding: Vec<Rebuild> = Vec::new();
    while !domains.is_empty() || !rebuilding.is_empty() {
        fire_timers(&mut domains);
        crate::devices::poll_faults();
        service_consoles(&mut domains, &grants, &mut input);
        service_stores(&mut domains, &mut xs);
        if let Some(r) = rebuilding.first_mut() {
            let name = r.config.name.clone();
            let done = r
                .memory
                .step(REBUILD_STEP_BYTES)
                .map_err(|e| format!("restarting domain '{name}': {}", BuildError::from(e)))?;
            if done {
                let r = rebuilding.remove(0);
                let mut fresh =
                    Domain::build_in(r.new_id, r.config, bundle, cpu, r.memory.finish())
                        .map_err(|e| format!("restarting domain '{name}': {e}"))?;
                fresh.core.restarts = r.restarts;
                grants
                    .create_domain(
                        r.new_id,
                        crate::grant_glue::domain_config(),
                        &mut crate::grant_glue::FramesOnly,
                    )
                    .map_err(|e| format!("restarting domain '{name}': no grant table: {e:?}"))?;
                log::info!(
                    "d{} ({name}) restarted as d{} (restart {})",
                    r.old_id,
                    r.new_id,
                    r.restarts
                );
                introduce(&mut xs, &mut fresh)
                    .map_err(|e| format!("restarting domain '{name}': xenstore: {e:?}"))?;
                domains.push(fresh);
            }
        }
        let Some((di, vi)) = pick(&mut domains, &mut cursor) else {
            if rebuilding.is_empty() {
                idle(&domains);
            }
            continue;
        };
        let end = run_slice(&mut domains, &mut grants, di, vi);
        if let Some(end) = end {
            let mut d = domains.remove(di);
            let ch = &d.core.evtchn;
            log::info!(
                "d{} event channels: {} ports in use at the end, {} ABI, {:?}",
                d.core.id,
                ch.active_ports(),
                if d.core.fifo.is_some() {
                    "FIFO"
                } else {
                    "2-level"
                },
                ch.counters()
            );
            close_interdomain(&mut d, &mut domains);
            let id = d.core.id;
            let n = xs.counts(id);
            log::info!(
                "d{id} xenstore: {} nodes, {} watches, {} transactions open at the end",
                n.entries,
                n.watches,
                n.transactions
            );
            if let Err(e) = xs.release(id) {
                log::warn!("d{id}: xenstore release: {e:?}");
            }
            if let Some(g) = grants.domain_counters(id) {
                log::info!(
                    "d{id} grants: {} maps, {} unmaps, {} copies ({} bytes), {} mappings live at the end",
                    g.maps, g.unmaps, g.copies, g.bytes_copied, g.live_mappings
                );
            }
            let mut host = crate::grant_glue::Host {
                cur: &mut d.core,
                before: &mut domains,
                after: &mut [],
                cpu: None,
            };
            let report = grants.destroy_domain(id, &mut host);
            let table_freed = report.is_none_or(|r| r.table_freed);
            let action = action_for(&d.core.config, &end);
            let ok = report_end(&mut d, end);
            if action != Action::Restart {
                if ok {
                    outcome.ok += 1;
                } else {
                    outcome.failed += 1;
                }
            }
            let (config, restarts) = (d.core.config.clone(), d.core.restarts);
            if action == Action::Preserve {
                log::info!("d{id}: preserved (not destroyed, not run) as its config asks");
                preserved.push(d);
            } else if table_freed {
                d.destroy();
            } else {
                log::info!("d{id}: memory kept until the other domains unmap its grants");
                zombies.push(d);
            }
            if action == Action::Restart {
                let name = config.name.clone();
                let new_id = next_id;
                if new_id >= abi::event_channel::DOMID_FIRST_RESERVED {
                    return Err(format!(
                        "restarting domain '{name}': no domain ids left (restarted {restarts} times)"
                    ));
                }
                next_id += 1;
                rebuilding.push(Rebuild {
                    old_id: id,
                    new_id,
                    memory: crate::memory::GuestMemory::start_allocation(config.memory_mib << 20),
                    config,
                    restarts: restarts + 1,
                });
            }
            let mut i = 0;
            while i < zombies.len() {
                if grants.table(zombies[i].core.id).is_none() {
                    zombies.swap_remove(i).destroy();
                } else {
                    i += 1;
                }
            }
        }
    }
    // every mapper has ended, so every table is free now
    for z in zombies.drain(..).chain(preserved.drain(..)) {
        z.destroy();
    }
    let xs_entries_after = xs.total_entries();
    if xs_entries_after == xs_entries_before {
        log::info!("xenstore back to {xs_entries_after} entries");
    } else {
        log::error!("xenstore leak: {xs_entries_before} entries before the domains, {xs_entries_after} after");
        outcome.failed += 1;
    }
    crate::domain::release_decompressed_kernels();
    let free_after = crate::frames::free_count();
    if free_after == free_before {
        log::info!("all domain memory returned: {free_after} free frames before and after");
    } else {
        log::error!("frame leak: {free_before} free frames before the domains, {free_after} after");
        outcome.failed += 1;
    }
    Ok(outcome)
}

/// Moves console output of every domain to the serial line, and typed input to the
/// domain with the input focus (three Ctrl-A in a row switch it, the hypervisor's debug
/// keys included).
fn service_consoles(domains: &mut [Domain], grants: &grant::GrantEngine, input: &mut InputSwitch) {
    for d in domains.iter_mut() {
        if d.core.service_console() {
            d.core.notify_console();
        }
    }
    let ids: Vec<u16> = domains.iter().map(|d| d.core.id).collect();
    for _ in 0..64 {
        let Some(b) = crate::console::read_byte() else {
            break;
        };
        for t in input.feed(b, &ids) {
            match t {
                Typed::ToDomain(id, c) => {
                    if let Some(d) = domains.iter_mut().find(|d| d.core.id == id) {
                        d.core.console_input(&[c]);
                        d.core.notify_console();
                    }
                }
                Typed::Switched(Focus::Domain(id)) => {
                    log::info!("console input now goes to d{id} (Ctrl-A three times to switch)")
                }
                Typed::Switched(Focus::Hypervisor) => {
                    log::info!("console input now goes to the hypervisor: press 'h' for debug keys")
                }
                Typed::DebugKey(k) => debug_key(k, domains, grants),
            }
        }
    }
}

/// The hypervisor's debug keys (as Xen's): state dumps on the console.
fn debug_key(key: u8, domains: &[Domain], grants: &grant::GrantEngine) {
    match key {
        b'd' => {
            for d in domains {
                let c = &d.core;
                log::info!("d{} ({}): {} MiB, {} vCPU(s), restarted {} times", c.id, c.name(), c.config.memory_mib, d.vcpus.len(), c.restarts);
                for (v, cpu) in d.vcpus.iter().enumerate() {
                    let s = &c.xen.vcpus[v];
                    log::info!("  vcpu{v}: {:?}, rip {:#x}, next timer {:?}", s.state, cpu.rip(), s.next_deadline());
                }
            }
        }
        b'e' => {
            for d in domains {
                let c = &d.core;
                log::info!(
                    "d{} event channels: {} ports, {} ABI, {:?}",
                    c.id,
                    c.evtchn.active_ports(),
                    if c.fifo.is_some() { "FIFO" } else { "2-level" },
                    c.evtchn.counters()
                );
            }
        }
        b'g' => {
            log::info!("grants (all domains): {:?}", grants.counters());
            for d in domains {
                if let Some(g) = grants.domain_counters(d.core.id) {
                    log::info!("d{} grants: {:?}", d.core.id, g);
                }
            }
        }
        b'c' => {
            for d in domains {
                let c = &d.core.counters;
                log::info!(
                    "d{} exits: hypercall {} cpuid {} io {} msr {} npf {} hlt {} xsetbv {} intr {} other {}",
                    d.core.id, c.exits[0], c.exits[1], c.exits[2], c.exits[3], c.exits[4], c.exits[5], c.exits[6], c.exits[7], c.exits[8]
                );
                log::info!("d{} hypercalls by number: {:?}", d.core.id, c.hypercalls);
            }
        }
        b'm' => log::info!("free memory: {} frames ({} MiB)", crate::frames::free_count(), crate::frames::free_count() >> 8),
        b'i' => log::info!("{}", crate::devices::summary()),
        _ => log::info!(
            "debug keys: d domains and vCPUs, e event channels, g grants, c exit and hypercall counters, m free memory, i IOMMU and assigned devices, h this help; Ctrl-A three times leaves"
        ),
    }
}

/// Wakes vCPUs whose timers are due, and raises their timer events.
fn fire_timers(domains: &mut [Domain]) {
    let now = time::now_ns();
    for d in domains.iter_mut() {
        for v in 0..d.core.xen.vcpus.len() {
            let s = &mut d.core.xen.vcpus[v];
            let mut fired = false;
            if s.singleshot.is_some_and(|t| t <= now) {
                s.singleshot = None;
                fired = true;
            }
            if let Some((period, next)) = s.periodic {
                if next <= now {
                    let missed = (now - next) / period + 1;
                    s.periodic = Some((period, next + missed * period));
                    fired = true;
                }
            }
            if s.apic.timer_deadline().is_some_and(|t| t <= now) {
                s.apic.timer_fire(now);
                if s.state == RunState::Blocked && s.apic.deliverable().is_some() {
                    s.state = RunState::Runnable;
                }
            }
            if let RunState::Polling {
                deadline: Some(t), ..
            } = s.state
            {
                if t <= now {
                    s.state = RunState::Runnable;
                }
            }
            if fired {
                d.core.timer_fired(v as u32);
            }
        }
    }
}

/// The next runnable vCPU after `cursor`, round-robin over (domain, vCPU) pairs.
/// Blocked vCPUs with a deliverable event become runnable here.
fn pick(domains: &mut [Domain], cursor: &mut usize) -> Option<(usize, usize)> {
    let slots: Vec<(usize, usize)> = domains
        .iter()
        .enumerate()
        .flat_map(|(di, d)| (0..d.vcpus.len()).map(move |vi| (di, vi)))
        .collect();
    if slots.is_empty() {
        return None;
    }
    for k in 1..=slots.len() {
        let (di, vi) = slots[(*cursor + k) % slots.len()];
        let d = &mut domains[di];
        let wake = d.core.event_deliverable(vi as u32);
        let s = &mut d.core.xen.vcpus[vi];
        match s.state {
            RunState::Runnable => {}
            RunState::Blocked | RunState::Polling { .. } if wake => s.state = RunState::Runnable,
            _ => continue,
        }
        *cursor = (*cursor + k) % slots.len();
        return Some((di, vi));
    }
    None
}

/// Nothing can run: sleep until the earliest timer (or a slice, to poll the console).
fn idle(domains: &[Domain]) {
    let now = time::now_ns();
    let next = domains
        .iter()
        .flat_map(|d| d.core.xen.vcpus.iter().filter_map(|s| s.next_deadline()))
        .min();
    let wait = match next {
        Some(t) if t <= now => return,
        Some(t) => (t - now).min(100 * TIME_SLICE_NS),
        None => 100 * TIME_SLICE_NS,
    };
    lapic::arm_ns(wait);
    lapic::wait_for_interrupt();
    lapic::disarm();
}

/// Runs vCPU `vi` of `d` for up to one time slice; `Some` when the domain has ended.
fn run_slice(
    domains: &mut [Domain],
    grants: &mut grant::GrantEngine,
    di: usize,
    vi: usize,
) -> Option<DomainEnd> {
    let (before, rest) = domains.split_at_mut(di);
    let (d, after) = rest.split_first_mut().expect("di is in range");
    let mut others = crate::domain::Others {
        before,
        after,
        grants,
    };
    let Domain { core, vcpus } = d;
    let cpu = &mut *vcpus[vi];
    let v = vi as u32;
    let now = time::now_ns();
    xen::runstate_change(&mut core.xen.vcpus[vi], xen::RUNSTATE_RUNNING, now);
    if core.tlb_flush_needed {
        cpu.flush_tlb();
        core.tlb_flush_needed = false;
    }
    let slice_end = core.xen.vcpus[vi]
        .next_deadline()
        .map_or(now + TIME_SLICE_NS, |t| t.min(now + TIME_SLICE_NS));
    if let Some(vector) = core.xen.vcpus[vi].sipi.take() {
        cpu.reset_real_mode(vector);
    }
    loop {
        // Interrupts: one outstanding at a time. An APIC vector moves to the ISR once
        // the CPU has taken it; the event-channel callback vector bypasses the APIC
        // (Xen's HVM_PARAM_CALLBACK_IRQ "vector" mode needs no EOI).
        let s = &mut core.xen.vcpus[vi];
        if let Some(vec) = s.apic_injected {
            if !cpu.interrupt_pending() {
                s.apic.accepted(vec);
                s.apic_injected = None;
            }
        }
        if !cpu.interrupt_pending() {
            if let Some(vector) = core.pending_upcall(v) {
                cpu.inject_interrupt(vector);
            } else if let Some(vector) = core.xen.vcpus[vi].apic.deliverable() {
                cpu.inject_interrupt(vector);
                core.xen.vcpus[vi].apic_injected = Some(vector);
            }
        }
        let now = time::now_ns();
        if now >= slice_end {
            break;
        }
        lapic::arm_ns(slice_end - now);
        let exit = cpu.run();
        lapic::disarm();
        match exits::handle(core, &mut others, v, cpu, exit) {
            Flow::End(end) => {
                if let DomainEnd::Crashed(_) = end {
                    let (code, i1, i2) = cpu.exit_info();
                    log::debug!(
                        "d{}: last exit {} (code {code:#x} info1 {i1:#x} info2 {i2:#x})",
                        core.id,
                        exits::describe(&exit)
                    );
                    dump_vcpu(core.id, v, cpu);
                }
                return Some(end);
            }
            Flow::Continue => {}
        }
        if core.xen.vcpus[vi].state != RunState::Runnable {
            break; // blocked, polling or down
        }
        if core.store_kicked {
            break; // let the scheduler serve xenstore now
        }
        if core.xen.vcpus[vi]
            .next_deadline()
            .is_some_and(|t| t <= time::now_ns())
        {
            break; // let the timer fire
        }
    }
    let s = &mut core.xen.vcpus[vi];
    let new = match s.state {
        RunState::Runnable => xen::RUNSTATE_RUNNABLE,
        RunState::Down => xen::RUNSTATE_OFFLINE,
        _ => xen::RUNSTATE_BLOCKED,
    };
    xen::runstate_change(s, new, time::now_ns());
    xen::write_runstate(core, v, cpu);
    None
}

/// Writes a new domain's xenstore home as the toolstack does and introduces it.
fn introduce(
    xs: &mut crate::xenstore::Xenstore,
    d: &mut Domain,
) -> Result<(), crate::xenstore::XsError> {
    let c = &mut d.core;
    // the ring's server_features field tells the guest what this xenstore supports
    let features = crate::xenstore::SERVER_FEATURES.to_le_bytes();
    let at = c.store_ring + abi::xs_wire::XS_RING_SERVER_FEATURES_OFFSET as u64;
    c.mem.write(at, &features);
    xs.populate_domain(c.id, &c.store_layout())?;
    xs.introduce(c.id, (c.store_ring >> 12) as i64, c.store_port())
}

/// Serves the xenstore rings of domains that signalled their port or have watch
/// events waiting.
fn service_stores(domains: &mut [Domain], xs: &mut crate::xenstore::Xenstore) {
    let dirty = xs.take_dirty();
    for d in domains.iter_mut() {
        if d.core.store_kicked || dirty.contains(&d.core.id) {
            d.core.service_store(xs);
        }
    }
}

/// What the domain's config says to do after `end` (xl's on_poweroff, on_reboot,
/// on_crash; a shutdown for suspend or watchdog counts as a crash here).
fn action_for(c: &crate::config::DomainConfig, end: &DomainEnd) -> Action {
    match end {
        DomainEnd::Shutdown(SHUTDOWN_POWEROFF) => c.on_poweroff,
        DomainEnd::Shutdown(abi::hypercall::SHUTDOWN_REBOOT) => c.on_reboot,
        DomainEnd::Shutdown(_) | DomainEnd::Crashed(_) => c.on_crash,
    }
}

/// A dying domain's interdomain event channels: the peers' ends go back to unbound,
/// as Xen does when a domain is destroyed.
fn close_interdomain(d: &mut Domain, rest: &mut [Domain]) {
    let core = &mut d.core;
    for c in core.evtchn_op(|ch, m| ch.reset(m)) {
        if let crate::evtchn::Closed::Interdomain {
            port,
            remote_dom,
            remote_port,
        } = c
        {
            if let Some(peer) = rest.iter_mut().find(|p| p.core.id == remote_dom) {
                peer.core.evtchn.peer_closed(remote_port, core.id, port);
            }
        }
    }
}

/// Logs how a domain ended; true if it ended well.
fn report_end(d: &mut Domain, end: DomainEnd) -> bool {
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
            false
        }
    };
    log::info!(
        "d{id} exits: hypercall {} cpuid {} io {} msr {} npf {} hlt {} xsetbv {} intr {} other {}; checks {} passed, {} failed",
        c.exits[0], c.exits[1], c.exits[2], c.exits[3], c.exits[4], c.exits[5], c.exits[6], c.exits[7], c.exits[8],
        c.checks_passed, c.checks_failed
    );
    let mut ports: Vec<(u16, u64)> = c.io_ports.iter().map(|(p, n)| (*p, *n)).collect();
    ports.sort_by_key(|p| core::cmp::Reverse(p.1));
    if !ports.is_empty() {
        let top: Vec<String> = ports
            .iter()
            .take(5)
            .map(|(p, n)| format!("{p:#x}: {n}"))
            .collect();
        log::info!("d{id} busiest ports: {}", top.join(", "));
    }
    ok
}

fn dump_vcpu(id: u16, v: u32, cpu: &crate::arch::cpu::Vcpu) {
    let p = cpu.paging();
    log::error!(
        "d{id} vcpu{v}: rip {:#x} rsp {:#x} rax {:#x} rbx {:#x} rcx {:#x} rdx {:#x} cr0 {:#x} cr3 {:#x} cr4 {:#x} efer {:#x} cr2 {:#x} exitintinfo {:#x}",
        cpu.rip(), cpu.reg(reg::RSP), cpu.reg(reg::RAX), cpu.reg(reg::RBX), cpu.reg(reg::RCX), cpu.reg(reg::RDX),
        p.cr0, p.cr3, p.cr4, p.efer, cpu.cr2(), cpu.exit_int_info()
    );
}
