//! Domains: a guest's memory, nested page tables, vCPUs, console and counters, built
//! from an xl.cfg description and the boot bundle.

use alloc::boxed::Box;
use alloc::collections::BTreeSet;
use alloc::format;
use alloc::string::String;
use alloc::vec::Vec;

use abi::start_info::{
    HvmMemmapEntry, HvmModlistEntry, HvmStartInfo, HVM_START_MAGIC, MEMMAP_TYPE_RAM,
};

use crate::arch::cpu::{HostCpu, NestedTable, Vcpu};
use crate::arch::phys::HostPhysMem;
use crate::arch::svm::PvhEntry;
use crate::config::DomainConfig;
use crate::loader;
use crate::memory::{GuestMemory, CHUNK};
use crate::paging::{PageSize, Perms};

/// Counters kept per domain.
#[derive(Default, Debug)]
pub struct Counters {
    /// Exits by kind: hypercall, cpuid, io, msr, npf, hlt, xsetbv, intr, other.
    pub exits: [u64; 9],
    /// Hypercalls by number.
    pub hypercalls: alloc::collections::BTreeMap<u64, u64>,
    /// Bytes written to the debug port.
    pub debug_port_bytes: u64,
    /// Port I/O exits by port.
    pub io_ports: alloc::collections::BTreeMap<u16, u64>,
    /// Reads from ports nothing decodes.
    pub unclaimed_port_reads: u64,
    /// Emulated reads/writes of unbacked guest-physical memory.
    pub unbacked_reads: u64,
    /// See `unbacked_reads`.
    pub unbacked_writes: u64,
    /// #GP injected for an MSR access (last MSR number).
    pub msr_gp_injected: u64,
    /// Last MSR that got a #GP.
    pub last_gp_msr: Option<u32>,
    /// Test checks passed / failed.
    pub checks_passed: u32,
    /// See `checks_passed`.
    pub checks_failed: u32,
}

/// How a domain ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DomainEnd {
    /// SCHEDOP_shutdown (or a halt with interrupts off, which Xen treats as poweroff).
    Shutdown(u32),
    /// The domain was stopped for a fault; the text says what happened.
    Crashed(String),
}

/// Everything of a domain except its vCPUs (so exit handlers can borrow both).
pub struct DomainCore {
    /// Domain id.
    pub id: u16,
    /// Its configuration.
    pub config: DomainConfig,
    /// Guest RAM.
    pub mem: GuestMemory,
    /// Nested page tables mirroring `mem`.
    pub npt: NestedTable,
    /// Xen state: shared_info, vCPU placement and timers, HVM parameters.
    pub xen: crate::xen::XenDomain,
    /// Event channels: ports and bindings.
    pub evtchn: crate::evtchn::EventChannels,
    /// FIFO event-channel state once the guest chose that ABI (`None`: 2-level).
    pub fifo: Option<crate::evtchn_fifo::FifoState>,
    /// Counters.
    pub counters: Counters,
    /// The ramdisk as loaded: (guest-physical address, length, FNV-1a of its bytes).
    pub ramdisk: Option<(u64, u64, u64)>,
    /// Guest-physical address of the console ring (`struct xencons_interface`).
    pub console_ring: u64,
    /// Guest-physical address of the xenstore ring (`struct xenstore_domain_interface`).
    pub store_ring: u64,
    /// The guest signalled its xenstore port: the ring needs service.
    pub store_kicked: bool,
    /// The guest's E820 memory map: (address, size, type).
    pub e820: Vec<(u64, u64, u32)>,
    /// How many times this domain was restarted (`on_reboot`/`on_crash = "restart"`).
    pub restarts: u32,
    /// The nested page tables changed: flush guest TLBs at the next entry.
    pub tlb_flush_needed: bool,
    /// Things already logged once (unknown hypercalls, MSRs, ports).
    logged: BTreeSet<(u8, u64)>,
    /// The PCI configuration address latch (port 0xcf8) of a domain owning devices.
    pub pci_cf8: u32,
}

/// The other domains, while one domain's exit is handled (for interdomain event
/// channels and grants).
pub struct Others<'a> {
    /// Domains before the current one.
    pub before: &'a mut [Domain],
    /// Domains after it.
    pub after: &'a mut [Domain],
    /// The grant-table engine (every domain's grant table and maptrack).
    pub grants: &'a mut grant::GrantEngine,
}

impl Others<'_> {
    /// Domain `id`, if it is running.
    pub fn get(&mut self, id: u16) -> Option<&mut DomainCore> {
        self.before
            .iter_mut()
            .chain(self.after.iter_mut())
            .map(|d| &mut d.core)
            .find(|c| c.id == id)
    }
}

/// A domain.
pub struct Domain {
    /// Memory, tables, counters.
    pub core: DomainCore,
    /// Virtual CPUs (vCPU 0 runs first; secondary vCPUs wait for the guest to start
    /// them); `None` while the scheduler runs one on some physical CPU.
    pub vcpus: Vec<Option<Box<Vcpu>>>,
}

/// Why a domain could not be built. Printed after "domain '<name>': ".
#[derive(Debug)]
pub enum BuildError {
    /// A file the config names is not in the boot bundle.
    MissingFile { what: &'static str, path: String },
    /// The kernel is not a loadable PVH image.
    KernelImage {
        /// The kernel's path in the bundle.
        path: String,
        /// What is wrong with it.
        error: crate::bzimage::BzImageError,
    },
    /// The kernel is not a loadable PVH ELF.
    Kernel {
        path: String,
        error: loader::LoadError,
    },
    /// Not enough memory.
    OutOfMemory { wanted: u64, free: u64 },
    /// The ramdisk or boot information does not fit in the domain's memory.
    TooSmall {
        what: &'static str,
        need: u64,
        have: u64,
    },
    /// Nested page tables could not be built.
    Paging(String),
    /// A `pci = [...]` device cannot be given to the domain.
    Device(String),
}

impl core::fmt::Display for BuildError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            BuildError::MissingFile { what, path } => {
                write!(f, "{what} '{path}' is not in the boot bundle")
            }
            BuildError::Kernel { path, error } => write!(f, "kernel '{path}' {error}"),
            BuildError::KernelImage { path, error } => write!(f, "kernel '{path}' {error}"),
            BuildError::OutOfMemory { wanted, free } => write!(
                f,
                "needs {} MiB but only {} MiB are free: lower `memory` or give the machine more",
                wanted >> 20,
                free >> 20
            ),
            BuildError::TooSmall { what, need, have } => write!(
                f,
                "{what} needs memory up to {need:#x} but the domain has {} MiB: raise `memory`",
                have >> 20
            ),
            BuildError::Paging(e) => write!(f, "nested page tables: {e}"),
            BuildError::Device(e) => write!(f, "PCI device assignment: {e}"),
        }
    }
}

/// Bytes at the top of a domain's memory reserved for ACPI tables (first 48 KiB) and
/// special pages.
pub const SPECIAL_AREA: u64 = 64 * 1024;
/// Offset of the console ring page in the special area.
pub const CONSOLE_PAGE_OFFSET: u64 = 0xe000;
/// Offset of the xenstore ring page in the special area.
pub const STORE_PAGE_OFFSET: u64 = 0xf000;

fn page_up(x: u64) -> u64 {
    x.next_multiple_of(4096)
}

impl From<crate::memory::OutOfMemory> for BuildError {
    fn from(e: crate::memory::OutOfMemory) -> BuildError {
        BuildError::OutOfMemory {
            wanted: e.wanted,
            free: e.free,
        }
    }
}

/// A bzImage payload decompressed once for the run (see [`release_decompressed_kernels`]).
struct DecompressedKernel {
    /// Address and length of the compressed payload inside the boot bundle.
    key: (usize, usize),
    buf: crate::memory::ScratchBuffer,
    len: usize,
}

/// Decompressed kernels, kept so that a restarted domain (or a second domain with the
/// same kernel file) is built without decompressing again: Debian's kernel takes ~5 s
/// to decompress under QEMU TCG, and a build stalls every other domain on this CPU.
static DECOMPRESSED: spin::Mutex<Vec<DecompressedKernel>> = spin::Mutex::new(Vec::new());

/// Frees the decompressed kernels (when no domain can be built any more); returns how
/// many there were.
pub fn release_decompressed_kernels() -> usize {
    let mut cache = DECOMPRESSED.lock();
    let n = cache.len();
    cache.clear();
    n
}

impl Domain {
    /// Builds a domain from `config`, taking files from the boot `bundle`: allocates
    /// memory, loads the PVH kernel (and ramdisk), writes `hvm_start_info`, builds the
    /// nested page tables and vCPU 0 at the kernel's PVH entry.
    pub fn build(
        id: u16,
        config: DomainConfig,
        bundle: &[u8],
        cpu: &HostCpu,
    ) -> Result<Domain, BuildError> {
        Domain::build_with(id, config, bundle, cpu, None)
    }

    /// [`Domain::build`] in guest memory allocated beforehand (zeroed, `memory_mib` of
    /// the config: see [`GuestMemory::start_allocation`]).
    pub fn build_in(
        id: u16,
        config: DomainConfig,
        bundle: &[u8],
        cpu: &HostCpu,
        mem: GuestMemory,
    ) -> Result<Domain, BuildError> {
        Domain::build_with(id, config, bundle, cpu, Some(mem))
    }

    fn build_with(
        id: u16,
        config: DomainConfig,
        bundle: &[u8],
        cpu: &HostCpu,
        mem: Option<GuestMemory>,
    ) -> Result<Domain, BuildError> {
        let started = crate::time::now_ns();
        let find = |what: &'static str, path: &str| match crate::bundle::find(bundle, path) {
            Ok(Some(d)) => Ok(d),
            _ => Err(BuildError::MissingFile {
                what,
                path: path.into(),
            }),
        };
        let kernel_file = find("kernel", &config.kernel)?;
        let kerr = |error| BuildError::Kernel {
            path: config.kernel.clone(),
            error,
        };
        let imgerr = |error| BuildError::KernelImage {
            path: config.kernel.clone(),
            error,
        };
        // What Xen users pass as `kernel =`: an ELF, or a bzImage whose payload Xen's
        // PVH loader decompresses itself (into frames outside the heap: 66 MB for
        // Debian's kernel).
        let mut cache = DECOMPRESSED.lock();
        let kernel: &[u8] = match crate::bzimage::identify(kernel_file) {
            Ok(crate::bzimage::KernelFormat::Elf(elf)) => elf,
            Ok(crate::bzimage::KernelFormat::BzImage {
                payload,
                compression,
                decompressed_len,
            }) => {
                // The bundle does not change during a run: the payload's address and
                // length identify it.
                let key = (payload.as_ptr() as usize, payload.len());
                let i = match cache.iter().position(|k| k.key == key) {
                    Some(i) => i,
                    None => {
                        let t0 = crate::time::now_ns();
                        let mut buf = crate::memory::ScratchBuffer::new(decompressed_len).ok_or(
                            BuildError::OutOfMemory {
                                wanted: decompressed_len as u64,
                                free: crate::frames::free_count() * 4096,
                            },
                        )?;
                        let n =
                            crate::bzimage::decompress(payload, compression, buf.as_mut_slice())
                                .map_err(imgerr)?;
                        log::info!(
                            "d{id}: kernel '{}' is a bzImage with a {} payload: {} -> {} bytes in {} ms \
                             (kept for restarts and other domains booting it)",
                            config.kernel,
                            compression.name(),
                            payload.len(),
                            n,
                            (crate::time::now_ns() - t0) / 1_000_000
                        );
                        cache.push(DecompressedKernel { key, buf, len: n });
                        cache.len() - 1
                    }
                };
                &cache[i].buf.as_slice()[..cache[i].len]
            }
            Err(crate::bzimage::BzImageError::NotAKernel { .. }) => kernel_file,
            Err(e) => return Err(imgerr(e)),
        };
        let plan = loader::parse_pvh(kernel).map_err(kerr)?;
        let size = config.memory_mib << 20;
        let mut mem = match mem {
            Some(m) if m.size() == size => m,
            Some(m) => {
                return Err(BuildError::Paging(format!(
                    "memory allocated beforehand has {} bytes, the config asks for {size}",
                    m.size()
                )))
            }
            None => GuestMemory::allocate(size)?,
        };
        if size < 2 * SPECIAL_AREA {
            return Err(BuildError::TooSmall {
                what: "the domain",
                need: 2 * SPECIAL_AREA,
                have: size,
            });
        }
        // The top of guest memory holds what a toolstack would put there: ACPI tables
        // and the console ring (reserved in the E820 map); the rest is RAM.
        let ram_end = size - SPECIAL_AREA;
        loader::load(&plan, kernel, &mut mem, ram_end).map_err(kerr)?;

        // Boot information goes in the pages after the kernel (and ramdisk): the
        // module list, start_info, memory map and command line, all below 1 GiB.
        let mut next = page_up(plan.end);
        let mut modules = Vec::new();
        let mut ramdisk = None;
        if let Some(path) = &config.ramdisk {
            let rd = find("ramdisk", path)?;
            let end = next + rd.len() as u64;
            if end > ram_end || !mem.write(next, rd) {
                return Err(BuildError::TooSmall {
                    what: "ramdisk",
                    need: end,
                    have: size,
                });
            }
            ramdisk = Some((next, rd.len() as u64, abi::ferro::fnv1a64(rd)));
            modules.push(HvmModlistEntry {
                paddr: next,
                size: rd.len() as u64,
                cmdline_paddr: 0,
                reserved: 0,
            });
            next = page_up(end);
        }
        let info_gpa = next;
        let memmap = [
            HvmMemmapEntry {
                addr: 0,
                size: ram_end,
                type_: MEMMAP_TYPE_RAM,
                reserved: 0,
            },
            HvmMemmapEntry {
                addr: ram_end,
                size: SPECIAL_AREA,
                type_: abi::start_info::MEMMAP_TYPE_RESERVED,
                reserved: 0,
            },
        ];
        let modlist_gpa = info_gpa + 64;
        let memmap_gpa = modlist_gpa + 32 * modules.len() as u64;
        let cmdline_gpa = memmap_gpa + 24 * memmap.len() as u64;
        let cmdline = config.cmdline.as_bytes();
        let info_end = cmdline_gpa + cmdline.len() as u64 + 1;
        if info_end > ram_end.min(1 << 30) {
            return Err(BuildError::TooSmall {
                what: "boot information",
                need: info_end,
                have: size,
            });
        }
        // ACPI tables (hardware-reduced, a MADT entry per vCPU) at the start of the
        // reserved area.
        let acpi = crate::guest_acpi::build(ram_end, config.vcpus.max(1), false);
        if acpi.tables.len() as u64 > CONSOLE_PAGE_OFFSET || !mem.write(ram_end, &acpi.tables) {
            return Err(BuildError::TooSmall {
                what: "ACPI tables",
                need: ram_end + acpi.tables.len() as u64,
                have: size,
            });
        }
        let info = HvmStartInfo {
            magic: HVM_START_MAGIC,
            version: 1,
            flags: 0,
            nr_modules: modules.len() as u32,
            modlist_paddr: if modules.is_empty() { 0 } else { modlist_gpa },
            cmdline_paddr: cmdline_gpa,
            rsdp_paddr: acpi.rsdp_gpa,
            memmap_paddr: memmap_gpa,
            memmap_entries: memmap.len() as u32,
            reserved: 0,
        };
        let mut blob = Vec::new();
        blob.extend_from_slice(&struct_bytes_start_info(&info));
        blob.resize(64, 0);
        for m in &modules {
            for v in [m.paddr, m.size, m.cmdline_paddr, m.reserved] {
                blob.extend_from_slice(&v.to_le_bytes());
            }
        }
        for e in &memmap {
            blob.extend_from_slice(&e.addr.to_le_bytes());
            blob.extend_from_slice(&e.size.to_le_bytes());
            blob.extend_from_slice(&e.type_.to_le_bytes());
            blob.extend_from_slice(&e.reserved.to_le_bytes());
        }
        blob.extend_from_slice(cmdline);
        blob.push(0);
        if !mem.write(info_gpa, &blob) {
            return Err(BuildError::TooSmall {
                what: "boot information",
                need: info_end,
                have: size,
            });
        }

        let mut pm = HostPhysMem;
        let mut npt = cpu
            .nested_table(&mut pm)
            .map_err(|e| BuildError::Paging(format!("{e}")))?;
        let rwx = Perms::ALL;
        for e in mem.extents() {
            let max = if e.gpa % CHUNK == 0 && e.hpa % CHUNK == 0 {
                PageSize::Size2M
            } else {
                PageSize::Size4K
            };
            npt.map_range(&mut pm, e.gpa, e.hpa, e.len, rwx, max)
                .map_err(|e| BuildError::Paging(format!("{e}")))?;
        }

        let mut xen = crate::xen::XenDomain::new(&mut mem, config.vcpus.max(1), 0).ok_or(
            BuildError::OutOfMemory {
                wanted: 4096,
                free: crate::frames::free_count() * 4096,
            },
        )?;
        let console_gpa = ram_end + CONSOLE_PAGE_OFFSET;
        xen.params[crate::xen::param::CONSOLE_PFN as usize] = console_gpa >> 12;
        let mut evtchn = crate::evtchn::EventChannels::new(
            id,
            config.vcpus.max(1),
            crate::evtchn::DEFAULT_MAX_PORTS,
        );
        let console_port = evtchn
            .alloc_unbound_for_hypervisor()
            .map_err(|_| BuildError::Paging(String::from("no event channel for the console")))?;
        xen.params[crate::xen::param::CONSOLE_EVTCHN as usize] = u64::from(console_port);
        let store_gpa = ram_end + STORE_PAGE_OFFSET;
        let store_port = evtchn
            .alloc_unbound_for_hypervisor()
            .map_err(|_| BuildError::Paging(String::from("no event channel for xenstore")))?;
        xen.params[crate::xen::param::STORE_PFN as usize] = store_gpa >> 12;
        xen.params[crate::xen::param::STORE_EVTCHN as usize] = u64::from(store_port);
        let entry = PvhEntry {
            entry: plan.entry,
            start_info: info_gpa,
        };
        // Devices last (nothing after this can fail): their DMA goes through an IOMMU
        // domain mirroring this memory, their registers are mapped at their host
        // addresses, above the domain's memory.
        if !config.pci.is_empty() {
            let bdfs: Vec<iommu::pci::Bdf> = config
                .pci
                .iter()
                .map(|&(b, d, f)| iommu::pci::Bdf::new(b, d, f))
                .collect();
            let ram: Vec<(u64, u64, u64)> = mem
                .extents()
                .iter()
                .map(|e| (e.gpa, e.hpa, e.len))
                .collect();
            let mmio = crate::devices::assign(id, &bdfs, &ram).map_err(BuildError::Device)?;
            // Same rights as RAM: the host runs without EFER.NXE, so an NX bit in a
            // nested entry would be a reserved bit (every access a nested page fault).
            let io = Perms::ALL;
            for r in &mmio {
                let mapped = if r.base < size {
                    Err(format!(
                        "device memory {:#x}+{:#x} overlaps the domain's {} MiB of memory: give the domain less memory",
                        r.base, r.len, config.memory_mib
                    ))
                } else {
                    npt.map_range(&mut pm, r.base, r.base, r.len, io, PageSize::Size4K)
                        .map_err(|e| {
                            format!("mapping device memory {:#x}+{:#x}: {e}", r.base, r.len)
                        })
                };
                if let Err(e) = mapped {
                    crate::devices::release(id);
                    return Err(BuildError::Device(e));
                }
                log::info!(
                    "d{id}: device memory {:#x}+{:#x} mapped at the same guest address",
                    r.base,
                    r.len
                );
            }
        }
        let vcpus = (0..config.vcpus.max(1))
            .map(|i| {
                Some(Box::new(Vcpu::new_pvh(
                    cpu,
                    u32::from(id) * 256 + i + 1,
                    &npt,
                    &entry,
                )))
            })
            .collect();
        log::info!(
            "d{id} ({}): {} MiB, {} vCPU(s), kernel '{}' entry {:#x}, start_info at {:#x}, cmdline \"{}\" (built in {} ms)",
            config.name,
            config.memory_mib,
            config.vcpus,
            config.kernel,
            plan.entry,
            info_gpa,
            config.cmdline,
            (crate::time::now_ns() - started) / 1_000_000
        );
        Ok(Domain {
            core: DomainCore {
                id,
                config,
                mem,
                npt,
                xen,
                evtchn,
                fifo: None,
                counters: Counters::default(),
                ramdisk,
                tlb_flush_needed: false,
                restarts: 0,
                console_ring: console_gpa,
                store_ring: store_gpa,
                store_kicked: true,
                e820: memmap.iter().map(|e| (e.addr, e.size, e.type_)).collect(),
                logged: BTreeSet::new(),
                pci_cf8: 0,
            },
            vcpus,
        })
    }

    /// Releases the domain's memory and page tables.
    pub fn destroy(self) {
        let Domain { core, vcpus } = self;
        drop(vcpus);
        // Devices first: no DMA may reach the memory freed below.
        crate::devices::release(core.id);
        core.npt.destroy(&mut HostPhysMem);
        drop(core.mem);
    }
}

fn struct_bytes_start_info(i: &HvmStartInfo) -> [u8; 56] {
    let mut b = [0u8; 56];
    b[0..4].copy_from_slice(&i.magic.to_le_bytes());
    b[4..8].copy_from_slice(&i.version.to_le_bytes());
    b[8..12].copy_from_slice(&i.flags.to_le_bytes());
    b[12..16].copy_from_slice(&i.nr_modules.to_le_bytes());
    b[16..24].copy_from_slice(&i.modlist_paddr.to_le_bytes());
    b[24..32].copy_from_slice(&i.cmdline_paddr.to_le_bytes());
    b[32..40].copy_from_slice(&i.rsdp_paddr.to_le_bytes());
    b[40..48].copy_from_slice(&i.memmap_paddr.to_le_bytes());
    b[48..52].copy_from_slice(&i.memmap_entries.to_le_bytes());
    b
}

impl DomainCore {
    /// Prints guest console output with the domain prefix.
    pub fn console_write(&mut self, bytes: &[u8]) {
        crate::console::guest_output(self.id, bytes);
    }

    /// Ends this domain's console line if it is left open (before verdict lines).
    pub fn flush_console_if_pending(&mut self) {
        crate::console::close_open_line();
    }

    /// True the first time `(kind, key)` is seen: for log-once messages.
    pub fn first_time(&mut self, kind: u8, key: u64) -> bool {
        self.logged.insert((kind, key))
    }

    /// Maps guest frame `gfn` to host frame `hpa` (one of the domain's special frames)
    /// in both the guest-physical view and the nested page tables, replacing RAM there.
    pub fn map_special(&mut self, gfn: u64, hpa: u64) -> Result<(), crate::paging::MapError> {
        let mut pm = HostPhysMem;
        let gpa = gfn << 12;
        if self.npt.translate(&pm, gpa).is_some() {
            self.npt.unmap(&mut pm, gpa, PageSize::Size4K)?;
        }
        self.npt
            .map(&mut pm, gpa, hpa, PageSize::Size4K, Perms::ALL)?;
        let rwx = Perms::ALL;
        match self.mem.overlay(gfn, hpa) {
            None => return Err(crate::paging::MapError::NotMapped),
            Some(Some(old)) => {
                // the frame moved: its old place shows what is underneath again
                self.npt.unmap(&mut pm, old << 12, PageSize::Size4K)?;
                if let Some(ram) = self.mem.ram_frame(old) {
                    self.npt
                        .map(&mut pm, old << 12, ram, PageSize::Size4K, rwx)?;
                }
            }
            Some(None) => {}
        }
        self.tlb_flush_needed = true;
        Ok(())
    }

    /// A timer of vCPU `v` fired: raise its VIRQ_TIMER (once event channels exist,
    /// see `evtchn`) and make a blocked vCPU runnable.
    pub fn timer_fired(&mut self, v: u32) {
        let virq = abi::event_channel::VIRQ_TIMER;
        if let Some(r) = self.evtchn_op(|ch, m| ch.raise_virq(virq, v, m)) {
            let port = self.evtchn.virq_port(virq, v).unwrap_or(0);
            self.apply_raise(port, r);
        }
    }

    /// The vector to inject into vCPU `v` now: its event-channel upcall is pending and
    /// a callback vector is set up.
    pub fn pending_upcall(&self, v: u32) -> Option<u8> {
        let vector = self.xen.callback_vector(v)?;
        self.xen.upcall_pending(&self.mem, v).then_some(vector)
    }

    /// Marks local event-channel `port` pending (2-level delivery) and wakes the vCPU
    /// it is bound to.
    pub fn raise_port(&mut self, port: u32) {
        if let Some(r) = self.evtchn_op(|ch, m| ch.hypervisor_notify(port, m)) {
            self.apply_raise(port, r);
        }
    }

    /// Marks local port `port` pending for an event sent by another domain, and wakes
    /// its vCPU.
    pub fn deliver_port(&mut self, port: u32) {
        let r = self.evtchn_op(|ch, m| ch.set_pending(port, m));
        self.apply_raise(port, r);
    }

    /// Maps another domain's frame `hpa` (a granted page) at guest frame `gfn`, in the
    /// nested page tables and the hypervisor's view; read-only when asked.
    pub fn map_foreign(
        &mut self,
        gfn: u64,
        hpa: u64,
        readonly: bool,
    ) -> Result<(), crate::paging::MapError> {
        let mut pm = HostPhysMem;
        let gpa = gfn << 12;
        if !self.mem.map_foreign(gfn, hpa, readonly) {
            return Err(crate::paging::MapError::AlreadyMapped);
        }
        if self.npt.translate(&pm, gpa).is_some() {
            if let Err(e) = self.npt.unmap(&mut pm, gpa, PageSize::Size4K) {
                self.mem.unmap_foreign(gfn, hpa);
                return Err(e);
            }
        }
        let perms = if readonly {
            Perms {
                write: false,
                ..Perms::ALL
            }
        } else {
            Perms::ALL
        };
        if let Err(e) = self.npt.map(&mut pm, gpa, hpa, PageSize::Size4K, perms) {
            self.mem.unmap_foreign(gfn, hpa);
            return Err(e);
        }
        self.tlb_flush_needed = true;
        Ok(())
    }

    /// Removes the grant mapping of `hpa` at `gfn` (RAM that was there shows again).
    /// The caller flushes before the grant is released.
    pub fn unmap_foreign(&mut self, gfn: u64, hpa: u64) -> Result<(), crate::paging::MapError> {
        let mut pm = HostPhysMem;
        if !self.mem.unmap_foreign(gfn, hpa) {
            return Err(crate::paging::MapError::NotMapped);
        }
        let gpa = gfn << 12;
        self.npt.unmap(&mut pm, gpa, PageSize::Size4K)?;
        if let Some(ram) = self.mem.ram_frame(gfn) {
            self.npt
                .map(&mut pm, gpa, ram, PageSize::Size4K, Perms::ALL)?;
        }
        self.tlb_flush_needed = true;
        Ok(())
    }

    /// Runs an event-channel operation against the guest memory of the domain's
    /// current ABI (2-level bitmaps, or FIFO event words and queues), then wakes or
    /// interrupts the vCPUs for every event the FIFO side raised.
    pub fn evtchn_op<R>(
        &mut self,
        f: impl FnOnce(&mut crate::evtchn::EventChannels, &mut dyn crate::evtchn::EventMemory) -> R,
    ) -> R {
        let (r, raised) = match &mut self.fifo {
            None => {
                let mut m = crate::xen::GuestEventMemory {
                    xen: &self.xen,
                    mem: &mut self.mem,
                };
                (f(&mut self.evtchn, &mut m), Vec::new())
            }
            Some(fifo) => {
                let mut words = crate::xen::GuestFifoMemory {
                    xen: &self.xen,
                    mem: &mut self.mem,
                };
                let mut m = crate::evtchn_fifo::FifoEventMemory::new(fifo, &mut words);
                let r = f(&mut self.evtchn, &mut m);
                let ch = &self.evtchn;
                (r, m.finish(|p| ch.port_vcpu(p)))
            }
        };
        for (port, raise) in raised {
            self.apply_raise(port, raise);
        }
        r
    }

    /// Is event `port` pending (for SCHEDOP_poll)?
    pub fn port_pending(&mut self, port: u32) -> bool {
        match &self.fifo {
            None => {
                let m = crate::xen::GuestEventMemory {
                    xen: &self.xen,
                    mem: &mut self.mem,
                };
                crate::evtchn::EventMemory::is_pending(&m, port)
            }
            Some(fifo) => {
                let words = crate::xen::GuestFifoMemory {
                    xen: &self.xen,
                    mem: &mut self.mem,
                };
                fifo.is_pending(port, &words)
            }
        }
    }

    /// Wakes whoever a newly pending event concerns: the vCPU that needs the upcall,
    /// and vCPUs polling the port.
    pub fn apply_raise(&mut self, port: u32, r: crate::evtchn::Raise) {
        use crate::xen::RunState;
        if let Some(v) = r.upcall {
            if let Some(s) = self.xen.vcpus.get_mut(v as usize) {
                s.notified += 1;
                // HVMOP_set_evtchn_upcall_vector: an edge into the local APIC (the
                // guest acknowledges it with an EOI), as Xen's vlapic_set_irq.
                if let Some(vector) = s.upcall_vector {
                    s.apic.raise(vector);
                }
                if s.state == RunState::Blocked {
                    s.state = RunState::Runnable;
                }
            }
        }
        if r.newly_pending {
            for s in self.xen.vcpus.iter_mut() {
                if let RunState::Polling { ports, .. } = &s.state {
                    if ports.contains(&port) {
                        s.state = RunState::Runnable;
                    }
                }
            }
        }
    }

    /// Would vCPU `v` take an event if it ran now (wakes blocked vCPUs)?
    pub fn event_deliverable(&self, v: u32) -> bool {
        self.pending_upcall(v).is_some()
            || self
                .xen
                .vcpus
                .get(v as usize)
                .is_some_and(|s| s.apic.deliverable().is_some())
    }

    /// Delivers an IPI vCPU `from` sent through its APIC.
    pub fn send_ipi(&mut self, from: u32, ipi: crate::vlapic::Ipi) {
        use crate::vlapic::{Dest, Ipi};
        let n = self.xen.vcpus.len() as u32;
        let targets = |dest: Dest| -> Vec<u32> {
            match dest {
                Dest::One(id) => (id < n).then_some(id).into_iter().collect(),
                Dest::AllIncludingSelf => (0..n).collect(),
                Dest::AllButSelf => (0..n).filter(|&v| v != from).collect(),
            }
        };
        match ipi {
            Ipi::Fixed { vector, dest } => {
                for t in targets(dest) {
                    let s = &mut self.xen.vcpus[t as usize];
                    s.notified += 1;
                    s.apic.raise(vector);
                    if s.state == crate::xen::RunState::Blocked {
                        s.state = crate::xen::RunState::Runnable;
                    }
                }
            }
            Ipi::Init(dest) => {
                for t in targets(dest).into_iter().filter(|&t| t != 0) {
                    let s = &mut self.xen.vcpus[t as usize];
                    s.state = crate::xen::RunState::Down;
                    s.wait_for_sipi = true;
                }
            }
            Ipi::Startup { vector, dest } => {
                for t in targets(dest) {
                    let s = &mut self.xen.vcpus[t as usize];
                    if s.wait_for_sipi {
                        s.wait_for_sipi = false;
                        s.sipi = Some(vector);
                        s.apic = crate::vlapic::Vlapic::new(t);
                        s.state = crate::xen::RunState::Runnable;
                        log::info!(
                            "d{}: vcpu{t} started by SIPI at {:#x}",
                            self.id,
                            u32::from(vector) << 12
                        );
                    }
                }
            }
            Ipi::Nmi(_) => {
                if self.first_time(5, 0) {
                    log::warn!("d{}: NMI IPIs are not delivered (logged once)", self.id);
                }
            }
        }
    }

    /// The guest's xenstore port (the hypervisor end of it).
    pub fn store_port(&self) -> u32 {
        self.xen.params[crate::xen::param::STORE_EVTCHN as usize] as u32
    }

    /// Serves the xenstore ring: a copy of the page goes to the engine once, the
    /// engine's answer is written back field by field, and the guest is signalled when
    /// the engine asks for it.
    pub fn service_store(&mut self, xs: &mut crate::xenstore::Xenstore) {
        self.store_kicked = false;
        let mut page = [0u8; 4096];
        if !self.mem.read(self.store_ring, &mut page) {
            return;
        }
        let snap = crate::xenstore::RingSnapshot::from_page(&page);
        let update = xs.service_ring(self.id, &snap);
        for (off, bytes) in update.page_writes() {
            self.mem.write(self.store_ring + off as u64, &bytes);
        }
        if update.notify {
            let port = self.store_port();
            self.raise_port(port);
        }
    }

    /// The layout the toolstack writes for this domain in xenstore.
    pub fn store_layout(&self) -> crate::xenstore::DomainLayout {
        crate::xenstore::DomainLayout {
            name: self.config.name.clone(),
            target_kib: self.config.memory_mib * 1024,
            static_max_kib: self.config.memory_mib * 1024,
            vcpus: self.xen.vcpus.len() as u32,
            store_port: self.store_port(),
            store_ring_ref: self.store_ring >> 12,
        }
    }

    /// Signals the guest's console event channel (after the hypervisor consumed output
    /// or produced input).
    pub fn notify_console(&mut self) {
        let port = self.xen.params[crate::xen::param::CONSOLE_EVTCHN as usize] as u32;
        if port != 0 {
            self.raise_port(port);
        }
    }

    /// Puts typed bytes into the console ring's input side; returns how many fit.
    pub fn console_input(&mut self, bytes: &[u8]) -> usize {
        const IN_SIZE: u32 = 1024;
        let mut idx = [0u8; 8];
        if !self.mem.read(self.console_ring + 3072, &mut idx) {
            return 0;
        }
        let cons = u32::from_le_bytes([idx[0], idx[1], idx[2], idx[3]]);
        let mut prod = u32::from_le_bytes([idx[4], idx[5], idx[6], idx[7]]);
        let mut n = 0;
        for &b in bytes {
            if prod.wrapping_sub(cons) >= IN_SIZE {
                break;
            }
            self.mem
                .write(self.console_ring + u64::from(prod % IN_SIZE), &[b]);
            prod = prod.wrapping_add(1);
            n += 1;
        }
        self.mem
            .write(self.console_ring + 3076, &prod.to_le_bytes());
        n
    }

    /// Drains the console ring's output side (hvc0): prints it with the domain prefix.
    /// Returns true when bytes were consumed (the guest should be notified). The
    /// indexes are read once and validated; a corrupt ring is reported and reset.
    pub fn service_console(&mut self) -> bool {
        const OUT: u64 = 1024;
        const OUT_SIZE: u32 = 2048;
        let mut idx = [0u8; 8];
        if !self.mem.read(self.console_ring + 3080, &mut idx) {
            return false;
        }
        let cons = u32::from_le_bytes([idx[0], idx[1], idx[2], idx[3]]);
        let prod = u32::from_le_bytes([idx[4], idx[5], idx[6], idx[7]]);
        let avail = prod.wrapping_sub(cons);
        if avail == 0 {
            return false;
        }
        if avail > OUT_SIZE {
            if self.first_time(6, 0) {
                log::warn!("d{}: console ring indexes corrupt (cons {cons}, prod {prod}); skipping to prod", self.id);
            }
            self.mem
                .write(self.console_ring + 3080, &prod.to_le_bytes());
            return true;
        }
        let mut buf = [0u8; OUT_SIZE as usize];
        for i in 0..avail {
            let off = u64::from(cons.wrapping_add(i) % OUT_SIZE);
            let mut b = [0u8; 1];
            self.mem.read(self.console_ring + OUT + off, &mut b);
            buf[i as usize] = b[0];
        }
        self.console_write(&buf[..avail as usize]);
        self.mem
            .write(self.console_ring + 3080, &prod.to_le_bytes());
        true
    }

    /// The domain's display name.
    pub fn name(&self) -> &str {
        &self.config.name
    }
}
