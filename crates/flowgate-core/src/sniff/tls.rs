//! TLS sniffer (placeholder).
use super::{ClientHello, Sniff};
pub const MAX_CLIENT_HELLO: usize = 16 * 1024;
pub fn client_hello(_stream: &[u8]) -> Sniff<ClientHello> {
    Sniff::NotThis
}
pub fn client_hello_message(_handshake: &[u8]) -> Sniff<ClientHello> {
    Sniff::NotThis
}
