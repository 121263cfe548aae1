//! Building the freestanding binaries: the hypervisor image and the test guests.
//!
//! They are `#![no_std]` programs built for `x86_64-unknown-linux-gnu` with the flags in
//! [`RUSTFLAGS`], passed through `CARGO_ENCODED_RUSTFLAGS` with an explicit `--target`
//! and a target directory of their own (`target/image`), so that host crates, build
//! scripts and `cargo test` never see them. Linker scripts come from each crate's
//! build.rs.

use std::path::PathBuf;
use std::process::Command;

use anyhow::Result;

use crate::{say, sys};

/// The target triple of the freestanding binaries.
pub const TARGET: &str = "x86_64-unknown-linux-gnu";

/// Rust flags for every freestanding binary.
pub const RUSTFLAGS: &[&str] = &[
    "-C",
    "relocation-model=static",
    "-C",
    "target-feature=+crt-static",
    "-C",
    "no-redzone=yes",
    "-C",
    "link-arg=-nostartfiles",
    "-C",
    "link-arg=-nostdlib",
    "-C",
    "link-arg=-static",
    "-C",
    "link-arg=-no-pie",
    "-C",
    "link-arg=-Wl,--build-id=none",
    "-C",
    "link-arg=-Wl,-z,max-page-size=0x1000",
    "-C",
    "force-frame-pointers=yes",
];

/// Cargo profile of a build.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Profile {
    /// `--release`, output in `.../release/`.
    Release,
    /// The dev profile, output in `.../debug/`.
    Debug,
}

impl Profile {
    /// `release` or `debug`: the profile's output directory and its name in messages.
    pub fn dir(self) -> &'static str {
        match self {
            Profile::Release => "release",
            Profile::Debug => "debug",
        }
    }
}

/// `<workspace>/target/image`, the target directory of the freestanding binaries.
pub fn target_dir() -> PathBuf {
    sys::workspace_root().join("target").join("image")
}

/// Where a freestanding binary called `bin` lands.
pub fn output(bin: &str, profile: Profile) -> PathBuf {
    target_dir().join(TARGET).join(profile.dir()).join(bin)
}

/// The built hypervisor image.
pub fn hypervisor(profile: Profile) -> PathBuf {
    output("ferrovisor", profile)
}

/// The built test guest.
pub fn testguest(profile: Profile) -> PathBuf {
    output("testguest", profile)
}

/// A cargo command (`subcommand`, e.g. `build` or `clippy`) for the freestanding crates:
/// image rustflags in the environment (inherited rustflags removed), explicit target and
/// the image target directory.
pub fn cargo_freestanding(subcommand: &str) -> Command {
    let mut cmd = sys::cargo();
    cmd.arg(subcommand)
        .args(["--target", TARGET, "--target-dir"])
        .arg(target_dir())
        .env_remove("RUSTFLAGS")
        .env_remove("CARGO_BUILD_RUSTFLAGS")
        .env("CARGO_ENCODED_RUSTFLAGS", RUSTFLAGS.join("\x1f"));
    cmd
}

/// Runs a command from [`cargo_freestanding`], first saying which rustflags it gets.
pub fn run_freestanding(cmd: &mut Command) -> Result<()> {
    say!("  (CARGO_ENCODED_RUSTFLAGS: {})", RUSTFLAGS.join(" "));
    sys::run(cmd)
}

fn build_bin(package: &str, bin: &str, profile: Profile) -> Result<PathBuf> {
    let mut cmd = cargo_freestanding("build");
    if profile == Profile::Release {
        cmd.arg("--release");
    }
    cmd.args(["-p", package, "--bin", bin]);
    run_freestanding(&mut cmd)?;
    Ok(output(bin, profile))
}

/// Builds the hypervisor image and returns its path.
pub fn build_hypervisor(profile: Profile) -> Result<PathBuf> {
    say!("building hypervisor image ({})...", profile.dir());
    build_bin("boot", "ferrovisor", profile)
}

/// Builds the test guest and returns its path.
pub fn build_testguest(profile: Profile) -> Result<PathBuf> {
    say!("building test guest ({})...", profile.dir());
    build_bin("testguest", "testguest", profile)
}

/// `cargo xtask build`: the image and every test guest.
pub fn build_all(profile: Profile) -> Result<()> {
    let image = build_hypervisor(profile)?;
    let guest = build_testguest(profile)?;
    say!("hypervisor image: {}", image.display());
    say!("test guest:       {}", guest.display());
    Ok(())
}
