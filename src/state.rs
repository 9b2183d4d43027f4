//! State handoff: bytes the old generation gives its successor (a cache,
//! session tickets, counters).
//!
//! They travel on the handshake link, parent to child: an 8-byte big-endian
//! length, then the bytes (length 0: no state). After them the link carries
//! one-byte messages from parent to child ([`FORWARDED_UPGRADE`]). The parent writes without
//! blocking from its poll loop, so a successor that never reads cannot stall
//! it; the successor's supervisor reads them as they come, so the parent's
//! writes always drain while the successor lives. Framing here is pure.

use std::io::{self, Write};

use crate::problem::StateProblem;

/// The largest state handed over.
pub const MAX_STATE: u64 = 1 << 30;

/// The message that passes an upgrade request on to the successor: the
/// parent got one after its successor was ready (a second `systemctl
/// reload` while it drains), and the successor, which serves next, runs it
/// once its parent is gone.
pub(crate) const FORWARDED_UPGRADE: u8 = b'U';

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
        /// What happened.
        problem: StateProblem,
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

/// The parent's side: what is left to write, the state and then the
/// messages queued after it.
#[derive(Debug)]
pub(crate) struct Outbox {
    header: [u8; 8],
    data: Vec<u8>,
    messages: Vec<u8>,
    sent: usize,
}

impl Outbox {
    pub(crate) fn new(data: Vec<u8>) -> Outbox {
        Outbox {
            header: (data.len() as u64).to_be_bytes(),
            data,
            messages: Vec::new(),
            sent: 0,
        }
    }

    /// An outbox whose state is all sent: only messages go out of it.
    pub(crate) fn sent() -> Outbox {
        let header = 0u64.to_be_bytes();
        Outbox {
            sent: header.len(),
            header,
            data: Vec::new(),
            messages: Vec::new(),
        }
    }

    /// Queues a one-byte message after the state.
    pub(crate) fn push_message(&mut self, message: u8) {
        self.messages.push(message);
    }

    /// Whether a message is queued and not yet all written.
    pub(crate) fn message_pending(&self) -> bool {
        !self.messages.is_empty() && self.pending()
    }

    /// Whether anything is left to write.
    pub(crate) fn pending(&self) -> bool {
        self.sent < self.header.len() + self.data.len() + self.messages.len()
    }

    /// Writes what the socket takes now. `Ok(true)` once everything is sent.
    pub(crate) fn write_some(&mut self, mut out: impl Write) -> io::Result<bool> {
        let state = self.header.len() + self.data.len();
        let total = state + self.messages.len();
        while self.sent < total {
            let chunk = if self.sent < self.header.len() {
                &self.header[self.sent..]
            } else if self.sent < state {
                &self.data[self.sent - self.header.len()..]
            } else {
                &self.messages[self.sent - state..]
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
    /// Takes in what it needs of `bytes`; `Ok((true, used))` once the state
    /// is complete, where the bytes after `used` are messages.
    pub(crate) fn push(&mut self, bytes: &[u8]) -> Result<(bool, usize), StateProblem> {
        let before = bytes.len();
        let mut bytes = bytes;
        let complete = self.take(&mut bytes)?;
        Ok((complete, before - bytes.len()))
    }

    fn take(&mut self, bytes: &mut &[u8]) -> Result<bool, StateProblem> {
        if self.expected.is_none() {
            let wanted = 8 - self.header.len();
            let take = wanted.min(bytes.len());
            self.header.extend_from_slice(&bytes[..take]);
            *bytes = &bytes[take..];
            if self.header.len() < 8 {
                return Ok(false);
            }
            let mut length = [0u8; 8];
            length.copy_from_slice(&self.header);
            let length = u64::from_be_bytes(length);
            if length > MAX_STATE {
                return Err(StateProblem::TooLarge { announced: length });
            }
            self.expected = Some(length);
            self.data.reserve(length as usize);
        }
        let expected = self.expected.unwrap_or(0) as usize;
        let take = (expected - self.data.len()).min(bytes.len());
        self.data.extend_from_slice(&bytes[..take]);
        *bytes = &bytes[take..];
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
            messages in prop::collection::vec(any::<u8>(), 0..4),
            write_limit in 1..700usize,
            read_chunk in 1..900usize,
        ) {
            let mut outbox = Outbox::new(data.clone());
            for &message in &messages {
                outbox.push_message(message);
            }
            let mut wire = Trickle { out: Vec::new(), limit: write_limit, block_next: false };
            while !outbox.write_some(&mut wire).unwrap() {}
            prop_assert!(!outbox.pending());
            let mut inbox = Inbox::default();
            let mut complete = false;
            let mut after = Vec::new();
            for chunk in wire.out.chunks(read_chunk) {
                if complete {
                    after.extend_from_slice(chunk);
                    continue;
                }
                let (done, used) = inbox.push(chunk).unwrap();
                complete = done;
                if complete {
                    after.extend_from_slice(&chunk[used..]);
                } else {
                    prop_assert_eq!(used, chunk.len());
                }
            }
            prop_assert!(complete);
            prop_assert_eq!(after, messages);
            prop_assert_eq!(inbox.into_state().unwrap_or_default(), data);
        }
    }

    #[test]
    fn an_absurd_length_is_refused() {
        let mut inbox = Inbox::default();
        let err = inbox.push(&u64::MAX.to_be_bytes()).unwrap_err();
        assert_eq!(
            err,
            StateProblem::TooLarge {
                announced: u64::MAX
            }
        );
        assert_eq!(
            err.to_string(),
            format!(
                "announced {} bytes, more than the 1073741824 allowed",
                u64::MAX
            )
        );
    }

    #[test]
    fn a_truncated_state_is_not_complete() {
        let mut inbox = Inbox::default();
        let mut frame = 10u64.to_be_bytes().to_vec();
        frame.extend_from_slice(b"12345");
        assert_eq!(inbox.push(&frame), Ok((false, 13)));
        assert_eq!(inbox.progress(), (5, Some(10)));
    }
}
