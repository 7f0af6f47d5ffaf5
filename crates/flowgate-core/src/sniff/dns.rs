//! dns sniffer (to be written).
