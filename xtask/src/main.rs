//! `cargo xtask`: builds ferrovisor's freestanding image and test guests, boots them in
//! QEMU, and runs everything CI checks.
//!
//! - `cargo xtask build [--debug]`: the hypervisor image and the test guests.
//! - `cargo xtask run [options] [-- CMD]`: build, bundle a domain, boot QEMU (or Bochs
//!   with `--cpu vmx`) on this terminal; with `-- CMD`, run CMD in the Linux guest and exit
//!   with its status.
//! - `cargo xtask guest [--force]`: download Debian's kernel and busybox, build the Linux
//!   guest's initramfs (cached in `target/guest/<release>/`).
//! - `cargo xtask bench [--runs N] [--vcpus N]`: the Linux guest's boot time under the
//!   hypervisor against bare QEMU (`target/xtask/bench-boot.json`).
//! - `cargo xtask test [--cpu svm|vmx] [--full] [--scenario NAME]... [--keep-going]`: fmt,
//!   clippy, unit tests, build and the QEMU (SVM) and Bochs (VMX) scenarios.
//! - `cargo xtask iso [--domain FILE]... [--output PATH]`: a hybrid BIOS/UEFI GRUB ISO.

mod bench;
mod bochs;
mod bundle;
mod cpio;
mod domains;
mod guest;
mod image;
mod iso;
mod kernels;
mod pipeline;
mod qemu;
mod run;
mod sys;
mod transcript;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// Build, boot and test ferrovisor.
#[derive(Parser, Debug)]
#[command(name = "cargo xtask", bin_name = "cargo xtask", version, about, long_about = None)]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Build the hypervisor image and the test guests (into target/image/).
    Build {
        /// Build the dev profile instead of release.
        #[arg(long)]
        debug: bool,
    },
    /// Build, then boot the hypervisor in QEMU with one domain, serial on this terminal;
    /// with `-- CMD`, run CMD in the Linux guest and exit with its status.
    Run(Box<run::RunArgs>),
    /// Download Debian's kernel and busybox and build the Linux guest (target/guest/).
    Guest(guest::GuestArgs),
    /// Everything CI runs: fmt, clippy, unit tests, build, QEMU and Bochs scenarios.
    Test(pipeline::TestArgs),
    /// A hybrid (BIOS and UEFI) GRUB ISO with the image and its domains, for real
    /// machines, USB sticks, QEMU -cdrom and Bochs.
    Iso(iso::IsoArgs),
    /// Boot-time benchmark: the Linux guest under the hypervisor against bare QEMU (TCG
    /// timings are noisy: only ratios within one run are meaningful).
    Bench(bench::BenchArgs),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Cmd::Build { debug } => image::build_all(if debug {
            image::Profile::Debug
        } else {
            image::Profile::Release
        })
        .map(|()| ExitCode::SUCCESS),
        Cmd::Run(args) => run::run(*args),
        Cmd::Guest(args) => guest::guest(args).map(|()| ExitCode::SUCCESS),
        Cmd::Test(args) => pipeline::test(args),
        Cmd::Iso(args) => iso::iso(args).map(|()| ExitCode::SUCCESS),
        Cmd::Bench(args) => bench::bench(args),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
