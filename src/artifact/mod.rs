//! Baked files as OCI images: what `push` writes, what `run REF`, `inspect` and `--kernel REF`
//! read back.
//!
//! A pushed unikernel is an ordinary OCI image (so every registry and client can copy,
//! inspect and garbage-collect it):
//!
//! - one layer, `application/vnd.oci.image.layer.v1.tar+zstd`, holding `unikernel/NAME.elf`
//!   (the baked file, byte for byte; a bundle's files beside it) and `urunc.json` (urunc's
//!   keys, values `b64:`-encoded, for runtimes that do not pass annotations on);
//! - an image config for `linux` and the kernel's architecture whose labels repeat the
//!   annotations;
//! - manifest annotations: urunc's keys ([`URUNC_TYPE`] ...), `org.opencontainers.image.*`
//!   (the source image as `base.name` and `base.digest`, `created`, `title`), and oci2uk's own
//!   ([`ROOTFS_DIGEST`] ...).
//!
//! A kernel artifact is the same shape: one layer with `boot/vmlinuz` and
//! `lib/modules/RELEASE/...`, annotated with [`KERNEL_VERSION`] and [`KERNEL_ARTIFACT`].
//!
//! Everything is deterministic: tar entries in sorted order with fixed owners and the
//! `created` time (or 0), zstd at a fixed level, JSON with a fixed key order; pushing the same
//! file twice gives the same digests.

pub mod baked;
pub mod fetch;
pub mod inspect;
pub mod push;

pub use baked::{BakedError, BakedInfo};

/// urunc: the unikernel type (`linux`).
pub const URUNC_TYPE: &str = "com.urunc.unikernel.unikernelType";
/// urunc: the hypervisor to start it with.
pub const URUNC_HYPERVISOR: &str = "com.urunc.unikernel.hypervisor";
/// urunc: the path of the kernel file inside the image.
pub const URUNC_BINARY: &str = "com.urunc.unikernel.binary";
/// urunc: the kernel command line.
pub const URUNC_CMDLINE: &str = "com.urunc.unikernel.cmdline";
/// The source image, as the user named it.
pub const BASE_NAME: &str = "org.opencontainers.image.base.name";
/// The source image's manifest digest.
pub const BASE_DIGEST: &str = "org.opencontainers.image.base.digest";
/// When the source image was created (or `SOURCE_DATE_EPOCH`).
pub const CREATED: &str = "org.opencontainers.image.created";
/// The file's name.
pub const TITLE: &str = "org.opencontainers.image.title";
/// sha256 of the baked initramfs.
pub const ROOTFS_DIGEST: &str = "org.oci2uk.rootfs.digest";
/// sha256 of the baked file itself.
pub const FILE_DIGEST: &str = "org.oci2uk.file.digest";
/// The kernel release.
pub const KERNEL_VERSION: &str = "org.oci2uk.kernel.version";
/// The guest memory the image needs, in MiB.
pub const MEMORY: &str = "org.oci2uk.memory";
/// Marks a kernel artifact (`oci2uk kernel push`); its value is the kernel image's path in
/// the layer.
pub const KERNEL_ARTIFACT: &str = "org.oci2uk.kernel.image";

/// The directory of the layer that holds the kernel file.
pub const UNIKERNEL_DIR: &str = "unikernel";
/// The layer's media type.
pub const LAYER_MEDIA_TYPE: &str = "application/vnd.oci.image.layer.v1.tar+zstd";
/// The manifest's media type.
pub const MANIFEST_MEDIA_TYPE: &str = "application/vnd.oci.image.manifest.v1+json";
/// The config's media type.
pub const CONFIG_MEDIA_TYPE: &str = "application/vnd.oci.image.config.v1+json";

/// Whether manifest annotations describe a unikernel (as pushed by oci2uk or for urunc).
pub fn is_unikernel(annotations: &std::collections::HashMap<String, String>) -> bool {
    annotations.contains_key(URUNC_BINARY) && annotations.contains_key(URUNC_TYPE)
}
