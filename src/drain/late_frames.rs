//! A guard against one bug of the `h2` crate (0.4.20, the newest release):
//! after the final GOAWAY of a graceful shutdown, a WINDOW_UPDATE for a
//! stream the client opened too late (above the GOAWAY's last stream id) is
//! taken as a frame on an idle stream, a connection error: h2 answers
//! GOAWAY PROTOCOL_ERROR and cuts every stream still in flight. RFC 9113
//! §6.8 says the sender of a GOAWAY ignores such frames, and h2 does ignore
//! HEADERS, DATA and RST_STREAM so, but not WINDOW_UPDATE. gRPC's C-core
//! clients (Python, C++, Ruby, PHP) send a WINDOW_UPDATE right after each
//! new stream's HEADERS: under upgrades every fifth drain or so cut their
//! calls in flight (53 of 5,929 slow unary calls in 10 s of SIGHUPs).
//!
//! The guard sits between the socket and h2 and drops exactly those frames.
//! It follows the client's frames as they pass, notes the highest stream a
//! HEADERS frame named, and when the client acknowledges h2's shutdown PING
//! (the moment h2 fixes the GOAWAY's last stream id, from the same number)
//! it drops every later WINDOW_UPDATE for a stream above that id: the frames
//! h2 should have ignored, and nothing else. The frames pass unchanged and
//! in order otherwise; no frame is parsed beyond its 9-byte header, except
//! a PING acknowledgement's 8 bytes.
//!
//! When h2 is done with the connection, the I/O object goes back to the
//! drain (not closed), so that it can close it without a reset: see
//! `Drain::linger`.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::oneshot;

/// The client connection preface, which comes before the first frame.
const PREFACE_LEN: usize = 24;
/// A frame header: length (24 bits), type, flags, stream id (31 bits).
const HEADER_LEN: usize = 9;
const HEADERS: u8 = 0x1;
const PING: u8 = 0x6;
const WINDOW_UPDATE: u8 = 0x8;
const ACK: u8 = 0x1;
/// The payload of the PING that h2 sends after its first GOAWAY of a
/// graceful shutdown (`h2::frame::Ping::SHUTDOWN`); its acknowledgement
/// makes h2 send the final GOAWAY.
const SHUTDOWN_PING: [u8; 8] = [0x0b, 0x7b, 0xa2, 0xf0, 0x8b, 0x9b, 0xfe, 0x54];

/// The client-to-server frame filter, pure: bytes in, the bytes h2 should
/// see out.
#[derive(Debug)]
pub(super) struct Filter {
    /// Preface bytes still to pass.
    preface: usize,
    /// The header of the next frame, as far as it has come.
    header: [u8; HEADER_LEN],
    header_len: usize,
    /// Payload bytes of the current frame still to come.
    payload: usize,
    /// Whether the current frame is dropped.
    dropping: bool,
    /// A PING acknowledgement's payload, while it is read.
    ping: Option<([u8; 8], usize)>,
    /// The highest stream id a HEADERS frame named.
    highest: u32,
    /// Once the shutdown PING is acknowledged: streams above this id are
    /// the ones h2 ignores.
    last_stream: Option<u32>,
    /// WINDOW_UPDATE frames dropped.
    dropped: u64,
}

impl Filter {
    pub(super) fn new() -> Filter {
        Filter {
            preface: PREFACE_LEN,
            header: [0; HEADER_LEN],
            header_len: 0,
            payload: 0,
            dropping: false,
            ping: None,
            highest: 0,
            last_stream: None,
            dropped: 0,
        }
    }

    /// How many WINDOW_UPDATE frames were dropped.
    pub(super) fn dropped(&self) -> u64 {
        self.dropped
    }

    /// Appends to `out` what of `input` h2 should see. A frame header cut
    /// between two calls is held until it is whole.
    pub(super) fn push(&mut self, mut input: &[u8], out: &mut Vec<u8>) {
        while !input.is_empty() {
            if self.preface > 0 {
                let n = self.preface.min(input.len());
                out.extend_from_slice(&input[..n]);
                self.preface -= n;
                input = &input[n..];
            } else if self.payload > 0 {
                let n = self.payload.min(input.len());
                if !self.dropping {
                    out.extend_from_slice(&input[..n]);
                }
                if let Some((ping, seen)) = &mut self.ping {
                    ping[*seen..*seen + n].copy_from_slice(&input[..n]);
                    *seen += n;
                }
                self.payload -= n;
                input = &input[n..];
                if self.payload == 0 {
                    self.frame_done();
                }
            } else {
                let n = (HEADER_LEN - self.header_len).min(input.len());
                self.header[self.header_len..self.header_len + n].copy_from_slice(&input[..n]);
                self.header_len += n;
                input = &input[n..];
                if self.header_len == HEADER_LEN {
                    self.header_len = 0;
                    self.frame_start(out);
                }
            }
        }
    }

    /// A whole header has come: decide on its frame.
    fn frame_start(&mut self, out: &mut Vec<u8>) {
        let header = self.header;
        let length = u32::from_be_bytes([0, header[0], header[1], header[2]]) as usize;
        let (kind, flags) = (header[3], header[4]);
        let stream = u32::from_be_bytes([header[5], header[6], header[7], header[8]]) & 0x7fff_ffff;
        self.dropping = kind == WINDOW_UPDATE
            && stream != 0
            && self.last_stream.is_some_and(|last| stream > last);
        if self.dropping {
            self.dropped += 1;
        } else {
            out.extend_from_slice(&header);
        }
        if kind == HEADERS && stream > self.highest {
            self.highest = stream;
        }
        self.ping = (kind == PING && flags & ACK != 0 && length == SHUTDOWN_PING.len())
            .then_some(([0; 8], 0));
        self.payload = length;
        if length == 0 {
            self.frame_done();
        }
    }

    fn frame_done(&mut self) {
        if let Some((payload, 8)) = self.ping.take() {
            if payload == SHUTDOWN_PING && self.last_stream.is_none() {
                self.last_stream = Some(self.highest);
            }
        }
        self.dropping = false;
    }
}

/// An HTTP/2 server connection's I/O with the [`Filter`] on what it reads;
/// dropped, it sends the I/O object back.
pub(super) struct LateWindowUpdates<I> {
    /// `None` only once dropped.
    inner: Option<I>,
    back: Option<oneshot::Sender<I>>,
    filter: Filter,
    /// Filtered bytes not yet read, from `position`.
    ready: Vec<u8>,
    position: usize,
    scratch: Box<[u8]>,
}

impl<I> LateWindowUpdates<I> {
    pub(super) fn new(inner: I, back: oneshot::Sender<I>) -> LateWindowUpdates<I> {
        LateWindowUpdates {
            inner: Some(inner),
            back: Some(back),
            filter: Filter::new(),
            ready: Vec::new(),
            position: 0,
            scratch: vec![0; 16 * 1024].into_boxed_slice(),
        }
    }

    fn inner(&mut self) -> io::Result<Pin<&mut I>>
    where
        I: Unpin,
    {
        match &mut self.inner {
            Some(inner) => Ok(Pin::new(inner)),
            None => Err(io::ErrorKind::NotConnected.into()),
        }
    }
}

impl<I> Drop for LateWindowUpdates<I> {
    fn drop(&mut self) {
        if let (Some(inner), Some(back)) = (self.inner.take(), self.back.take()) {
            // Nobody waiting: it closes here.
            let _ = back.send(inner);
        }
        if self.filter.dropped() > 0 {
            tracing::debug!(
                dropped = self.filter.dropped(),
                "ignored WINDOW_UPDATE frames for streams opened after the final GOAWAY"
            );
        }
    }
}

impl<I: AsyncRead + Unpin> AsyncRead for LateWindowUpdates<I> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        loop {
            if this.position < this.ready.len() {
                let n = (this.ready.len() - this.position).min(buf.remaining());
                buf.put_slice(&this.ready[this.position..this.position + n]);
                this.position += n;
                if this.position == this.ready.len() {
                    this.ready.clear();
                    this.position = 0;
                }
                return Poll::Ready(Ok(()));
            }
            let Some(inner) = &mut this.inner else {
                return Poll::Ready(Err(io::ErrorKind::NotConnected.into()));
            };
            let mut read = ReadBuf::new(&mut this.scratch);
            ready!(Pin::new(inner).poll_read(cx, &mut read))?;
            if read.filled().is_empty() {
                // End of stream (a header cut short is h2's to report).
                return Poll::Ready(Ok(()));
            }
            this.filter.push(read.filled(), &mut this.ready);
            // All of it dropped or held: read on rather than report an end.
        }
    }
}

impl<I: AsyncWrite + Unpin> AsyncWrite for LateWindowUpdates<I> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.inner()?.poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        self.inner()?.poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.as_ref().is_some_and(I::is_write_vectored)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.inner()?.poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.inner()?.poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
        let length = (payload.len() as u32).to_be_bytes();
        let mut frame = vec![length[1], length[2], length[3], kind, flags];
        frame.extend_from_slice(&stream.to_be_bytes());
        frame.extend_from_slice(payload);
        frame
    }

    fn window_update(stream: u32) -> Vec<u8> {
        frame(WINDOW_UPDATE, 0, stream, &5u32.to_be_bytes())
    }

    fn headers(stream: u32) -> Vec<u8> {
        frame(HEADERS, 0x5, stream, &[0x82, 0x86, 0x84])
    }

    /// The client's side of a drain: streams 1 and 3, the shutdown PING's
    /// acknowledgement, then stream 5 (too late) with its WINDOW_UPDATE,
    /// and a WINDOW_UPDATE for stream 3 and the connection, which stay.
    fn drained_connection() -> (Vec<u8>, Vec<u8>) {
        let preface = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
        let before = [
            preface,
            frame(0x4, 0, 0, &[]),
            headers(1),
            window_update(1),
            headers(3),
            frame(PING, 0, 0, &[1; 8]),
            frame(PING, ACK, 0, &[1; 8]),
            frame(PING, ACK, 0, &SHUTDOWN_PING),
            headers(5),
        ]
        .concat();
        let input = [
            before.clone(),
            window_update(5),
            window_update(3),
            window_update(0),
        ]
        .concat();
        let expected = [before, window_update(3), window_update(0)].concat();
        (input, expected)
    }

    #[test]
    fn a_window_update_above_the_last_stream_after_the_shutdown_ack_is_dropped() {
        let (input, expected) = drained_connection();
        let mut filter = Filter::new();
        let mut out = Vec::new();
        filter.push(&input, &mut out);
        assert_eq!(out, expected);
        assert_eq!(filter.dropped(), 1);
    }

    #[test]
    fn before_the_shutdown_ack_nothing_is_dropped() {
        let input = [
            b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec(),
            headers(1),
            frame(PING, ACK, 0, &[9; 8]),
            window_update(7),
            frame(PING, 0, 0, &SHUTDOWN_PING),
            window_update(9),
        ]
        .concat();
        let mut filter = Filter::new();
        let mut out = Vec::new();
        filter.push(&input, &mut out);
        assert_eq!(out, input);
    }

    proptest! {
        /// Cut anywhere, in any number of pieces, the output is the same.
        #[test]
        fn the_output_does_not_depend_on_how_the_bytes_are_cut(
            cuts in proptest::collection::vec(0usize..200, 0..12)
        ) {
            let (input, expected) = drained_connection();
            let mut cuts: Vec<usize> = cuts.into_iter().map(|c| c % input.len()).collect();
            cuts.sort_unstable();
            let mut filter = Filter::new();
            let mut out = Vec::new();
            let mut from = 0;
            for cut in cuts.into_iter().chain([input.len()]) {
                filter.push(&input[from..cut], &mut out);
                from = cut;
            }
            prop_assert_eq!(out, expected);
        }
    }
}
