//! Which container images the fake kubelet can run, and with which local binaries.
//!
//! There is no container runtime: an image is a set of named local executables.
//! A container's `command[0]` is looked up by its file name among the image's
//! executables; an empty `command` runs the image's entrypoint.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// Repositories (any tag or digest) that run the locally built `pgrs` binary.
pub const PGRS_IMAGE_REPOSITORIES: [&str; 2] = ["ghcr.io/pgrs-dev/pgrs", "pgrs"];

/// Test-only image running the `tiny-http` binary of this crate.
pub const TINY_HTTP_IMAGE_REPOSITORY: &str = "pgrs-testbed/tiny-http";

#[derive(Debug, Clone)]
struct Image {
    repositories: Vec<String>,
    entrypoint: String,
    executables: BTreeMap<String, PathBuf>,
}

/// The images the fake kubelet knows.
#[derive(Debug, Clone, Default)]
pub struct ImageMap {
    images: Vec<Image>,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ImageError {
    #[error(
        "image {image:?} cannot run on the pgrs test bed: the fake kubelet only runs {known} \
         (mapped to local binaries; no container runtime)"
    )]
    UnknownImage { image: String, known: String },
    #[error(
        "command {command:?} is not in image {image:?}: the test bed maps this image to {available}"
    )]
    UnknownCommand {
        image: String,
        command: String,
        available: String,
    },
    #[error(
        "the binary {path} for image {image:?} does not exist (build it first, e.g. `cargo build`)"
    )]
    MissingBinary { image: String, path: PathBuf },
}

impl ImageMap {
    /// `ghcr.io/pgrs-dev/pgrs` / `pgrs` → `$PGRS_BIN` or `<target>/<profile>/pgrs`;
    /// `pgrs-testbed/tiny-http` → `$PGRS_TESTBED_TINY_HTTP` or `<target>/<profile>/tiny-http`.
    pub fn from_env() -> Self {
        let profile_dir = profile_dir();
        let pgrs = std::env::var_os("PGRS_BIN")
            .map(PathBuf::from)
            .unwrap_or_else(|| profile_dir.join("pgrs"));
        let tiny_http = std::env::var_os("PGRS_TESTBED_TINY_HTTP")
            .map(PathBuf::from)
            .unwrap_or_else(|| profile_dir.join("tiny-http"));
        let mut map = Self::default();
        map.add(&PGRS_IMAGE_REPOSITORIES, "pgrs", [("pgrs", pgrs)]);
        map.add(
            &[TINY_HTTP_IMAGE_REPOSITORY],
            "tiny-http",
            [("tiny-http", tiny_http)],
        );
        map
    }

    /// Registers (or replaces) an image.
    pub fn add<const N: usize>(
        &mut self,
        repositories: &[&str],
        entrypoint: &str,
        executables: [(&str, PathBuf); N],
    ) {
        self.images.retain(|i| {
            !i.repositories
                .iter()
                .any(|r| repositories.contains(&r.as_str()))
        });
        self.images.push(Image {
            repositories: repositories.iter().map(|r| (*r).to_owned()).collect(),
            entrypoint: entrypoint.to_owned(),
            executables: executables
                .into_iter()
                .map(|(name, path)| (name.to_owned(), path))
                .collect(),
        });
    }

    /// The program and arguments a container runs (`command` + `args` with the
    /// image's entrypoint when `command` is empty).
    pub fn resolve(
        &self,
        image: &str,
        command: &[String],
        args: &[String],
    ) -> Result<(PathBuf, Vec<String>), ImageError> {
        let repository = repository_of(image);
        let found = self
            .images
            .iter()
            .find(|i| i.repositories.iter().any(|r| r == repository))
            .ok_or_else(|| ImageError::UnknownImage {
                image: image.to_owned(),
                known: self.known(),
            })?;
        let (program, mut argv) = match command.split_first() {
            Some((program, rest)) => (program.as_str(), rest.to_vec()),
            None => (found.entrypoint.as_str(), Vec::new()),
        };
        argv.extend(args.iter().cloned());
        let name = Path::new(program)
            .file_name()
            .and_then(|n| n.to_str())
            .unwrap_or(program);
        let path = found
            .executables
            .get(name)
            .ok_or_else(|| ImageError::UnknownCommand {
                image: image.to_owned(),
                command: program.to_owned(),
                available: found
                    .executables
                    .keys()
                    .cloned()
                    .collect::<Vec<_>>()
                    .join(", "),
            })?;
        if !path.is_file() {
            return Err(ImageError::MissingBinary {
                image: image.to_owned(),
                path: path.clone(),
            });
        }
        Ok((path.clone(), argv))
    }

    fn known(&self) -> String {
        self.images
            .iter()
            .flat_map(|i| i.repositories.iter().map(|r| format!("{r}:*")))
            .collect::<Vec<_>>()
            .join(", ")
    }
}

/// The environment an image sets (its Dockerfile's `ENV`), under the container's own `env`.
/// The pgrs image of PostgreSQL major N (tag `…-pgN`, else 15) sets `PGRS_PG_BIN` to its
/// server programs: on the test bed Debian's 15, or the other majors from the cache of
/// `scripts/install-pg-majors` (`$PGRS_PG_CACHE`, default /var/cache/pgrs-pg).
pub fn image_env(image: &str) -> BTreeMap<String, String> {
    let mut env = BTreeMap::new();
    if !PGRS_IMAGE_REPOSITORIES.contains(&repository_of(image)) {
        return env;
    }
    let bin = match postgres_major_of(image) {
        Some(major) if major != 15 => {
            let cache =
                std::env::var("PGRS_PG_CACHE").unwrap_or_else(|_| "/var/cache/pgrs-pg".to_string());
            format!("{cache}/{major}/bin")
        }
        _ => "/usr/lib/postgresql/15/bin".to_string(),
    };
    env.insert("PGRS_PG_BIN".to_string(), bin);
    env
}

/// The major of a `…-pg<major>` tag.
fn postgres_major_of(image: &str) -> Option<u32> {
    let without_digest = image.split('@').next().unwrap_or(image);
    let tag = without_digest
        .strip_prefix(repository_of(image))?
        .strip_prefix(':')?;
    tag.rsplit_once("-pg")?.1.parse().ok()
}

/// `ghcr.io/pgrs-dev/pgrs:0.1@sha256:..` → `ghcr.io/pgrs-dev/pgrs`.
pub fn repository_of(image: &str) -> &str {
    let without_digest = image.split('@').next().unwrap_or(image);
    match without_digest.rfind(':') {
        // A colon after the last slash starts the tag; before it, it is a registry port.
        Some(colon) if !without_digest[colon..].contains('/') => &without_digest[..colon],
        _ => without_digest,
    }
}

/// The cargo profile directory (`target/debug`) of the running executable; test
/// binaries live one level deeper, in `deps/`.
fn profile_dir() -> PathBuf {
    let exe = std::env::current_exe().unwrap_or_default();
    let dir = exe.parent().map(Path::to_path_buf).unwrap_or_default();
    if dir.file_name().is_some_and(|n| n == "deps") {
        dir.parent().map(Path::to_path_buf).unwrap_or(dir)
    } else {
        dir
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_pgrs_image_of_a_major_names_its_server_programs() {
        assert_eq!(
            postgres_major_of("ghcr.io/pgrs-dev/pgrs:0.1.0-pg17"),
            Some(17)
        );
        assert_eq!(postgres_major_of("pgrs:dev"), None);
        assert_eq!(
            image_env("pgrs:dev").get("PGRS_PG_BIN").map(String::as_str),
            Some("/usr/lib/postgresql/15/bin")
        );
        assert!(image_env("ghcr.io/pgrs-dev/pgrs:1-pg18")["PGRS_PG_BIN"].ends_with("/18/bin"));
        assert!(image_env("pgrs-testbed/tiny-http:1").is_empty());
    }

    fn map_with(dir: &Path) -> ImageMap {
        let pgrs = dir.join("pgrs");
        std::fs::write(&pgrs, "").unwrap();
        let mut map = ImageMap::default();
        map.add(&PGRS_IMAGE_REPOSITORIES, "pgrs", [("pgrs", pgrs)]);
        map
    }

    #[test]
    fn repository_strips_tag_and_digest_but_not_a_registry_port() {
        assert_eq!(
            repository_of("ghcr.io/pgrs-dev/pgrs:0.1.0"),
            "ghcr.io/pgrs-dev/pgrs"
        );
        assert_eq!(repository_of("pgrs@sha256:abc"), "pgrs");
        assert_eq!(repository_of("localhost:5000/pgrs"), "localhost:5000/pgrs");
        assert_eq!(
            repository_of("localhost:5000/pgrs:dev"),
            "localhost:5000/pgrs"
        );
    }

    #[test]
    fn empty_command_runs_the_entrypoint_with_args() {
        let dir = tempfile::tempdir().unwrap();
        let map = map_with(dir.path());
        let (program, argv) = map
            .resolve("ghcr.io/pgrs-dev/pgrs:latest", &[], &["agent".to_owned()])
            .unwrap();
        assert_eq!(program, dir.path().join("pgrs"));
        assert_eq!(argv, vec!["agent".to_owned()]);
    }

    #[test]
    fn command_is_looked_up_by_file_name() {
        let dir = tempfile::tempdir().unwrap();
        let map = map_with(dir.path());
        let (program, argv) = map
            .resolve(
                "pgrs:dev",
                &["/usr/local/bin/pgrs".to_owned(), "operator".to_owned()],
                &["--x".to_owned()],
            )
            .unwrap();
        assert_eq!(program, dir.path().join("pgrs"));
        assert_eq!(argv, vec!["operator".to_owned(), "--x".to_owned()]);
    }

    #[test]
    fn other_images_and_commands_are_refused_with_a_clear_message() {
        let dir = tempfile::tempdir().unwrap();
        let map = map_with(dir.path());
        let err = map.resolve("nginx:1.27", &[], &[]).unwrap_err();
        assert!(
            err.to_string().contains("cannot run on the pgrs test bed"),
            "{err}"
        );
        let err = map.resolve("pgrs", &["sh".to_owned()], &[]).unwrap_err();
        assert!(matches!(err, ImageError::UnknownCommand { .. }), "{err}");
    }
}
