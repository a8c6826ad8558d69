//! The first embodiment (issue 19, [0016]-[0048]): the array keeps each
//! pair's mode in its mirroring management table and enforces it, and
//! db-server sets it with `ModeSelect` (`--array-mode stateful`) instead of
//! re-routing writes. db-server still keeps the update location table, the
//! journal and the resync; the journal says which mode the array must hold,
//! and at start-up the array is made to agree with it.

/// Who keeps a pair's mode (`--array-mode`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ArrayModeKeeping {
    /// db-server keeps the mode and routes every write; the array enforces
    /// nothing (the stateless array of the second and third embodiments).
    #[default]
    Stateless,
    /// The array keeps the mode (`ModeSelect`) and enforces it on every
    /// request; db-server writes the mirror LU in every mode.
    Stateful,
}

impl std::fmt::Display for ArrayModeKeeping {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            ArrayModeKeeping::Stateless => "stateless",
            ArrayModeKeeping::Stateful => "stateful",
        })
    }
}

/// An `--array-mode` that is neither `stateless` nor `stateful`.
#[derive(Debug, thiserror::Error)]
#[error("unknown array mode {0:?}: expected stateless or stateful")]
pub struct UnknownArrayModeKeeping(String);

impl std::str::FromStr for ArrayModeKeeping {
    type Err = UnknownArrayModeKeeping;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "stateless" => Ok(ArrayModeKeeping::Stateless),
            "stateful" => Ok(ArrayModeKeeping::Stateful),
            other => Err(UnknownArrayModeKeeping(other.to_string())),
        }
    }
}
