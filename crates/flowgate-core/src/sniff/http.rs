//! HTTP sniffer (placeholder).
use super::Sniff;
pub const MAX_HEAD: usize = 16 * 1024;
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RequestHead {
    pub method: String,
    pub target: String,
    pub host: Option<String>,
}
pub fn request_head(_stream: &[u8]) -> Sniff<RequestHead> {
    Sniff::NotThis
}
