//! The short-lived program of the owners benchmark (`src/bin/owners.rs`, `bench/owners.sh`): one
//! flow from a source port given on the command line, then exit at once.
//!
//! ```text
//! connect_once tcp 203.0.113.10:5002 10000   # bind port 10000, connect() (at most 5 s), exit
//! connect_once udp 203.0.113.10:5300 10001   # bind port 10001, one unconnected sendto(), exit
//! ```
//!
//! TCP: a blocking `connect()` (bounded by SO_SNDTIMEO, 5 s), then the process exits, which
//! closes the socket (FIN). UDP: one 16-byte datagram by `sendto()` on an unconnected socket,
//! then the process exits. Exit status 0 when the connect or the send succeeded, 1 when it failed
//! (the error on stderr), 2 for a bad command line. The source port makes each run's flow its own
//! 4-tuple, so the benchmark finds each run's flow in flowgate's event log by it, and it is in
//! the command line that flowgate records for the flow's owner.
//!
//! It touches one socket of its own and nothing else; no allocator setup, no threads, so that a
//! run costs about a millisecond (exec included).

use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4, UdpSocket};
use std::process::ExitCode;

use flowgate_bench::connect::connect_open;
use nix::sys::socket::SockaddrIn;

const USAGE: &str = "usage: connect_once tcp|udp IPV4:PORT SOURCE_PORT";

fn run(args: &[String]) -> Result<(), (u8, String)> {
    let [proto, to, port] = args else {
        return Err((2, USAGE.to_string()));
    };
    let to: SocketAddrV4 = to.parse().map_err(|e| (2, format!("`{to}` is not IPV4:PORT ({e})\n{USAGE}")))?;
    let port: u16 = port.parse().map_err(|e| (2, format!("`{port}` is not a port ({e})\n{USAGE}")))?;
    match proto.as_str() {
        "tcp" => {
            // The socket is closed by the exit.
            let (_fd, _) = connect_open(&SockaddrIn::from(to), port).map_err(|e| (1, format!("tcp: {e}")))?;
            Ok(())
        }
        "udp" => {
            let local = SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, port);
            let s = UdpSocket::bind(local).map_err(|e| (1, format!("udp: bind {local}: {e}")))?;
            s.send_to(b"flowgate-owners\n", SocketAddr::V4(to)).map_err(|e| (1, format!("udp: sendto {to}: {e}")))?;
            Ok(())
        }
        other => Err((2, format!("`{other}`: expected tcp or udp\n{USAGE}"))),
    }
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match run(&args) {
        Ok(()) => ExitCode::SUCCESS,
        Err((code, msg)) => {
            eprintln!("connect_once: {msg}");
            ExitCode::from(code)
        }
    }
}
