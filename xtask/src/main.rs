//! `cargo xtask`: builds ferrovisor's freestanding image and test guests, boots them in
//! QEMU, and runs everything CI checks.
//!
//! - `cargo xtask build [--debug]`: the hypervisor image and the test guests.
//! - `cargo xtask run [options]`: build, bundle a domain, boot QEMU on this terminal.
//! - `cargo xtask test [--full] [--scenario NAME]... [--keep-going]`: fmt, clippy, unit
//!   tests, build and the QEMU scenarios.

mod bundle;
mod cpio;
mod image;
mod kernels;
mod pipeline;
mod qemu;
mod run;
mod sys;

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
    /// Build, then boot the hypervisor in QEMU with one domain, serial on this terminal.
    Run(run::RunArgs),
    /// Everything CI runs: fmt, clippy, unit tests, build, QEMU scenarios.
    Test(pipeline::TestArgs),
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
        Cmd::Run(args) => run::run(args),
        Cmd::Test(args) => pipeline::test(args),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
