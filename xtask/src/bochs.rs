//! Booting the hypervisor under Bochs (an emulated Intel CPU with VMX, EPT, unrestricted
//! guest and VPID), and the one switch between QEMU and Bochs that `run` and `test` use.
//!
//! Bochs boots the GRUB ISO that `cargo xtask iso` makes (the image and the boot bundle
//! as multiboot2 modules). Debian's Bochs has no headless display and starts in its
//! debugger, so it runs under `script(1)` (a pseudo-terminal for the `term` display) with
//! an `-rc` file that says `c` then `quit`. Its exit status is 1 however the run ended:
//! the hypervisor's verdict comes from its last serial line, `ferrovisor: exit status N`
//! (the status QEMU's isa-debug-exit device would have given). The image powers Bochs off
//! through ACPI at the end of a run.

use std::fs::File;
use std::io::{Read, Write};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};

use crate::qemu::{self, Ended, Serial};
use crate::sys::Requirement;

/// `Boot::cpu` values starting with this run Bochs with the CPU model after it.
pub const CPU_PREFIX: &str = "bochs:";

/// The `Boot::cpu` value for `--cpu vmx`: Bochs' `corei7_skylake_x`, Intel with VMX, EPT,
/// unrestricted guest and VPID, which boots stock Debian Linux (`tigerlake` stalls it on
/// inconsistent XSAVE sizes).
pub const CPU: &str = ferrovisor_tests::BOCHS_CPU;

/// Bochs BIOS image (package bochsbios).
pub const BIOS: &str = "/usr/share/bochs/BIOS-bochs-latest";
/// VGA BIOS image (package vgabios).
pub const VGABIOS: &str = "/usr/share/vgabios/vgabios.bin";
/// The term display plugin (package bochs-term).
pub const TERM_PLUGIN: &str = "/usr/lib/x86_64-linux-gnu/bochs/plugins/libbx_term_gui.so";

/// Guest instructions per emulated second: Bochs' clock (with `clock: sync=none`) runs
/// at this rate whatever the host's speed.
pub const IPS: u64 = 50_000_000;

/// What Bochs runs need from the system.
pub const REQUIREMENTS: &[Requirement] = &[
    Requirement {
        command: "bochs",
        package: "bochs",
        why: "emulates an Intel CPU with VMX and EPT for the VMX backend (--cpu vmx)",
        optional: false,
    },
    Requirement {
        command: TERM_PLUGIN,
        package: "bochs-term",
        why: "Bochs' text display, the only one that runs without a window",
        optional: false,
    },
    Requirement {
        command: BIOS,
        package: "bochsbios",
        why: "Bochs' BIOS",
        optional: false,
    },
    Requirement {
        command: VGABIOS,
        package: "vgabios",
        why: "Bochs' VGA BIOS",
        optional: false,
    },
    Requirement {
        command: "script",
        package: "bsdutils",
        why: "gives Bochs the terminal its display needs",
        optional: false,
    },
];

/// How a boot is started: QEMU boots the image directly (its serial where [`Serial`]
/// says); Bochs boots an ISO with its serial port in a file.
#[derive(Debug)]
pub enum Launch {
    /// A QEMU command line.
    Qemu(Command),
    /// A Bochs run.
    Bochs(BochsRun),
}

/// A prepared Bochs run.
#[derive(Debug)]
pub struct BochsRun {
    /// `script -qfec "bochs ..." /dev/null`, in a process group of its own.
    pub cmd: Command,
    /// Where Bochs writes the serial port.
    pub serial: PathBuf,
    /// Where the terminal display's output goes.
    pub display: PathBuf,
}

impl Launch {
    /// The command, for printing.
    pub fn command(&self) -> &Command {
        match self {
            Launch::Qemu(c) => c,
            Launch::Bochs(b) => &b.cmd,
        }
    }
}

/// The bochsrc for an ISO, a CPU model, memory and a serial file.
pub fn bochsrc(iso: &Path, model: &str, memory_mib: u64, serial: &Path, log: &Path) -> String {
    format!(
        "# written by cargo xtask (xtask/src/bochs.rs)\n\
         romimage: file={BIOS}\n\
         vgaromimage: file={VGABIOS}\n\
         megs: {memory_mib}\n\
         cpu: model={model}, count=1, ips={IPS}\n\
         ata0-master: type=cdrom, path={}, status=inserted\n\
         boot: cdrom\n\
         clock: sync=none, time0=local\n\
         com1: enabled=1, mode=file, dev={}\n\
         display_library: term\n\
         error: action=report\n\
         panic: action=fatal\n\
         speaker: enabled=0\n\
         sound: driver=dummy\n\
         log: {}\n",
        iso.display(),
        serial.display(),
        log.display()
    )
}

/// Prepares how `boot` starts: QEMU's command line, or for a `bochs:` CPU the ISO (in
/// `dir`), the bochsrc and the command. Bochs' serial goes to the file `boot.serial`
/// names, else to `dir/serial.txt`.
pub fn launch(boot: &qemu::Boot, dir: &Path) -> Result<Launch> {
    let Some(model) = boot.cpu.strip_prefix(CPU_PREFIX) else {
        return Ok(Launch::Qemu(qemu::command(boot)));
    };
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let iso = dir.join("ferrovisor.iso");
    crate::iso::build(
        &crate::iso::Contents {
            image: boot.image,
            bundle: boot.bundle,
            cmdline: boot.cmdline,
        },
        &iso,
        false,
    )?;
    let serial = match &boot.serial {
        Serial::File(p) => p.clone(),
        Serial::Interactive | Serial::Pipe => dir.join("serial.txt"),
    };
    let _ = std::fs::remove_file(&serial);
    let rc = dir.join("bochsrc");
    let log = dir.join("bochs.log");
    std::fs::write(
        &rc,
        bochsrc(
            &iso,
            model,
            qemu::host_memory_mib(boot.domain_memory_mib),
            &serial,
            &log,
        ),
    )
    .with_context(|| format!("writing {}", rc.display()))?;
    let cont = dir.join("continue.rc");
    std::fs::write(&cont, "c\nquit\n").with_context(|| format!("writing {}", cont.display()))?;
    let mut inner = format!(
        "bochs -q -f {} -rc {}",
        crate::sys::shell_word(rc.as_os_str()),
        crate::sys::shell_word(cont.as_os_str())
    );
    for a in boot.extra {
        inner.push(' ');
        inner.push_str(&crate::sys::shell_word(a.as_ref()));
    }
    let mut cmd = Command::new("script");
    cmd.args(["-qfec", &inner, "/dev/null"]);
    cmd.process_group(0);
    Ok(Launch::Bochs(BochsRun {
        cmd,
        serial,
        display: dir.join("display.txt"),
    }))
}

/// Kills a Bochs run: `script` and Bochs under it (their process group).
pub fn kill(child: &mut Child) {
    let _ = Command::new("kill")
        .args(["-KILL", "--", &format!("-{}", child.id())])
        .stderr(Stdio::null())
        .status();
    let _ = child.kill();
}

/// Starts a Bochs run with its display output in a file and no input.
pub fn spawn(run: &mut BochsRun) -> Result<Child> {
    let display = File::create(&run.display)
        .with_context(|| format!("creating {}", run.display.display()))?;
    run.cmd
        .stdin(Stdio::null())
        .stdout(display.try_clone()?)
        .stderr(display)
        .spawn()
        .context("starting bochs (under script)")
}

/// Runs a Bochs boot to its end or `timeout` (then kills it). The image powers Bochs off
/// at the end of a run once it has found the emulator's ACPI tables; a verdict printed
/// before that (a fatal error or exception early at boot) ends the run here, a second
/// after the verdict line. The display output is copied to `output` afterwards.
pub fn run_with_timeout(mut run: BochsRun, timeout: Duration, output: &Path) -> Result<Ended> {
    let start = std::time::Instant::now();
    let mut child = spawn(&mut run)?;
    let mut verdict_at: Option<std::time::Instant> = None;
    let ended = loop {
        if let Some(status) = child.try_wait()? {
            break Ended::Exited(status.code());
        }
        if verdict_at.is_none() {
            let serial = std::fs::read(&run.serial).unwrap_or_default();
            if verdict(&String::from_utf8_lossy(&serial)).is_some() {
                verdict_at = Some(std::time::Instant::now());
            }
        }
        if verdict_at.is_some_and(|t| t.elapsed() > Duration::from_secs(1)) {
            kill(&mut child);
            let status = child.wait()?;
            break Ended::Exited(status.code());
        }
        if start.elapsed() > timeout {
            kill(&mut child);
            child.wait()?;
            break Ended::TimedOut;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    let _ = std::fs::copy(&run.display, output);
    Ok(ended)
}

/// The hypervisor's verdict in a serial log: the status of its last `ferrovisor: exit
/// status N` line (what QEMU's isa-debug-exit would have exited with).
pub fn verdict(serial: &str) -> Option<i32> {
    serial
        .lines()
        .rev()
        .find_map(|l| l.trim_end().strip_prefix("ferrovisor: exit status "))
        .and_then(|s| s.trim().parse().ok())
}

/// A file read as it grows: reads block (polling) until data comes or `done` is set.
pub struct Tail {
    file: File,
    done: Arc<AtomicBool>,
}

impl Tail {
    /// Follows `path` (created empty when missing) until `done`.
    pub fn new(path: &Path, done: Arc<AtomicBool>) -> Result<Tail> {
        if !path.exists() {
            File::create(path).with_context(|| format!("creating {}", path.display()))?;
        }
        let file = File::open(path).with_context(|| format!("opening {}", path.display()))?;
        Ok(Tail { file, done })
    }
}

impl Read for Tail {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        loop {
            let finished = self.done.load(Ordering::Acquire);
            let n = self.file.read(buf)?;
            if n > 0 || finished {
                return Ok(n);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

/// Copies a Bochs run's serial output to stdout as it comes, until Bochs exits; returns
/// the hypervisor's verdict status.
pub fn follow_to_stdout(mut run: BochsRun) -> Result<Option<i32>> {
    let mut child = spawn(&mut run)?;
    if !run.serial.exists() {
        File::create(&run.serial)?;
    }
    let mut file = File::open(&run.serial)?;
    let mut seen = Vec::new();
    let mut buf = [0u8; 4096];
    let mut verdict_at: Option<std::time::Instant> = None;
    loop {
        let exited = child.try_wait()?.is_some();
        let n = file.read(&mut buf)?;
        if n == 0 {
            if exited {
                break;
            }
            // A verdict printed before the image could power Bochs off ends the run.
            if verdict_at.is_none() && verdict(&String::from_utf8_lossy(&seen)).is_some() {
                verdict_at = Some(std::time::Instant::now());
            }
            if verdict_at.is_some_and(|t| t.elapsed() > Duration::from_secs(1)) {
                kill(&mut child);
            }
            std::thread::sleep(Duration::from_millis(20));
            continue;
        }
        seen.extend_from_slice(&buf[..n]);
        let mut out = std::io::stdout().lock();
        out.write_all(&buf[..n])?;
        out.flush()?;
    }
    child.wait()?;
    Ok(verdict(&String::from_utf8_lossy(&seen)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bochsrc_has_what_debian_bochs_needs() {
        let rc = bochsrc(
            Path::new("/t/f.iso"),
            "corei7_skylake_x",
            512,
            Path::new("/t/s.txt"),
            Path::new("/t/b.log"),
        );
        for line in [
            "cpu: model=corei7_skylake_x, count=1, ips=50000000",
            "ata0-master: type=cdrom, path=/t/f.iso, status=inserted",
            "boot: cdrom",
            "megs: 512",
            "com1: enabled=1, mode=file, dev=/t/s.txt",
            "display_library: term",
            "error: action=report",
            // without these two Bochs 2.7 aborts with "buffer overflow detected"
            "speaker: enabled=0",
            "sound: driver=dummy",
        ] {
            assert!(rc.lines().any(|l| l == line), "missing {line:?} in\n{rc}");
        }
    }

    #[test]
    fn the_verdict_is_the_last_status_line() {
        assert_eq!(verdict("x\nferrovisor: exit status 1\r\n"), Some(1));
        assert_eq!(
            verdict("ferrovisor: exit status 5\nferrovisor: exit status 7\n"),
            Some(7)
        );
        assert_eq!(verdict("FATAL: no\n"), None);
    }

    #[test]
    fn qemu_cpus_stay_qemu() {
        let boot = qemu::Boot {
            image: Path::new("/i"),
            bundle: Path::new("/b"),
            cmdline: "",
            cpu: "max",
            domain_memory_mib: 32,
            host_cpus: 2,
            serial: Serial::Pipe,
            extra: &[],
        };
        let l = launch(&boot, Path::new("/nonexistent")).unwrap();
        assert!(matches!(l, Launch::Qemu(_)));
    }

    #[test]
    fn a_tail_reads_what_is_appended() {
        let path = std::env::temp_dir().join(format!("xtask-tail-{}.txt", std::process::id()));
        let _ = std::fs::remove_file(&path);
        let done = Arc::new(AtomicBool::new(false));
        let mut t = Tail::new(&path, done.clone()).unwrap();
        std::fs::OpenOptions::new()
            .append(true)
            .open(&path)
            .unwrap()
            .write_all(b"abc")
            .unwrap();
        let mut buf = [0u8; 8];
        assert_eq!(t.read(&mut buf).unwrap(), 3);
        done.store(true, Ordering::Release);
        assert_eq!(t.read(&mut buf).unwrap(), 0);
        std::fs::remove_file(&path).unwrap();
    }
}
