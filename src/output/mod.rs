//! Outputs: a flattened tree in, bytes out.

pub mod sink;
pub mod tar;
