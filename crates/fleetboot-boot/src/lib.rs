//! What a client should boot.
//!
//! - [`identity`]: who is booting — MAC, UUID, architecture, vendor and user class, group —
//!   as gathered from a DHCP request. Shared by every role that meets clients.
//! - [`profile`]: operator rules (profiles) matching identities to a [`BootPlan`].
//! - [`ipxe`]: the per-client iPXE script for a plan.
//! - [`config`]: the `[[profile]]` and `[[client]]` arrays of the config file.
//!
//! No I/O here: the address service, TFTP and HTTP shells call into these pure functions.

pub mod config;
pub mod identity;
pub mod ipxe;
pub mod profile;

pub use identity::{format_pxe_uuid, Arch, ClientIdentity, MacAddr};
pub use profile::{image_ref_ok, select, BootPlan, Disk, DiskOverlay, Matcher, Profile, ProfileError};
