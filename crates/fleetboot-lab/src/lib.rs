//! fleetboot's boot lab: real iPXE firmware (QEMU) booting from a real server inside
//! private network namespaces, end to end, with nothing touching the host's network.
//!
//! Map of the crate:
//! - [`netns`]: the topology. [`netns::Lab`] creates a switch namespace (bridge `br0`), a
//!   server namespace (`srv0` = 10.77.0.1/24, fd77::1/64), taps for VMs and optional client
//!   namespaces; runs commands inside them; tracks the processes it started and deletes
//!   everything on drop, on error and on SIGINT/SIGTERM ([`netns::install_signal_cleanup`]).
//! - [`payload`]: the kernel + busybox initramfs that prints `FLEETBOOT-LAB-MARKER nonce=...`
//!   (built by `scripts/build-payload.sh`, cached).
//! - [`vm`]: one QEMU VM booting from the network with a [`Firmware`] (BIOS + iPXE ROM,
//!   OVMF PXE, OVMF HTTP Boot, OVMF Secure Boot, AAVMF arm64); its serial console read
//!   line by line, matched against the whole marker line; fails fast on firmware/kernel
//!   errors.
//! - [`run`](fn@run): a whole lab run (topology, served root with the boot files Debian
//!   ships for the firmware and [`Loader`] — iPXE, shim + GRUB, GRUB, PXELINUX —, fleetboot
//!   or the dnsmasq reference, 1-3 VMs at once, per-VM timelines) returning a [`LabReport`].
//! - [`gate`]: whether an end-to-end test can run here (root, tools), and whether a
//!   skip is a failure (`FLEETBOOT_REQUIRE_E2E=1`).
//! - [`bench`]: fleetboot and the dnsmasq reference alternately, medians and their ratio.
//! - the `fleetboot-lab` binary (`fleetboot-lab net up`): a [`netns::Lab`] for shell
//!   scripts, held while the calling script runs; the `scripts/bench-*.sh` benchmarks
//!   build their topology with it (`scripts/bench-common.sh`).
//!
//! Everything needs root and the packages `scripts/setup.sh` installs. Wall-clock times
//! are reported, never used to decide pass/fail: a run passes when every VM printed its
//! marker.

pub mod bench;
pub mod gate;
pub mod netns;
pub mod payload;
mod runner;
pub mod vm;

pub use runner::{
    default_vm_timeout, fleetboot_config, fleetboot_config_for, run, trace, LabOptions, LabReport, Loader,
    Mode, ServerKind, TimelineEntry, TimelineSource, TraceEvent, VmReport, GRUB_NET_SIGNED, IPXE_EFI,
    LDLINUX_C32, LPXELINUX, SECURE_BOOT_REFUSAL, SHIM_SIGNED, SNPONLY_EFI,
};
pub use vm::Firmware;
