//! The `ringmover send` → `ringmover recv` wire format: enough framing that
//! a transfer cut short at any point, even by `SIGKILL` (which still ends
//! the connection with a FIN), never looks complete to the receiver.
//!
//! ```text
//! stream   = MAGIC frame* END
//! MAGIC    = 89 52 4d 56 0d 0a 1a 0a        ("\x89RMV\r\n\x1a\n", 8 bytes)
//! frame    = length payload                 (length: u64 big-endian, > 0)
//! END      = 00 00 00 00 00 00 00 00        (a frame of length 0)
//! ```
//!
//! The sender writes the magic, then its bytes as frames of any size, then
//! `END`, then closes. The receiver completes a transfer only when it has
//! seen `END` followed by the end of stream; an end of stream anywhere
//! else is a truncated transfer. The payload is spliced, never read into
//! user memory, so there is no digest: the length framing is what detects
//! an interruption.
//!
//! A stream that does not begin with the magic is raw (`nc`, `socat`) and is
//! received as it comes (an empty stream is a complete raw one); a stream
//! that ends after 1 to 7 bytes that begin the magic is a truncated framed
//! one; a raw stream that happens to begin with these eight bytes is taken
//! for a framed one (the `0x89` and the line endings make that unlikely for
//! text and for the usual archive formats).
//! Decoding here is pure: no syscalls, so every backend shares it.

/// The first eight bytes of a framed stream.
pub const MAGIC: [u8; 8] = *b"\x89RMV\r\n\x1a\n";

/// Length of a frame header.
pub const HEADER_LEN: usize = 8;

/// The header of a frame of `len` payload bytes (`0`: the end marker).
pub fn frame_header(len: u64) -> [u8; HEADER_LEN] {
    len.to_be_bytes()
}

/// The end marker: a frame of length 0.
pub const END: [u8; HEADER_LEN] = [0; HEADER_LEN];

/// What the first bytes of a stream say about its format.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Detect {
    /// The stream starts with [`MAGIC`]: consume those 8 bytes, then
    /// decode frames with a [`Deframer`].
    Framed,
    /// Not the magic: receive every byte as payload (nothing consumed).
    Raw,
    /// A prefix of the magic so far: wait for more bytes. A stream that
    /// ends here is a truncated framed one (or, with no byte at all, an
    /// empty raw one).
    NeedMore,
}

/// Classifies the first bytes of a stream, as peeked (`MSG_PEEK`) without
/// consuming them.
pub fn detect(peeked: &[u8]) -> Detect {
    let n = peeked.len().min(MAGIC.len());
    if peeked[..n] != MAGIC[..n] {
        Detect::Raw
    } else if n == MAGIC.len() {
        Detect::Framed
    } else {
        Detect::NeedMore
    }
}

/// What a [`Deframer`] needs next.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Want {
    /// This many more header bytes (1..=8): read them (they are few) and
    /// pass them to [`Deframer::header`].
    Header(usize),
    /// Up to this many payload bytes belong to the current frame: move
    /// them to the output, then report the count to [`Deframer::payload`].
    Payload(u64),
    /// The end marker was seen: the only valid next thing is the end of
    /// stream; any further byte is a protocol error.
    End,
}

/// Decodes the frames of a stream after its [`MAGIC`].
#[derive(Debug, Clone, Default)]
pub struct Deframer {
    header: [u8; HEADER_LEN],
    have: usize,
    payload_left: u64,
    ended: bool,
    payload_total: u64,
}

impl Deframer {
    /// A decoder positioned just after the magic.
    pub fn new() -> Deframer {
        Deframer::default()
    }

    /// What to do next.
    pub fn want(&self) -> Want {
        if self.ended {
            Want::End
        } else if self.payload_left > 0 {
            Want::Payload(self.payload_left)
        } else {
            Want::Header(HEADER_LEN - self.have)
        }
    }

    /// Feeds header bytes; at most what [`Want::Header`] asked for is used.
    /// Returns how many were used (0 unless a header is wanted).
    pub fn header(&mut self, bytes: &[u8]) -> usize {
        let Want::Header(need) = self.want() else {
            return 0;
        };
        let n = need.min(bytes.len());
        self.header[self.have..self.have + n].copy_from_slice(&bytes[..n]);
        self.have += n;
        if self.have == HEADER_LEN {
            self.have = 0;
            let len = u64::from_be_bytes(self.header);
            if len == 0 {
                self.ended = true;
            } else {
                self.payload_left = len;
            }
        }
        n
    }

    /// Records `n` payload bytes moved (at most what [`Want::Payload`]
    /// allowed; more is a caller bug and is clamped).
    pub fn payload(&mut self, n: u64) {
        let n = n.min(self.payload_left);
        self.payload_left -= n;
        self.payload_total += n;
    }

    /// The end marker has been seen.
    pub fn ended(&self) -> bool {
        self.ended
    }

    /// Payload bytes decoded so far.
    pub fn payload_total(&self) -> u64 {
        self.payload_total
    }

    /// Payload bytes still owed by the current frame (0 between frames).
    pub fn payload_left(&self) -> u64 {
        self.payload_left
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn encode(chunks: &[&[u8]]) -> Vec<u8> {
        let mut out = MAGIC.to_vec();
        for c in chunks {
            out.extend_from_slice(&frame_header(c.len() as u64));
            out.extend_from_slice(c);
        }
        out.extend_from_slice(&END);
        out
    }

    /// Decodes `wire` fed in pieces of `step` bytes; returns the payload
    /// and whether the end marker was seen.
    fn decode(wire: &[u8], step: usize) -> (Vec<u8>, bool) {
        assert_eq!(detect(&wire[..8.min(wire.len())]), Detect::Framed);
        let mut d = Deframer::new();
        let mut out = Vec::new();
        let mut rest = &wire[8..];
        while !rest.is_empty() {
            let take = step.min(rest.len());
            match d.want() {
                Want::Header(_) => {
                    let used = d.header(&rest[..take]);
                    rest = &rest[used..];
                }
                Want::Payload(left) => {
                    let n = (take as u64).min(left) as usize;
                    out.extend_from_slice(&rest[..n]);
                    d.payload(n as u64);
                    rest = &rest[n..];
                }
                Want::End => panic!("bytes after the end marker"),
            }
        }
        assert_eq!(d.payload_total(), out.len() as u64);
        (out, d.ended())
    }

    #[test]
    fn round_trip_in_any_piece_size() {
        let a = vec![1u8; 1000];
        let b = vec![2u8; 3];
        let wire = encode(&[&a, &b]);
        for step in [1, 3, 7, 8, 9, 64, 4096] {
            let (got, ended) = decode(&wire, step);
            assert_eq!(got, [a.clone(), b.clone()].concat(), "step {step}");
            assert!(ended);
        }
    }

    #[test]
    fn a_cut_anywhere_is_never_ended() {
        let wire = encode(&[&[9u8; 20], &[8u8; 5]]);
        for cut in 0..wire.len() {
            if cut < 8 {
                continue; // still detecting
            }
            let (_, ended) = decode(&wire[..cut], 5);
            assert!(!ended, "cut at {cut} looked complete");
        }
    }

    #[test]
    fn detection() {
        assert_eq!(detect(b""), Detect::NeedMore);
        assert_eq!(detect(&MAGIC[..3]), Detect::NeedMore);
        assert_eq!(detect(b"hello world"), Detect::Raw);
        assert_eq!(detect(&MAGIC), Detect::Framed);
        let mut longer = MAGIC.to_vec();
        longer.extend_from_slice(b"more");
        assert_eq!(detect(&longer), Detect::Framed);
    }
}
