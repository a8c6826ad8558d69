//! The array's configuration: which real LUs exist and the mirroring
//! definition table (Fig. 9) that pairs them.

use std::collections::{BTreeMap, BTreeSet};

use serde::Deserialize;

use crate::access::{AccessConfig, GrantConfig};

/// An LU number, as on the SAN.
pub type LuId = u32;

/// Block sizes the array accepts.
pub const BLOCK_SIZES_BYTES: [u32; 2] = [512, 4096];

/// The default LU size when no config is given.
pub const DEFAULT_LU_SIZE_BYTES: u64 = 64 << 20;

/// The whole array: real LUs, mirror LUs over them, and who may access
/// them (LUN masking, see [`crate::access`]).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ArrayConfig {
    #[serde(default, rename = "lu")]
    pub lus: Vec<RealLuConfig>,
    /// One row per (mirror LU, mate): see [`MirrorConfig`].
    #[serde(default, rename = "mirror", deserialize_with = "mirror_tables")]
    pub mirrors: Vec<MirrorConfig>,
    /// The owner and backup identities (defaults: db-server and
    /// backup-server).
    #[serde(default)]
    pub access: AccessConfig,
    /// Explicit grants, overriding the defaults for their (identity, LU).
    #[serde(default, rename = "grant")]
    pub grants: Vec<GrantConfig>,
}

/// One real LU, stored as `lu<ID>.img`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RealLuConfig {
    pub id: LuId,
    pub block_size_bytes: u32,
    pub block_count: u64,
}

/// One row of the mirroring definition table: writes to `mirror` go to
/// `origin` and `mate`. Each row is one pair. A mirror LU with several
/// mates (up to [`MAX_MATES`], [0020]) has one row per mate, mate 1 first,
/// every row naming the same origin: what a `[[mirror]]` table with
/// `mates = [a, b, c]` becomes (see [`ArrayConfig::mirror_lus`] for the
/// rows grouped by mirror LU).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MirrorConfig {
    pub mirror: LuId,
    pub origin: LuId,
    pub mate: LuId,
}

/// The most mates one mirror LU may have ([0020]).
pub const MAX_MATES: usize = 3;

/// A mirror LU with every one of its mates, in the configuration's order
/// (mate 1 first).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MirrorLu {
    pub mirror: LuId,
    pub origin: LuId,
    pub mates: Vec<LuId>,
}

/// A `[[mirror]]` table as written: `mate = N` (one mate, as configs
/// always were) or `mates = [a, b, c]`, exactly one of the two.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct MirrorTable {
    mirror: LuId,
    origin: LuId,
    mate: Option<LuId>,
    mates: Option<Vec<LuId>>,
}

/// The `[[mirror]]` tables as rows, one per (mirror LU, mate). Refuses a
/// table with neither or both of `mate` and `mates`, an empty `mates`, and
/// a mirror LU defined by two tables (the rest is [`ArrayConfig::validate`]'s).
fn mirror_tables<'de, D>(deserializer: D) -> Result<Vec<MirrorConfig>, D::Error>
where
    D: serde::Deserializer<'de>,
{
    use serde::de::Error;
    let tables = Vec::<MirrorTable>::deserialize(deserializer)?;
    let mut rows = Vec::new();
    let mut seen = BTreeSet::new();
    for table in tables {
        let mirror = table.mirror;
        if !seen.insert(mirror) {
            return Err(D::Error::custom(format!(
                "mirror LU {mirror} is already defined (one [[mirror]] table per mirror LU; \
                 list several mates with mates = [..])"
            )));
        }
        let mates = match (table.mate, table.mates) {
            (Some(mate), None) => vec![mate],
            (None, Some(mates)) if mates.is_empty() => {
                return Err(D::Error::custom(format!(
                    "mirror LU {mirror}: mates = [] lists no LU (1 to {MAX_MATES} mates)"
                )));
            }
            (None, Some(mates)) => mates,
            (Some(_), Some(_)) => {
                return Err(D::Error::custom(format!(
                    "mirror LU {mirror}: give either mate = N or mates = [..], not both"
                )));
            }
            (None, None) => {
                return Err(D::Error::custom(format!(
                    "mirror LU {mirror}: no mate (give mate = N or mates = [a, b, c])"
                )));
            }
        };
        rows.extend(mates.into_iter().map(|mate| MirrorConfig {
            mirror,
            origin: table.origin,
            mate,
        }));
    }
    Ok(rows)
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ConfigError {
    #[error("parsing the array config: {0}")]
    Parse(String),
    #[error("the array config is invalid: {0}")]
    Invalid(String),
    /// The `[access]` table names no owner or backup identity, or the same
    /// identity for both (the backup identity's read-only default would
    /// take the owner's write access away).
    #[error("the array config is invalid: [access]: {0}")]
    Access(String),
    /// A `[[grant]]` entry (counted from 1) is unusable.
    #[error(
        "the array config is invalid: [[grant]] number {number} \
         (identity {identity:?}, LU {lu}): {reason}"
    )]
    Grant {
        number: usize,
        identity: String,
        lu: LuId,
        reason: String,
    },
}

impl ArrayConfig {
    /// The first two rows of Fig. 9: mirror LU 0 = origin 1 + mate 2 and
    /// mirror LU 3 = origin 4 + mate 5, each real LU `lu_size_bytes` large
    /// with 4096-byte blocks.
    pub fn default_pairs(lu_size_bytes: u64) -> Result<Self, ConfigError> {
        const BLOCK_SIZE_BYTES: u32 = 4096;
        if lu_size_bytes == 0 || !lu_size_bytes.is_multiple_of(u64::from(BLOCK_SIZE_BYTES)) {
            return Err(ConfigError::Invalid(format!(
                "LU size {lu_size_bytes} is not a positive multiple of {BLOCK_SIZE_BYTES} bytes"
            )));
        }
        let block_count = lu_size_bytes / u64::from(BLOCK_SIZE_BYTES);
        let lu = |id| RealLuConfig {
            id,
            block_size_bytes: BLOCK_SIZE_BYTES,
            block_count,
        };
        let config = Self {
            access: AccessConfig::default(),
            grants: Vec::new(),
            lus: vec![lu(1), lu(2), lu(4), lu(5)],
            mirrors: vec![
                MirrorConfig {
                    mirror: 0,
                    origin: 1,
                    mate: 2,
                },
                MirrorConfig {
                    mirror: 3,
                    origin: 4,
                    mate: 5,
                },
            ],
        };
        config.validate()?;
        Ok(config)
    }

    /// Adds a plain LU `id` (an LU in no mirror, e.g. a scratch LU to
    /// restore a backup onto) with `block_count` blocks of
    /// `block_size_bytes`, and a configured grant on it for each
    /// `(identity, access)`, as `[[lu]]` and `[[grant]]` tables would;
    /// the result is validated again.
    pub fn add_plain_lu(
        &mut self,
        id: LuId,
        block_size_bytes: u32,
        block_count: u64,
        grants: &[(&str, crate::access::Access)],
    ) -> Result<(), ConfigError> {
        self.lus.push(RealLuConfig {
            id,
            block_size_bytes,
            block_count,
        });
        self.grants
            .extend(grants.iter().map(|&(identity, access)| GrantConfig {
                identity: identity.to_string(),
                lu: id,
                access,
            }));
        self.validate()
    }

    /// Parses and validates a TOML config such as:
    ///
    /// ```toml
    /// [[lu]]
    /// id = 1
    /// block_size_bytes = 4096
    /// block_count = 16384
    ///
    /// [[mirror]]
    /// mirror = 0
    /// origin = 1
    /// mate = 2
    ///
    /// # A mirror LU with several mates (up to three, mate 1 first): each
    /// # (mirror LU, mate) is a pair with its own mode.
    /// [[mirror]]
    /// mirror = 10
    /// origin = 11
    /// mates = [12, 13, 14]
    ///
    /// # Optional: LUN masking (these two are the defaults).
    /// [access]
    /// owner = "db-server"
    /// backup = "backup-server"
    ///
    /// # Optional, any number: none, read or read-write.
    /// [[grant]]
    /// identity = "reporting"
    /// lu = 1
    /// access = "read"
    /// ```
    ///
    /// Parse errors name the line and column.
    pub fn from_toml(text: &str) -> Result<Self, ConfigError> {
        let config: Self = toml::from_str(text).map_err(|e| ConfigError::Parse(e.to_string()))?;
        config.validate()?;
        Ok(config)
    }

    /// The mirror LUs, each with its mates (mate 1 first), in the order of
    /// their first row.
    pub fn mirror_lus(&self) -> Vec<MirrorLu> {
        let mut mirrors: Vec<MirrorLu> = Vec::new();
        for row in &self.mirrors {
            match mirrors.iter_mut().find(|m| m.mirror == row.mirror) {
                Some(mirror) => mirror.mates.push(row.mate),
                None => mirrors.push(MirrorLu {
                    mirror: row.mirror,
                    origin: row.origin,
                    mates: vec![row.mate],
                }),
            }
        }
        mirrors
    }

    /// Checks that the table makes sense: known block sizes, unique ids,
    /// each mirror over an origin and 1 to [`MAX_MATES`] mates, distinct
    /// real LUs of one geometry, no real LU in two mirrors, grants naming
    /// defined LUs.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let invalid = |message: String| Err(ConfigError::Invalid(message));
        if self.lus.is_empty() {
            return invalid("no LUs defined (add [[lu]] tables)".into());
        }
        let mut real = BTreeMap::new();
        for lu in &self.lus {
            if !BLOCK_SIZES_BYTES.contains(&lu.block_size_bytes) {
                return invalid(format!(
                    "LU {}: block_size_bytes must be 512 or 4096, not {}",
                    lu.id, lu.block_size_bytes
                ));
            }
            if lu.block_count == 0 {
                return invalid(format!("LU {}: block_count must be positive", lu.id));
            }
            if lu
                .block_count
                .checked_mul(u64::from(lu.block_size_bytes))
                .is_none_or(|bytes| bytes > i64::MAX as u64)
            {
                return invalid(format!("LU {}: too large for a file", lu.id));
            }
            if real.insert(lu.id, lu).is_some() {
                return invalid(format!("LU {} is defined twice", lu.id));
            }
        }
        let mut paired = BTreeSet::new();
        let mut mirror_ids = BTreeSet::new();
        for m in self.mirror_lus() {
            if real.contains_key(&m.mirror) || !mirror_ids.insert(m.mirror) {
                return invalid(format!("mirror LU {} is already defined", m.mirror));
            }
            if let Some(row) = self
                .mirrors
                .iter()
                .find(|row| row.mirror == m.mirror && row.origin != m.origin)
            {
                return invalid(format!(
                    "mirror LU {}: its pairs name two origins, LU {} and LU {}",
                    m.mirror, m.origin, row.origin
                ));
            }
            if m.mates.len() > MAX_MATES {
                return invalid(format!(
                    "mirror LU {}: {} mates; a mirror LU has 1 to {MAX_MATES}",
                    m.mirror,
                    m.mates.len()
                ));
            }
            for (index, &mate) in m.mates.iter().enumerate() {
                if mate == m.origin {
                    return invalid(format!(
                        "mirror LU {}: origin and mate are both LU {}",
                        m.mirror, m.origin
                    ));
                }
                if m.mates[..index].contains(&mate) {
                    return invalid(format!(
                        "mirror LU {}: mate LU {mate} is listed twice",
                        m.mirror
                    ));
                }
            }
            for &side in std::iter::once(&m.origin).chain(&m.mates) {
                if !real.contains_key(&side) {
                    return invalid(format!(
                        "mirror LU {}: LU {side} is not a defined [[lu]]",
                        m.mirror
                    ));
                }
                if !paired.insert(side) {
                    return invalid(format!(
                        "mirror LU {}: LU {side} already belongs to another mirror",
                        m.mirror
                    ));
                }
            }
            let origin = real[&m.origin];
            for mate in &m.mates {
                let mate_lu = real[mate];
                if (origin.block_size_bytes, origin.block_count)
                    != (mate_lu.block_size_bytes, mate_lu.block_count)
                {
                    return invalid(format!(
                        "mirror LU {}: origin LU {} and mate LU {mate} differ in block size or count",
                        m.mirror, m.origin
                    ));
                }
            }
        }
        self.validate_access(|lu| real.contains_key(&lu) || mirror_ids.contains(&lu))
    }

    /// Checks `[access]` and every `[[grant]]`.
    fn validate_access(&self, defined: impl Fn(LuId) -> bool) -> Result<(), ConfigError> {
        let AccessConfig { owner, backup } = &self.access;
        if owner.is_empty() || backup.is_empty() {
            return Err(ConfigError::Access(
                "owner and backup must be non-empty identities".into(),
            ));
        }
        if owner == backup {
            return Err(ConfigError::Access(format!(
                "owner and backup are both {owner:?}; they must be different identities"
            )));
        }
        let mut seen = BTreeSet::new();
        for (index, grant) in self.grants.iter().enumerate() {
            let refuse = |reason: String| {
                Err(ConfigError::Grant {
                    number: index + 1,
                    identity: grant.identity.clone(),
                    lu: grant.lu,
                    reason,
                })
            };
            if grant.identity.is_empty() {
                return refuse("the identity is empty".into());
            }
            if !defined(grant.lu) {
                return refuse(format!("LU {} is not defined", grant.lu));
            }
            if !seen.insert((grant.identity.as_str(), grant.lu)) {
                return refuse("an earlier [[grant]] names the same identity and LU".into());
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_is_the_first_two_rows_of_fig_9() {
        let config = ArrayConfig::default_pairs(DEFAULT_LU_SIZE_BYTES).expect("valid");
        assert_eq!(config.mirrors.len(), 2);
        assert_eq!(
            config.mirrors[0],
            MirrorConfig {
                mirror: 0,
                origin: 1,
                mate: 2
            }
        );
        assert_eq!(config.lus[0].block_count, 16384);
        assert!(ArrayConfig::default_pairs(1000).is_err());
    }

    #[test]
    fn a_plain_lu_is_added_with_its_grants_and_checked() {
        use crate::access::Access;
        let mut config = ArrayConfig::default_pairs(DEFAULT_LU_SIZE_BYTES).expect("valid");
        config
            .add_plain_lu(
                6,
                4096,
                16384,
                &[
                    ("backup-server", Access::ReadWrite),
                    ("console", Access::Read),
                ],
            )
            .expect("valid");
        assert_eq!(config.lus.len(), 5);
        assert_eq!(config.mirrors.len(), 2);
        assert_eq!(
            config.grants,
            vec![
                GrantConfig {
                    identity: "backup-server".into(),
                    lu: 6,
                    access: Access::ReadWrite,
                },
                GrantConfig {
                    identity: "console".into(),
                    lu: 6,
                    access: Access::Read,
                },
            ]
        );
        // An id already in use is refused.
        let mut config = ArrayConfig::default_pairs(DEFAULT_LU_SIZE_BYTES).expect("valid");
        let error = config
            .add_plain_lu(2, 4096, 16384, &[])
            .expect_err("LU 2 exists");
        assert!(error.to_string().contains("defined twice"), "{error}");
    }

    #[test]
    fn parses_a_toml_table() {
        let text = r#"
            [[lu]]
            id = 7
            block_size_bytes = 512
            block_count = 100
            [[lu]]
            id = 8
            block_size_bytes = 512
            block_count = 100
            [[lu]]
            id = 9
            block_size_bytes = 4096
            block_count = 1
            [[mirror]]
            mirror = 6
            origin = 7
            mate = 8
        "#;
        let config = ArrayConfig::from_toml(text).expect("valid");
        assert_eq!(config.lus.len(), 3);
        assert_eq!(config.mirrors[0].mate, 8);
        assert_eq!(config.access, AccessConfig::default());
        assert!(config.grants.is_empty());
    }

    #[test]
    fn parses_access_and_grants() {
        let text = r#"
            [[lu]]
            id = 9
            block_size_bytes = 4096
            block_count = 1
            [access]
            owner = "db-a"
            backup = "tape"
            [[grant]]
            identity = "reporting"
            lu = 9
            access = "read-write"
        "#;
        let config = ArrayConfig::from_toml(text).expect("valid");
        assert_eq!(config.access.owner, "db-a");
        assert_eq!(config.access.backup, "tape");
        assert_eq!(
            config.grants,
            vec![GrantConfig {
                identity: "reporting".into(),
                lu: 9,
                access: crate::access::Access::ReadWrite,
            }]
        );
    }

    #[test]
    fn rejects_bad_access_tables_naming_the_entry() {
        let lu = "[[lu]]\nid = 9\nblock_size_bytes = 4096\nblock_count = 1\n";
        let grant = |identity: &str, lu: u32, access: &str| {
            format!("[[grant]]\nidentity = {identity:?}\nlu = {lu}\naccess = {access:?}\n")
        };
        let cases = [
            (
                format!("{lu}{}", grant("reporting", 7, "read")),
                "[[grant]] number 1 (identity \"reporting\", LU 7): LU 7 is not defined",
            ),
            (
                format!("{lu}{}", grant("reporting", 9, "write")),
                "unknown variant `write`, expected one of `none`, `read`, `read-write`",
            ),
            (
                format!("{lu}{}{}", grant("a", 9, "read"), grant("a", 9, "none")),
                "[[grant]] number 2 (identity \"a\", LU 9): an earlier [[grant]]",
            ),
            (
                format!("{lu}{}", grant("", 9, "read")),
                "the identity is empty",
            ),
            (
                format!("{lu}[access]\nowner = \"x\"\nbackup = \"x\"\n"),
                "owner and backup are both \"x\"",
            ),
            (format!("{lu}[access]\nowner = \"\"\n"), "non-empty"),
            (format!("{lu}[access]\nreader = \"x\"\n"), "reader"),
        ];
        for (text, expected) in cases {
            let error = ArrayConfig::from_toml(&text).expect_err(&text);
            assert!(error.to_string().contains(expected), "{text}: {error}");
        }
    }

    #[test]
    fn a_syntax_error_names_the_line() {
        let text = "[[lu]]\nid = 1\nblock_size_bytes = = 4096\n";
        let error = ArrayConfig::from_toml(text).expect_err("bad syntax");
        assert!(error.to_string().contains("line 3"), "{error}");
    }

    #[test]
    fn a_mirror_with_three_mates_is_one_row_per_pair_mate_1_first() {
        let text = r#"
            [[lu]]
            id = 1
            block_size_bytes = 4096
            block_count = 8
            [[lu]]
            id = 2
            block_size_bytes = 4096
            block_count = 8
            [[lu]]
            id = 3
            block_size_bytes = 4096
            block_count = 8
            [[lu]]
            id = 4
            block_size_bytes = 4096
            block_count = 8
            [[mirror]]
            mirror = 0
            origin = 1
            mates = [4, 2, 3]
        "#;
        let config = ArrayConfig::from_toml(text).expect("valid");
        let row = |mate| MirrorConfig {
            mirror: 0,
            origin: 1,
            mate,
        };
        assert_eq!(config.mirrors, vec![row(4), row(2), row(3)]);
        assert_eq!(
            config.mirror_lus(),
            vec![MirrorLu {
                mirror: 0,
                origin: 1,
                mates: vec![4, 2, 3],
            }]
        );
        // `mates = [n]` is the same as `mate = n`.
        let one = text.replace("mates = [4, 2, 3]", "mates = [2]");
        let single = text.replace("mates = [4, 2, 3]", "mate = 2");
        assert_eq!(
            ArrayConfig::from_toml(&one).expect("valid"),
            ArrayConfig::from_toml(&single).expect("valid")
        );
    }

    #[test]
    fn rejects_bad_mates_naming_the_mirror_lu() {
        let lu = |id: u32, bs: u32, n: u64| {
            format!("[[lu]]\nid = {id}\nblock_size_bytes = {bs}\nblock_count = {n}\n")
        };
        let lus = (1..=5).map(|id| lu(id, 512, 8)).collect::<String>();
        let mirror = |keys: &str| format!("[[mirror]]\nmirror = 0\norigin = 1\n{keys}");
        let cases = [
            (
                lus.clone() + &mirror(""),
                "mirror LU 0: no mate (give mate = N or mates = [a, b, c])",
            ),
            (
                lus.clone() + &mirror("mate = 2\nmates = [3]\n"),
                "mirror LU 0: give either mate = N or mates = [..], not both",
            ),
            (
                lus.clone() + &mirror("mates = []\n"),
                "mirror LU 0: mates = [] lists no LU",
            ),
            (
                lus.clone() + &mirror("mates = [2, 3, 4, 5]\n"),
                "mirror LU 0: 4 mates; a mirror LU has 1 to 3",
            ),
            (
                lus.clone() + &mirror("mates = [2, 3, 2]\n"),
                "mirror LU 0: mate LU 2 is listed twice",
            ),
            (
                lus.clone() + &mirror("mates = [2, 1]\n"),
                "mirror LU 0: origin and mate are both LU 1",
            ),
            (
                lus.clone() + &mirror("mates = [2, 9]\n"),
                "mirror LU 0: LU 9 is not a defined [[lu]]",
            ),
            (
                lus.clone() + &lu(6, 512, 9) + &mirror("mates = [2, 6]\n"),
                "mirror LU 0: origin LU 1 and mate LU 6 differ in block size or count",
            ),
            (
                lus.clone() + &lu(6, 4096, 8) + &mirror("mates = [6]\n"),
                "mirror LU 0: origin LU 1 and mate LU 6 differ in block size or count",
            ),
            (
                lus.clone()
                    + &mirror("mates = [2, 3]\n")
                    + "[[mirror]]\nmirror = 9\norigin = 4\nmates = [5, 3]\n",
                "mirror LU 9: LU 3 already belongs to another mirror",
            ),
            (
                lus.clone() + &mirror("mates = [2]\n") + &mirror("mate = 3\n"),
                "mirror LU 0 is already defined",
            ),
            (lus.clone() + &mirror("mates = 2\n"), "mates"),
        ];
        for (text, expected) in cases {
            let error = ArrayConfig::from_toml(&text).expect_err(&text);
            assert!(error.to_string().contains(expected), "{text}: {error}");
        }
        // Rows built in code are checked the same way: two origins.
        let mut config =
            ArrayConfig::from_toml(&(lus.clone() + &mirror("mates = [2, 3]\n"))).expect("valid");
        config.mirrors[1].origin = 4;
        let error = config.validate().expect_err("two origins");
        assert!(
            error
                .to_string()
                .contains("mirror LU 0: its pairs name two origins, LU 1 and LU 4"),
            "{error}"
        );
    }

    #[test]
    fn rejects_bad_tables() {
        let lu = |id: u32, bs: u32, n: u64| {
            format!("[[lu]]\nid = {id}\nblock_size_bytes = {bs}\nblock_count = {n}\n")
        };
        let mirror = |m: u32, o: u32, t: u32| {
            format!("[[mirror]]\nmirror = {m}\norigin = {o}\nmate = {t}\n")
        };
        let cases = [
            (String::new(), "no LUs"),
            (lu(1, 1000, 8), "block_size_bytes"),
            (lu(1, 512, 0), "positive"),
            (lu(1, 512, 8) + &lu(1, 512, 8), "twice"),
            (
                lu(1, 512, 8) + &lu(2, 512, 8) + &mirror(1, 1, 2),
                "already defined",
            ),
            (lu(1, 512, 8) + &mirror(0, 1, 1), "both"),
            (lu(1, 512, 8) + &mirror(0, 1, 2), "not a defined"),
            (lu(1, 512, 8) + &lu(2, 4096, 8) + &mirror(0, 1, 2), "differ"),
            (
                lu(1, 512, 8)
                    + &lu(2, 512, 8)
                    + &lu(3, 512, 8)
                    + &mirror(0, 1, 2)
                    + &mirror(9, 2, 3),
                "another mirror",
            ),
            (
                "[[lu]]\nid = 1\nblock_size_bytes = 512\nblock_count = 8\ncolour = 3\n".into(),
                "colour",
            ),
        ];
        for (text, expected) in cases {
            let error = ArrayConfig::from_toml(&text).expect_err(&text);
            assert!(error.to_string().contains(expected), "{text}: {error}");
        }
    }
}
