//! tls sniffer (to be written).
