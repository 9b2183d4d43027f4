//! TLS session-ticket keys that outlive a generation.
//!
//! A TLS server resumes a session from a ticket only if it holds the key
//! that sealed it. rustls's own ticketer draws its keys at random in each
//! process, so after an upgrade every client that comes back with a ticket
//! is refused resumption and makes a full handshake: a handshake storm at
//! each deploy, and a new generation that handshakes slower than the old
//! one did. [`TicketKeys`] are handed to the successor in the state
//! handoff, so tickets sealed by any generation open in the next.
//!
//! The keys rotate as rustls's own do: a new one every six hours (counted
//! from when it was made, by whichever generation), the one before kept to
//! open tickets sealed with it, anything older forgotten. Tickets are
//! sealed with ChaCha20-Poly1305: `key name (16) | nonce (12) | ciphertext
//! and tag`. The keys travel only on the handshake link between the two
//! generations (a socket pair, never a file).

use std::fmt;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{SystemTime, UNIX_EPOCH};

use ring::aead::{Aad, CHACHA20_POLY1305, LessSafeKey, NONCE_LEN, Nonce, UnboundKey};
use ring::rand::{SecureRandom, SystemRandom};
use rustls::ServerConfig;
use rustls::server::ProducesTickets;

use super::tls::TlsError;

/// How long a key seals new tickets (seconds). A ticket opens for up to
/// twice this: its key is kept for one more period after the next takes
/// over.
const ROTATE_EVERY: u64 = 6 * 60 * 60;

/// The encoding's version byte (the first of [`TicketKeys::to_bytes`]).
pub(super) const VERSION: u8 = 1;
const NAME_LEN: usize = 16;
const SECRET_LEN: usize = 32;
/// One key encoded: name, secret, birth (seconds since the epoch, big-endian).
const KEY_LEN: usize = NAME_LEN + SECRET_LEN + 8;
/// The largest ticket this code seals is far below this; anything longer
/// is refused before any work.
const MAX_TICKET: usize = 16 * 1024;

/// Session-ticket keys for rustls that a successor inherits: TLS clients
/// resume their sessions across an upgrade instead of making a full
/// handshake with the new generation.
///
/// Take them from the parent or make them, and hand them on
/// ([`TicketKeys::inherit`] does both through the state handoff), then give
/// them to the acceptor
/// ([`tls_acceptor_with_tickets`](super::tls_acceptor_with_tickets), or
/// [`install`](Self::install) on a `ServerConfig` of your own):
///
/// ```no_run
/// # async fn f(upgrader: &handover::Upgrader) -> Result<(), Box<dyn std::error::Error>> {
/// use handover::drain::{TicketKeys, tls_acceptor_with_tickets};
///
/// // Before ready(): the parent's keys (or new ones), handed on in turn.
/// let tickets = TicketKeys::inherit(upgrader).await?;
/// let acceptor = tls_acceptor_with_tickets("cert.pem", "key.pem", &tickets)?;
/// # Ok(()) }
/// ```
///
/// [`inherit`](Self::inherit) takes the state handoff for the keys. A
/// service that hands on state of its own frames the keys' bytes
/// ([`to_bytes`](Self::to_bytes), at most 113) with its own in its state
/// provider, and gives them back to [`from_bytes`](Self::from_bytes) in
/// the successor.
///
/// Clones share the keys (and their rotation). `Debug` shows no secret.
#[derive(Clone)]
#[cfg_attr(docsrs, doc(cfg(feature = "tls")))]
pub struct TicketKeys {
    inner: Arc<Inner>,
}

struct Inner {
    keys: Mutex<Keys>,
    random: SystemRandom,
}

/// The key that seals, and the one before it, which still opens.
struct Keys {
    current: Key,
    previous: Option<Key>,
}

struct Key {
    name: [u8; NAME_LEN],
    secret: [u8; SECRET_LEN],
    /// Seconds since the epoch when it was made.
    born: u64,
    aead: LessSafeKey,
}

impl Key {
    fn generate(random: &SystemRandom, born: u64) -> Result<Key, TlsError> {
        let mut name = [0; NAME_LEN];
        let mut secret = [0; SECRET_LEN];
        random.fill(&mut name).map_err(|_| TlsError::Random)?;
        random.fill(&mut secret).map_err(|_| TlsError::Random)?;
        Ok(Key::from_parts(name, secret, born))
    }

    fn from_parts(name: [u8; NAME_LEN], secret: [u8; SECRET_LEN], born: u64) -> Key {
        // A 32-byte key is what ChaCha20-Poly1305 takes: this cannot fail.
        let unbound = UnboundKey::new(&CHACHA20_POLY1305, &secret)
            .unwrap_or_else(|_| unreachable!("a 32-byte ChaCha20-Poly1305 key"));
        Key {
            name,
            secret,
            born,
            aead: LessSafeKey::new(unbound),
        }
    }

    fn encode(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.name);
        out.extend_from_slice(&self.secret);
        out.extend_from_slice(&self.born.to_be_bytes());
    }

    fn decode(bytes: &[u8]) -> Key {
        let (name, rest) = bytes.split_at(NAME_LEN);
        let (secret, born) = rest.split_at(SECRET_LEN);
        let mut parts = ([0; NAME_LEN], [0; SECRET_LEN], [0; 8]);
        parts.0.copy_from_slice(name);
        parts.1.copy_from_slice(secret);
        parts.2.copy_from_slice(born);
        Key::from_parts(parts.0, parts.1, u64::from_be_bytes(parts.2))
    }
}

impl Keys {
    /// Moves on to a new key once the current one has sealed for
    /// [`ROTATE_EVERY`]; the one it replaces opens for one more period
    /// (tickets it sealed a moment ago live that long), and the one before
    /// that is forgotten.
    fn rotate(&mut self, now: u64, random: &SystemRandom) -> Result<(), TlsError> {
        if now.saturating_sub(self.current.born) >= ROTATE_EVERY {
            let next = Key::generate(random, now)?;
            self.previous = Some(std::mem::replace(&mut self.current, next));
        }
        Ok(())
    }
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |elapsed| elapsed.as_secs())
}

impl TicketKeys {
    /// A fresh key, drawn from the system's random source.
    ///
    /// # Errors
    /// [`TlsError::Random`] if the system's random source fails.
    pub fn new() -> Result<TicketKeys, TlsError> {
        let random = SystemRandom::new();
        let current = Key::generate(&random, now())?;
        Ok(TicketKeys::from_keys(
            Keys {
                current,
                previous: None,
            },
            random,
        ))
    }

    fn from_keys(keys: Keys, random: SystemRandom) -> TicketKeys {
        TicketKeys {
            inner: Arc::new(Inner {
                keys: Mutex::new(keys),
                random,
            }),
        }
    }

    /// The keys as bytes, for the state handoff: a version byte, then one
    /// or two keys of 56 bytes (name, secret, birth time). They are
    /// secrets: hand them to a successor, never to a log or a file.
    pub fn to_bytes(&self) -> Vec<u8> {
        let keys = self.lock();
        let mut out = Vec::with_capacity(1 + 2 * KEY_LEN);
        out.push(VERSION);
        keys.current.encode(&mut out);
        if let Some(previous) = &keys.previous {
            previous.encode(&mut out);
        }
        out
    }

    /// The keys a predecessor handed over with [`to_bytes`](Self::to_bytes).
    ///
    /// # Errors
    /// [`TlsError::TicketKeys`] if `bytes` are not keys in this encoding
    /// (another version of it, another state, a truncated handoff); says
    /// how long they were and what version byte they had. A successor may
    /// start with [`TicketKeys::new`] then, at the cost of one full
    /// handshake per returning client.
    pub fn from_bytes(bytes: &[u8]) -> Result<TicketKeys, TlsError> {
        let malformed = || TlsError::TicketKeys {
            len: bytes.len(),
            version: bytes.first().copied(),
        };
        let (&version, keys) = bytes.split_first().ok_or_else(malformed)?;
        if version != VERSION || !(keys.len() == KEY_LEN || keys.len() == 2 * KEY_LEN) {
            return Err(malformed());
        }
        let (current, previous) = keys.split_at(KEY_LEN);
        let keys = Keys {
            current: Key::decode(current),
            previous: (!previous.is_empty()).then(|| Key::decode(previous)),
        };
        Ok(TicketKeys::from_keys(keys, SystemRandom::new()))
    }

    /// The keys this generation's parent handed on in the state, or new
    /// ones for the first generation, handed on in turn to each successor
    /// (this sets the [state provider](crate::Upgrader::set_state_provider)):
    /// the whole of resumption across upgrades, for a service that hands on
    /// no state of its own. Call it before
    /// [`ready`](crate::Upgrader::ready).
    ///
    /// A state that is not ticket keys (a predecessor that handed on
    /// something else) or that did not come whole (the parent died while
    /// sending it) is no error: this generation starts with new keys, at
    /// the cost of one full handshake per returning client, and says so in
    /// a warning.
    ///
    /// # Errors
    /// [`TlsError::Random`] if new keys are needed and the system's random
    /// source fails.
    pub async fn inherit(upgrader: &crate::Upgrader) -> Result<TicketKeys, TlsError> {
        let generation = upgrader.generation();
        let keys = match upgrader.inherited_state().await {
            Ok(Some(bytes)) => TicketKeys::from_bytes(&bytes).map_err(|error| error.to_string()),
            Ok(None) if upgrader.has_parent() => Err("the parent handed on no state".into()),
            Ok(None) => return TicketKeys::new().map(|keys| keys.handed_on_by(upgrader)),
            Err(error) => Err(error.to_string()),
        };
        let keys = match keys {
            Ok(keys) => keys,
            Err(why) => {
                tracing::warn!(generation, %why, "TLS ticket keys not inherited: new ones, so returning clients make a full handshake once");
                TicketKeys::new()?
            }
        };
        Ok(keys.handed_on_by(upgrader))
    }

    /// Makes `upgrader` hand these keys on to each successor.
    fn handed_on_by(self, upgrader: &crate::Upgrader) -> TicketKeys {
        let handed_on = self.clone();
        upgrader.set_state_provider(move || handed_on.to_bytes());
        self
    }

    /// Makes `config` seal and open session tickets with these keys (TLS
    /// 1.3 tickets and TLS 1.2 session tickets), for a `ServerConfig` built
    /// by hand.
    pub fn install(&self, config: &mut ServerConfig) {
        config.ticketer = Arc::new(self.clone());
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Keys> {
        self.inner
            .keys
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    fn seal(&self, plain: &[u8], now: u64) -> Option<Vec<u8>> {
        let mut nonce = [0; NONCE_LEN];
        self.inner.random.fill(&mut nonce).ok()?;
        let mut keys = self.lock();
        // A rotation that cannot draw a key seals with the current one.
        let _ = keys.rotate(now, &self.inner.random);
        let key = &keys.current;
        let mut ticket = Vec::with_capacity(NAME_LEN + NONCE_LEN + plain.len() + 16);
        ticket.extend_from_slice(&key.name);
        ticket.extend_from_slice(&nonce);
        ticket.extend_from_slice(plain);
        let tag = key
            .aead
            .seal_in_place_separate_tag(
                Nonce::assume_unique_for_key(nonce),
                Aad::from(key.name),
                &mut ticket[NAME_LEN + NONCE_LEN..],
            )
            .ok()?;
        ticket.extend_from_slice(tag.as_ref());
        Some(ticket)
    }

    fn open(&self, ticket: &[u8], now: u64) -> Option<Vec<u8>> {
        if ticket.len() > MAX_TICKET || ticket.len() < NAME_LEN + NONCE_LEN {
            return None;
        }
        let (name, rest) = ticket.split_at(NAME_LEN);
        let (nonce, sealed) = rest.split_at(NONCE_LEN);
        let mut keys = self.lock();
        let _ = keys.rotate(now, &self.inner.random);
        let key = [Some(&keys.current), keys.previous.as_ref()]
            .into_iter()
            .flatten()
            .find(|key| key.name == name)?;
        let nonce = Nonce::try_assume_unique_for_key(nonce).ok()?;
        let mut plain = sealed.to_vec();
        let len = key
            .aead
            .open_in_place(nonce, Aad::from(key.name), &mut plain)
            .ok()?
            .len();
        plain.truncate(len);
        Some(plain)
    }
}

impl ProducesTickets for TicketKeys {
    fn enabled(&self) -> bool {
        true
    }

    /// What clients are told, as rustls's own rotator tells them: the
    /// longest a ticket can open (sealed just as its key took over).
    fn lifetime(&self) -> u32 {
        2 * ROTATE_EVERY as u32
    }

    fn encrypt(&self, plain: &[u8]) -> Option<Vec<u8>> {
        self.seal(plain, now())
    }

    fn decrypt(&self, ticket: &[u8]) -> Option<Vec<u8>> {
        self.open(ticket, now())
    }
}

impl fmt::Debug for TicketKeys {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let keys = self.lock();
        f.debug_struct("TicketKeys")
            .field("current_born", &keys.current.born)
            .field(
                "previous_born",
                &keys.previous.as_ref().map(|previous| previous.born),
            )
            .finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_successor_opens_tickets_sealed_before_the_handoff() {
        let old = TicketKeys::new().unwrap();
        let ticket = old.seal(b"session", 1_000).unwrap();
        let new = TicketKeys::from_bytes(&old.to_bytes()).unwrap();
        assert_eq!(new.open(&ticket, 1_000).as_deref(), Some(&b"session"[..]));
        // Keys of their own open nothing the old generation sealed.
        assert_eq!(TicketKeys::new().unwrap().open(&ticket, 1_000), None);
    }

    #[test]
    fn a_tampered_or_short_ticket_does_not_open() {
        let keys = TicketKeys::new().unwrap();
        let ticket = keys.seal(b"session", 1_000).unwrap();
        for at in [0, NAME_LEN, NAME_LEN + NONCE_LEN, ticket.len() - 1] {
            let mut bad = ticket.clone();
            bad[at] ^= 1;
            assert_eq!(keys.open(&bad, 1_000), None, "byte {at} flipped");
        }
        assert_eq!(keys.open(&ticket[..NAME_LEN + NONCE_LEN - 1], 1_000), None);
        assert_eq!(keys.open(&ticket[..ticket.len() - 1], 1_000), None);
        assert_eq!(keys.open(&vec![0; MAX_TICKET + 1], 1_000), None);
    }

    #[test]
    fn keys_rotate_and_the_previous_one_opens_for_one_more_period() {
        let keys = TicketKeys::new().unwrap();
        let born = keys.lock().current.born;
        let early = keys.seal(b"early", born).unwrap();
        // One period on: a new key seals, the old one still opens.
        let later = keys.seal(b"later", born + ROTATE_EVERY).unwrap();
        assert_ne!(early[..NAME_LEN], later[..NAME_LEN]);
        assert_eq!(keys.to_bytes().len(), 1 + 2 * KEY_LEN);
        let handed = TicketKeys::from_bytes(&keys.to_bytes()).unwrap();
        for keys in [&keys, &handed] {
            let at = born + ROTATE_EVERY + 1;
            assert_eq!(keys.open(&early, at).as_deref(), Some(&b"early"[..]));
            assert_eq!(keys.open(&later, at).as_deref(), Some(&b"later"[..]));
        }
        // Two periods on: the first key is gone, the second still opens.
        let at = born + 2 * ROTATE_EVERY;
        assert_eq!(keys.open(&early, at), None);
        assert_eq!(keys.open(&later, at).as_deref(), Some(&b"later"[..]));
    }

    #[test]
    fn bytes_that_are_not_keys_are_a_typed_error() {
        let good = TicketKeys::new().unwrap().to_bytes();
        for (bytes, len, version) in [
            (&b""[..], 0, None),
            (&good[..good.len() - 1], good.len() - 1, Some(VERSION)),
            (&b"\x02not keys"[..], 9, Some(2)),
        ] {
            match TicketKeys::from_bytes(bytes) {
                Err(TlsError::TicketKeys { len: l, version: v }) => {
                    assert_eq!((l, v), (len, version))
                }
                other => panic!("{bytes:?}: {other:?}"),
            }
        }
        let mut wrong_version = good.clone();
        wrong_version[0] = 9;
        assert!(TicketKeys::from_bytes(&wrong_version).is_err());
    }

    #[test]
    fn debug_shows_no_secret() {
        let keys = TicketKeys::new().unwrap();
        let secret = keys.lock().current.secret;
        let shown = format!("{keys:?}");
        assert!(shown.starts_with("TicketKeys"), "{shown}");
        let hex: String = secret[..4].iter().map(|b| format!("{b:02x}")).collect();
        assert!(!shown.contains(&hex) && !shown.contains(&format!("{:?}", &secret[..4])));
    }
}
