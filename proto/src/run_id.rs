//! What a run id may be. A run id names the holder of a snapshot (and the
//! run a backup belongs to): operators type it, logs and status lines print
//! it, and another run must be able to tell it apart from its own. So it
//! must say something (not empty, not only spaces), print as one line (no
//! control characters) and stay short. Every node that takes a run id
//! checks it with [`validate_run_id`], so they all refuse the same ones.

/// The longest run id accepted, in bytes of UTF-8. A UUID is 36; the room
/// above it is for operators' own names ("nightly-2026-11-28-db1").
pub const MAX_RUN_ID_BYTES: usize = 128;

/// Why a run id was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RunIdError {
    #[error("the run id is empty")]
    Empty,
    #[error("the run id {0:?} is only white space")]
    Blank(String),
    #[error("the run id {run_id:?} holds the control character U+{code:04X}")]
    ControlCharacter { run_id: String, code: u32 },
    #[error("the run id is {bytes} bytes long; the limit is {MAX_RUN_ID_BYTES} bytes")]
    TooLong { bytes: usize },
}

/// Accepts a run id that is not empty, not only white space, holds no
/// control character and is at most [`MAX_RUN_ID_BYTES`] bytes long.
pub fn validate_run_id(run_id: &str) -> Result<(), RunIdError> {
    if run_id.is_empty() {
        return Err(RunIdError::Empty);
    }
    if run_id.len() > MAX_RUN_ID_BYTES {
        return Err(RunIdError::TooLong {
            bytes: run_id.len(),
        });
    }
    if let Some(c) = run_id.chars().find(|c| c.is_control()) {
        return Err(RunIdError::ControlCharacter {
            run_id: run_id.to_string(),
            code: u32::from(c),
        });
    }
    if run_id.trim().is_empty() {
        return Err(RunIdError::Blank(run_id.to_string()));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ordinary_run_ids_pass() {
        for run_id in [
            "0190f3a2-7c1e-7b3a-9f00-123456789abc",
            "nightly 2026-11-28",
            "réplica-ü",
            &"x".repeat(MAX_RUN_ID_BYTES),
        ] {
            assert_eq!(validate_run_id(run_id), Ok(()), "{run_id:?}");
        }
    }

    #[test]
    fn blank_control_and_long_run_ids_are_refused() {
        assert_eq!(validate_run_id(""), Err(RunIdError::Empty));
        assert!(matches!(validate_run_id("   "), Err(RunIdError::Blank(_))));
        assert!(matches!(
            validate_run_id("\u{3000}\u{a0}"),
            Err(RunIdError::Blank(_))
        ));
        assert!(matches!(
            validate_run_id("run\n1"),
            Err(RunIdError::ControlCharacter { code: 0x0a, .. })
        ));
        assert!(matches!(
            validate_run_id("\t"),
            Err(RunIdError::ControlCharacter { code: 0x09, .. })
        ));
        assert!(matches!(
            validate_run_id("run\u{1b}[31m"),
            Err(RunIdError::ControlCharacter { code: 0x1b, .. })
        ));
        assert_eq!(
            validate_run_id(&"x".repeat(MAX_RUN_ID_BYTES + 1)),
            Err(RunIdError::TooLong {
                bytes: MAX_RUN_ID_BYTES + 1
            })
        );
    }
}
