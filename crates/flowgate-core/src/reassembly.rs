//! Bounded stream reassembly (placeholder until the room lands).

#[derive(Copy, Clone, Debug, Default, PartialEq, Eq)]
pub struct Insert {
    pub stored: usize,
    pub conflict: bool,
    pub beyond: bool,
    pub refused: bool,
}

#[derive(Clone, Debug)]
pub struct Reassembler {
    start: u64,
    limit: usize,
    bytes: Vec<Option<u8>>,
    contiguous: Vec<u8>,
}

impl Reassembler {
    pub fn new(start: u64, limit: usize) -> Self {
        Reassembler { start, limit, bytes: Vec::new(), contiguous: Vec::new() }
    }
    pub fn insert(&mut self, offset: u64, bytes: &[u8]) -> Insert {
        let mut r = Insert::default();
        for (i, &b) in bytes.iter().enumerate() {
            let o = offset + i as u64;
            if o < self.start {
                continue;
            }
            let k = (o - self.start) as usize;
            if k >= self.limit {
                r.beyond = true;
                continue;
            }
            if self.bytes.get(k).copied().flatten().is_some_and(|x| x != b) {
                r.conflict = true;
                return r;
            }
        }
        for (i, &b) in bytes.iter().enumerate() {
            let o = offset + i as u64;
            if o < self.start {
                continue;
            }
            let k = (o - self.start) as usize;
            if k >= self.limit {
                continue;
            }
            if self.bytes.len() <= k {
                self.bytes.resize(k + 1, None);
            }
            if self.bytes[k].is_none() {
                self.bytes[k] = Some(b);
                r.stored += 1;
            }
        }
        self.contiguous = self.bytes.iter().map_while(|b| *b).collect();
        r
    }
    pub fn start(&self) -> u64 {
        self.start
    }
    pub fn limit(&self) -> usize {
        self.limit
    }
    pub fn contiguous_end(&self) -> u64 {
        self.start + self.contiguous.len() as u64
    }
    pub fn contiguous(&self) -> &[u8] {
        &self.contiguous
    }
    pub fn has(&self, from: u64, to: u64) -> bool {
        (from.max(self.start)..to).all(|o| self.bytes.get((o - self.start) as usize).copied().flatten().is_some())
    }
    pub fn forget_before(&mut self, offset: u64) {
        if offset <= self.start {
            return;
        }
        let n = ((offset - self.start) as usize).min(self.bytes.len());
        self.bytes.drain(..n);
        self.start = offset;
        self.contiguous = self.bytes.iter().map_while(|b| *b).collect();
    }
    pub fn buffered(&self) -> usize {
        self.bytes.iter().flatten().count()
    }
    pub fn heap_bytes(&self) -> usize {
        self.bytes.capacity() * 2
    }
}
