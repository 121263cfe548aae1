//! Running the domains of a boot bundle: parse their configs, build them all, then
//! schedule every runnable vCPU of every domain round-robin over every physical CPU
//! until all domains have ended; report each end and release everything.
//!
//! Every CPU runs [`cpu_loop`]. The shared state (domains, grants, xenstore, consoles,
//! the run queue) sits in one [`Machine`] behind one spin lock, the big hypervisor
//! lock: it is held for exit handling and scheduling decisions, never while a guest
//! runs. It is a plain test-and-set lock, not a ticket lock: under QEMU TCG on a busy
//! host a CPU's thread can be descheduled for milliseconds, and a ticket lock then
//! hands the lock to a waiter that is not running while the others wait behind it
//! (measured: seconds of lock waiting per Linux boot); a CPU leaves the lock free
//! while its guest runs, so the other CPUs get it then. A vCPU picked to run is taken out of its domain (its slot is `None`, the
//! scheduler notes the CPU running it), so the running CPU owns it without aliasing;
//! it goes back after its slice. What targets a running vCPU from elsewhere (event
//! upcalls, IPIs between vCPUs of one domain, timers, shutdown) lands in the shared
//! state, and the CPU running it is kicked with an IPI when that changes what it
//! would inject or whether it should run at all; it applies the change before its next
//! entry. Nested-page-table changes are flushed by TLB generations and
//! [`crate::smp::sync_domain`]. A domain ends only when none of its vCPUs runs
//! anywhere. Idle CPUs halt with interrupts on until a kick or their timer.
//!
//! A vCPU runs until it exits or its time slice ends (the host APIC timer preempts
//! it); blocked vCPUs wake on a pending event upcall or a timer. Console input is
//! read by CPU 0 only.

use alloc::boxed::Box;
use alloc::format;
use alloc::string::String;
use alloc::vec::Vec;

use abi::hypercall::{shutdown_reason_name, SHUTDOWN_POWEROFF};

use crate::arch::cpu::Vcpu;
use crate::arch::lapic;
use crate::arch::HostCpu;
use crate::config::Action;
use crate::console::{Focus, InputSwitch, Typed};
use crate::domain::{BuildError, Domain, DomainEnd};
use crate::exits::{self, Flow};
use crate::smp::{self, MAX_CPUS};
use crate::time;
use crate::vcpu::{reg, GuestCpu};
use crate::xen::{self, RunState};

/// Longest a vCPU runs before another runnable vCPU gets the CPU.
pub const TIME_SLICE_NS: u64 = 10_000_000;

/// Longest an idle CPU sleeps without a timer due (it polls the console then).
const IDLE_MAX_NS: u64 = 100 * TIME_SLICE_NS;

/// The result of running every domain.
#[derive(Debug, Clone, Copy)]
pub struct Outcome {
    /// Domains that shut down with poweroff and failed no check.
    pub ok: u32,
    /// Domains that crashed, shut down otherwise, or failed a check.
    pub failed: u32,
}

/// The big hypervisor lock and what it protects; published once the domains are built.
static MACHINE: spin::Once<spin::Mutex<Machine>> = spin::Once::new();
/// CPUs that have left [`cpu_loop`] for good.
static CPUS_DONE: core::sync::atomic::AtomicUsize = core::sync::atomic::AtomicUsize::new(0);

/// What the scheduler knows of one vCPU.
#[derive(Clone, Debug, Default)]
struct VcpuSched {
    /// The CPU running it now (its slot in the domain is `None` meanwhile).
    running_on: Option<usize>,
    /// The CPU it ran on last.
    last_cpu: Option<usize>,
    /// The domain's TLB generation when it last flushed.
    tlb_seen: u64,
    /// Time slices it was given.
    slices: u64,
    /// Time it spent inside the guest.
    guest_ns: u64,
}

/// What the scheduler knows of one domain (kept beside `Machine::domains`, same index).
#[derive(Debug)]
struct DomSched {
    /// Unique for the whole run (domain ids come back after a restart).
    serial: u64,
    vcpus: Vec<VcpuSched>,
    /// Bumped whenever its nested page tables changed: vCPUs that flushed at an older
    /// generation flush before their next entry.
    tlb_gen: u64,
    /// The domain has ended; it is torn down once none of its vCPUs runs.
    dying: Option<DomainEnd>,
}

/// What a running vCPU had to take when it entered, to tell whether something new
/// arrived for it since (then its CPU is kicked).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct EntrySig {
    /// Its `VcpuState::notified` count.
    notified: u64,
    /// The APIC vector it could take (timers raise vectors without notifying).
    apic: Option<u8>,
}

/// What the scheduler knows of one physical CPU.
#[derive(Clone, Copy, Debug, Default)]
struct CpuSched {
    /// (domain serial, vCPU) it runs.
    running: Option<(u64, usize)>,
    /// What that vCPU could take when it last entered the guest.
    sig: EntrySig,
    /// Kicked since that entry.
    kicked: bool,
    /// Halted with nothing to run.
    idle: bool,
}

/// A restart to build outside the lock (a bzImage takes seconds to decompress).
struct Rebuild {
    /// The ended domain's id.
    id: u16,
    /// The new domain's id (like xl, a restart is a new domain with the next free id:
    /// the old one may still be held by a zombie whose grants are mapped elsewhere).
    new_id: u16,
    config: crate::config::DomainConfig,
    restarts: u32,
}

/// Everything the CPUs share, behind the big lock.
pub struct Machine {
    bundle: &'static [u8],
    domains: Vec<Domain>,
    sched: Vec<DomSched>,
    grants: grant::GrantEngine,
    xs: crate::xenstore::Xenstore,
    /// Domains that ended while others still map their grants: their memory stays
    /// until the last mapping is gone (as Xen keeps granted pages alive).
    zombies: Vec<Domain>,
    /// Domains whose config says `preserve`: kept, not run, released at the end.
    preserved: Vec<Domain>,
    input: InputSwitch,
    outcome: Outcome,
    /// Round-robin position over (domain, vCPU) pairs.
    cursor: usize,
    /// Restarts being built outside the lock.
    building: usize,
    /// The id the next restarted domain gets.
    next_id: u16,
    /// A fatal error after the start: every CPU stops and the boot CPU reports it.
    fatal: Option<String>,
    cpus: [CpuSched; MAX_CPUS],
    next_serial: u64,
    free_before: u64,
    xs_entries_before: usize,
    started_ns: u64,
}

/// Runs every domain in `bundle` (`domains/*.cfg`, in name order, domids from 1) on
/// every CPU that is up (`host` is the boot CPU's state; the others join through
/// [`ap_main`]). `Err` is a fatal error: the message says what and how to fix.
pub fn run_bundle(bundle: &'static [u8], host: &HostCpu) -> Result<Outcome, String> {
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
    let mut xs = crate::xenstore::Xenstore::new();
    // what a toolstack creates at boot: the parent of every domain's home
    let home = crate::xenstore::Op::Mkdir {
        path: String::from("/local/domain"),
    };
    xs.request(crate::xenstore::PRIV_DOMID, 0, &home)
        .map_err(|e| format!("xenstore: cannot create /local/domain: {e:?}"))?;
    let xs_entries_before = xs.total_entries();
    let mut m = Machine {
        bundle,
        domains: Vec::new(),
        sched: Vec::new(),
        grants: grant::GrantEngine::new(),
        xs,
        zombies: Vec::new(),
        preserved: Vec::new(),
        input: InputSwitch::new(),
        outcome: Outcome { ok: 0, failed: 0 },
        cursor: 0,
        building: 0,
        next_id: cfgs.len() as u16 + 1,
        fatal: None,
        cpus: [CpuSched::default(); MAX_CPUS],
        next_serial: 1,
        free_before,
        xs_entries_before,
        started_ns: 0,
    };
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
        let d = Domain::build(id, config, bundle, host).map_err(|e| match e {
            BuildError::Kernel { path, error } => {
                format!("kernel '{path}' of domain '{name}' {error}")
            }
            BuildError::KernelImage { path, error } => {
                format!("kernel '{path}' of domain '{name}' {error}")
            }
            other => format!("domain '{name}': {other}"),
        })?;
        m.admit(d).map_err(|e| format!("domain '{name}': {e}"))?;
    }
    // start just before the first vCPU of the first domain
    m.cursor = m.slots().len().saturating_sub(1);
    m.started_ns = time::now_ns();
    let cpus = smp::count();
    log::info!(
        "scheduling {} domain(s) on {cpus} physical CPU(s), {} ms slices",
        m.domains.len(),
        TIME_SLICE_NS / 1_000_000
    );
    let machine = MACHINE.call_once(|| spin::Mutex::new(m));
    for i in smp::online().filter(|&i| i != 0) {
        smp::kick(i); // out of their wait for the machine
    }
    cpu_loop(machine, 0, host);

    // wait for the other CPUs to leave their loops (they are never inside a guest then)
    let t0 = time::now_ns();
    while CPUS_DONE.load(core::sync::atomic::Ordering::SeqCst) < cpus {
        core::hint::spin_loop();
        if time::now_ns() - t0 > 2_000_000_000 {
            log::warn!(
                "a CPU did not leave the scheduler within 2 s of the end: finishing without it"
            );
            break;
        }
    }
    let mut m = machine.lock();
    if let Some(msg) = m.fatal.take() {
        return Err(msg);
    }
    m.finish_run();
    Ok(m.outcome)
}

/// Where a secondary CPU goes once it is up (`host`: its own virtualisation state):
/// it waits for the boot CPU to publish the domains, schedules them with the others,
/// then halts.
pub fn ap_main(index: usize, host: HostCpu) -> ! {
    let machine = loop {
        if let Some(m) = MACHINE.get() {
            break m;
        }
        lapic::arm_ns(IDLE_MAX_NS / 10);
        lapic::wait_for_interrupt();
        lapic::disarm();
    };
    cpu_loop(machine, index, &host);
    crate::arch::x86::halt_forever()
}

/// The scheduler loop of CPU `index`: timers, consoles, xenstore, then the next
/// runnable vCPU for a slice, or a halt when there is none.
fn cpu_loop(machine: &'static spin::Mutex<Machine>, index: usize, host: &HostCpu) {
    let mut m = lock(machine, index);
    loop {
        if !crate::arch::stack::intact(index) {
            panic!("cpu{index} overflowed its stack (the canary at its bottom is overwritten)");
        }
        m.cpus[index].idle = false;
        if m.done() {
            m.kick_idle(index);
            break;
        }
        m.fire_timers();
        crate::devices::poll_faults();
        m.service_consoles(index == 0);
        m.service_stores();
        let picked = m.pick(index).map(|(di, vi)| {
            let serial = m.sched[di].serial;
            let cpu = m.domains[di].vcpus[vi]
                .take()
                .expect("a vCPU picked to run is in its domain");
            m.sched[di].vcpus[vi].running_on = Some(index);
            m.cpus[index].running = Some((serial, vi));
            (serial, vi, cpu)
        });
        // after this CPU took its vCPU: idle CPUs are kicked only for what is left
        m.after_changes(index);
        match picked {
            // the lock stays held from the pick to the guest entry, and from the
            // vCPU's return to the next pick: other CPUs never see a runnable vCPU
            // between two slices of this CPU
            Some((serial, vi, cpu)) => m = run_slice(machine, m, index, host, serial, vi, cpu),
            None => {
                let wait = m.idle_wait(index);
                m.cpus[index].idle = true;
                drop(m);
                if let Some(wait) = wait {
                    let t0 = time::now_ns();
                    lapic::arm_ns(wait);
                    lapic::wait_for_interrupt();
                    lapic::disarm();
                    smp::count_idle(index, time::now_ns() - t0);
                }
                m = lock(machine, index);
            }
        }
    }
    drop(m);
    CPUS_DONE.fetch_add(1, core::sync::atomic::Ordering::SeqCst);
}

/// The next slot after `cursor` (of `len`, wrapping) that `can_run` accepts: each slot
/// gets its turn before any gets a second one.
fn round_robin(len: usize, cursor: usize, mut can_run: impl FnMut(usize) -> bool) -> Option<usize> {
    (1..=len).map(|k| (cursor + k) % len).find(|&i| can_run(i))
}

/// Should the CPU running a vCPU that entered with `entry` be kicked, now that it looks
/// like `now` (`stop`: it must not go on running: blocked, down, or its domain ended)?
/// New events or IPIs (the notification count moved) and a different APIC vector to
/// take need an exit to be injected; the same state does not.
fn needs_kick(entry: EntrySig, now: EntrySig, stop: bool) -> bool {
    stop || now.notified != entry.notified || (now.apic.is_some() && now.apic != entry.apic)
}

/// Must the vCPU flush its TLB before entering on CPU `cpu`? Yes when it last ran on
/// another CPU (this one may hold stale translations of its ASID from before, and the
/// other one did the guest's own flushes since) or when its domain's nested page
/// tables changed since its last flush.
fn needs_flush(v: &VcpuSched, cpu: usize, tlb_gen: u64) -> bool {
    v.last_cpu != Some(cpu) || v.tlb_seen != tlb_gen
}

/// Takes the big lock on CPU `index`, counting the time spent waiting for it.
fn lock(
    machine: &'static spin::Mutex<Machine>,
    index: usize,
) -> spin::MutexGuard<'static, Machine> {
    if let Some(g) = machine.try_lock() {
        return g;
    }
    let t0 = time::now_ns();
    let g = machine.lock();
    smp::count_lock_wait(index, time::now_ns() - t0);
    g
}

/// Runs vCPU `vi` of the domain with `serial` on CPU `index` for up to one time slice,
/// then gives it back (and ends the domain if it ended). Called and returns with the
/// big lock held (`m`); lets go of it only while the guest runs (and while a restarted
/// domain is built).
fn run_slice(
    machine: &'static spin::Mutex<Machine>,
    mut m: spin::MutexGuard<'static, Machine>,
    index: usize,
    host: &HostCpu,
    serial: u64,
    vi: usize,
    mut cpu: Box<Vcpu>,
) -> spin::MutexGuard<'static, Machine> {
    smp::count_slice(index);
    cpu.load_on(host);
    let v = vi as u32;
    let now = time::now_ns();
    let slice_end = {
        let di = m.index_of(serial);
        m.sched[di].vcpus[vi].slices += 1;
        let core = &mut m.domains[di].core;
        xen::runstate_change(&mut core.xen.vcpus[vi], xen::RUNSTATE_RUNNING, now);
        if let Some(vector) = core.xen.vcpus[vi].sipi.take() {
            cpu.reset_real_mode(vector);
        }
        core.xen.vcpus[vi]
            .next_deadline()
            .map_or(now + TIME_SLICE_NS, |t| t.min(now + TIME_SLICE_NS))
    };
    let end = loop {
        let di = m.index_of(serial);
        m.tlb_sweep();
        if m.sched[di].dying.is_some() {
            break None;
        }
        let Machine {
            domains,
            sched,
            cpus,
            ..
        } = &mut *m;
        let (core, ds) = (&mut domains[di].core, &mut sched[di]);
        let vs = &mut ds.vcpus[vi];
        if needs_flush(vs, index, ds.tlb_gen) {
            // another CPU may hold stale translations of this vCPU's ASID, or this
            // one may hold translations from before a nested-page-table change
            cpu.flush_tlb();
            vs.tlb_seen = ds.tlb_gen;
        }
        vs.last_cpu = Some(index);
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
            break None;
        }
        cpus[index].sig = EntrySig {
            notified: core.xen.vcpus[vi].notified,
            apic: core.xen.vcpus[vi].apic.deliverable(),
        };
        cpus[index].kicked = false;
        let id = core.id;
        smp::entering_guest(index, id);
        drop(m);

        lapic::arm_ns(slice_end - now);
        let t0 = time::now_ns();
        let exit = cpu.run();
        let t1 = time::now_ns();
        lapic::disarm();
        smp::left_guest(index, t1 - t0);

        m = lock(machine, index);
        let di = m.index_of(serial);
        m.sched[di].vcpus[vi].guest_ns += t1 - t0;
        let Machine {
            domains, grants, ..
        } = &mut *m;
        let (before, rest) = domains.split_at_mut(di);
        let (d, after) = rest.split_first_mut().expect("di is in range");
        let mut others = crate::domain::Others {
            before,
            after,
            grants,
        };
        let core = &mut d.core;
        let flow = exits::handle(core, &mut others, v, &mut *cpu, exit);
        if let Flow::End(end) = flow {
            if let DomainEnd::Crashed(_) = end {
                let (code, i1, i2) = cpu.exit_info();
                log::debug!(
                    "d{}: last exit {} (code {code:#x} info1 {i1:#x} info2 {i2:#x})",
                    core.id,
                    exits::describe(&exit)
                );
                dump_vcpu(core.id, v, &cpu);
            }
            break Some(end);
        }
        let state_runnable = core.xen.vcpus[vi].state == RunState::Runnable;
        let store_kicked = core.store_kicked;
        let timer_due = core.xen.vcpus[vi]
            .next_deadline()
            .is_some_and(|t| t <= time::now_ns());
        m.after_changes(index);
        if !state_runnable || store_kicked || timer_due {
            // blocked, polling or down; or let the scheduler serve xenstore or fire
            // the timer now
            break None;
        }
    };
    // give the vCPU back
    let di = m.index_of(serial);
    {
        let core = &mut m.domains[di].core;
        let s = &mut core.xen.vcpus[vi];
        let new = match s.state {
            RunState::Runnable => xen::RUNSTATE_RUNNABLE,
            RunState::Down => xen::RUNSTATE_OFFLINE,
            _ => xen::RUNSTATE_BLOCKED,
        };
        xen::runstate_change(s, new, time::now_ns());
        xen::write_runstate(core, v, &*cpu);
    }
    m.domains[di].vcpus[vi] = Some(cpu);
    m.sched[di].vcpus[vi].running_on = None;
    m.cpus[index].running = None;
    let first_end = end.is_some() && m.sched[di].dying.is_none();
    if let Some(end) = end {
        if m.sched[di].dying.is_none() {
            m.sched[di].dying = Some(end);
        }
    }
    let last_out = m.sched[di].vcpus.iter().all(|s| s.running_on.is_none());
    if m.sched[di].dying.is_some() {
        if !last_out {
            if first_end {
                let elsewhere: Vec<String> = m.sched[di]
                    .vcpus
                    .iter()
                    .enumerate()
                    .filter_map(|(v, s)| s.running_on.map(|c| format!("vcpu{v} on cpu{c}")))
                    .collect();
                log::info!(
                    "d{} ended on cpu{index}: destroyed once its vCPUs running elsewhere stop ({})",
                    m.domains[di].core.id,
                    elsewhere.join(", ")
                );
            }
            m.after_changes(index); // the others see it dying and come back
            return m;
        }
        if let Some(rebuild) = m.end_domain(di) {
            m.building += 1;
            let bundle = m.bundle;
            drop(m);
            let built = Domain::build(rebuild.new_id, rebuild.config.clone(), bundle, host);
            m = lock(machine, index);
            m.building -= 1;
            let name = rebuild.config.name.clone();
            match built {
                Ok(mut fresh) => {
                    fresh.core.restarts = rebuild.restarts + 1;
                    let (id, new_id) = (rebuild.id, rebuild.new_id);
                    match m.admit(fresh) {
                        Ok(()) => log::info!(
                            "d{id} ({name}) restarted as d{new_id} (restart {})",
                            rebuild.restarts + 1
                        ),
                        Err(e) => m.fatal = Some(format!("restarting domain '{name}': {e}")),
                    }
                }
                Err(e) => m.fatal = Some(format!("restarting domain '{name}': {e}")),
            }
            m.after_changes(index);
        }
    }
    m
}

impl Machine {
    /// Every domain has ended (and no restart is being built), or a fatal error stops
    /// the run.
    fn done(&self) -> bool {
        self.fatal.is_some() || (self.domains.is_empty() && self.building == 0)
    }

    /// Adds a built domain: its grant table, its xenstore home, its scheduler entry.
    fn admit(&mut self, mut d: Domain) -> Result<(), String> {
        let id = d.core.id;
        self.grants
            .create_domain(
                id,
                crate::grant_glue::domain_config(),
                &mut crate::grant_glue::FramesOnly,
            )
            .map_err(|e| format!("no grant table: {e:?}"))?;
        introduce(&mut self.xs, &mut d).map_err(|e| format!("xenstore: {e:?}"))?;
        let serial = self.next_serial;
        self.next_serial += 1;
        self.sched.push(DomSched {
            serial,
            vcpus: alloc::vec![VcpuSched::default(); d.vcpus.len()],
            tlb_gen: 0,
            dying: None,
        });
        self.domains.push(d);
        Ok(())
    }

    /// The index of the domain with `serial` (it cannot go while one of its vCPUs runs).
    fn index_of(&self, serial: u64) -> usize {
        self.sched
            .iter()
            .position(|s| s.serial == serial)
            .expect("a domain stays while one of its vCPUs runs")
    }

    /// Every (domain, vCPU) pair, in round-robin order.
    fn slots(&self) -> Vec<(usize, usize)> {
        self.domains
            .iter()
            .enumerate()
            .flat_map(|(di, d)| (0..d.vcpus.len()).map(move |vi| (di, vi)))
            .collect()
    }

    /// Can vCPU `vi` of domain `di` be picked (waking it when an event waits)?
    fn can_run(&mut self, di: usize, vi: usize) -> bool {
        if self.sched[di].dying.is_some() || self.sched[di].vcpus[vi].running_on.is_some() {
            return false;
        }
        let core = &mut self.domains[di].core;
        match core.xen.vcpus[vi].state {
            RunState::Runnable => true,
            RunState::Down => false,
            RunState::Blocked | RunState::Polling { .. } => {
                let wake = core.event_deliverable(vi as u32);
                if wake {
                    core.xen.vcpus[vi].state = RunState::Runnable;
                }
                wake
            }
        }
    }

    /// The next runnable vCPU after the cursor that no CPU runs, round-robin over
    /// (domain, vCPU) pairs.
    fn pick(&mut self, _index: usize) -> Option<(usize, usize)> {
        let slots = self.slots();
        let next = round_robin(slots.len(), self.cursor, |i| {
            let (di, vi) = slots[i];
            self.can_run(di, vi)
        })?;
        self.cursor = next;
        Some(slots[next])
    }

    /// How long CPU `index` may sleep: until the earliest timer of a vCPU no CPU runs
    /// (`None`: something is due now). CPU 0 reads the console: while guests run on
    /// other CPUs it wakes every time slice, so typed input goes in as fast as on one
    /// CPU.
    fn idle_wait(&self, index: usize) -> Option<u64> {
        let wait = self.idle_wait_for_timers()?;
        if index == 0 && self.cpus.iter().any(|c| c.running.is_some()) {
            return Some(wait.min(TIME_SLICE_NS));
        }
        Some(wait)
    }

    fn idle_wait_for_timers(&self) -> Option<u64> {
        let now = time::now_ns();
        let next = self
            .domains
            .iter()
            .zip(&self.sched)
            .flat_map(|(d, ds)| {
                d.core
                    .xen
                    .vcpus
                    .iter()
                    .zip(&ds.vcpus)
                    .filter(|(_, vs)| vs.running_on.is_none())
                    .filter_map(|(s, _)| s.next_deadline())
            })
            .min();
        match next {
            Some(t) if t <= now => None,
            Some(t) => Some((t - now).min(IDLE_MAX_NS)),
            None => Some(IDLE_MAX_NS),
        }
    }

    /// Domains whose nested page tables changed get a new TLB generation; their vCPUs
    /// inside guests on other CPUs are kicked out and waited for.
    fn tlb_sweep(&mut self) {
        for (d, ds) in self.domains.iter_mut().zip(self.sched.iter_mut()) {
            if d.core.tlb_flush_needed {
                d.core.tlb_flush_needed = false;
                ds.tlb_gen += 1;
                smp::sync_domain(d.core.id);
            }
        }
    }

    /// After the shared state changed on CPU `me`: TLB generations, kicks for vCPUs
    /// running elsewhere that have something new to take (or must stop), and kicks for
    /// idle CPUs when a vCPU waits for a CPU.
    fn after_changes(&mut self, me: usize) {
        self.tlb_sweep();
        for c in smp::online().filter(|&c| c != me) {
            let cs = self.cpus[c];
            let Some((serial, vi)) = cs.running else {
                continue;
            };
            if cs.kicked || !smp::in_guest(c) {
                // a CPU outside its guest looks at the shared state before entering
                continue;
            }
            let Some(di) = self.sched.iter().position(|s| s.serial == serial) else {
                continue;
            };
            let s = &self.domains[di].core.xen.vcpus[vi];
            let now = EntrySig {
                notified: s.notified,
                apic: s.apic.deliverable(),
            };
            let stop = self.sched[di].dying.is_some() || s.state != RunState::Runnable;
            if needs_kick(cs.sig, now, stop) {
                self.cpus[c].kicked = true;
                smp::kick(c);
            }
        }
        self.kick_idle(me);
    }

    /// Kicks idle CPUs when the run is over or a vCPU waits for a CPU.
    fn kick_idle(&mut self, me: usize) {
        if !smp::online().any(|c| c != me && self.cpus[c].idle) {
            return;
        }
        let mut waiting = if self.done() { usize::MAX } else { 0 };
        if waiting == 0 {
            for di in 0..self.domains.len() {
                for vi in 0..self.domains[di].vcpus.len() {
                    if self.can_run(di, vi) {
                        waiting += 1;
                    }
                }
            }
        }
        for c in smp::online() {
            if waiting == 0 {
                break;
            }
            if c != me && self.cpus[c].idle {
                self.cpus[c].idle = false;
                smp::kick(c);
                waiting -= 1;
            }
        }
    }

    /// Wakes vCPUs whose timers are due, and raises their timer events.
    fn fire_timers(&mut self) {
        let now = time::now_ns();
        for d in self.domains.iter_mut() {
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

    /// Moves console output of every domain to the serial line, and (`input`: on CPU 0
    /// only) typed input to the domain with the input focus (three Ctrl-A in a row
    /// switch it, the hypervisor's debug keys included).
    fn service_consoles(&mut self, input: bool) {
        for d in self.domains.iter_mut() {
            if d.core.service_console() {
                d.core.notify_console();
            }
        }
        if !input {
            return;
        }
        let ids: Vec<u16> = self.domains.iter().map(|d| d.core.id).collect();
        for _ in 0..64 {
            let Some(b) = crate::console::read_byte() else {
                break;
            };
            for t in self.input.feed(b, &ids) {
                match t {
                    Typed::ToDomain(id, c) => {
                        if let Some(d) = self.domains.iter_mut().find(|d| d.core.id == id) {
                            d.core.console_input(&[c]);
                            d.core.notify_console();
                        }
                    }
                    Typed::Switched(Focus::Domain(id)) => {
                        log::info!("console input now goes to d{id} (Ctrl-A three times to switch)")
                    }
                    Typed::Switched(Focus::Hypervisor) => {
                        log::info!(
                            "console input now goes to the hypervisor: press 'h' for debug keys"
                        )
                    }
                    Typed::DebugKey(k) => self.debug_key(k),
                }
            }
        }
    }

    /// Serves the xenstore rings of domains that signalled their port or have watch
    /// events waiting.
    fn service_stores(&mut self) {
        service_stores(&mut self.domains, &mut self.xs);
    }

    /// The hypervisor's debug keys (as Xen's): state dumps on the console.
    fn debug_key(&self, key: u8) {
        let (domains, grants) = (&self.domains, &self.grants);
        match key {
            b'd' => {
                for (d, ds) in domains.iter().zip(&self.sched) {
                    let c = &d.core;
                    log::info!("d{} ({}): {} MiB, {} vCPU(s), restarted {} times", c.id, c.name(), c.config.memory_mib, d.vcpus.len(), c.restarts);
                    for (v, cpu) in d.vcpus.iter().enumerate() {
                        let s = &c.xen.vcpus[v];
                        let vs = &ds.vcpus[v];
                        let last = vs.last_cpu.map_or(String::from("never ran"), |p| {
                            format!("last ran on cpu{p} ({} slices, {} ms in the guest)", vs.slices, vs.guest_ns / 1_000_000)
                        });
                        match (cpu, vs.running_on) {
                            (_, Some(p)) => log::info!("  vcpu{v}: {:?}, running on cpu{p}, next timer {:?}", s.state, s.next_deadline()),
                            (Some(cpu), None) => log::info!("  vcpu{v}: {:?}, {last}, rip {:#x}, next timer {:?}", s.state, cpu.rip(), s.next_deadline()),
                            (None, None) => log::info!("  vcpu{v}: {:?}, {last}", s.state),
                        }
                    }
                }
            }
            b'r' => self.log_cpus(),
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
                "debug keys: d domains and vCPUs (where they run), r physical CPUs, e event channels, g grants, c exit and hypercall counters, m free memory, i IOMMU and assigned devices, h this help; Ctrl-A three times leaves"
            ),
        }
    }

    /// One line per physical CPU: slices, exits, time in guests and idle, kicks.
    fn log_cpus(&self) {
        let wall = time::now_ns().saturating_sub(self.started_ns).max(1);
        for i in smp::online() {
            let c = smp::counters(i);
            let running = match self.cpus[i].running {
                Some((serial, v)) => self
                    .sched
                    .iter()
                    .zip(&self.domains)
                    .find(|(s, _)| s.serial == serial)
                    .map_or(String::new(), |(_, d)| {
                        format!(", running d{} vcpu{v}", d.core.id)
                    }),
                None => String::new(),
            };
            let stack = crate::arch::stack::depth(i).map_or(String::new(), |(d, s)| {
                format!("; stack {} of {} KiB used", d.div_ceil(1024), s / 1024)
            });
            log::info!(
                "cpu{i} (apic id {}): {} slices, {} exits, in guests {} ms, idle {} ms, waiting for the lock {} ms, of {} ms; {} kicks received{running}{stack}",
                smp::apic_id(i),
                c.slices,
                c.exits,
                c.guest_ns / 1_000_000,
                c.idle_ns / 1_000_000,
                c.lock_wait_ns / 1_000_000,
                wall / 1_000_000,
                c.kicks
            );
        }
    }

    /// Tears down the domain at `di` (none of its vCPUs runs): reports its end,
    /// releases event channels, xenstore and grants, then destroys, preserves or keeps
    /// it as a zombie; returns what to rebuild when its config says restart.
    fn end_domain(&mut self, di: usize) -> Option<Rebuild> {
        let ds = self.sched.remove(di);
        let end = ds.dying.expect("only dying domains end");
        let mut d = self.domains.remove(di);
        let slots = self.slots().len();
        if slots > 0 {
            self.cursor %= slots;
        }
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
        close_interdomain(&mut d, &mut self.domains);
        let id = d.core.id;
        let n = self.xs.counts(id);
        log::info!(
            "d{id} xenstore: {} nodes, {} watches, {} transactions open at the end",
            n.entries,
            n.watches,
            n.transactions
        );
        if let Err(e) = self.xs.release(id) {
            log::warn!("d{id}: xenstore release: {e:?}");
        }
        if let Some(g) = self.grants.domain_counters(id) {
            log::info!(
                "d{id} grants: {} maps, {} unmaps, {} copies ({} bytes), {} mappings live at the end",
                g.maps, g.unmaps, g.copies, g.bytes_copied, g.live_mappings
            );
        }
        let mut host = crate::grant_glue::Host {
            cur: &mut d.core,
            before: &mut self.domains,
            after: &mut [],
            cpu: None,
        };
        let report = self.grants.destroy_domain(id, &mut host);
        let table_freed = report.is_none_or(|r| r.table_freed);
        let action = action_for(&d.core.config, &end);
        let vcpus: Vec<String> = ds
            .vcpus
            .iter()
            .enumerate()
            .filter(|(_, s)| s.slices > 0)
            .map(|(v, s)| {
                format!(
                    "vcpu{v} {} slices, {} ms in the guest, last on cpu{}",
                    s.slices,
                    s.guest_ns / 1_000_000,
                    s.last_cpu.unwrap_or(0)
                )
            })
            .collect();
        log::info!("d{id} scheduling: {}", vcpus.join("; "));
        let ok = report_end(&mut d, end);
        if action != Action::Restart {
            if ok {
                self.outcome.ok += 1;
            } else {
                self.outcome.failed += 1;
            }
        }
        let (config, restarts) = (d.core.config.clone(), d.core.restarts);
        if action == Action::Preserve {
            log::info!("d{id}: preserved (not destroyed, not run) as its config asks");
            self.preserved.push(d);
        } else if table_freed {
            d.destroy();
        } else {
            log::info!("d{id}: memory kept until the other domains unmap its grants");
            self.zombies.push(d);
        }
        let mut i = 0;
        while i < self.zombies.len() {
            if self.grants.table(self.zombies[i].core.id).is_none() {
                self.zombies.swap_remove(i).destroy();
            } else {
                i += 1;
            }
        }
        if action != Action::Restart {
            return None;
        }
        let new_id = self.next_id;
        if new_id >= abi::event_channel::DOMID_FIRST_RESERVED {
            self.fatal = Some(format!(
                "restarting domain '{}': no domain ids left (restarted {restarts} times)",
                config.name
            ));
            return None;
        }
        self.next_id += 1;
        Some(Rebuild {
            id,
            new_id,
            config,
            restarts,
        })
    }

    /// After the last domain: releases what is left, checks that every frame and
    /// xenstore entry came back, and prints the per-CPU counters.
    fn finish_run(&mut self) {
        // every mapper has ended, so every table is free now
        for z in self.zombies.drain(..).chain(self.preserved.drain(..)) {
            z.destroy();
        }
        self.log_cpus();
        let ran: Vec<String> = smp::online()
            .filter(|&i| smp::counters(i).slices > 0)
            .map(|i| format!("cpu{i}"))
            .collect();
        log::info!(
            "physical CPUs that ran guests: {} of {} ({})",
            ran.len(),
            smp::count(),
            ran.join(", ")
        );
        let overlap = smp::overlap_ns();
        log::info!(
            "guests ran on two or more physical CPUs at once: {}",
            if overlap > 0 {
                format!("yes, for {} ms", overlap / 1_000_000)
            } else {
                String::from("no")
            }
        );
        let xs_entries_after = self.xs.total_entries();
        if xs_entries_after == self.xs_entries_before {
            log::info!("xenstore back to {xs_entries_after} entries");
        } else {
            log::error!(
                "xenstore leak: {} entries before the domains, {xs_entries_after} after",
                self.xs_entries_before
            );
            self.outcome.failed += 1;
        }
        crate::domain::release_decompressed_kernels();
        let free_after = crate::frames::free_count();
        if free_after == self.free_before {
            log::info!("all domain memory returned: {free_after} free frames before and after");
        } else {
            log::error!(
                "frame leak: {} free frames before the domains, {free_after} after",
                self.free_before
            );
            self.outcome.failed += 1;
        }
    }
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

fn dump_vcpu(id: u16, v: u32, cpu: &Vcpu) {
    let p = cpu.paging();
    log::error!(
        "d{id} vcpu{v}: rip {:#x} rsp {:#x} rax {:#x} rbx {:#x} rcx {:#x} rdx {:#x} cr0 {:#x} cr3 {:#x} cr4 {:#x} efer {:#x} cr2 {:#x} exitintinfo {:#x}",
        cpu.rip(), cpu.reg(reg::RSP), cpu.reg(reg::RAX), cpu.reg(reg::RBX), cpu.reg(reg::RCX), cpu.reg(reg::RDX),
        p.cr0, p.cr3, p.cr4, p.efer, cpu.cr2(), cpu.exit_int_info()
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_robin_gives_every_runnable_slot_its_turn() {
        let runnable = [true, false, true, true];
        let mut cursor = runnable.len() - 1;
        let mut order = Vec::new();
        for _ in 0..6 {
            cursor = round_robin(runnable.len(), cursor, |i| runnable[i]).unwrap();
            order.push(cursor);
        }
        assert_eq!(order, [0, 2, 3, 0, 2, 3]);
        assert_eq!(round_robin(3, 0, |_| false), None);
        assert_eq!(round_robin(0, 0, |_| true), None);
        // the only runnable slot comes back to the same CPU at once
        assert_eq!(round_robin(3, 1, |i| i == 1), Some(1));
    }

    #[test]
    fn a_running_vcpu_is_kicked_only_for_something_new() {
        let entry = EntrySig {
            notified: 5,
            apic: Some(0xec),
        };
        assert!(!needs_kick(entry, entry, false));
        assert!(needs_kick(entry, entry, true), "it must stop");
        let event = EntrySig {
            notified: 6,
            ..entry
        };
        assert!(needs_kick(entry, event, false), "a new event or IPI");
        let vector = EntrySig {
            apic: Some(0xef),
            ..entry
        };
        assert!(needs_kick(entry, vector, false), "another vector to take");
        let taken = EntrySig {
            apic: None,
            ..entry
        };
        assert!(
            !needs_kick(entry, taken, false),
            "the guest took its vector"
        );
    }

    #[test]
    fn a_vcpu_flushes_after_moving_or_after_a_nested_table_change() {
        let v = VcpuSched {
            last_cpu: Some(1),
            tlb_seen: 4,
            ..VcpuSched::default()
        };
        assert!(!needs_flush(&v, 1, 4));
        assert!(needs_flush(&v, 0, 4), "moved to another CPU");
        assert!(needs_flush(&v, 1, 5), "nested page tables changed");
        assert!(needs_flush(&VcpuSched::default(), 0, 0), "first entry");
    }
}
