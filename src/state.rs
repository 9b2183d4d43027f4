//! State handoff: bytes the old generation gives its successor (a cache,
//! session tickets, counters).
//!
//! They travel on the handshake link, parent to child: an 8-byte big-endian
//! length, then the bytes (length 0: no state). The parent writes without
//! blocking from its poll loop, so a successor that never reads cannot stall
//! it; the successor's supervisor reads them as they come, so the parent's
//! writes always drain while the successor lives. Framing here is pure.

use std::io::{self, Write};

/// The largest state handed over.
pub const MAX_STATE: u64 = 1 << 30;

/// Where the received state stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Status {
    /// Still arriving (or not started).
    Pending,
    /// All of it is here (possibly none at all).
    Complete,
    /// The parent went away, or broke the framing, before all of it came.
    Lost {
        /// Bytes that came.
        received: u64,
        /// Bytes announced, if the length came.
        expected: Option<u64>,
    },
}

/// The received state, shared by the supervisor (which fills it) and the
/// `Upgrader` (which hands it out once).
#[derive(Debug)]
pub(crate) struct Slot {
    pub(crate) status: tokio::sync::watch::Sender<Status>,
    pub(crate) data: std::sync::Mutex<Option<Vec<u8>>>,
}

impl Slot {
    pub(crate) fn new(status: Status) -> Slot {
        Slot {
            status: tokio::sync::watch::channel(status).0,
            data: std::sync::Mutex::new(None),
        }
    }
}

/// The parent's side: what is left to write.
#[derive(Debug)]
pub(crate) struct Outbox {
    header: [u8; 8],
    data: Vec<u8>,
    sent: usize,
}

impl Outbox {
    pub(crate) fn new(data: Vec<u8>) -> Outbox {
        Outbox {
            header: (data.len() as u64).to_be_bytes(),
            data,
            sent: 0,
        }
    }

    /// Writes what the socket takes now. `Ok(true)` once everything is sent.
    pub(crate) fn write_some(&mut self, mut out: impl Write) -> io::Result<bool> {
        let total = self.header.len() + self.data.len();
        while self.sent < total {
            let chunk = if self.sent < self.header.len() {
                &self.header[self.sent..]
            } else {
                &self.data[self.sent - self.header.len()..]
            };
            match out.write(chunk) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(n) => self.sent += n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(false),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(true)
    }
}

/// The successor's side: what has come so far.
#[derive(Debug, Default)]
pub(crate) struct Inbox {
    header: Vec<u8>,
    expected: Option<u64>,
    data: Vec<u8>,
}

impl Inbox {
    /// Takes in `bytes`; `Ok(true)` once the state is complete (bytes after
    /// it are not part of it and are ignored).
    pub(crate) fn push(&mut self, mut bytes: &[u8]) -> Result<bool, String> {
        if self.expected.is_none() {
            let wanted = 8 - self.header.len();
            let take = wanted.min(bytes.len());
            self.header.extend_from_slice(&bytes[..take]);
            bytes = &bytes[take..];
            if self.header.len() < 8 {
                return Ok(false);
            }
            let mut length = [0u8; 8];
            length.copy_from_slice(&self.header);
            let length = u64::from_be_bytes(length);
            if length > MAX_STATE {
                return Err(format!(
                    "the parent announced {length} bytes of state, more than {MAX_STATE}"
                ));
            }
            self.expected = Some(length);
            self.data.reserve(length as usize);
        }
        let expected = self.expected.unwrap_or(0) as usize;
        let take = (expected - self.data.len()).min(bytes.len());
        self.data.extend_from_slice(&bytes[..take]);
        Ok(self.data.len() == expected)
    }

    /// How much has come, and how much was announced.
    pub(crate) fn progress(&self) -> (u64, Option<u64>) {
        (self.data.len() as u64, self.expected)
    }

    /// The state, once complete; `None` for an empty one.
    pub(crate) fn into_state(self) -> Option<Vec<u8>> {
        (!self.data.is_empty()).then_some(self.data)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// A writer that takes at most `limit` bytes per call and then, once,
    /// would block, like a full socket buffer.
    struct Trickle {
        out: Vec<u8>,
        limit: usize,
        block_next: bool,
    }

    impl Write for Trickle {
        fn write(&mut self, bytes: &[u8]) -> io::Result<usize> {
            if std::mem::take(&mut self.block_next) {
                return Err(io::ErrorKind::WouldBlock.into());
            }
            self.block_next = true;
            let n = bytes.len().min(self.limit);
            self.out.extend_from_slice(&bytes[..n]);
            Ok(n)
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    proptest! {
        /// Whatever the chunking on either side, the successor gets exactly
        /// what the parent sent, and knows when it is complete.
        #[test]
        fn state_arrives_whole_in_any_chunks(
            data in prop::collection::vec(any::<u8>(), 0..4000),
            write_limit in 1..700usize,
            read_chunk in 1..900usize,
        ) {
            let mut outbox = Outbox::new(data.clone());
            let mut wire = Trickle { out: Vec::new(), limit: write_limit, block_next: false };
            while !outbox.write_some(&mut wire).unwrap() {}
            let mut inbox = Inbox::default();
            let mut complete = false;
            for chunk in wire.out.chunks(read_chunk) {
                prop_assert!(!complete, "complete before the last chunk");
                complete = inbox.push(chunk).unwrap();
            }
            prop_assert!(complete);
            prop_assert_eq!(inbox.into_state().unwrap_or_default(), data);
        }
    }

    #[test]
    fn an_absurd_length_is_refused() {
        let mut inbox = Inbox::default();
        let err = inbox.push(&u64::MAX.to_be_bytes()).unwrap_err();
        assert!(err.contains("more than"), "{err}");
    }

    #[test]
    fn a_truncated_state_is_not_complete() {
        let mut inbox = Inbox::default();
        let mut frame = 10u64.to_be_bytes().to_vec();
        frame.extend_from_slice(b"12345");
        assert_eq!(inbox.push(&frame), Ok(false));
        assert_eq!(inbox.progress(), (5, Some(10)));
    }
}
