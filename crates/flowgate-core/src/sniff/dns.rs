//! DNS sniffer (placeholder).
use super::Sniff;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Message {
    pub id: u16,
    pub response: bool,
    pub rcode: u8,
    pub question: Option<Question>,
    pub answers: Vec<Record>,
}
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Question {
    pub name: String,
    pub qtype: u16,
}
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Record {
    pub name: String,
    pub ttl: u32,
    pub data: RecordData,
}
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RecordData {
    A(Ipv4Addr),
    Aaaa(Ipv6Addr),
    Cname(String),
    Other(u16),
}
pub fn message(_datagram: &[u8]) -> Sniff<Message> {
    Sniff::NotThis
}
pub fn tcp_message(_stream: &[u8]) -> Sniff<Message> {
    Sniff::NotThis
}
impl Message {
    pub fn resolved(&self) -> Vec<(IpAddr, u32)> {
        Vec::new()
    }
}
