//! quic sniffer (to be written).
