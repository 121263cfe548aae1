//! The one QEMU command line used by `run` and `test`, the one that boots the Linux
//! guest without the hypervisor (`run --bare`), and running QEMU with a timeout.

use std::ffi::OsString;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use anyhow::{Context, Result};
use wait_timeout::ChildExt;

/// qboot, the small firmware that boots PVH kernels quickly (package qemu-system-data).
pub const QBOOT: &str = "/usr/share/qemu/qboot.rom";

/// Memory QEMU gives the hypervisor itself, before the domains' memory.
pub const HYPERVISOR_MEMORY_MIB: u64 = 256;

/// Physical CPUs QEMU gives the hypervisor unless told otherwise (`--host-cpus`).
pub const DEFAULT_HOST_CPUS: u32 = 2;

/// Where the serial port goes.
#[derive(Clone, Debug)]
pub enum Serial {
    /// The terminal, multiplexed with QEMU's monitor (`-serial mon:stdio`; Ctrl-A X quits).
    Interactive,
    /// A file (`-serial file:PATH`), for tests.
    File(PathBuf),
    /// QEMU's stdout (`-serial stdio`), for xtask to read through a pipe.
    Pipe,
}

/// Everything that varies between QEMU boots.
#[derive(Clone, Debug)]
pub struct Boot<'a> {
    /// The hypervisor image (`-kernel`).
    pub image: &'a Path,
    /// The boot bundle (`-initrd`).
    pub bundle: &'a Path,
    /// The hypervisor's command line (`-append`).
    pub cmdline: &'a str,
    /// The `-cpu` value.
    pub cpu: &'a str,
    /// Sum of the memory of every domain, in MiB.
    pub domain_memory_mib: u64,
    /// Physical CPUs of the machine (`-smp`): the hypervisor starts them all.
    pub host_cpus: u32,
    /// Where the serial port goes.
    pub serial: Serial,
    /// Extra arguments appended as they are.
    pub extra: &'a [String],
}

/// Host memory for QEMU: the hypervisor's share plus every domain's, rounded up to
/// 64 MiB.
pub fn host_memory_mib(domain_memory_mib: u64) -> u64 {
    (HYPERVISOR_MEMORY_MIB + domain_memory_mib).div_ceil(64) * 64
}

/// What QEMU boots directly (its `-kernel`, `-initrd` and `-append`).
struct Machine<'a> {
    cpu: &'a str,
    memory_mib: u64,
    cpus: u32,
    kernel: &'a Path,
    initrd: &'a Path,
    append: &'a str,
    serial: &'a Serial,
    extra: &'a [String],
    debug_exit: bool,
}

fn machine_command(m: &Machine) -> Command {
    let mut args: Vec<OsString> = Vec::new();
    let mut push = |items: &[&str]| args.extend(items.iter().map(OsString::from));
    push(&["-machine", "q35", "-accel", "tcg", "-cpu", m.cpu]);
    push(&["-m", &m.memory_mib.to_string()]);
    push(&[
        "-smp",
        &m.cpus.to_string(),
        "-nodefaults",
        "-no-user-config",
        "-display",
        "none",
    ]);
    push(&["-no-reboot"]);
    if Path::new(QBOOT).exists() {
        push(&["-bios", QBOOT]);
    }
    if m.debug_exit {
        push(&["-device", "isa-debug-exit,iobase=0xf4,iosize=4"]);
    }
    args.push("-kernel".into());
    args.push(m.kernel.into());
    args.push("-initrd".into());
    args.push(m.initrd.into());
    args.push("-append".into());
    args.push(m.append.into());
    args.push("-serial".into());
    match m.serial {
        Serial::Interactive => args.push("mon:stdio".into()),
        Serial::File(path) => {
            let mut s = OsString::from("file:");
            s.push(path);
            args.push(s);
        }
        Serial::Pipe => args.push("stdio".into()),
    }
    args.extend(m.extra.iter().map(OsString::from));

    let mut cmd = Command::new("qemu-system-x86_64");
    cmd.args(args);
    cmd
}

/// The QEMU command line for `boot`.
pub fn command(boot: &Boot) -> Command {
    machine_command(&Machine {
        cpu: boot.cpu,
        memory_mib: host_memory_mib(boot.domain_memory_mib),
        cpus: boot.host_cpus.max(1),
        kernel: boot.image,
        initrd: boot.bundle,
        append: boot.cmdline,
        serial: &boot.serial,
        extra: boot.extra,
        debug_exit: true,
    })
}

/// A Linux kernel booted by QEMU itself, without the hypervisor (`run --bare`): the
/// reference the hypervisor's boot is measured against.
#[derive(Clone, Debug)]
pub struct BareLinux<'a> {
    /// The bzImage (`-kernel`).
    pub kernel: &'a Path,
    /// The initramfs (`-initrd`).
    pub initrd: &'a Path,
    /// The kernel's command line (`-append`).
    pub cmdline: &'a str,
    /// Guest memory (`-m`): the same as the domain would get.
    pub memory_mib: u64,
    /// Virtual CPUs (`-smp`).
    pub vcpus: u32,
    /// Where the serial port goes.
    pub serial: Serial,
    /// Extra arguments appended as they are.
    pub extra: &'a [String],
}

/// The QEMU command line for a [`BareLinux`] boot: the same machine as [`command`]'s,
/// without the debug-exit device.
pub fn bare_linux_command(b: &BareLinux) -> Command {
    machine_command(&Machine {
        cpu: "max",
        memory_mib: b.memory_mib,
        cpus: b.vcpus,
        kernel: b.kernel,
        initrd: b.initrd,
        append: b.cmdline,
        serial: &b.serial,
        extra: b.extra,
        debug_exit: false,
    })
}

/// How a captured QEMU run ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Ended {
    /// QEMU exited; `None` when a signal ended it.
    Exited(Option<i32>),
    /// QEMU was still running at the timeout and was killed.
    TimedOut,
}

/// Runs `cmd` without a terminal (stdin empty, stdout and stderr to `output`), killing
/// it after `timeout`.
pub fn run_with_timeout(mut cmd: Command, timeout: Duration, output: &Path) -> Result<Ended> {
    let out = File::create(output).with_context(|| format!("creating {}", output.display()))?;
    let err = out.try_clone()?;
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(out)
        .stderr(err)
        .spawn()
        .context("starting qemu-system-x86_64")?;
    match child.wait_timeout(timeout)? {
        Some(status) => Ok(Ended::Exited(status.code())),
        None => {
            // Already exited between the timeout and here is fine too.
            let _ = child.kill();
            child.wait()?;
            Ok(Ended::TimedOut)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sys::shell_line;

    #[test]
    fn a_run_is_captured_and_a_hang_is_killed() {
        let out = std::env::temp_dir().join(format!("xtask-qemu-{}.txt", std::process::id()));
        let mut cmd = Command::new("sh");
        cmd.args(["-c", "echo said; echo err >&2; exit 5"]);
        let ended = run_with_timeout(cmd, Duration::from_secs(30), &out).unwrap();
        assert_eq!(ended, Ended::Exited(Some(5)));
        assert_eq!(std::fs::read_to_string(&out).unwrap(), "said\nerr\n");

        let mut cmd = Command::new("sleep");
        cmd.arg("30");
        let start = std::time::Instant::now();
        let ended = run_with_timeout(cmd, Duration::from_millis(100), &out).unwrap();
        assert_eq!(ended, Ended::TimedOut);
        assert!(start.elapsed() < Duration::from_secs(10));
        std::fs::remove_file(&out).unwrap();
    }

    #[test]
    fn memory_is_rounded_up_to_64_mib() {
        assert_eq!(host_memory_mib(0), 256);
        assert_eq!(host_memory_mib(32), 320);
        assert_eq!(host_memory_mib(64), 320);
        assert_eq!(host_memory_mib(65), 384);
    }

    #[test]
    fn command_line_has_the_fixed_shape() {
        let extra = vec!["-d".to_string(), "int".to_string()];
        let cmd = command(&Boot {
            image: Path::new("/t/ferrovisor"),
            bundle: Path::new("/t/run.cpio"),
            cmdline: "",
            cpu: "max",
            domain_memory_mib: 32,
            host_cpus: 2,
            serial: Serial::File("/t/x.log".into()),
            extra: &extra,
        });
        let line = shell_line(&cmd);
        let bios = if Path::new(QBOOT).exists() {
            format!(" -bios {QBOOT}")
        } else {
            String::new()
        };
        assert_eq!(
            line,
            format!(
                "qemu-system-x86_64 -machine q35 -accel tcg -cpu max -m 320 -smp 2 -nodefaults \
                 -no-user-config -display none -no-reboot{bios} \
                 -device isa-debug-exit,iobase=0xf4,iosize=4 -kernel /t/ferrovisor \
                 -initrd /t/run.cpio -append '' -serial file:/t/x.log -d int"
            )
        );
        let cmd = bare_linux_command(&BareLinux {
            kernel: Path::new("/g/vmlinuz"),
            initrd: Path::new("/g/i.cpio"),
            cmdline: "console=ttyS0 ferro.cmd=1",
            memory_mib: 256,
            vcpus: 1,
            serial: Serial::Pipe,
            extra: &[],
        });
        assert_eq!(
            shell_line(&cmd),
            format!(
                "qemu-system-x86_64 -machine q35 -accel tcg -cpu max -m 256 -smp 1 -nodefaults \
                 -no-user-config -display none -no-reboot{bios} -kernel /g/vmlinuz \
                 -initrd /g/i.cpio -append 'console=ttyS0 ferro.cmd=1' -serial stdio"
            )
        );
    }
}
