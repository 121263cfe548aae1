//! `cargo xtask run`: build, bundle one domain, boot QEMU on the terminal.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{bail, Context, Result};
use clap::Args;
use ferrovisor_tests::{status_meaning, Domain, KernelSource, STATUS_OK};

use crate::image::{self, Profile};
use crate::{bundle, kernels, qemu, sys};

/// Options of `cargo xtask run`.
#[derive(Args, Debug)]
pub struct RunArgs {
    /// Guest kernel (a PVH ELF); default: the project's test guest.
    #[arg(long, value_name = "PATH")]
    pub kernel: Option<PathBuf>,
    /// Guest command line; default: "test=exits" for the test guest, empty otherwise.
    #[arg(long, value_name = "STR")]
    pub append: Option<String>,
    /// Guest ramdisk, bundled as `ramdisk = "files/<name>"`.
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
    /// Virtualisation backend to boot: only `svm` (QEMU `-cpu max`) exists so far.
    #[arg(long, value_name = "svm", default_value = "svm")]
    pub cpu: String,
    /// Extra argument for QEMU, appended as it is (repeat for more, e.g. `--qemu-arg=-d`).
    #[arg(long = "qemu-arg", value_name = "ARG", allow_hyphen_values = true)]
    pub qemu_args: Vec<String>,
    /// Build and boot the dev profile instead of release.
    #[arg(long)]
    pub debug: bool,
    /// Build and write the bundle, print the QEMU command, but do not start QEMU.
    #[arg(long)]
    pub dry_run: bool,
    /// A command to run in the guest (needs a Linux guest: not available yet).
    #[arg(last = true, value_name = "CMD")]
    pub command: Vec<String>,
}

/// The QEMU `-cpu` value for a `--cpu` backend name.
fn qemu_cpu(backend: &str) -> Result<&'static str> {
    match backend {
        "svm" => Ok("max"),
        "vmx" => bail!("--cpu vmx: the VMX backend under Bochs is not built yet"),
        other => bail!("--cpu {other}: unknown backend (only `svm` exists)"),
    }
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
    if !args.command.is_empty() {
        bail!("running a command in the guest needs a Linux guest: not available yet");
    }
    let cpu = qemu_cpu(&args.cpu)?;
    let profile = if args.debug {
        Profile::Debug
    } else {
        Profile::Release
    };

    if !args.dry_run {
        sys::ensure(sys::QEMU)?;
    }
    let image = image::build_hypervisor(profile)?;
    let (domain, testguest) = match &args.kernel {
        None => {
            let guest = image::build_testguest(profile)?;
            let domain = Domain {
                memory_mib: args.memory.unwrap_or(32),
                vcpus: args.vcpus,
                cmdline: args.append.clone().unwrap_or_else(|| "test=exits".into()),
                ..Domain::test_guest("testguest", "")
            };
            (domain, guest)
        }
        Some(path) => {
            let path = std::fs::canonicalize(path)
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
            };
            (domain, PathBuf::new())
        }
    };

    let work = sys::workspace_root().join("target").join("xtask");
    let mut domains = kernels::prepare(
        std::slice::from_ref(&domain),
        &testguest,
        &work.join("kernels"),
        "run",
    )?;
    if let Some(r) = &args.ramdisk {
        let r = std::fs::canonicalize(r).with_context(|| format!("--ramdisk {}", r.display()))?;
        domains[0].ramdisk = Some(r);
    }
    let bundle_path = work.join("run.cpio");
    bundle::write(&bundle_path, &domains)?;
    println!(
        "boot bundle: {} (domain '{}', {} MiB, {} vCPU, cmdline {})",
        bundle_path.display(),
        domain.name,
        domain.memory_mib,
        domain.vcpus,
        bundle::quote(&domain.cmdline)
    );

    let mut cmd = qemu::command(&qemu::Boot {
        image: &image,
        bundle: &bundle_path,
        cmdline: &args.cmdline,
        cpu,
        domain_memory_mib: domain.memory_mib,
        serial: qemu::Serial::Interactive,
        extra: &args.qemu_args,
    });
    if args.dry_run {
        println!("{}", sys::shell_line(&cmd));
        return Ok(ExitCode::SUCCESS);
    }
    println!("$ {}", sys::shell_line(&cmd));
    println!("(serial on this terminal; Ctrl-A X quits QEMU)");
    let status = cmd.status().context("starting qemu-system-x86_64")?.code();
    match status {
        Some(s) => println!("QEMU exited with status {s}: {}", status_meaning(s)),
        None => println!("QEMU was killed by a signal: {}", status_meaning(-1)),
    }
    Ok(ExitCode::from(exit_code(status)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_svm_is_offered() {
        assert_eq!(qemu_cpu("svm").unwrap(), "max");
        let err = qemu_cpu("vmx").unwrap_err().to_string();
        assert!(err.contains("the VMX backend under Bochs is not built yet"));
        assert!(qemu_cpu("arm").is_err());
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
}
