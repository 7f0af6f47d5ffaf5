//! The `flowgate` binary: see `flowgate --help` and the README.

/// mimalloc instead of glibc's allocator: the daemon's threads hand memory to each other (kernel
/// report batches to the queue workers, listing chunks and events away from them), and with
/// glibc a queue worker freeing another thread's block waits for that thread's arena lock, and
/// sometimes trims its heap, for milliseconds (measured with `bench/src/bin/registry.rs`).
/// mimalloc frees across threads without a shared lock.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> std::process::ExitCode {
    flowgate::cli::main()
}
