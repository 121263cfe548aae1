//! `cargo xtask run`: build, bundle one domain, boot QEMU on the terminal; or, with
//! `-- CMD`, run a command in the Linux guest, print its output and exit with its status.

use std::collections::VecDeque;
use std::fs::File;
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, RecvTimeoutError};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::{Args, ValueEnum};
use ferrovisor_tests::{
    linux_cmdline, status_meaning, Domain, KernelSource, LINUX_MEMORY_MIB, STATUS_OK,
};

use crate::bochs::{self, Launch};
use crate::bundle::BundledDomain;
use crate::guest::LinuxGuest;
use crate::image::{self, Profile};
use crate::kernels::Guests;
use crate::transcript::{Event, Source, Transcript};
use crate::{bundle, guest, kernels, qemu, say, sys};

/// The guests `run` knows by name.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum GuestKind {
    /// Debian's Linux kernel with the project's busybox initramfs (`cargo xtask guest`).
    Linux,
    /// The project's freestanding test guest.
    #[value(name = "testguest")]
    TestGuest,
}

/// The guest `cargo xtask run` boots without `--guest`, `--kernel` or `-- CMD`.
pub const DEFAULT_GUEST: GuestKind = GuestKind::Linux;

/// `run -- CMD` exits with this when the guest never reported the command's status.
pub const NO_EXIT_MARKER: u8 = 125;

/// Lines of serial output shown when a command run ends without `FERRO-EXIT`.
const TAIL_LINES: usize = 40;

/// How long QEMU may go on after `FERRO-EXIT` before it is killed.
const AFTER_EXIT_GRACE: Duration = Duration::from_secs(60);

/// Options of `cargo xtask run`.
#[derive(Args, Debug)]
pub struct RunArgs {
    /// Which guest to boot: `linux` or `testguest`. Default: `linux` with `-- CMD` or
    /// `--bare`, else `DEFAULT_GUEST` (xtask/src/run.rs: Debian's Linux).
    #[arg(long, value_enum, value_name = "GUEST", conflicts_with = "kernel")]
    pub guest: Option<GuestKind>,
    /// Guest kernel (a PVH ELF) instead of a named guest.
    #[arg(long, value_name = "PATH")]
    pub kernel: Option<PathBuf>,
    /// Guest command line; default: "test=exits" for the test guest, empty otherwise.
    /// For the Linux guest it is added to "console=hvc0 earlyprintk=xen".
    #[arg(long, value_name = "STR")]
    pub append: Option<String>,
    /// Guest ramdisk, bundled as `ramdisk = "files/<name>"` (for the Linux guest: instead
    /// of its initramfs).
    #[arg(long, value_name = "PATH")]
    pub ramdisk: Option<PathBuf>,
    /// Guest memory in MiB; default: 32 for the test guest, 256 otherwise.
    #[arg(long, value_name = "MIB")]
    pub memory: Option<u64>,
    /// Guest vCPUs.
    #[arg(long, value_name = "N", default_value_t = 1)]
    pub vcpus: u32,
    /// The hypervisor's own command line (QEMU `-append`).
    #[arg(long, value_name = "STR", default_value = "")]
    pub cmdline: String,
    /// Physical CPUs of the machine the hypervisor runs on (QEMU `-smp`; its
    /// `maxcpus=N` command-line option uses fewer). Ignored with --bare (which gives
    /// the guest --vcpus CPUs).
    #[arg(long, value_name = "N", default_value_t = qemu::DEFAULT_HOST_CPUS,
          value_parser = clap::value_parser!(u32).range(1..=16))]
    pub host_cpus: u32,
    /// Virtualisation backend: `svm` boots QEMU TCG (`-cpu max`, AMD SVM with nested
    /// paging); `vmx` boots Bochs (`corei7_skylake_x`: Intel VMX with EPT) from the GRUB
    /// ISO, headless, serial output only (no console input).
    #[arg(long, value_name = "svm|vmx", default_value = "svm")]
    pub cpu: String,
    /// Extra argument for QEMU, appended as it is (repeat for more, e.g. `--qemu-arg=-d`);
    /// with `--cpu vmx`, a bochsrc line for Bochs' command line.
    #[arg(long = "qemu-arg", value_name = "ARG", allow_hyphen_values = true)]
    pub qemu_args: Vec<String>,
    /// Build and boot the dev profile instead of release.
    #[arg(long)]
    pub debug: bool,
    /// Build and write the bundle, print the QEMU command, but do not start QEMU.
    #[arg(long)]
    pub dry_run: bool,
    /// A domain described by an xl.cfg file (repeatable: one domain per file, created in
    /// the given order). `kernel`/`ramdisk` name host files relative to the file, or
    /// `@linux`, `@linux-initramfs`, `@testguest`. Replaces the default guest.
    #[arg(long = "domain", value_name = "FILE", conflicts_with_all = ["kernel", "guest", "bare"])]
    pub domains: Vec<PathBuf>,
    /// Boot the Linux guest directly in QEMU, without the hypervisor (console ttyS0): the
    /// reference for boot-time comparisons.
    #[arg(long, conflicts_with = "kernel")]
    pub bare: bool,
    /// With `-- CMD`: kill QEMU and fail when the command has not finished after SECS.
    #[arg(long, value_name = "SECS")]
    pub timeout: Option<u64>,
    /// A command to run in the Linux guest (words joined with spaces, run by sh); run
    /// exits with its status.
    #[arg(last = true, value_name = "CMD")]
    pub command: Vec<String>,
}

/// What `run` boots.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Choice {
    TestGuest,
    Linux,
    Kernel(PathBuf),
}

/// Picks the guest from `--kernel`, `--guest`, `--bare` and whether a command was given.
fn choose(
    kernel: Option<&Path>,
    guest: Option<GuestKind>,
    bare: bool,
    has_cmd: bool,
) -> Result<Choice> {
    if let Some(k) = kernel {
        if has_cmd {
            bail!("`run -- CMD` runs the command in the Linux guest: it does not go with --kernel");
        }
        if bare || guest.is_some() {
            bail!("--kernel does not go with --guest or --bare");
        }
        return Ok(Choice::Kernel(k.to_path_buf()));
    }
    match guest {
        Some(GuestKind::TestGuest) if has_cmd => {
            bail!("`run -- CMD` runs the command in the Linux guest: it does not go with --guest testguest")
        }
        Some(GuestKind::TestGuest) if bare => {
            bail!("--bare boots the Linux guest without the hypervisor: it does not go with --guest testguest")
        }
        Some(GuestKind::TestGuest) => Ok(Choice::TestGuest),
        Some(GuestKind::Linux) => Ok(Choice::Linux),
        None if has_cmd || bare => Ok(Choice::Linux),
        None => Ok(match DEFAULT_GUEST {
            GuestKind::Linux => Choice::Linux,
            GuestKind::TestGuest => Choice::TestGuest,
        }),
    }
}

/// The Linux guest's command line on bare QEMU: the serial console instead of hvc0.
fn bare_cmdline(with_cmd: bool, append: &str) -> String {
    ferrovisor_tests::cmdline_with("console=ttyS0", with_cmd, append)
}

/// One boot of the Linux guest, with or without the hypervisor: what `run` (Linux) and
/// `bench` have in common.
#[derive(Clone, Debug)]
pub struct LinuxBoot<'a> {
    /// The kernel (and the release it names).
    pub guest: &'a LinuxGuest,
    /// The ramdisk: the initramfs, with the command archive appended in command mode.
    pub ramdisk: &'a Path,
    /// Whether `/init` runs `/ferro/cmd` (command mode) instead of a shell.
    pub with_cmd: bool,
    /// The user's additions to the kernel command line.
    pub append: &'a str,
    /// Guest memory in MiB (the domain's, or bare QEMU's `-m`).
    pub memory_mib: u64,
    /// Guest vCPUs (the domain's, or bare QEMU's `-smp`).
    pub vcpus: u32,
    /// Where the serial port goes.
    pub serial: qemu::Serial,
    /// Extra QEMU arguments.
    pub extra: &'a [String],
}

impl LinuxBoot<'_> {
    /// The kernel command line on bare QEMU.
    pub fn bare_cmdline(&self) -> String {
        bare_cmdline(self.with_cmd, self.append)
    }

    /// QEMU booting the kernel directly, without the hypervisor (`run --bare`).
    pub fn bare_command(&self) -> Command {
        let cmdline = self.bare_cmdline();
        qemu::bare_linux_command(&qemu::BareLinux {
            kernel: &self.guest.vmlinuz,
            initrd: self.ramdisk,
            cmdline: &cmdline,
            memory_mib: self.memory_mib,
            vcpus: self.vcpus,
            serial: self.serial.clone(),
            extra: self.extra,
        })
    }

    /// The guest as the hypervisor's domain 1 (for the boot bundle).
    pub fn domain(&self) -> BundledDomain {
        BundledDomain {
            name: "linux".into(),
            kernel: self.guest.vmlinuz.clone(),
            ramdisk: Some(self.ramdisk.to_path_buf()),
            cmdline: linux_cmdline(self.with_cmd, self.append),
            memory_mib: self.memory_mib,
            vcpus: self.vcpus,
            test_interface: false,
            evtchn_fifo: true,
            pci: Vec::new(),
        }
    }

    /// QEMU booting the hypervisor `image` with `bundle` (written from [`Self::domain`]).
    pub fn hypervisor_command(
        &self,
        image: &Path,
        bundle: &Path,
        hv_cmdline: &str,
        cpu: &str,
        host_cpus: u32,
    ) -> Command {
        qemu::command(&self.hypervisor_boot(image, bundle, hv_cmdline, cpu, host_cpus))
    }

    /// The boot of the hypervisor `image` with `bundle`, on QEMU or Bochs (`cpu`).
    pub fn hypervisor_boot<'b>(
        &'b self,
        image: &'b Path,
        bundle: &'b Path,
        hv_cmdline: &'b str,
        cpu: &'b str,
        host_cpus: u32,
    ) -> qemu::Boot<'b> {
        qemu::Boot {
            image,
            bundle,
            cmdline: hv_cmdline,
            cpu,
            domain_memory_mib: self.memory_mib,
            host_cpus,
            serial: self.serial.clone(),
            extra: self.extra,
        }
    }
}

/// The `Boot::cpu` value for a `--cpu` backend name: QEMU's `-cpu max` for `svm`,
/// Bochs' Intel model for `vmx`.
pub fn qemu_cpu(backend: &str) -> Result<&'static str> {
    match backend {
        "svm" => Ok("max"),
        "vmx" => Ok(bochs::CPU),
        other => bail!("--cpu {other}: unknown backend (`svm`: QEMU, `vmx`: Bochs)"),
    }
}

/// Makes sure the emulator for `cpu` (and for Bochs, GRUB's ISO tools) is installed.
pub fn ensure_emulator(cpu: &str) -> Result<()> {
    if cpu.starts_with(bochs::CPU_PREFIX) {
        sys::ensure(bochs::REQUIREMENTS)?;
        sys::ensure(crate::iso::REQUIREMENTS)
    } else {
        sys::ensure(sys::QEMU)
    }
}

/// Where a Bochs run of `run` keeps its ISO, bochsrc and logs.
fn bochs_dir(work: &Path) -> PathBuf {
    work.join("bochs-run")
}

/// The process exit code for QEMU's status: 0 for a clean run (QEMU status 1), QEMU's
/// own status for the hypervisor's other verdicts, 2 when there was no verdict.
fn exit_code(status: Option<i32>) -> u8 {
    match status {
        Some(STATUS_OK) => 0,
        Some(s @ (3 | 5 | 7)) => s as u8,
        _ => 2,
    }
}

/// Runs `cargo xtask run`.
pub fn run(args: RunArgs) -> Result<ExitCode> {
    let command = (!args.command.is_empty()).then(|| args.command.join(" "));
    if command.as_deref().is_some_and(|c| c.trim().is_empty()) {
        bail!("the command after `--` is empty");
    }
    if command.is_some() {
        // stdout is the command's output.
        sys::chatter_to_stderr();
    }
    let choice = choose(
        args.kernel.as_deref(),
        args.guest,
        args.bare,
        command.is_some(),
    )?;
    let cpu = qemu_cpu(&args.cpu)?;
    let profile = if args.debug {
        Profile::Debug
    } else {
        Profile::Release
    };
    if !args.dry_run {
        ensure_emulator(if args.bare { "max" } else { cpu })?;
    }
    if args.bare && cpu != "max" {
        bail!("--bare boots Linux on QEMU without the hypervisor: it does not go with --cpu vmx");
    }
    let work = sys::workspace_root().join("target").join("xtask");
    if !args.domains.is_empty() {
        if command.is_some() {
            bail!("`-- CMD` runs a command in the default Linux guest; it cannot be combined with --domain");
        }
        return run_user_domains(&args, cpu, profile, &work);
    }
    if choice == Choice::Linux {
        return run_linux(&args, command.as_deref(), cpu, profile, &work);
    }

    let image = image::build_hypervisor(profile)?;
    let (domain, testguest) = match choice {
        Choice::Kernel(path) => {
            let path = std::fs::canonicalize(&path)
                .with_context(|| format!("--kernel {}", path.display()))?;
            let name = path
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_else(|| "guest".into());
            let domain = Domain {
                name,
                kernel: KernelSource::Path(path),
                cmdline: args.append.clone().unwrap_or_default(),
                memory_mib: args.memory.unwrap_or(256),
                vcpus: args.vcpus,
                test_interface: false,
                ramdisk: None,
                linux_cmd: None,
                pci: Vec::new(),
                evtchn_fifo: true,
            };
            (domain, PathBuf::new())
        }
        _ => {
            let guest = image::build_testguest(profile)?;
            let domain = Domain {
                memory_mib: args.memory.unwrap_or(32),
                vcpus: args.vcpus,
                cmdline: args.append.clone().unwrap_or_else(|| "test=exits".into()),
                ..Domain::test_guest("testguest", "")
            };
            (domain, guest)
        }
    };

    let guests = Guests {
        testguest: &testguest,
        linux: None,
    };
    let mut domains = kernels::prepare(
        std::slice::from_ref(&domain),
        guests,
        &work.join("kernels"),
        "run",
    )?;
    if let Some(r) = &args.ramdisk {
        let r = std::fs::canonicalize(r).with_context(|| format!("--ramdisk {}", r.display()))?;
        domains[0].ramdisk = Some(r);
    }
    let bundle_path = work.join("run.cpio");
    write_bundle(&bundle_path, &domains[0])?;
    let launch = bochs::launch(
        &qemu::Boot {
            image: &image,
            bundle: &bundle_path,
            cmdline: &args.cmdline,
            cpu,
            domain_memory_mib: domain.memory_mib,
            host_cpus: args.host_cpus,
            serial: qemu::Serial::Interactive,
            extra: &args.qemu_args,
        },
        &bochs_dir(&work),
    )?;
    interactive(launch, args.dry_run, false)
}

/// Writes the boot bundle `bundle_path` for one domain and says what is in it.
pub fn write_bundle(bundle_path: &Path, domain: &BundledDomain) -> Result<()> {
    bundle::write(bundle_path, std::slice::from_ref(domain))?;
    say!(
        "boot bundle: {} (domain '{}', {} MiB, {} vCPU, cmdline {})",
        bundle_path.display(),
        domain.name,
        domain.memory_mib,
        domain.vcpus,
        bundle::quote(&domain.cmdline)
    );
    Ok(())
}

/// Boots the Linux guest, under the hypervisor or (`--bare`) directly in QEMU, with its
/// console on the terminal or running `command`.
fn run_linux(
    args: &RunArgs,
    command: Option<&str>,
    cpu: &str,
    profile: Profile,
    work: &Path,
) -> Result<ExitCode> {
    let g = guest::prepare(false)?;
    let base = match &args.ramdisk {
        Some(r) => {
            std::fs::canonicalize(r).with_context(|| format!("--ramdisk {}", r.display()))?
        }
        None => g.initramfs.clone(),
    };
    let ramdisk = match command {
        Some(c) => {
            let out = work.join("run-initramfs+cmd.cpio");
            guest::ramdisk_with_command(&base, c, &out)?;
            out
        }
        None => base,
    };
    let serial = if command.is_some() {
        qemu::Serial::Pipe
    } else {
        qemu::Serial::Interactive
    };
    let boot = LinuxBoot {
        guest: &g,
        ramdisk: &ramdisk,
        with_cmd: command.is_some(),
        append: args.append.as_deref().unwrap_or(""),
        memory_mib: args.memory.unwrap_or(LINUX_MEMORY_MIB),
        vcpus: args.vcpus,
        serial,
        extra: &args.qemu_args,
    };

    let (qemu_cmd, source) = if args.bare {
        say!(
            "Linux guest {} on bare QEMU, without the hypervisor ({} MiB, {} vCPU, \
             cmdline {})",
            g.release,
            boot.memory_mib,
            boot.vcpus,
            bundle::quote(&boot.bare_cmdline())
        );
        (Launch::Qemu(boot.bare_command()), Source::Bare)
    } else {
        let image = image::build_hypervisor(profile)?;
        let bundle_path = work.join("run.cpio");
        write_bundle(&bundle_path, &boot.domain())?;
        let launch = bochs::launch(
            &boot.hypervisor_boot(&image, &bundle_path, &args.cmdline, cpu, args.host_cpus),
            &bochs_dir(work),
        )?;
        (launch, Source::Hypervisor { domid: 1 })
    };
    match command {
        None => interactive(qemu_cmd, args.dry_run, args.bare),
        Some(_) if args.dry_run => {
            say!("{}", sys::shell_line(qemu_cmd.command()));
            Ok(ExitCode::SUCCESS)
        }
        Some(_) => run_command(
            qemu_cmd,
            source,
            work,
            args.timeout.map(Duration::from_secs),
        ),
    }
}

/// Boots QEMU with the serial console on the terminal. Under the hypervisor the exit
/// code follows its verdict; on bare QEMU it is QEMU's own status.
/// `run --domain FILE...`: the user's xl.cfg files, bundled with the files they name.
fn run_user_domains(args: &RunArgs, cpu: &str, profile: Profile, work: &Path) -> Result<ExitCode> {
    let image = image::build_hypervisor(profile)?;
    let bundle_path = work.join("run.cpio");
    let memory = write_user_bundle(&args.domains, profile, &bundle_path)?;
    let launch = bochs::launch(
        &qemu::Boot {
            image: &image,
            bundle: &bundle_path,
            cmdline: &args.cmdline,
            cpu,
            domain_memory_mib: memory,
            host_cpus: args.host_cpus,
            serial: qemu::Serial::Interactive,
            extra: &args.qemu_args,
        },
        &bochs_dir(work),
    )?;
    interactive(launch, args.dry_run, false)
}

/// Writes the boot bundle for the user's xl.cfg files (with the files they name) to
/// `bundle_path`; returns the sum of the domains' memory in MiB.
pub fn write_user_bundle(files: &[PathBuf], profile: Profile, bundle_path: &Path) -> Result<u64> {
    let texts: Vec<String> = files
        .iter()
        .map(|f| {
            std::fs::read_to_string(f)
                .with_context(|| format!("reading domain config {}", f.display()))
        })
        .collect::<Result<_>>()?;
    let testguest = if texts.iter().any(|t| crate::domains::needs_testguest(t)) {
        Some(image::build_testguest(profile)?)
    } else {
        None
    };
    let linux = if texts.iter().any(|t| crate::domains::needs_linux(t)) {
        Some(crate::guest::prepare(false)?)
    } else {
        None
    };
    let known = crate::domains::Known {
        testguest: testguest.as_deref(),
        linux: linux
            .as_ref()
            .map(|g| (g.vmlinuz.as_path(), g.initramfs.as_path())),
    };
    let domains: Vec<_> = files
        .iter()
        .enumerate()
        .map(|(i, f)| crate::domains::load(f, i, &known))
        .collect::<Result<_>>()?;
    if let Some(dir) = bundle_path.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    std::fs::write(bundle_path, crate::domains::bundle(&domains)?)
        .with_context(|| format!("writing {}", bundle_path.display()))?;
    for d in &domains {
        say!(
            "domain '{}': {} MiB, {} file(s) bundled",
            d.name,
            d.memory_mib,
            d.files.len()
        );
    }
    Ok(domains.iter().map(|d| d.memory_mib).sum())
}

fn interactive(launch: Launch, dry_run: bool, bare: bool) -> Result<ExitCode> {
    if dry_run {
        say!("{}", sys::shell_line(launch.command()));
        return Ok(ExitCode::SUCCESS);
    }
    say!("$ {}", sys::shell_line(launch.command()));
    let mut cmd = match launch {
        Launch::Qemu(cmd) => cmd,
        Launch::Bochs(run) => {
            say!(
                "(Bochs: serial output on this terminal, no input; log {}; Ctrl-C stops it)",
                run.serial.display()
            );
            let status = bochs::follow_to_stdout(run)?;
            match status {
                Some(s) => say!(
                    "the hypervisor ended with status {s}: {}",
                    status_meaning(s)
                ),
                None => say!("Bochs ended without the hypervisor's verdict"),
            }
            return Ok(ExitCode::from(exit_code(status)));
        }
    };
    say!("(serial on this terminal; Ctrl-A X quits QEMU)");
    let status = cmd.status().context("starting qemu-system-x86_64")?.code();
    if bare {
        match status {
            Some(s) => say!("QEMU exited with status {s}"),
            None => say!("QEMU was killed by a signal"),
        }
        return Ok(ExitCode::from(status.map_or(2, |s| s.clamp(0, 255) as u8)));
    }
    match status {
        Some(s) => say!("QEMU exited with status {s}: {}", status_meaning(s)),
        None => say!("QEMU was killed by a signal: {}", status_meaning(-1)),
    }
    Ok(ExitCode::from(exit_code(status)))
}

/// What one boot of a guest in command mode produced ([`boot_command`]).
#[derive(Clone, Debug)]
pub struct CommandBoot {
    /// Where the serial output came from.
    pub source: Source,
    /// From QEMU's start to the `ferro-init: up` line.
    pub up_at: Option<Duration>,
    /// The command's status and the time from QEMU's start to its `FERRO-EXIT` line.
    pub exit: Option<(i32, Duration)>,
    /// Whether the command started (`ferro-init: running command` was seen).
    pub started: bool,
    /// QEMU's exit status (`None`: ended by a signal).
    pub qemu_status: Option<i32>,
    /// Why xtask killed QEMU, when it did.
    pub killed: Option<String>,
    /// The last serial lines (at most [`TAIL_LINES`]).
    pub tail: Vec<String>,
    /// What QEMU wrote to its stderr.
    pub qemu_said: String,
    /// The serial log.
    pub log: PathBuf,
}

impl CommandBoot {
    /// Whether QEMU ended as a clean run ends: on its own, with status 0 on bare QEMU or
    /// the hypervisor's "all fine" verdict.
    pub fn clean(&self) -> bool {
        self.killed.is_none()
            && match self.source {
                Source::Bare => self.qemu_status == Some(0),
                Source::Hypervisor { .. } => self.qemu_status == Some(STATUS_OK),
            }
    }

    /// How QEMU ended, in words.
    pub fn qemu_end(&self) -> String {
        match (&self.killed, self.qemu_status) {
            (Some(why), _) => format!("{why}: QEMU killed"),
            (None, Some(s)) if self.source != Source::Bare => {
                format!("QEMU exited with status {s}: {}", status_meaning(s))
            }
            (None, Some(s)) => format!("QEMU exited with status {s}"),
            (None, None) => "QEMU was killed by a signal".to_string(),
        }
    }

    /// How far the guest got, for a boot without `FERRO-EXIT`.
    pub fn phase(&self) -> &'static str {
        if self.started {
            "while the command ran"
        } else if self.up_at.is_some() {
            "after ferro-init came up, before the command started"
        } else {
            "before ferro-init came up"
        }
    }

    /// Prints (to stderr) the last serial lines and what QEMU said.
    pub fn show_tail(&self) {
        eprintln!("last {} serial lines:", self.tail.len());
        for l in &self.tail {
            eprintln!("  | {l}");
        }
        if !self.qemu_said.trim().is_empty() {
            eprintln!("QEMU said: {}", self.qemu_said.trim());
        }
    }
}

/// Boots QEMU (`-serial stdio`) with a guest in command mode and follows its serial
/// output (saved to `log`; QEMU's stderr beside it as `.qemu.txt`) until QEMU ends. With
/// `echo`, the command's output goes to stdout as it comes and the hypervisor's lines
/// meanwhile to stderr. QEMU is killed [`AFTER_EXIT_GRACE`] after `FERRO-EXIT`, or at
/// `timeout` when the command has not finished by then. Prints nothing else.
pub fn boot_command(
    launch: Launch,
    source: Source,
    log: &Path,
    timeout: Option<Duration>,
    echo: bool,
) -> Result<CommandBoot> {
    if let Some(dir) = log.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let qemu_out = log.with_extension("qemu.txt");
    let qemu_err =
        File::create(&qemu_out).with_context(|| format!("creating {}", qemu_out.display()))?;
    let mut log_file = File::create(log).with_context(|| format!("creating {}", log.display()))?;

    let start = Instant::now();
    // Bochs writes its serial port to a file, followed here until Bochs has exited.
    let bochs_done = Arc::new(AtomicBool::new(false));
    let is_bochs = matches!(launch, Launch::Bochs(_));
    let (mut child, serial): (std::process::Child, Box<dyn std::io::Read + Send>) = match launch {
        Launch::Qemu(mut qemu_cmd) => {
            let mut child = qemu_cmd
                .stdin(Stdio::null())
                .stdout(Stdio::piped())
                .stderr(qemu_err)
                .spawn()
                .context("starting qemu-system-x86_64")?;
            let serial = child.stdout.take().context("QEMU's stdout")?;
            (child, Box::new(serial))
        }
        Launch::Bochs(mut run) => {
            let child = bochs::spawn(&mut run)?;
            let tail = bochs::Tail::new(&run.serial, bochs_done.clone())?;
            (child, Box::new(tail))
        }
    };
    let mut verdict: Option<i32> = None;
    let mut verdict_seen: Option<Instant> = None;
    let (tx, rx) = mpsc::channel::<(Instant, String)>();
    let reader = std::thread::spawn(move || {
        let mut r = BufReader::new(serial);
        let mut buf = Vec::new();
        loop {
            buf.clear();
            match r.read_until(b'\n', &mut buf) {
                Ok(0) | Err(_) => break,
                Ok(_) => {
                    let at = Instant::now();
                    let _ = log_file.write_all(&buf);
                    let mut line = String::from_utf8_lossy(&buf).into_owned();
                    if line.ends_with('\n') {
                        line.pop();
                    }
                    if tx.send((at, line)).is_err() {
                        break;
                    }
                }
            }
        }
    });

    let mut transcript = Transcript::new(source);
    let mut tail: VecDeque<String> = VecDeque::with_capacity(TAIL_LINES);
    let mut up_at: Option<Duration> = None;
    let mut exit: Option<(i32, Duration)> = None;
    let mut killed: Option<String> = None;
    loop {
        match rx.recv_timeout(Duration::from_millis(100)) {
            Ok((at, line)) => {
                if let Some(v) = bochs::verdict(&line) {
                    verdict = Some(v);
                }
                if tail.len() == TAIL_LINES {
                    tail.pop_front();
                }
                tail.push_back(line.trim_end_matches('\r').to_string());
                for event in transcript.feed(&line) {
                    match event {
                        Event::Up => {
                            up_at.get_or_insert(at - start);
                        }
                        Event::Running => {}
                        Event::Output(text) if echo => {
                            let mut out = std::io::stdout().lock();
                            let _ = writeln!(out, "{text}");
                            let _ = out.flush();
                        }
                        Event::Diagnostic(text) if echo => eprintln!("{text}"),
                        Event::Output(_) | Event::Diagnostic(_) => {}
                        Event::Exit(status) => exit = Some((status, at - start)),
                    }
                }
            }
            Err(RecvTimeoutError::Timeout) => {}
            Err(RecvTimeoutError::Disconnected) => break,
        }
        if is_bochs && child.try_wait()?.is_some() {
            bochs_done.store(true, Ordering::Release);
        }
        // A verdict printed before the image could power Bochs off ends the run.
        if is_bochs && verdict.is_some() && killed.is_none() {
            let at = *verdict_seen.get_or_insert_with(Instant::now);
            if at.elapsed() > Duration::from_secs(1) && child.try_wait()?.is_none() {
                bochs::kill(&mut child);
            }
        }
        if killed.is_none() {
            let why = match (exit, timeout) {
                (Some((_, at)), _) if start.elapsed() > at + AFTER_EXIT_GRACE => Some(format!(
                    "QEMU still ran {} s after FERRO-EXIT",
                    AFTER_EXIT_GRACE.as_secs()
                )),
                (None, Some(limit)) if start.elapsed() > limit => Some(format!(
                    "no FERRO-EXIT within --timeout {} s",
                    limit.as_secs()
                )),
                _ => None,
            };
            if let Some(why) = why {
                if is_bochs {
                    bochs::kill(&mut child);
                } else {
                    let _ = child.kill();
                }
                killed = Some(why);
            }
        }
    }
    let status = child.wait()?.code();
    let _ = reader.join();
    // Bochs' own status says nothing: the hypervisor's verdict line stands for it.
    let qemu_status = if is_bochs { verdict } else { status };

    Ok(CommandBoot {
        source,
        up_at,
        exit,
        started: transcript.started(),
        qemu_status,
        killed,
        tail: tail.into(),
        qemu_said: std::fs::read_to_string(&qemu_out).unwrap_or_default(),
        log: log.to_path_buf(),
    })
}

/// `run -- CMD`: boots QEMU with a guest that runs a command, prints the command's output
/// as it comes, and returns its status from the `FERRO-EXIT` line.
fn run_command(
    qemu_cmd: Launch,
    source: Source,
    work: &Path,
    timeout: Option<Duration>,
) -> Result<ExitCode> {
    let log = work.join("run.log");
    say!("$ {}", sys::shell_line(qemu_cmd.command()));
    say!("(serial log: {})", log.display());
    let b = boot_command(qemu_cmd, source, &log, timeout, true)?;
    match b.exit {
        Some((code, at)) => {
            say!(
                "guest command finished in {:.1} s (emulator start to FERRO-EXIT)",
                at.as_secs_f64()
            );
            if let Some(up) = b.up_at {
                say!(
                    "(ferro-init: up {:.1} s after the emulator started)",
                    up.as_secs_f64()
                );
            }
            if !b.clean() {
                say!("warning: after the command, {}", b.qemu_end());
                if !b.qemu_said.trim().is_empty() {
                    say!("QEMU said: {}", b.qemu_said.trim());
                }
            }
            Ok(ExitCode::from(code.clamp(0, 255) as u8))
        }
        None => {
            b.show_tail();
            eprintln!(
                "error: the guest ended without reporting FERRO-EXIT ({}; {}); serial log: {}",
                b.phase(),
                b.qemu_end(),
                b.log.display()
            );
            Ok(ExitCode::from(NO_EXIT_MARKER))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn svm_is_qemu_and_vmx_is_bochs() {
        assert_eq!(qemu_cpu("svm").unwrap(), "max");
        assert_eq!(qemu_cpu("vmx").unwrap(), "bochs:corei7_skylake_x");
        let err = qemu_cpu("arm").unwrap_err().to_string();
        assert!(err.contains("`vmx`: Bochs"), "{err}");
    }

    #[test]
    fn exit_codes_follow_the_verdict() {
        assert_eq!(exit_code(Some(1)), 0);
        assert_eq!(exit_code(Some(3)), 3);
        assert_eq!(exit_code(Some(5)), 5);
        assert_eq!(exit_code(Some(7)), 7);
        assert_eq!(exit_code(Some(0)), 2);
        assert_eq!(exit_code(None), 2);
    }

    #[test]
    fn the_guest_follows_the_options() {
        let k = Path::new("/k");
        assert_eq!(choose(None, None, false, false).unwrap(), Choice::Linux);
        assert_eq!(
            choose(None, Some(GuestKind::TestGuest), false, false).unwrap(),
            Choice::TestGuest
        );
        assert_eq!(choose(None, None, false, true).unwrap(), Choice::Linux);
        assert_eq!(choose(None, None, true, false).unwrap(), Choice::Linux);
        assert_eq!(
            choose(None, Some(GuestKind::Linux), false, false).unwrap(),
            Choice::Linux
        );
        assert_eq!(
            choose(Some(k), None, false, false).unwrap(),
            Choice::Kernel(k.into())
        );
        let err = choose(None, Some(GuestKind::TestGuest), false, true).unwrap_err();
        assert!(err.to_string().contains("--guest testguest"), "{err}");
        assert!(choose(None, Some(GuestKind::TestGuest), true, false).is_err());
        assert!(choose(Some(k), None, false, true).is_err());
        assert!(choose(Some(k), None, true, false).is_err());
    }

    #[test]
    fn bare_command_lines_use_the_serial_console() {
        assert_eq!(bare_cmdline(false, ""), "console=ttyS0");
        assert_eq!(
            bare_cmdline(true, "quiet"),
            "console=ttyS0 ferro.cmd=1 quiet"
        );
    }
}
