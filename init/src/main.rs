//! PID 1 of an oci2uk guest.
fn main() {}
