//! PostgreSQL majors: which ones pgrs supports, the major of a set of binaries (`postgres
//! --version`) and of a data directory (`PG_VERSION`), and the differences between majors that
//! matter to the agent. Pure except [`read_data_dir_major`].
//!
//! A data directory of another major than the binaries is refused, never upgraded: a major
//! upgrade is `pg_upgrade`'s work, not a side effect of pointing `--pg-bin` elsewhere.

use std::ops::RangeInclusive;
use std::path::{Path, PathBuf};

/// The majors pgrs supports and tests (docs/postgres-versions.md).
pub const SUPPORTED_MAJORS: RangeInclusive<u32> = 14..=18;

/// The major used when none is chosen: Debian 12's own PostgreSQL, the default `--pg-bin` and
/// the default `spec.postgresVersion`.
pub const DEFAULT_MAJOR: u32 = 15;

/// Where Debian (and the PGDG packages) put the server programs of `major`.
pub fn debian_bin_dir(major: u32) -> PathBuf {
    PathBuf::from(format!("/usr/lib/postgresql/{major}/bin"))
}

/// The major of `postgres --version` output, e.g. `postgres (PostgreSQL) 17.11` or
/// `postgres (PostgreSQL) 15.18 (Debian 15.18-0+deb12u1)` or `postgres (PostgreSQL) 18beta1`.
pub fn parse_version_output(text: &str) -> Option<u32> {
    let (_, rest) = text.split_once("(PostgreSQL)")?;
    leading_number(rest.trim_start())
}

/// The major in a data directory's `PG_VERSION` file (`15\n`; `9.6` before 10).
pub fn parse_pg_version_file(text: &str) -> Option<u32> {
    let text = text.trim();
    let major = leading_number(text)?;
    // Exactly a number, or a pre-10 `9.6`: nothing else is a PG_VERSION.
    let rest = &text[major.to_string().len()..];
    (rest.is_empty()
        || rest
            .strip_prefix('.')
            .is_some_and(|minor| minor.parse::<u32>().is_ok()))
    .then_some(major)
}

fn leading_number(text: &str) -> Option<u32> {
    let digits: String = text.chars().take_while(char::is_ascii_digit).collect();
    digits.parse().ok()
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum VersionError {
    #[error(
        "PostgreSQL {major} is not supported (binaries in {dir}); pgrs supports {}",
        supported_text()
    )]
    Unsupported { major: u32, dir: PathBuf },
    #[error(
        "refusing data directory {data_dir}: it holds a PostgreSQL {data_major} cluster, but the binaries in {bin_dir} are PostgreSQL {binaries_major}. Nothing was changed; pgrs never upgrades implicitly: use --pg-bin with PostgreSQL {data_major} binaries (or upgrade the cluster with pg_upgrade yourself)"
    )]
    DataDirMismatch {
        data_dir: PathBuf,
        data_major: u32,
        bin_dir: PathBuf,
        binaries_major: u32,
    },
    #[error(
        "the binaries in {bin_dir} are PostgreSQL {binaries_major}, but PostgreSQL {expected} was asked for (--postgres-version); use the binaries (or the image) of PostgreSQL {expected}"
    )]
    NotTheExpected {
        bin_dir: PathBuf,
        binaries_major: u32,
        expected: u32,
    },
    #[error(
        "the primary {host}:{port} runs PostgreSQL {upstream_major}, but this instance's binaries ({bin_dir}) are PostgreSQL {binaries_major}; a replica must run the primary's major"
    )]
    UpstreamMismatch {
        host: String,
        port: u16,
        upstream_major: u32,
        bin_dir: PathBuf,
        binaries_major: u32,
    },
    #[error("failed to read {path}: {cause}")]
    Unreadable { path: PathBuf, cause: String },
}

/// "14, 15, 16, 17 and 18".
pub fn supported_text() -> String {
    let majors: Vec<String> = SUPPORTED_MAJORS.map(|m| m.to_string()).collect();
    match majors.split_last() {
        Some((last, rest)) if !rest.is_empty() => format!("{} and {last}", rest.join(", ")),
        _ => majors.join(""),
    }
}

/// "14 to 18".
pub fn range_text() -> String {
    format!("{} to {}", SUPPORTED_MAJORS.start(), SUPPORTED_MAJORS.end())
}

pub fn check_supported(major: u32, dir: &Path) -> Result<(), VersionError> {
    if SUPPORTED_MAJORS.contains(&major) {
        Ok(())
    } else {
        Err(VersionError::Unsupported {
            major,
            dir: dir.to_path_buf(),
        })
    }
}

/// The major of an initialized data directory (`None` when it has no `PG_VERSION`).
pub fn read_data_dir_major(data_dir: &Path) -> Result<Option<u32>, VersionError> {
    let path = data_dir.join("PG_VERSION");
    let text = match std::fs::read_to_string(&path) {
        Ok(text) => text,
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(error) => {
            return Err(VersionError::Unreadable {
                path,
                cause: error.to_string(),
            });
        }
    };
    parse_pg_version_file(&text)
        .map(Some)
        .ok_or_else(|| VersionError::Unreadable {
            path,
            cause: format!("unexpected content {:?}", text.trim()),
        })
}

/// Refuses a data directory of another major than the binaries.
pub fn check_data_dir_major(
    data_dir: &Path,
    data_major: u32,
    bin_dir: &Path,
    binaries_major: u32,
) -> Result<(), VersionError> {
    if data_major == binaries_major {
        return Ok(());
    }
    Err(VersionError::DataDirMismatch {
        data_dir: data_dir.to_path_buf(),
        data_major,
        bin_dir: bin_dir.to_path_buf(),
        binaries_major,
    })
}

/// The major of a `server_version_num` (`170011` → 17; `90624` → 9).
pub fn major_of_version_num(version_num: u32) -> u32 {
    // 10 and later: MMmmmm; before: MMmmpp with a two-part major (9.6 is 906xx): 9 either way.
    version_num / 10_000
}

/// Server parameters that a major no longer has, with what replaced them: postgres refuses to
/// start (or to reload) with an unknown parameter in `postgresql.conf`, so the agent refuses it
/// first, naming the major. (Those added in a later major are not listed: postgres' own error
/// names them.)
const REMOVED_PARAMETERS: &[(&str, u32, &str)] = &[
    (
        "stats_temp_directory",
        15,
        "statistics live in shared memory since 15; remove it",
    ),
    (
        "force_parallel_mode",
        16,
        "renamed debug_parallel_query in 16",
    ),
    (
        "promote_trigger_file",
        16,
        "promotion is by pg_promote() (the agent's promote action)",
    ),
    (
        "vacuum_defer_cleanup_age",
        16,
        "use hot_standby_feedback or a replication slot",
    ),
    ("db_user_namespace", 17, "removed without replacement"),
    ("old_snapshot_threshold", 17, "removed without replacement"),
    ("trace_recovery_messages", 17, "removed without replacement"),
];

/// Why `name` cannot be set on `major` (removed in that major or earlier), if so.
pub fn removed_parameter(major: u32, name: &str) -> Option<String> {
    REMOVED_PARAMETERS
        .iter()
        .find(|(removed, since, _)| *removed == name && major >= *since)
        .map(|(_, since, hint)| format!("removed in PostgreSQL {since}: {hint}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_version_output_of_every_kind_of_build() {
        assert_eq!(
            parse_version_output("postgres (PostgreSQL) 15.18 (Debian 15.18-0+deb12u1)\n"),
            Some(15)
        );
        assert_eq!(
            parse_version_output("postgres (PostgreSQL) 17.11"),
            Some(17)
        );
        assert_eq!(
            parse_version_output("postgres (PostgreSQL) 18beta1"),
            Some(18)
        );
        assert_eq!(
            parse_version_output("postgres (PostgreSQL) 9.6.24"),
            Some(9)
        );
        assert_eq!(parse_version_output("pg_ctl 17"), None);
        assert_eq!(parse_version_output(""), None);
    }

    #[test]
    fn parses_pg_version_files() {
        assert_eq!(parse_pg_version_file("15\n"), Some(15));
        assert_eq!(parse_pg_version_file("18"), Some(18));
        assert_eq!(parse_pg_version_file("9.6\n"), Some(9));
        assert_eq!(parse_pg_version_file("17beta"), None);
        assert_eq!(parse_pg_version_file(""), None);
        assert_eq!(parse_pg_version_file("x"), None);
    }

    #[test]
    fn supported_majors_are_14_to_18_and_the_default_is_one() {
        assert_eq!(supported_text(), "14, 15, 16, 17 and 18");
        assert_eq!(range_text(), "14 to 18");
        assert!(SUPPORTED_MAJORS.contains(&DEFAULT_MAJOR));
        assert!(check_supported(14, Path::new("/b")).is_ok());
        assert!(check_supported(18, Path::new("/b")).is_ok());
        let error = check_supported(13, Path::new("/b"))
            .unwrap_err()
            .to_string();
        assert!(error.contains("PostgreSQL 13 is not supported"), "{error}");
        assert!(error.contains("/b") && error.contains("14, 15"), "{error}");
        assert_eq!(
            debian_bin_dir(17),
            PathBuf::from("/usr/lib/postgresql/17/bin")
        );
    }

    #[test]
    fn a_data_directory_of_another_major_is_refused_naming_both() {
        assert!(check_data_dir_major(Path::new("/d"), 17, Path::new("/b"), 17).is_ok());
        let error = check_data_dir_major(Path::new("/d"), 15, Path::new("/b17"), 17)
            .unwrap_err()
            .to_string();
        assert!(error.contains("PostgreSQL 15 cluster"), "{error}");
        assert!(error.contains("/b17 are PostgreSQL 17"), "{error}");
        assert!(error.contains("never upgrades implicitly"), "{error}");
    }

    #[test]
    fn reads_the_major_of_a_data_directory() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(read_data_dir_major(dir.path()).unwrap(), None);
        std::fs::write(dir.path().join("PG_VERSION"), "16\n").unwrap();
        assert_eq!(read_data_dir_major(dir.path()).unwrap(), Some(16));
        std::fs::write(dir.path().join("PG_VERSION"), "garbage\n").unwrap();
        assert!(matches!(
            read_data_dir_major(dir.path()),
            Err(VersionError::Unreadable { .. })
        ));
    }

    #[test]
    fn version_numbers_give_their_major() {
        assert_eq!(major_of_version_num(170011), 17);
        assert_eq!(major_of_version_num(150018), 15);
        assert_eq!(major_of_version_num(180000), 18);
        assert_eq!(major_of_version_num(90624), 9);
    }

    #[test]
    fn removed_parameters_are_named_from_their_major_on() {
        assert_eq!(removed_parameter(15, "force_parallel_mode"), None);
        let why = removed_parameter(16, "force_parallel_mode").unwrap();
        assert!(why.contains("debug_parallel_query"), "{why}");
        assert!(removed_parameter(18, "force_parallel_mode").is_some());
        assert!(removed_parameter(14, "stats_temp_directory").is_none());
        assert!(removed_parameter(15, "stats_temp_directory").is_some());
        assert!(removed_parameter(16, "old_snapshot_threshold").is_none());
        assert!(removed_parameter(17, "old_snapshot_threshold").is_some());
        assert!(removed_parameter(18, "work_mem").is_none());
        // The agent never writes it; on 16+ postgres would not even start with it.
        assert!(removed_parameter(16, "promote_trigger_file").is_some());
    }
}
