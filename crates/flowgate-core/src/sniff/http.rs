//! http sniffer (to be written).
