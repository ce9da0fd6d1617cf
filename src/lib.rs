//! oci2uk turns a container image into a self-contained unikernel.
//!
//! The library is organised by pipeline stage; data flows one way:
//!
//! ```text
//! source ──> image ──> flatten ──> plan ──> rootfs ──> bake ──> output
//! ```
//!
//! - [`reference`]: what the user names (a registry reference or a transport such as
//!   `oci:DIR`, `docker-archive:FILE`) in, a [`reference::Source`] out.
//! - [`oci`]: the OCI document model, with no I/O: media types, manifests and indexes,
//!   platforms, layer compression, digests and the integrity checks.
//! - [`registry`]: the distribution protocol: manifests and blobs from a registry, verified,
//!   into the [`cache`].
//! - [`image`]: a [`reference::Source`] in, a resolved [`image::Image`] out (config and verified
//!   layer blobs), whatever the transport, by one walk over each transport's blobs.
//! - [`tar`]: the hardened tar reader (capped extension records, truncation detected) that
//!   both the layers and the archive transports are read with.
//! - [`flatten`]: layer blobs in, one [`flatten::Tree`] out (metadata in memory, file contents
//!   spooled by digest).
//! - [`output`]: a tree in, bytes out (the `tar` format).
//! - [`kernel`]: a kernel image in (bzImage, vmlinux), a [`kernel::Kernel`] out: its vmlinux,
//!   version, PVH entry, configuration and module tree.
//! - [`plan`]: image config + tree + CLI overrides in, the checked launch configuration
//!   ([`oci2uk_config::Config`]) out.
//! - [`rootfs`]: tree + init + modules + configuration in, a compressed newc initramfs out.
//! - [`bake`]: kernel + initramfs + command line in, one bootable PVH ELF out.
//! - [`input`]: a command's argument in, a file or an image ([`input::Input`]) out.
//! - [`host`]: probes of the machine oci2uk runs on (the TSC frequency a build bakes).
//! - [`build`]: the whole pipeline for the `build` command; [`run`]: a baked file in, a QEMU
//!   guest out; [`init_blob`]: the embedded guest init.
//! - [`launch`]: a guest's description in, what each hypervisor takes out (QEMU's arguments
//!   and script, Firecracker's JSON, Cloud Hypervisor's script, xl.cfg); [`run`] and
//!   [`bundle`] use it.
#![forbid(unsafe_code)]
#![deny(missing_docs)]

pub mod artifact;
pub mod bake;
pub mod build;
pub mod bundle;
pub mod cache;
pub mod flatten;
pub mod host;
pub mod image;
pub mod init_blob;
pub mod input;
pub mod kernel;
pub mod launch;
pub mod oci;
pub mod output;
pub mod plan;
pub mod progress;
pub mod reference;
pub mod registry;
pub mod rootfs;
pub mod run;
pub mod tar;
