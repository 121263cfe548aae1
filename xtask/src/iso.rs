//! `cargo xtask iso`: a hybrid GRUB ISO (BIOS and UEFI; CD, USB stick or QEMU `-cdrom`)
//! that boots the hypervisor with its domains, on a real machine or an emulator.
//!
//! GRUB loads the image with `multiboot2` and the boot bundle with `module2`: the same
//! cpio archive QEMU gets as `-initrd` (`domains/*.cfg`, the xl.cfg of each domain, and
//! `files/*`, the kernels and ramdisks they name). One module keeps the ISO and QEMU runs
//! byte-for-byte the same boot; the bundle's xl.cfg files are also copied beside it on
//! the ISO (`/boot/domains/`) to be read. `grub-mkrescue` needs grub-pc-bin (BIOS),
//! grub-efi-amd64-bin (UEFI), xorriso and mtools.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use anyhow::{bail, Context, Result};
use clap::Args;

use crate::image::{self, Profile};
use crate::say;
use crate::sys::{self, Requirement};

/// What `grub-mkrescue` needs.
pub const REQUIREMENTS: &[Requirement] = &[
    Requirement {
        command: "grub-mkrescue",
        package: "grub-common",
        why: "makes the bootable GRUB ISO",
        optional: false,
    },
    Requirement {
        command: "/usr/lib/grub/i386-pc",
        package: "grub-pc-bin",
        why: "GRUB for BIOS machines (and Bochs)",
        optional: false,
    },
    Requirement {
        command: "/usr/lib/grub/x86_64-efi",
        package: "grub-efi-amd64-bin",
        why: "GRUB for UEFI machines",
        optional: false,
    },
    Requirement {
        command: "xorriso",
        package: "xorriso",
        why: "writes the ISO 9660 image",
        optional: false,
    },
    Requirement {
        command: "mformat",
        package: "mtools",
        why: "writes the EFI system partition inside the ISO",
        optional: false,
    },
];

/// What goes on an ISO.
#[derive(Clone, Debug)]
pub struct Contents<'a> {
    /// The hypervisor image (ELF64 with the multiboot2 header).
    pub image: &'a Path,
    /// The boot bundle (cpio).
    pub bundle: &'a Path,
    /// The hypervisor's command line.
    pub cmdline: &'a str,
}

/// The grub.cfg: serial and screen console, no menu delay, one entry.
pub fn grub_cfg(cmdline: &str, timeout_secs: u32) -> String {
    let cmdline = cmdline.replace(['"', '\\', '$'], "");
    format!(
        "# ferrovisor (written by cargo xtask iso)\n\
         # The hypervisor's options follow its path on the multiboot2 line (e.g. loglvl=debug).\n\
         set timeout={timeout_secs}\n\
         set default=0\n\
         serial --unit=0 --speed=115200\n\
         terminal_input serial console\n\
         terminal_output serial console\n\
         menuentry \"ferrovisor\" {{\n\
         \x20   multiboot2 /boot/ferrovisor {cmdline}\n\
         \x20   module2 /boot/bundle.cpio bundle\n\
         \x20   boot\n\
         }}\n"
    )
}

/// Writes the ISO `out` holding `c` (staging files in `out` with `.d` appended).
/// `interactive` gives the GRUB menu a few seconds (for real machines).
pub fn build(c: &Contents, out: &Path, interactive: bool) -> Result<()> {
    sys::ensure(REQUIREMENTS)?;
    let mut stage = out.as_os_str().to_owned();
    stage.push(".d");
    let stage = PathBuf::from(stage);
    let _ = std::fs::remove_dir_all(&stage);
    let boot = stage.join("boot");
    std::fs::create_dir_all(boot.join("grub"))
        .with_context(|| format!("creating {}", boot.display()))?;
    let copy = |from: &Path, to: &Path| {
        std::fs::copy(from, to)
            .with_context(|| format!("copying {} to {}", from.display(), to.display()))
    };
    copy(c.image, &boot.join("ferrovisor"))?;
    copy(c.bundle, &boot.join("bundle.cpio"))?;
    std::fs::write(
        boot.join("grub").join("grub.cfg"),
        grub_cfg(c.cmdline, if interactive { 3 } else { 0 }),
    )?;
    // The domain configs, readable on the ISO (the bundle holds the same bytes).
    let bytes = std::fs::read(c.bundle)?;
    for (name, data) in crate::cpio::entries(&bytes)? {
        if let Some(cfg) = name.strip_prefix("domains/") {
            let dir = boot.join("domains");
            std::fs::create_dir_all(&dir)?;
            std::fs::write(dir.join(cfg), data)?;
        }
    }
    let mut cmd = Command::new("grub-mkrescue");
    cmd.arg("-o").arg(out).arg(&stage);
    let output = cmd
        .stdin(Stdio::null())
        .output()
        .context("starting grub-mkrescue")?;
    if !output.status.success() {
        bail!(
            "`{}` failed ({}): {}",
            sys::shell_line(&cmd),
            output.status,
            String::from_utf8_lossy(&output.stderr).trim()
        );
    }
    Ok(())
}

/// Options of `cargo xtask iso`.
#[derive(Args, Debug)]
pub struct IsoArgs {
    /// Where to write the ISO.
    #[arg(long, value_name = "PATH", default_value = "target/ferrovisor.iso")]
    pub output: PathBuf,
    /// A domain described by an xl.cfg file (repeatable), as for `cargo xtask run
    /// --domain`; default: the Linux guest with a shell on its console.
    #[arg(long = "domain", value_name = "FILE")]
    pub domains: Vec<PathBuf>,
    /// The hypervisor's command line.
    #[arg(long, value_name = "STR", default_value = "")]
    pub cmdline: String,
    /// Build the dev profile instead of release.
    #[arg(long)]
    pub debug: bool,
}

/// Runs `cargo xtask iso`.
pub fn iso(args: IsoArgs) -> Result<()> {
    let profile = if args.debug {
        Profile::Debug
    } else {
        Profile::Release
    };
    let work = sys::workspace_root().join("target").join("xtask");
    std::fs::create_dir_all(&work)?;
    let image = image::build_hypervisor(profile)?;
    let bundle_path = work.join("iso.cpio");
    if args.domains.is_empty() {
        let g = crate::guest::prepare(false)?;
        let boot = crate::run::LinuxBoot {
            guest: &g,
            ramdisk: &g.initramfs,
            with_cmd: false,
            append: "",
            memory_mib: ferrovisor_tests::LINUX_MEMORY_MIB,
            vcpus: 1,
            serial: crate::qemu::Serial::Pipe,
            extra: &[],
        };
        crate::run::write_bundle(&bundle_path, &boot.domain())?;
    } else {
        crate::run::write_user_bundle(&args.domains, profile, &bundle_path)?;
    }
    let out = if args.output.is_absolute() {
        args.output.clone()
    } else {
        sys::workspace_root().join(&args.output)
    };
    build(
        &Contents {
            image: &image,
            bundle: &bundle_path,
            cmdline: &args.cmdline,
        },
        &out,
        true,
    )?;
    let size = std::fs::metadata(&out)?.len();
    say!(
        "ISO: {} ({} MiB; BIOS and UEFI, CD or USB stick: `dd if={} of=/dev/sdX bs=4M`)",
        out.display(),
        size >> 20,
        out.display()
    );
    say!(
        "try it: qemu-system-x86_64 -machine q35 -accel tcg -cpu max -m 1024 -cdrom {} -serial stdio -display none \
         (UEFI: add -bios /usr/share/ovmf/OVMF.fd)",
        out.display()
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grub_cfg_loads_the_image_and_the_bundle() {
        let cfg = grub_cfg("loglvl=debug", 0);
        assert!(cfg.contains("    multiboot2 /boot/ferrovisor loglvl=debug\n"));
        assert!(cfg.contains("    module2 /boot/bundle.cpio bundle\n"));
        assert!(cfg.contains("set timeout=0\n"));
        assert!(cfg.contains("serial --unit=0 --speed=115200\n"));
        // quotes and variables cannot break out of the line
        assert!(grub_cfg("a\"b$c", 1).contains("multiboot2 /boot/ferrovisor abc\n"));
    }
}
