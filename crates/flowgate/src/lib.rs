//! # flowgate
//!
//! The binary crate: the config file, the CLI and the drivers that feed the engine of
//! `flowgate-core`. Everything here is I/O around the core: reading files, writing event lines,
//! parsing arguments, and the live daemon (`daemon`), which drives the engines with the Linux data
//! plane of `flowgate-linux`. The library half exists so tests, benchmarks and products that
//! embed the filter (`daemon::Running`) call the same code the binary runs.

pub mod check;
pub mod cli;
pub mod config;
pub mod daemon;
pub mod diag;
pub mod protocol;
pub mod replay;
