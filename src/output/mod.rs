//! Outputs: a flattened tree in, bytes out.

pub mod tar;
