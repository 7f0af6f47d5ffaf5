//! One bulk TCP transfer to the lab's `tcp_sink`, for the live benchmarks that measure
//! throughput (`src/bin/live.rs`, `src/bin/packets.rs`): 128 KiB writes for a time (or up to a
//! byte cap), a half-close, and the time until the sink's reply confirms every byte arrived.
//!
//! It touches only the one client socket it opens, in the calling thread's namespace.

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::time::{Duration, Instant};

/// Size of each write.
pub const WRITE_SIZE: usize = 128 << 10;

/// Sends to the sink at `to` for `seconds` or until `max_bytes` were sent, whichever comes
/// first; returns the bytes sent and the seconds until the sink confirmed it got them all.
pub fn to_sink(to: SocketAddr, seconds: f64, max_bytes: u64) -> Result<(u64, f64), String> {
    let mut s =
        TcpStream::connect_timeout(&to, Duration::from_secs(5)).map_err(|e| format!("bulk: connect {to}: {e}"))?;
    s.set_write_timeout(Some(Duration::from_secs(10))).map_err(|e| e.to_string())?;
    let buf = vec![0x5a_u8; WRITE_SIZE];
    let start = Instant::now();
    let until = start + Duration::from_secs_f64(seconds);
    let mut sent = 0u64;
    while sent < max_bytes && Instant::now() < until {
        s.write_all(&buf).map_err(|e| format!("bulk: write after {sent} bytes: {e}"))?;
        sent += WRITE_SIZE as u64;
    }
    s.shutdown(Shutdown::Write).map_err(|e| format!("bulk: shutdown: {e}"))?;
    s.set_read_timeout(Some(Duration::from_secs(10))).map_err(|e| e.to_string())?;
    let mut reply = String::new();
    s.read_to_string(&mut reply).map_err(|e| format!("bulk: reading the sink's count: {e}"))?;
    let seconds = start.elapsed().as_secs_f64();
    match reply.trim().parse::<u64>() {
        Ok(n) if n == sent => Ok((sent, seconds)),
        _ => Err(format!("bulk: sent {sent} bytes, the sink answered {reply:?}")),
    }
}
