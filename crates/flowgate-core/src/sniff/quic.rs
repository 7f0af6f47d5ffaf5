//! QUIC sniffer (placeholder).
use super::{ClientHello, Sniff};
pub fn is_initial(_datagram: &[u8]) -> bool {
    false
}
#[derive(Default)]
pub struct InitialSniffer;
impl InitialSniffer {
    pub fn new() -> Self {
        InitialSniffer
    }
    pub fn push(&mut self, _datagram: &[u8]) -> Sniff<ClientHello> {
        Sniff::NotThis
    }
}
