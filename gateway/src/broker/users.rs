//! Who may connect to the embedded broker: the users of a Mosquitto password
//! file (`mosquitto_passwd` hashes, so one file serves both brokers), the
//! gateway's own internal user, and which MQTT client ids each may use.
//!
//! rumqttd asks [`Users::check`] at every CONNECT that carries a user name
//! (one without is refused by rumqttd itself before asking).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use base64::engine::general_purpose::STANDARD;
use base64::Engine as _;
use sha2::{Digest, Sha512};
use subtle::ConstantTimeEq;

/// How one user's password is checked.
#[derive(Clone)]
enum Secret {
    /// `$7$ITERATIONS$SALT$HASH`: PBKDF2-HMAC-SHA512 (mosquitto_passwd's
    /// default since Mosquitto 2.0), salt and hash in standard base64.
    Pbkdf2Sha512 { iterations: u32, salt: Vec<u8>, hash: Vec<u8> },
    /// `$6$SALT$HASH`: SHA-512 over the password then the salt (Mosquitto ≤ 1.6).
    Sha512 { salt: Vec<u8>, hash: Vec<u8> },
    /// The gateway's internal user: a random password held only in memory.
    Internal(Vec<u8>),
}

impl Secret {
    fn matches(&self, password: &[u8]) -> bool {
        match self {
            Secret::Pbkdf2Sha512 { iterations, salt, hash } => {
                let mut derived = vec![0u8; hash.len()];
                pbkdf2::pbkdf2_hmac::<Sha512>(password, salt, *iterations, &mut derived);
                derived.ct_eq(hash).into()
            }
            Secret::Sha512 { salt, hash } => {
                let derived = Sha512::new().chain_update(password).chain_update(salt).finalize();
                derived.as_slice().ct_eq(hash).into()
            }
            Secret::Internal(expected) => expected.ct_eq(password).into(),
        }
    }
}

/// Most PBKDF2 iterations accepted from a file: the check runs on the
/// broker's own threads at every CONNECT (mosquitto_passwd uses 101).
const MAX_ITERATIONS: u32 = 100_000;

/// A password file that cannot be used; names the file and the line.
#[derive(Debug, thiserror::Error)]
pub enum UsersError {
    #[error("cannot read the MQTT users file {path} (--mqtt-users-file): {source}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error(
        "{path} line {line}: {reason}. Each line is USER:HASH as mosquitto_passwd writes it \
         ($7$ PBKDF2-SHA512 or $6$ SHA-512); make one with `mosquitto_passwd -c FILE USER`"
    )]
    Line { path: PathBuf, line: usize, reason: String },
    #[error("the MQTT users file {0} holds no user")]
    Empty(PathBuf),
    #[error(
        "the MQTT users file names user {0:?}, the gateway's own internal user (its instance id): \
         rename that user or give the gateway another --instance-id"
    )]
    Reserved(String),
}

/// Why a CONNECT was refused (logged and counted; never the password).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refusal {
    UnknownUser,
    WrongPassword,
    /// The client id belongs to this other user (see [`Users::owner`]).
    ClientIdOfAnotherUser(String),
}

impl std::fmt::Display for Refusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Refusal::UnknownUser => f.write_str("unknown user"),
            Refusal::WrongPassword => f.write_str("wrong password"),
            Refusal::ClientIdOfAnotherUser(owner) => write!(f, "client id belongs to user {owner:?}"),
        }
    }
}

/// The embedded broker's users. Cheap to check against; cloned into the
/// broker's auth handler.
#[derive(Clone, Default)]
pub struct Users {
    secrets: HashMap<String, Secret>,
}

impl std::fmt::Debug for Users {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut names: Vec<_> = self.secrets.keys().collect();
        names.sort();
        f.debug_struct("Users").field("names", &names).finish()
    }
}

impl Users {
    /// Reads a Mosquitto password file: one `USER:HASH` per line, blank lines
    /// and lines starting with `#` skipped. Errors name the file and line.
    pub fn load(path: &Path) -> Result<Users, UsersError> {
        let text = std::fs::read_to_string(path)
            .map_err(|source| UsersError::Read { path: path.to_owned(), source })?;
        let users = Users::parse(&text).map_err(|(line, reason)| UsersError::Line {
            path: path.to_owned(),
            line,
            reason,
        })?;
        if users.secrets.is_empty() {
            return Err(UsersError::Empty(path.to_owned()));
        }
        Ok(users)
    }

    /// The users of a password file's text; on error the 1-based line and why.
    fn parse(text: &str) -> Result<Users, (usize, String)> {
        let mut secrets = HashMap::new();
        for (index, line) in text.lines().enumerate() {
            let line = line.trim_end_matches('\r');
            if line.trim().is_empty() || line.starts_with('#') {
                continue;
            }
            let (user, hash) =
                line.split_once(':').ok_or((index + 1, "no ':' after the user name".to_owned()))?;
            if user.is_empty() {
                return Err((index + 1, "empty user name".into()));
            }
            let secret = parse_hash(hash).map_err(|reason| (index + 1, reason))?;
            if secrets.insert(user.to_owned(), secret).is_some() {
                return Err((index + 1, format!("user {user:?} is listed twice")));
            }
        }
        Ok(Users { secrets })
    }

    /// Adds the gateway's internal user (its instance id) with a random
    /// password, returned for its own clients. Fails if the file has it.
    pub fn add_internal(&mut self, username: &str) -> Result<String, UsersError> {
        let password: String = {
            use rand::Rng as _;
            let bytes: [u8; 32] = rand::thread_rng().gen();
            bytes.iter().map(|b| format!("{b:02x}")).collect()
        };
        self.with_internal(username, password.as_bytes())?;
        Ok(password)
    }

    fn with_internal(&mut self, username: &str, password: &[u8]) -> Result<(), UsersError> {
        if self.secrets.contains_key(username) {
            return Err(UsersError::Reserved(username.to_owned()));
        }
        self.secrets.insert(username.to_owned(), Secret::Internal(password.to_vec()));
        Ok(())
    }

    /// The user a client id belongs to: the user whose name is the client id,
    /// or the longest user name `U` such that the id starts with `U-`
    /// (`receiver-1` owns `receiver-1`; the gateway's internal user `gw-a`
    /// owns `gw-a-main` and `gw-a-reports`). `None`: free for anyone.
    pub fn owner(&self, client_id: &str) -> Option<&str> {
        self.secrets
            .keys()
            .filter(|user| {
                client_id == user.as_str()
                    || client_id.strip_prefix(user.as_str()).is_some_and(|rest| rest.starts_with('-'))
            })
            .max_by_key(|user| user.len())
            .map(String::as_str)
    }

    /// Whether `username` with `password` may connect as `client_id`: a
    /// known user, the right password, and a client id that is free or its
    /// own — so nobody can take over (and disconnect) another user's client.
    pub fn check(&self, client_id: &str, username: &str, password: &str) -> Result<(), Refusal> {
        let secret = self.secrets.get(username).ok_or(Refusal::UnknownUser)?;
        if !secret.matches(password.as_bytes()) {
            return Err(Refusal::WrongPassword);
        }
        match self.owner(client_id) {
            Some(owner) if owner != username => Err(Refusal::ClientIdOfAnotherUser(owner.to_owned())),
            _ => Ok(()),
        }
    }
}

/// The users file as the embedded broker sees it: read at start, and read
/// again at the first CONNECT after it changed (its modification time or
/// size), so adding a user or rotating a password needs no restart. A
/// changed file that does not load is logged and the previous users stay.
#[derive(Debug)]
pub struct UsersFile {
    path: PathBuf,
    /// The gateway's internal user, added to every load.
    internal: (String, Vec<u8>),
    /// A std mutex: held for a `stat` (and a reload when the file changed),
    /// never during a password check.
    loaded: Mutex<(Option<Stamp>, Arc<Users>)>,
}

/// What tells a file's versions apart: modification time and size.
type Stamp = (SystemTime, u64);

impl UsersFile {
    /// Loads `path` and adds the internal user `internal_user`; returns the
    /// file and the internal user's password (random, for this process only).
    pub fn open(path: &Path, internal_user: &str) -> Result<(UsersFile, String), UsersError> {
        let stamp = stamp(path);
        let mut users = Users::load(path)?;
        let password = users.add_internal(internal_user)?;
        let internal = (internal_user.to_owned(), password.clone().into_bytes());
        let file =
            UsersFile { path: path.to_owned(), internal, loaded: Mutex::new((stamp, Arc::new(users))) };
        Ok((file, password))
    }

    /// [`Users::check`] against the file as it is now.
    pub fn check(&self, client_id: &str, username: &str, password: &str) -> Result<(), Refusal> {
        self.current().check(client_id, username, password)
    }

    fn current(&self) -> Arc<Users> {
        let now = stamp(&self.path);
        let mut loaded = self.loaded.lock().expect("users file lock");
        if now != loaded.0 {
            loaded.0 = now;
            let (name, password) = &self.internal;
            let reloaded = Users::load(&self.path).and_then(|mut users| {
                users.with_internal(name, password)?;
                Ok(users)
            });
            match reloaded {
                Ok(users) => {
                    tracing::info!(path = %self.path.display(), users = users.secrets.len() - 1, "MQTT users file read again");
                    loaded.1 = Arc::new(users);
                }
                Err(error) => {
                    tracing::error!(%error, "the changed MQTT users file was not loaded; the previous users stay")
                }
            }
        }
        loaded.1.clone()
    }
}

fn stamp(path: &Path) -> Option<Stamp> {
    let meta = std::fs::metadata(path).ok()?;
    Some((meta.modified().ok()?, meta.len()))
}

/// One hash field of a password file line.
fn parse_hash(hash: &str) -> Result<Secret, String> {
    let b64 =
        |field: &str, what: &str| STANDARD.decode(field).map_err(|e| format!("{what} is not base64: {e}"));
    let fields: Vec<&str> = hash.split('$').collect();
    match fields.as_slice() {
        ["", "7", iterations, salt, hash] => {
            let iterations: u32 =
                iterations.parse().map_err(|_| format!("iteration count {iterations:?}"))?;
            if !(1..=MAX_ITERATIONS).contains(&iterations) {
                return Err(format!("iteration count {iterations} is not 1 to {MAX_ITERATIONS}"));
            }
            Ok(Secret::Pbkdf2Sha512 {
                iterations,
                salt: b64(salt, "the salt")?,
                hash: b64(hash, "the hash")?,
            })
        }
        ["", "6", salt, hash] => {
            Ok(Secret::Sha512 { salt: b64(salt, "the salt")?, hash: b64(hash, "the hash")? })
        }
        _ => {
            Err("not a $7$ or $6$ hash (a plain-text password? hash the file with mosquitto_passwd -U)"
                .into())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Written by `mosquitto_passwd` 2.0.11 (`-b`, and `-H sha512 -b`).
    const FILE: &str = "\
# made by mosquitto_passwd
alice:$7$101$DxcFuBrGDZbZYHi2$+QHZ35tzqrchCV4qLiuoTWDmh9FHykoCLNZKUwVuACX5B4wYsd2Em9DmgWp/BCNma7qAwKdP7T+Ea2YkTAZMdw==
bob:$6$NUsuNfhB5prXTqCI$m5qQuEHL8LaZSCeGpxpRjUDdeMGEjgBqG0GzzdRmpgcUSiLAHhgClcvpaBpaj3/MClGjZoZlitgkx6PLY8+vfA==

receiver-1:$7$101$DxcFuBrGDZbZYHi2$+QHZ35tzqrchCV4qLiuoTWDmh9FHykoCLNZKUwVuACX5B4wYsd2Em9DmgWp/BCNma7qAwKdP7T+Ea2YkTAZMdw==
";

    #[test]
    fn mosquitto_passwd_hashes_check_both_ways() {
        let users = Users::parse(FILE).unwrap();
        assert_eq!(users.check("c1", "alice", "s3cret!"), Ok(()));
        assert_eq!(users.check("c1", "alice", "s3cret"), Err(Refusal::WrongPassword));
        assert_eq!(users.check("c2", "bob", "hunter2"), Ok(()));
        assert_eq!(users.check("c2", "bob", "hunter3"), Err(Refusal::WrongPassword));
        assert_eq!(users.check("c3", "carol", "x"), Err(Refusal::UnknownUser));
    }

    #[test]
    fn client_ids_belong_to_their_users() {
        let mut users = Users::parse(FILE).unwrap();
        let internal = users.add_internal("gw-a").unwrap();
        assert_eq!(users.owner("receiver-1"), Some("receiver-1"));
        assert_eq!(users.owner("receiver-10"), None);
        assert_eq!(users.owner("gw-a-main"), Some("gw-a"));
        assert_eq!(users.owner("caller-42"), None);
        // A caller may not take the receiver's or the gateway's client id…
        let taken = Err(Refusal::ClientIdOfAnotherUser("receiver-1".into()));
        assert_eq!(users.check("receiver-1", "alice", "s3cret!"), taken);
        assert!(users.check("gw-a-reports", "alice", "s3cret!").is_err());
        // …but any free one; the owners their own.
        assert_eq!(users.check("caller-42", "alice", "s3cret!"), Ok(()));
        assert_eq!(users.check("receiver-1", "receiver-1", "s3cret!"), Ok(()));
        assert_eq!(users.check("gw-a-main", "gw-a", &internal), Ok(()));
        assert_eq!(users.check("gw-a-main", "gw-a", "guess"), Err(Refusal::WrongPassword));
        assert!(matches!(users.add_internal("alice"), Err(UsersError::Reserved(_))));
    }

    #[test]
    fn bad_lines_are_named() {
        for (text, line) in [
            ("alice:plaintext\n", 1),
            ("# c\nbob\n", 2),
            ("a:$7$0$AAAA$AAAA\n", 1),
            ("a:$7$101$!!$AAAA\n", 1),
            (":$6$AAAA$AAAA\n", 1),
            ("a:$6$AAAA$AAAA\na:$6$AAAA$AAAA\n", 2),
        ] {
            assert_eq!(Users::parse(text).unwrap_err().0, line, "{text}");
        }
        let dir = tempfile::tempdir().unwrap();
        let empty = dir.path().join("empty");
        std::fs::write(&empty, "# nobody\n").unwrap();
        assert!(matches!(Users::load(&empty), Err(UsersError::Empty(_))));
        let err = Users::load(&dir.path().join("missing")).unwrap_err().to_string();
        assert!(err.contains("--mqtt-users-file"), "{err}");
    }

    #[test]
    fn a_changed_file_is_read_again_and_a_broken_one_keeps_the_old_users() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("users");
        let alice = FILE.lines().find(|l| l.starts_with("alice:")).unwrap();
        let bob = FILE.lines().find(|l| l.starts_with("bob:")).unwrap();
        std::fs::write(&path, format!("{alice}\n")).unwrap();
        let (file, internal) = UsersFile::open(&path, "gw-a").unwrap();
        assert_eq!(file.check("c", "alice", "s3cret!"), Ok(()));
        assert_eq!(file.check("c", "bob", "hunter2"), Err(Refusal::UnknownUser));
        // alice removed, bob added (a longer file: a new size even within one mtime tick).
        std::fs::write(&path, format!("# rotated\n{bob}\n")).unwrap();
        assert_eq!(file.check("c", "bob", "hunter2"), Ok(()));
        assert_eq!(file.check("c", "alice", "s3cret!"), Err(Refusal::UnknownUser));
        assert_eq!(file.check("gw-a-main", "gw-a", &internal), Ok(()), "the internal user stays");
        std::fs::write(&path, "bob:plaintext-is-refused\n").unwrap();
        assert_eq!(file.check("c", "bob", "hunter2"), Ok(()), "a broken file keeps the previous users");
    }
}
