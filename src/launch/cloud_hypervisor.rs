//! Cloud Hypervisor: a script that starts it with `--kernel`, `--initramfs`, `--cmdline`,
//! `--cpus boot=`, `--memory size=`, `--serial tty --console off` and `--net tap=`.

use super::{Guest, TAP};

/// The script: from its own directory, the command line read from the guest's file, the tap
/// device `$OCI2UK_TAP` or [`TAP`]; further arguments go to Cloud Hypervisor.
pub fn script(guest: &Guest<'_>) -> String {
    format!(
        r#"#!/bin/sh
# Boots {name} on Cloud Hypervisor: {kernel} (PVH) with {initrd} and the command line in
# {cmdline}, {mem} MiB, the serial console on this terminal. The guest's network is the tap
# device $OCI2UK_TAP (default {TAP}); Cloud Hypervisor creates it when it has CAP_NET_ADMIN.
# The guest asks for an address by DHCP. Further arguments go to Cloud Hypervisor.
set -eu
cd "$(dirname "$0")"
exec cloud-hypervisor \
    --kernel {kernel} --initramfs {initrd} --cmdline "$(cat {cmdline})" \
    --cpus boot={vcpus} --memory size={mem}M \
    --serial tty --console off \
    --net "tap=${{OCI2UK_TAP:-{TAP}}}" "$@"
"#,
        name = guest.name,
        kernel = guest.kernel,
        initrd = guest.initrd,
        cmdline = guest.cmdline_file,
        mem = guest.memory_mib,
        vcpus = guest.vcpus,
    )
}
