//! What can be wrong, typed: with an inherited descriptor (the platform layer
//! finds these, [`Error::InheritedDescriptor`](crate::Error::InheritedDescriptor)
//! carries them), with a successor's handshake
//! ([`Error::Handshake`](crate::Error::Handshake)) and with the state a
//! parent hands over ([`Error::StateLost`](crate::Error::StateLost)), so
//! that a caller can match on the problem and a log line still reads as one
//! sentence.
//!
//! Pure data with their messages; no system call happens here.

use std::io;

use nix::libc;

use crate::kind::Kind;

/// What is wrong with one inherited descriptor (named by the parent, passed
/// by systemd, or the handshake link itself), found when a generation
/// starts. The message says what was expected and what was found.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum DescriptorProblem {
    /// The number is not an open descriptor in this process.
    #[error("it is not open ({})", io::Error::from_raw_os_error(libc::EBADF))]
    NotOpen,

    /// The system would not say what it is.
    #[error("cannot inspect it: {call}: {}", io::Error::from_raw_os_error(*errno))]
    Uninspectable {
        /// The system call that failed, such as `getsockname(2)`.
        call: &'static str,
        /// The error number it failed with (`errno`).
        errno: i32,
    },

    /// It should be a socket (the handshake link) but is something else.
    #[error("expected a socket, found {found}")]
    NotASocket {
        /// What it is instead.
        found: FoundObject,
    },

    /// It is not the kind of descriptor its parent named it as.
    #[error("expected a {expected}, found {found}")]
    KindMismatch {
        /// The kind the parent claimed.
        expected: Kind,
        /// What it is instead.
        found: FoundObject,
    },

    /// The descriptors did not arrive as named on the handshake link.
    #[error("{0}")]
    Receive(#[source] ReceiveError),
}

impl From<ReceiveError> for DescriptorProblem {
    fn from(error: ReceiveError) -> Self {
        DescriptorProblem::Receive(error)
    }
}

/// What an inherited descriptor turned out to be, when it was not what it
/// should have been.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, thiserror::Error)]
#[non_exhaustive]
pub enum FoundObject {
    /// A socket of this kind.
    #[error("a {0}")]
    Socket(Kind),
    /// A socket of no kind this library hands over by kind: a connected
    /// stream, a raw socket, a listener of another address family.
    #[error("another kind of socket")]
    OtherSocket,
    /// A regular file.
    #[error("a regular file")]
    RegularFile,
    /// A directory.
    #[error("a directory")]
    Directory,
    /// A pipe or FIFO.
    #[error("a pipe")]
    Pipe,
    /// A character device (a terminal, `/dev/null`).
    #[error("a character device")]
    CharacterDevice,
    /// A block device.
    #[error("a block device")]
    BlockDevice,
    /// A symbolic link.
    #[error("a symbolic link")]
    SymbolicLink,
    /// A file of a type not named above.
    #[error("an unknown kind of file")]
    OtherFile,
    /// Something `fstat(2)` could not describe.
    #[error("something that cannot be inspected")]
    Unknown,
}

/// How receiving the named descriptors on the handshake link failed. The
/// parent queues all of them before it starts its successor, so anything
/// but exactly as many as the inheritance names is an error.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ReceiveError {
    /// Fewer descriptors were waiting than the inheritance names.
    #[error("only {received} of {expected} descriptors were waiting on it")]
    TooFew {
        /// How many the inheritance names.
        expected: usize,
        /// How many were waiting.
        received: usize,
    },
    /// The parent's end was closed before all of them came.
    #[error("it was closed after {received} of {expected} descriptors")]
    Closed {
        /// How many the inheritance names.
        expected: usize,
        /// How many came before the end.
        received: usize,
    },
    /// More descriptors came than the inheritance names.
    #[error("it carried {received} descriptors, the inheritance names {expected}")]
    TooMany {
        /// How many the inheritance names.
        expected: usize,
        /// How many came.
        received: usize,
    },
    /// A message carried another byte than the one that marks descriptors.
    #[error("it carried byte 0x{byte:02x} instead of descriptors")]
    UnexpectedByte {
        /// The byte.
        byte: u8,
    },
    /// A message carried no descriptor at all.
    #[error("a message after {received} descriptors carried none")]
    Empty {
        /// How many came before it.
        received: usize,
    },
    /// A message carried more descriptors than the protocol allows in one,
    /// so the kernel cut its control data short.
    #[error("a message carried more than {limit} descriptors")]
    Truncated {
        /// The most one message may carry.
        limit: usize,
    },
    /// A system call failed.
    #[error("receiving descriptors on it failed: {call}: {}", io::Error::from_raw_os_error(*errno))]
    Io {
        /// The call: `recvmsg(2)`, or `fcntl(2)` marking one close-on-exec.
        call: &'static str,
        /// The error number it failed with (`errno`).
        errno: i32,
    },
}

impl FoundObject {
    /// What a file of this `st_mode` type (`S_IFMT` bits) is.
    pub(crate) fn from_file_type(mode: libc::mode_t) -> FoundObject {
        match mode & libc::S_IFMT {
            libc::S_IFREG => FoundObject::RegularFile,
            libc::S_IFDIR => FoundObject::Directory,
            libc::S_IFIFO => FoundObject::Pipe,
            libc::S_IFCHR => FoundObject::CharacterDevice,
            libc::S_IFBLK => FoundObject::BlockDevice,
            libc::S_IFLNK => FoundObject::SymbolicLink,
            _ => FoundObject::OtherFile,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The error number is told by its name, as the system says it.
    #[test]
    fn errors_from_the_system_say_the_call_and_the_error() {
        let problem = DescriptorProblem::Uninspectable {
            call: "getsockopt(SO_ACCEPTCONN)",
            errno: libc::EACCES,
        };
        assert_eq!(
            problem.to_string(),
            format!(
                "cannot inspect it: getsockopt(SO_ACCEPTCONN): {}",
                io::Error::from_raw_os_error(libc::EACCES)
            )
        );
        assert!(problem.to_string().contains("os error"), "{problem}");
        assert!(
            DescriptorProblem::NotOpen
                .to_string()
                .starts_with("it is not open (Bad file descriptor")
        );
    }

    #[test]
    fn a_file_type_is_named_by_its_mode_bits_alone() {
        assert_eq!(
            FoundObject::from_file_type(libc::S_IFREG | 0o644),
            FoundObject::RegularFile
        );
        assert_eq!(
            FoundObject::from_file_type(libc::S_IFIFO | 0o600),
            FoundObject::Pipe
        );
        assert_eq!(
            FoundObject::from_file_type(libc::S_IFDIR),
            FoundObject::Directory
        );
    }

    #[test]
    fn a_mismatch_says_what_was_expected_and_what_was_found() {
        let problem = DescriptorProblem::KindMismatch {
            expected: Kind::TcpListener,
            found: FoundObject::Socket(Kind::Udp),
        };
        assert_eq!(
            problem.to_string(),
            "expected a tcp listener, found a udp socket"
        );
        let problem = DescriptorProblem::from(ReceiveError::TooFew {
            expected: 2,
            received: 1,
        });
        assert_eq!(
            problem.to_string(),
            "only 1 of 2 descriptors were waiting on it"
        );
    }
}

/// How a starting successor broke the handshake, carried by
/// [`Error::Handshake`](crate::Error::Handshake).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum HandshakeProblem {
    /// It wrote something other than the one readiness byte on its link.
    #[error("sent byte 0x{byte:02x} instead of the ready byte")]
    UnexpectedByte {
        /// The byte it sent.
        byte: u8,
    },

    /// This process could not wait for it (someone else reaped it, or
    /// `waitid(2)` failed): its pid may name another process by now, so
    /// nothing was killed.
    #[error("cannot wait for it: {}", io::Error::from_raw_os_error(*errno))]
    Unwaitable {
        /// The error number the wait failed with (`errno`).
        errno: i32,
    },
}

impl HandshakeProblem {
    /// The problem of a failed wait, from its error.
    pub(crate) fn unwaitable(error: &io::Error) -> HandshakeProblem {
        HandshakeProblem::Unwaitable {
            errno: error.raw_os_error().unwrap_or(libc::EIO),
        }
    }
}

/// Why the state a parent hands over did not all arrive, carried by
/// [`Error::StateLost`](crate::Error::StateLost).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum StateProblem {
    /// The parent exited, or closed the link, before all of it came.
    #[error("went away")]
    ParentGone,

    /// The parent announced more than the largest state a successor takes
    /// (1 GiB): the framing is broken.
    #[error(
        "announced {announced} bytes, more than the {} allowed",
        crate::state::MAX_STATE
    )]
    TooLarge {
        /// The length it announced.
        announced: u64,
    },
}
