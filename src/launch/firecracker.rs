//! Firecracker: the `VmmConfig` JSON that `firecracker --no-api --config-file FILE` takes
//! (`boot-source`, `drives`, `machine-config`, `network-interfaces`).

use super::{Guest, TAP};

/// The guest's MAC address on Firecracker: locally administered, unicast.
pub const GUEST_MAC: &str = "06:00:ac:10:00:02";

/// What Firecracker needs on the command line beyond the baked one: reboot through the
/// keyboard controller (which stops the VM; the baked `panic=-1` reboots on a panic), no PCI
/// probe, and no i8042 probes that only cost time (as Firecracker's own default has them).
pub const FIRECRACKER_ARGS: &str = "reboot=k pci=off i8042.noaux i8042.nomux i8042.nopnp \
                                    i8042.dumbkbd";

/// Firecracker's command line: `cmdline` and [`FIRECRACKER_ARGS`].
pub fn boot_args(cmdline: &str) -> String {
    format!("{cmdline} {FIRECRACKER_ARGS}")
}

/// The configuration, pretty-printed with a final newline.
pub fn config_json(guest: &Guest<'_>) -> String {
    let v = serde_json::json!({
        "boot-source": {
            "kernel_image_path": guest.kernel,
            "initrd_path": guest.initrd,
            "boot_args": boot_args(guest.cmdline),
        },
        // Firecracker's configuration has no default for this list.
        "drives": [],
        "machine-config": {
            "vcpu_count": guest.vcpus,
            "mem_size_mib": guest.memory_mib,
        },
        "network-interfaces": [{
            "iface_id": "eth0",
            "guest_mac": GUEST_MAC,
            "host_dev_name": TAP,
        }],
    });
    let mut s = serde_json::to_string_pretty(&v).expect("JSON values serialise");
    s.push('\n');
    s
}
