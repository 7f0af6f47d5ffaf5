//! # flowgate
//!
//! The binary crate: the config file, the CLI and the drivers that feed the engine of
//! `flowgate-core`. Everything here is I/O around the core: reading files, writing event lines,
//! parsing arguments. The library half exists so tests and benchmarks can call the same code the
//! binary runs.

pub mod cli;
pub mod config;
pub mod daemon;
pub mod replay;
