//! Integration tests: the `oci2uk` binary as a user runs it.
//!
//! The tests in `registry`, `repro` and `faults` need the loopback test registry and its fixtures
//! (`testregistry/up.sh`, then `source /tmp/oci2uk-testreg/env`); they are built with the
//! `registry-tests` feature, which the README's test command and `.ci/run` enable. The ones
//! in `vm`, `guest`, `rootfs`, `stop`, `push`, `volume`, `postgres` and `redis` boot VMs
//! through the harness in `support`; they are built with `vm-tests`, which `.ci/run` enables
//! too. Those in `xen` boot guests under a real Xen, the test host `testxen/up.sh DIR` starts
//! (`OCI2UK_XEN_DIR=DIR`); they are built with `xen-tests`.

mod cli;
mod conformance;
#[cfg(feature = "registry-tests")]
mod faults;
#[cfg(feature = "vm-tests")]
mod guest;
mod hostile;
mod kernel_build;
#[cfg(feature = "vm-tests")]
mod postgres;
#[cfg(feature = "vm-tests")]
mod push;
#[cfg(feature = "vm-tests")]
mod redis;
#[cfg(feature = "registry-tests")]
mod registry;
#[cfg(feature = "registry-tests")]
mod repro;
#[cfg(feature = "vm-tests")]
mod rootfs;
#[cfg(feature = "vm-tests")]
mod stop;
#[cfg(feature = "vm-tests")]
mod support;
mod util;
#[cfg(feature = "vm-tests")]
mod vm;
#[cfg(feature = "vm-tests")]
mod volume;
#[cfg(feature = "xen-tests")]
mod xen;
