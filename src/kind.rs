//! What a named descriptor is: the one type that the registry, the
//! inheritance format, the platform layer and the errors all speak of, in a
//! module that depends on none of them.

use std::fmt;

/// The kind of object a named descriptor is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
#[non_exhaustive]
pub enum Kind {
    /// A listening TCP socket (IPv4 or IPv6).
    TcpListener,
    /// A UDP socket (IPv4 or IPv6).
    Udp,
    /// A listening Unix stream socket.
    UnixListener,
    /// A Unix datagram socket.
    UnixDatagram,
    /// Any other descriptor: a file, a pipe, an established connection.
    Fd,
}

impl Kind {
    /// Every kind, in a fixed order.
    pub const ALL: [Kind; 5] = [
        Kind::TcpListener,
        Kind::Udp,
        Kind::UnixListener,
        Kind::UnixDatagram,
        Kind::Fd,
    ];

    pub(crate) fn token(self) -> &'static str {
        match self {
            Kind::TcpListener => "tcp",
            Kind::Udp => "udp",
            Kind::UnixListener => "unix",
            Kind::UnixDatagram => "unixgram",
            Kind::Fd => "fd",
        }
    }

    pub(crate) fn from_token(token: &str) -> Option<Kind> {
        Kind::ALL.into_iter().find(|kind| kind.token() == token)
    }
}

impl fmt::Display for Kind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Kind::TcpListener => "tcp listener",
            Kind::Udp => "udp socket",
            Kind::UnixListener => "unix listener",
            Kind::UnixDatagram => "unix datagram socket",
            Kind::Fd => "descriptor",
        })
    }
}
