//! Which of a volume's mates ([0020]: a mirror LU may have up to three).
//! db-server's Status has one `VolumeStatus` per (volume, mate), mate 1
//! first; every place that picks a volume's entry picks it by both, here.

use splitmirror_proto::client::{ClientError, DbClient, ErrorKind};
use splitmirror_proto::db::v1 as dpb;

/// The most mates a mirror LU may have ([0020]).
pub const MAX_MATES: u32 = 3;

/// A mate as the wire counts it: 0 (unset, or a db-server older than
/// several mates) is mate 1.
pub fn mate_or_first(mate: u32) -> u32 {
    mate.max(1)
}

/// The mate an entry of db-server's Status describes (counted from 1).
pub fn mate_of(status: &dpb::VolumeStatus) -> u32 {
    mate_or_first(status.mate)
}

/// Parses `--mate`: which of the volume's mates, 1 to [`MAX_MATES`].
pub fn parse_mate(text: &str) -> Result<u32, String> {
    let mate: u32 = text
        .parse()
        .map_err(|_| format!("{text:?} is not a mate number: give 1, 2 or 3"))?;
    match mate {
        1..=MAX_MATES => Ok(mate),
        _ => Err(format!(
            "mates are counted from 1 and a volume has at most {MAX_MATES}: give 1, 2 or 3 (`console status` lists each volume's mates)"
        )),
    }
}

/// " (mate N)" for a mate other than the first, "" for mate 1: what the
/// console prints about a volume with one mate reads as it always did.
pub fn of_mate(mate: u32) -> String {
    match mate_or_first(mate) {
        1 => String::new(),
        mate => format!(" (mate {mate})"),
    }
}

/// The entry of `volume`'s mate `mate` among Status's entries.
pub fn pick(volumes: &[dpb::VolumeStatus], volume: u32, mate: u32) -> Option<&dpb::VolumeStatus> {
    let mate = mate_or_first(mate);
    volumes
        .iter()
        .find(|v| v.volume == volume && mate_of(v) == mate)
}

/// How many mates `volume` has (0: db-server does not know it).
pub fn count(volumes: &[dpb::VolumeStatus], volume: u32) -> u32 {
    volumes.iter().filter(|v| v.volume == volume).count() as u32
}

/// db-server's Status entry of `volume`'s mate `mate`. A volume db-server
/// does not know, or a mate it does not have, is
/// [`ErrorKind::NotFound`] saying how many mates the volume has.
pub async fn volume_status_of(
    db: &DbClient,
    volume: u32,
    mate: u32,
) -> Result<dpb::VolumeStatus, ClientError> {
    let status = db.status(false).await?;
    if let Some(found) = pick(&status.volumes, volume, mate) {
        return Ok(found.clone());
    }
    let why = match count(&status.volumes, volume) {
        0 => format!("db-server has no volume {volume}"),
        1 => format!("volume {volume} has one mate, not a mate {mate}"),
        n => format!("volume {volume} has {n} mates, not a mate {mate}"),
    };
    Err(ClientError::local(
        ErrorKind::NotFound,
        "db-server",
        db.target(),
        "asking for status",
        why,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(volume: u32, mate: u32, mate_lu: u32) -> dpb::VolumeStatus {
        dpb::VolumeStatus {
            volume,
            mate,
            mate_lu,
            ..Default::default()
        }
    }

    #[test]
    fn an_entry_is_picked_by_volume_and_mate_and_zero_is_mate_one() {
        let volumes = vec![
            entry(0, 0, 2),
            entry(1, 1, 5),
            entry(1, 2, 6),
            entry(1, 3, 7),
        ];
        assert_eq!(pick(&volumes, 0, 1).map(|v| v.mate_lu), Some(2));
        assert_eq!(pick(&volumes, 0, 0).map(|v| v.mate_lu), Some(2));
        assert_eq!(pick(&volumes, 0, 2), None);
        assert_eq!(pick(&volumes, 1, 1).map(|v| v.mate_lu), Some(5));
        assert_eq!(pick(&volumes, 1, 3).map(|v| v.mate_lu), Some(7));
        assert_eq!((count(&volumes, 0), count(&volumes, 1)), (1, 3));
        assert_eq!(count(&volumes, 9), 0);
    }

    #[test]
    fn a_mate_is_one_to_three() {
        assert_eq!(parse_mate("1"), Ok(1));
        assert_eq!(parse_mate("3"), Ok(3));
        for refused in ["0", "4", "-1", "two"] {
            let why = parse_mate(refused).expect_err(refused);
            assert!(why.contains("give 1, 2 or 3"), "{why}");
        }
        assert_eq!((of_mate(0), of_mate(1)), (String::new(), String::new()));
        assert_eq!(of_mate(2), " (mate 2)");
    }
}
