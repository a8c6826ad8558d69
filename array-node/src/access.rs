//! LUN masking: who may read or write which LU, deny by default.
//!
//! # Who is asking
//!
//! The caller of a request is the [`Caller`] the server stack put in its
//! extensions: the identity of its client certificate (the first DNS name,
//! `db-server`, `backup-server`, `console`, …). With `--insecure` the
//! caller is [`Caller::Unauthenticated`] and masking is off: every LU is
//! read-write for everyone, because there is nobody to tell apart. A caller
//! without a certificate ([`Caller::Anonymous`]) is refused by the layer
//! before it reaches the array; should one get through, it has no access to
//! anything (fail closed).
//!
//! # What is granted
//!
//! An identity has one [`Access`] per LU: `none`, `read` or `read-write`.
//! It comes from two places:
//!
//! - **Configured** (the array's TOML configuration, or the defaults
//!   without one): the `[access]` table names the `owner` (default
//!   `db-server`) and the `backup` identity (default `backup-server`). The
//!   owner may read and write every LU of every pair (mirror, origin and
//!   mate); the backup identity may read every mate LU; everyone else
//!   (the console too) has no access. An LU outside every pair (a plain LU)
//!   is reachable only through `[[grant]]` entries (`identity`, `lu`,
//!   `access`), which also override the defaults for their (identity, LU).
//! - **Set** with `SetAccess` by the owner, and only by the owner: the
//!   array learns temporary grants from the node that manages the pairs,
//!   never from the node that gains the access. db-server makes the mate
//!   read-only for itself while a snapshot is held; a restore will give
//!   backup-server read-write access to one mirror LU for one restore.
//!   `SetAccess` reaches only LUs of pairs (plain LUs are the
//!   configuration's alone: `INVALID_ARGUMENT`), and unsetting the access
//!   returns the identity to what the configuration grants.
//!
//! The grant of (identity, LU) is the set one if there is one, else the
//! configured one, else `none`.
//!
//! # What a request needs
//!
//! The access an identity has to an LU *through* a request is the least of
//! its grants on every place the LU's data lives: for a real LU its own
//! grant; for a mirror LU the least of its grants on the mirror LU, its
//! origin and every mate, because a write to a mirror LU may write all of
//! them and a read may be served by any. So when db-server made a mate
//! read-only for itself, the mirror LU is read-only for it too, and a write
//! to it is refused before anything is written — unless that mate's pair
//! (see [`crate::modes`]) is in Snapshot, where a mirror write leaves the
//! mate alone: a mirror write needs `read-write` on the mirror LU, the
//! origin and every mate it is sent to, no more (the array refuses such a
//! write should a mode change to one that writes a mate the caller may
//! not write before it runs).
//!
//! Read, `ChecksumRange`, `ModeSense` and `Flush` need `read` (a flush
//! changes no data: it only makes acknowledged writes durable); `Write`
//! needs `read-write`; `CopyRange` needs `read` on the source and
//! `read-write` on the destination. Every check is made in one place per
//! request kind ([`crate::validate`]) before any side effect.
//!
//! # How a refusal reads
//!
//! An LU the identity has no access to is invisible: `ListLus` leaves it
//! out, and every request naming it answers `NOT_FOUND` with exactly the
//! text of an LU that does not exist ("LU 9 does not exist"), so that
//! masking does not reveal which LUs exist. A visible LU used beyond its
//! access answers `PERMISSION_DENIED`, saying what access the identity has
//! and what the request needs.
//!
//! # Durability of what is set
//!
//! Set grants are kept in `DATA_DIR/access.json` (JSON with a BLAKE3
//! checksum of its grants, written as every state file of the array is:
//! [`crate::state_file`]). The file is replaced atomically (a temporary
//! file in the same directory, fsync, rename, fsync of the directory)
//! *before* `SetAccess` answers; if any step fails, the call fails and the
//! grants in force are unchanged, as if it had never been made. The file
//! is read at start; a damaged one (unreadable, not JSON, a wrong
//! checksum, a grant for an LU the configuration no longer pairs) stops
//! the array from starting with an error naming the file: guessing who may
//! access what is worse than not serving. Deleting the file returns every
//! identity to its configured access.
//!
//! A request validated after `SetAccess` answered sees the new access; a
//! request validated before it may still be running (the owner changes
//! masking when it is not writing, e.g. after it quiesced for a snapshot).

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::{Mutex, RwLock};

use serde::{Deserialize, Serialize};
use splitmirror_proto::security::{Caller, role};

use crate::config::{ArrayConfig, LuId};
use crate::error::ArrayError;
use crate::state_file::{self, StateFileError};

/// The file set grants are kept in, inside the data directory.
pub const ACCESS_FILE: &str = "access.json";

/// What identifies the file's layout; a file of another layout is refused.
const FORMAT: &str = "splitmirror-array-access-v1";

/// The longest identity `SetAccess` takes: the longest DNS name.
pub const MAX_IDENTITY_BYTES: usize = 253;

/// The longest purpose `SetAccess` takes, so that the file stays small.
pub const MAX_PURPOSE_BYTES: usize = 1024;

/// What an identity may do with an LU. Ordered: `None < Read < ReadWrite`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Access {
    None,
    Read,
    ReadWrite,
}

impl Access {
    /// The word the configuration and the file use.
    pub fn word(self) -> &'static str {
        match self {
            Self::None => "none",
            Self::Read => "read",
            Self::ReadWrite => "read-write",
        }
    }
}

impl std::fmt::Display for Access {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.word())
    }
}

/// The `[access]` table of the configuration.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AccessConfig {
    /// The identity that manages the pairs: read-write on every LU of every
    /// pair, and the only one that may call `SetAccess`.
    pub owner: String,
    /// The identity that backs up the mates: read on every mate LU.
    pub backup: String,
}

impl Default for AccessConfig {
    fn default() -> Self {
        Self {
            owner: role::DB.to_string(),
            backup: role::BACKUP.to_string(),
        }
    }
}

/// One `[[grant]]` entry of the configuration.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GrantConfig {
    pub identity: String,
    pub lu: LuId,
    pub access: Access,
}

/// Where a grant in force comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GrantSource {
    Configured,
    Set,
}

/// One grant in force, as `ListAccess` answers it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Grant {
    pub identity: String,
    pub lu: LuId,
    pub access: Access,
    pub source: GrantSource,
    /// The purpose given to `SetAccess` (empty for a configured grant).
    pub purpose: String,
}

/// One `SetAccess` call, validated ([`crate::validate::set_access`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AccessChange {
    pub identity: String,
    pub lu: LuId,
    /// `None`: back to the configured access.
    pub access: Option<Access>,
    pub purpose: String,
}

/// A grant set by `SetAccess`.
#[derive(Debug, Clone, PartialEq, Eq)]
struct SetGrant {
    access: Access,
    purpose: String,
}

/// identity → LU → grant. Nested so that a lookup by `&str` allocates
/// nothing on the I/O path.
type Grants<T> = BTreeMap<String, BTreeMap<LuId, T>>;

/// Why the file of set grants could not be loaded (see
/// [`crate::state_file`]). The array does not start: none of these is
/// retryable as it is; the file must be restored or deleted.
pub type AccessFileError = StateFileError;

/// What the operator can do about a damaged file.
const ADVICE: &str = "the array refuses to start rather than guess who may access which LU \
                      (restore the file from a copy, or delete it to return every identity \
                      to the access the configuration grants)";

/// The file's content.
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct AccessFile {
    format: String,
    /// BLAKE3 (hex) of `grants` serialized as compact JSON.
    blake3: String,
    grants: Vec<FileGrant>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileGrant {
    identity: String,
    lu: LuId,
    access: Access,
    purpose: String,
}

/// Every grant of the array: configured and set. Shared by every request;
/// reads take a read lock for a map lookup, `SetAccess` replaces the set
/// grants after they are durable.
#[derive(Debug)]
pub struct AccessTable {
    owner: String,
    /// Every LU of every pair (mirror, origin, mate): the LUs `SetAccess`
    /// may change.
    pair_lus: BTreeSet<LuId>,
    configured: Grants<Access>,
    set: RwLock<Grants<SetGrant>>,
    /// Held for the whole of one `SetAccess` (persist, then swap), so that
    /// two changes never lose one another.
    changing: Mutex<()>,
    /// The file set grants are kept in; `None` keeps them in memory only
    /// (unit tests and the in-memory array).
    file: Option<PathBuf>,
}

impl AccessTable {
    /// The configured grants of `config`, with the set grants of
    /// `DATA_DIR/access.json` when it exists.
    pub fn open(config: &ArrayConfig, data_dir: &Path) -> Result<Self, AccessFileError> {
        let mut table = Self::in_memory(config);
        let path = data_dir.join(ACCESS_FILE);
        table.set = RwLock::new(load(&path, &table.pair_lus)?);
        table.file = Some(path);
        Ok(table)
    }

    /// The configured grants of `config`; set grants live in memory only.
    pub fn in_memory(config: &ArrayConfig) -> Self {
        let owner = config.access.owner.clone();
        let backup = config.access.backup.clone();
        let mut configured: Grants<Access> = BTreeMap::new();
        let mut pair_lus = BTreeSet::new();
        let mut grant = |identity: &str, lu: LuId, access: Access| {
            configured
                .entry(identity.to_string())
                .or_default()
                .insert(lu, access);
        };
        for pair in &config.mirrors {
            for lu in [pair.mirror, pair.origin, pair.mate] {
                pair_lus.insert(lu);
                grant(&owner, lu, Access::ReadWrite);
            }
            grant(&backup, pair.mate, Access::Read);
        }
        // Explicit entries last: they override the defaults.
        for entry in &config.grants {
            grant(&entry.identity, entry.lu, entry.access);
        }
        Self {
            owner,
            pair_lus,
            configured,
            set: RwLock::new(BTreeMap::new()),
            changing: Mutex::new(()),
            file: None,
        }
    }

    /// The identity that may call `SetAccess`.
    pub fn owner(&self) -> &str {
        &self.owner
    }

    /// Whether `lu` belongs to a pair (mirror, origin or mate).
    pub fn in_pair(&self, lu: LuId) -> bool {
        self.pair_lus.contains(&lu)
    }

    /// What `caller` may do with `lu` itself (not counting the sides of a
    /// mirror LU; [`crate::Array::effective_access`] does that).
    pub fn access(&self, caller: &Caller, lu: LuId) -> Access {
        match caller {
            Caller::Unauthenticated => Access::ReadWrite,
            Caller::Anonymous => Access::None,
            Caller::Identified(identity) => self.grant(identity, lu),
        }
    }

    /// The grant of `identity` on `lu`: set, else configured, else none.
    pub fn grant(&self, identity: &str, lu: LuId) -> Access {
        let set = self.set.read().expect("access table poisoned");
        if let Some(grant) = set.get(identity).and_then(|lus| lus.get(&lu)) {
            return grant.access;
        }
        self.configured_grant(identity, lu)
    }

    fn configured_grant(&self, identity: &str, lu: LuId) -> Access {
        self.configured
            .get(identity)
            .and_then(|lus| lus.get(&lu))
            .copied()
            .unwrap_or(Access::None)
    }

    /// Applies a validated `SetAccess`: durable first, then in force.
    /// Answers the identity's grant on the LU before and after. On an error
    /// nothing changed, in memory or on disk. Blocking (file I/O): call it
    /// off the async threads.
    pub fn set(&self, change: &AccessChange) -> Result<(Access, Access), ArrayError> {
        let _changing = self.changing.lock().expect("access change lock poisoned");
        let previous = self.grant(&change.identity, change.lu);
        let mut next = self.set.read().expect("access table poisoned").clone();
        match change.access {
            Some(access) => {
                next.entry(change.identity.clone()).or_default().insert(
                    change.lu,
                    SetGrant {
                        access,
                        purpose: change.purpose.clone(),
                    },
                );
            }
            None => {
                if let Some(lus) = next.get_mut(&change.identity) {
                    lus.remove(&change.lu);
                    if lus.is_empty() {
                        next.remove(&change.identity);
                    }
                }
            }
        }
        if let Some(path) = &self.file {
            let old = self.set.read().expect("access table poisoned").clone();
            state_file::persist(path, &file_content(&next), &file_content(&old)).map_err(|e| {
                ArrayError::io(format!("saving LUN masking to {}", path.display()), e)
            })?;
        }
        *self.set.write().expect("access table poisoned") = next;
        let now = self.grant(&change.identity, change.lu);
        Ok((previous, now))
    }

    /// The grants in force that `caller` may see: the owner (and anyone
    /// with `--insecure`) sees every grant on the LUs of pairs and its own
    /// elsewhere; any other identity only its own. One row per (identity,
    /// LU), the set grant where there is one.
    pub fn list(&self, caller: &Caller) -> Vec<Grant> {
        let visible = |identity: &str, lu: LuId| match caller {
            Caller::Unauthenticated => true,
            Caller::Anonymous => false,
            Caller::Identified(own) => {
                identity == own || (*own == self.owner && self.pair_lus.contains(&lu))
            }
        };
        let set = self.set.read().expect("access table poisoned");
        let mut rows: BTreeMap<(String, LuId), Grant> = BTreeMap::new();
        for (identity, lus) in &self.configured {
            for (&lu, &access) in lus {
                if visible(identity, lu) {
                    rows.insert(
                        (identity.clone(), lu),
                        Grant {
                            identity: identity.clone(),
                            lu,
                            access,
                            source: GrantSource::Configured,
                            purpose: String::new(),
                        },
                    );
                }
            }
        }
        for (identity, lus) in set.iter() {
            for (&lu, grant) in lus {
                if visible(identity, lu) {
                    rows.insert(
                        (identity.clone(), lu),
                        Grant {
                            identity: identity.clone(),
                            lu,
                            access: grant.access,
                            source: GrantSource::Set,
                            purpose: grant.purpose.clone(),
                        },
                    );
                }
            }
        }
        rows.into_values().collect()
    }
}

/// The set grants of the file at `path` (none if it does not exist).
fn load(path: &Path, pair_lus: &BTreeSet<LuId>) -> Result<Grants<SetGrant>, AccessFileError> {
    let Some(bytes) = state_file::read(path)? else {
        return Ok(BTreeMap::new());
    };
    let damaged = |reason: String| AccessFileError::Damaged {
        path: path.to_path_buf(),
        reason,
        advice: ADVICE,
    };
    let file: AccessFile =
        serde_json::from_slice(&bytes).map_err(|e| damaged(format!("not its JSON: {e}")))?;
    state_file::check(&file.format, FORMAT, &file.blake3, &file.grants).map_err(damaged)?;
    let mut grants: Grants<SetGrant> = BTreeMap::new();
    for grant in file.grants {
        if !pair_lus.contains(&grant.lu) {
            return Err(damaged(format!(
                "it sets {}'s access to LU {}, which no pair of the configuration holds",
                grant.identity, grant.lu
            )));
        }
        let previous = grants.entry(grant.identity.clone()).or_default().insert(
            grant.lu,
            SetGrant {
                access: grant.access,
                purpose: grant.purpose,
            },
        );
        if previous.is_some() {
            return Err(damaged(format!(
                "it sets {}'s access to LU {} twice",
                grant.identity, grant.lu
            )));
        }
    }
    Ok(grants)
}

fn file_content(set: &Grants<SetGrant>) -> Vec<u8> {
    let grants: Vec<FileGrant> = set
        .iter()
        .flat_map(|(identity, lus)| {
            lus.iter().map(|(&lu, grant)| FileGrant {
                identity: identity.clone(),
                lu,
                access: grant.access,
                purpose: grant.purpose.clone(),
            })
        })
        .collect();
    state_file::encode(&AccessFile {
        format: FORMAT.to_string(),
        blake3: state_file::checksum(&grants),
        grants,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::RealLuConfig;

    const OWNER: &str = "db-server";
    const BACKUP: &str = "backup-server";
    const CONSOLE: &str = "console";

    fn who(identity: &str) -> Caller {
        Caller::Identified(identity.to_string())
    }

    /// The default pairs (0 = 1 + 2, 3 = 4 + 5) plus plain LU 9.
    fn config(grants: Vec<GrantConfig>) -> ArrayConfig {
        let mut config = ArrayConfig::default_pairs(1 << 20).expect("config");
        config.lus.push(RealLuConfig {
            id: 9,
            block_size_bytes: 4096,
            block_count: 16,
        });
        config.grants = grants;
        config.validate().expect("valid");
        config
    }

    fn change(identity: &str, lu: LuId, access: Option<Access>) -> AccessChange {
        AccessChange {
            identity: identity.into(),
            lu,
            access,
            purpose: format!("test of {identity} on LU {lu}"),
        }
    }

    #[test]
    fn defaults_deny_everyone_but_the_owner_and_the_backup_on_mates() {
        let table = AccessTable::in_memory(&config(Vec::new()));
        for lu in [0, 1, 2, 3, 4, 5] {
            assert_eq!(table.access(&who(OWNER), lu), Access::ReadWrite, "LU {lu}");
            assert_eq!(table.access(&who(CONSOLE), lu), Access::None, "LU {lu}");
            assert_eq!(table.access(&Caller::Anonymous, lu), Access::None);
            assert_eq!(
                table.access(&Caller::Unauthenticated, lu),
                Access::ReadWrite
            );
        }
        for (lu, access) in [(0, Access::None), (1, Access::None), (2, Access::Read)] {
            assert_eq!(table.access(&who(BACKUP), lu), access, "LU {lu}");
            assert_eq!(table.access(&who(BACKUP), lu + 3), access, "LU {}", lu + 3);
        }
        // A plain LU is nobody's without a [[grant]], not even the owner's.
        assert_eq!(table.access(&who(OWNER), 9), Access::None);
        assert_eq!(table.access(&Caller::Unauthenticated, 9), Access::ReadWrite);
        assert!(table.in_pair(5) && !table.in_pair(9));
    }

    #[test]
    fn grants_override_the_defaults_for_their_identity_and_lu() {
        let grant = |identity: &str, lu, access| GrantConfig {
            identity: identity.into(),
            lu,
            access,
        };
        let table = AccessTable::in_memory(&config(vec![
            grant(BACKUP, 2, Access::None),
            grant("reporting", 9, Access::Read),
            grant(OWNER, 9, Access::ReadWrite),
        ]));
        assert_eq!(table.access(&who(BACKUP), 2), Access::None);
        assert_eq!(table.access(&who(BACKUP), 5), Access::Read);
        assert_eq!(table.access(&who("reporting"), 9), Access::Read);
        assert_eq!(table.access(&who("reporting"), 1), Access::None);
        assert_eq!(table.access(&who(OWNER), 9), Access::ReadWrite);
    }

    #[test]
    fn an_owner_named_in_the_config_is_the_one_with_the_pairs() {
        let mut config = config(Vec::new());
        config.access = AccessConfig {
            owner: "db-a".into(),
            backup: "tape".into(),
        };
        let table = AccessTable::in_memory(&config);
        assert_eq!(table.owner(), "db-a");
        assert_eq!(table.access(&who("db-a"), 0), Access::ReadWrite);
        assert_eq!(table.access(&who(OWNER), 0), Access::None);
        assert_eq!(table.access(&who("tape"), 2), Access::Read);
        assert_eq!(table.access(&who(BACKUP), 2), Access::None);
    }

    #[test]
    fn a_set_grant_overrides_until_unset() {
        let table = AccessTable::in_memory(&config(Vec::new()));
        let set = table.set(&change(OWNER, 2, Some(Access::Read)));
        assert_eq!(set.expect("set"), (Access::ReadWrite, Access::Read));
        assert_eq!(table.access(&who(OWNER), 2), Access::Read);
        let set = table.set(&change(BACKUP, 0, Some(Access::ReadWrite)));
        assert_eq!(set.expect("set"), (Access::None, Access::ReadWrite));
        let unset = table.set(&change(OWNER, 2, None));
        assert_eq!(unset.expect("unset"), (Access::Read, Access::ReadWrite));
        // Unsetting what was never set changes nothing.
        let unset = table.set(&change(CONSOLE, 2, None));
        assert_eq!(unset.expect("unset"), (Access::None, Access::None));
        assert_eq!(table.access(&who(BACKUP), 0), Access::ReadWrite);
    }

    #[test]
    fn the_owner_lists_every_grant_on_its_pairs_and_others_only_their_own() {
        let config = config(vec![GrantConfig {
            identity: "reporting".into(),
            lu: 9,
            access: Access::Read,
        }]);
        let table = AccessTable::in_memory(&config);
        table
            .set(&change(OWNER, 2, Some(Access::Read)))
            .expect("set");
        let owner = table.list(&who(OWNER));
        // 6 pair LUs for the owner, 2 mates for the backup; not reporting's
        // grant on the plain LU.
        assert_eq!(owner.len(), 8, "{owner:?}");
        let mate = owner
            .iter()
            .find(|g| g.identity == OWNER && g.lu == 2)
            .expect("the owner's grant on the mate");
        assert_eq!(
            (mate.access, mate.source, mate.purpose.as_str()),
            (Access::Read, GrantSource::Set, "test of db-server on LU 2")
        );
        let backup = table.list(&who(BACKUP));
        assert!(backup.iter().all(|g| g.identity == BACKUP), "{backup:?}");
        assert_eq!(backup.len(), 2);
        let reporting = table.list(&who("reporting"));
        assert_eq!(reporting.len(), 1);
        assert_eq!(reporting[0].source, GrantSource::Configured);
        assert!(table.list(&who(CONSOLE)).is_empty());
        assert!(table.list(&Caller::Anonymous).is_empty());
        assert_eq!(table.list(&Caller::Unauthenticated).len(), 9);
    }

    #[test]
    fn set_grants_survive_a_restart() {
        let dir = tempfile::tempdir().expect("tempdir");
        let config = config(Vec::new());
        let table = AccessTable::open(&config, dir.path()).expect("open");
        table
            .set(&change(OWNER, 2, Some(Access::Read)))
            .expect("set");
        table
            .set(&change(BACKUP, 0, Some(Access::ReadWrite)))
            .expect("set");
        table.set(&change(BACKUP, 0, None)).expect("unset");
        table
            .set(&change("restore-7", 3, Some(Access::None)))
            .expect("set");
        let listed = table.list(&Caller::Unauthenticated);
        drop(table);
        let reopened = AccessTable::open(&config, dir.path()).expect("reopen");
        assert_eq!(reopened.list(&Caller::Unauthenticated), listed);
        assert_eq!(reopened.access(&who(OWNER), 2), Access::Read);
        assert_eq!(reopened.access(&who(BACKUP), 0), Access::None);
        assert!(!dir.path().join("access.json.tmp").exists());
    }

    #[test]
    fn a_damaged_file_stops_the_start() {
        let dir = tempfile::tempdir().expect("tempdir");
        let config = config(Vec::new());
        let table = AccessTable::open(&config, dir.path()).expect("open");
        table
            .set(&change(OWNER, 2, Some(Access::Read)))
            .expect("set");
        let path = dir.path().join(ACCESS_FILE);
        let good = std::fs::read_to_string(&path).expect("read");
        // The same LUs, but LU 2 no longer in a pair.
        let mut other_lu = config.clone();
        other_lu.mirrors.retain(|m| m.mirror == 3);
        let cases = [
            (
                good.replace("\"read\"", "\"read-write\""),
                &config,
                "checksum",
            ),
            (good[..good.len() / 2].to_string(), &config, "not its JSON"),
            (String::new(), &config, "not its JSON"),
            (good.replace(FORMAT, "something-else"), &config, "format"),
            (good.clone(), &other_lu, "LU 2, which no pair"),
        ];
        for (text, config, expected) in cases {
            std::fs::write(&path, &text).expect("write");
            let error = AccessTable::open(config, dir.path()).expect_err(&text);
            let message = error.to_string();
            assert!(
                message.contains(expected) && message.contains("access.json"),
                "{text}: {message}"
            );
            assert!(message.contains("delete it"), "{message}");
        }
        // Unreadable (a directory where the file should be).
        std::fs::remove_file(&path).expect("remove");
        std::fs::create_dir(&path).expect("mkdir");
        let error = AccessTable::open(&config, dir.path()).expect_err("a directory");
        assert!(matches!(error, AccessFileError::Read { .. }), "{error}");
    }

    #[test]
    fn a_failed_save_changes_nothing() {
        let dir = tempfile::tempdir().expect("tempdir");
        let config = config(Vec::new());
        let table = AccessTable::open(&config, dir.path()).expect("open");
        table
            .set(&change(OWNER, 2, Some(Access::Read)))
            .expect("set");
        let path = dir.path().join(ACCESS_FILE);
        let before = std::fs::read(&path).expect("read");
        let listed = table.list(&Caller::Unauthenticated);
        // A directory where the temporary file goes: creating it fails, as
        // for a full or read-only disk (and even for root).
        std::fs::create_dir(dir.path().join("access.json.tmp")).expect("mkdir");
        for attempt in [
            change(OWNER, 2, None),
            change(BACKUP, 0, Some(Access::ReadWrite)),
        ] {
            let error = table.set(&attempt).expect_err("cannot save");
            assert!(matches!(error, ArrayError::Io { .. }), "{error}");
            assert!(error.to_string().contains("saving LUN masking"), "{error}");
        }
        assert_eq!(table.access(&who(OWNER), 2), Access::Read);
        assert_eq!(table.access(&who(BACKUP), 0), Access::None);
        assert_eq!(table.list(&Caller::Unauthenticated), listed);
        assert_eq!(std::fs::read(&path).expect("read"), before);
        // And once the disk is back, the same change goes through.
        std::fs::remove_dir(dir.path().join("access.json.tmp")).expect("rmdir");
        let set = table.set(&change(OWNER, 2, None)).expect("set");
        assert_eq!(set, (Access::Read, Access::ReadWrite));
    }
}
