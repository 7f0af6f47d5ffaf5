//! Helpers shared by flowgate's fuzz targets (see `fuzz/README.md`): a reader that turns the
//! fuzzer's bytes into decisions, and the framing of the netlink targets' inputs.
//!
//! Nothing here is a parser under test; it only cuts the input up. Every reader method returns
//! a default once the input runs out, so a target never fails for lack of bytes.

/// Reads small values off the front of the fuzz input.
#[derive(Debug, Clone)]
pub struct Input<'a> {
    data: &'a [u8],
}

impl<'a> Input<'a> {
    pub fn new(data: &'a [u8]) -> Self {
        Input { data }
    }

    pub fn is_empty(&self) -> bool {
        self.data.is_empty()
    }

    pub fn rest(&self) -> &'a [u8] {
        self.data
    }

    pub fn u8(&mut self) -> u8 {
        match self.data.split_first() {
            Some((&b, rest)) => {
                self.data = rest;
                b
            }
            None => 0,
        }
    }

    pub fn u16(&mut self) -> u16 {
        u16::from_le_bytes([self.u8(), self.u8()])
    }

    pub fn u32(&mut self) -> u32 {
        u32::from_le_bytes([self.u8(), self.u8(), self.u8(), self.u8()])
    }

    pub fn bool(&mut self) -> bool {
        self.u8() & 1 == 1
    }

    /// Up to `n` bytes (fewer at the end of the input).
    pub fn bytes(&mut self, n: usize) -> &'a [u8] {
        let n = n.min(self.data.len());
        let (head, rest) = self.data.split_at(n);
        self.data = rest;
        head
    }

    /// A length-prefixed (u16, little endian) chunk.
    pub fn chunk(&mut self) -> &'a [u8] {
        let n = usize::from(self.u16());
        self.bytes(n)
    }

    /// One of `items`, chosen by the next byte.
    pub fn pick<T: Copy>(&mut self, items: &[T]) -> T {
        items[usize::from(self.u8()) % items.len()]
    }
}

/// What the mock kernel of the netlink targets hands to one `recvfrom` call.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Delivery {
    /// A datagram. `stamp`: set every message's sequence number to that of the last request
    /// sent, so answers can match requests without the fuzzer guessing sequence numbers.
    /// `pid`: the sender's port id (0 is the kernel; anything else must be ignored).
    Datagram { bytes: Vec<u8>, stamp: bool, pid: u32 },
    /// The call fails with this errno (ENOBUFS, EINTR, ...).
    Errno(i32),
}

/// Splits a netlink target's input into deliveries: records of a flag byte, a u16 length and
/// that many bytes. Flag bits: 0x01 stamp sequence numbers, 0x02 sent by a process rather than
/// the kernel; 0x40 an ENOBUFS error instead of a datagram, 0x80 an EINTR (these two carry no
/// bytes).
pub fn deliveries(input: &mut Input<'_>) -> Vec<Delivery> {
    let mut out = Vec::new();
    while !input.is_empty() {
        let flags = input.u8();
        if flags & 0x40 != 0 {
            out.push(Delivery::Errno(libc::ENOBUFS));
            continue;
        }
        if flags & 0x80 != 0 {
            out.push(Delivery::Errno(libc::EINTR));
            continue;
        }
        let bytes = input.chunk().to_vec();
        out.push(Delivery::Datagram { bytes, stamp: flags & 1 != 0, pid: if flags & 2 != 0 { 4242 } else { 0 } });
    }
    out
}
