//! Container image → local executable mapping (see `e2e/testbed/images.conf` for the file format).

use std::path::{Path, PathBuf};

use super::KubeletError;

/// What to execute for an image.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Executable {
    /// This local binary (its `command[0]` is replaced by it).
    Binary(PathBuf),
    /// The container's `command[0]`, looked up on the host `PATH`.
    Command,
}

#[derive(Debug, Clone)]
enum Target {
    /// Candidate paths; the first existing file wins.
    Paths(Vec<PathBuf>),
    Command,
}

/// Parsed image map: ordered `(pattern, target)` pairs, first match wins.
#[derive(Debug, Clone, Default)]
pub struct ImageMap {
    entries: Vec<(String, Target)>,
}

impl ImageMap {
    /// Parses the map text; `${REPO}` and `${TARGET}` in targets are substituted.
    pub fn parse(text: &str, repo: &Path, target: &Path, origin: &Path) -> Result<Self, KubeletError> {
        let mut entries = Vec::new();
        for (idx, raw) in text.lines().enumerate() {
            let line = raw.split('#').next().unwrap_or("").trim();
            if line.is_empty() {
                continue;
            }
            let mut parts = line.split_whitespace();
            let (Some(pattern), Some(exe), None) = (parts.next(), parts.next(), parts.next()) else {
                return Err(KubeletError::ImageMap {
                    path: origin.to_path_buf(),
                    line: idx + 1,
                    msg: format!("expected `<pattern> <executable>`, got `{line}`"),
                });
            };
            let exe = if exe == "@command" {
                Target::Command
            } else {
                let subst = |p: &str| {
                    PathBuf::from(
                        p.replace("${REPO}", &repo.to_string_lossy()).replace("${TARGET}", &target.to_string_lossy()),
                    )
                };
                Target::Paths(exe.split('|').filter(|p| !p.is_empty()).map(subst).collect())
            };
            entries.push((pattern.to_string(), exe));
        }
        Ok(Self { entries })
    }

    /// Reads and parses a map file.
    pub fn load(path: &Path, repo: &Path, target: &Path) -> Result<Self, KubeletError> {
        let text =
            std::fs::read_to_string(path).map_err(|source| KubeletError::Io { path: path.to_path_buf(), source })?;
        Self::parse(&text, repo, target, path)
    }

    /// Resolves an image reference. `file:///abs/path` images map to that path directly. For `a|b` targets the first
    /// existing file wins (the first candidate is returned when none exists, for the error message).
    pub fn resolve(&self, image: &str) -> Option<Executable> {
        if let Some(path) = image.strip_prefix("file://") {
            return Some(Executable::Binary(PathBuf::from(path)));
        }
        let normalized = normalize(image);
        let (_, target) = self.entries.iter().find(|(pattern, _)| glob_match(pattern, &normalized))?;
        match target {
            Target::Command => Some(Executable::Command),
            Target::Paths(paths) => {
                paths.iter().find(|p| p.is_file()).or_else(|| paths.first()).cloned().map(Executable::Binary)
            }
        }
    }
}

/// Adds `:latest` to an image reference without tag or digest.
fn normalize(image: &str) -> String {
    let last = image.rsplit('/').next().unwrap_or(image);
    if last.contains(':') || last.contains('@') { image.to_string() } else { format!("{image}:latest") }
}

/// `*`-only glob matching over bytes.
fn glob_match(pattern: &str, text: &str) -> bool {
    let (p, t) = (pattern.as_bytes(), text.as_bytes());
    let (mut pi, mut ti) = (0usize, 0usize);
    let mut star: Option<(usize, usize)> = None;
    while ti < t.len() {
        if pi < p.len() && p[pi] == b'*' {
            star = Some((pi, ti));
            pi += 1;
        } else if pi < p.len() && p[pi] == t[ti] {
            pi += 1;
            ti += 1;
        } else if let Some((sp, st)) = star {
            pi = sp + 1;
            ti = st + 1;
            star = Some((sp, st + 1));
        } else {
            return false;
        }
    }
    while pi < p.len() && p[pi] == b'*' {
        pi += 1;
    }
    pi == p.len()
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn map() -> ImageMap {
        let text = "# comment\nkpipe/worker:*  ${TARGET}/release/kpipe-worker\n*/kpipe/worker:* ${REPO}/w # trailing\nbusybox:* @command\n";
        ImageMap::parse(text, Path::new("/repo"), Path::new("/repo/target"), Path::new("x")).unwrap()
    }

    #[test]
    fn resolves_patterns_in_order() {
        let m = map();
        assert_eq!(
            m.resolve("kpipe/worker:0.1.0"),
            Some(Executable::Binary("/repo/target/release/kpipe-worker".into()))
        );
        assert_eq!(m.resolve("kpipe/worker"), Some(Executable::Binary("/repo/target/release/kpipe-worker".into())));
        assert_eq!(m.resolve("ghcr.io/kpipe/worker:1"), Some(Executable::Binary("/repo/w".into())));
        assert_eq!(m.resolve("busybox:1.36"), Some(Executable::Command));
        assert_eq!(m.resolve("nginx:1"), None);
        assert_eq!(m.resolve("file:///bin/true"), Some(Executable::Binary("/bin/true".into())));
    }

    #[test]
    fn first_existing_alternative_wins() {
        let m = ImageMap::parse("x:* /nonexistent/a|/bin/sh", Path::new("/"), Path::new("/"), Path::new("f")).unwrap();
        assert_eq!(m.resolve("x:1"), Some(Executable::Binary("/bin/sh".into())));
        let m = ImageMap::parse("x:* /nonexistent/a|/nonexistent/b", Path::new("/"), Path::new("/"), Path::new("f"))
            .unwrap();
        assert_eq!(m.resolve("x:1"), Some(Executable::Binary("/nonexistent/a".into())));
    }

    #[test]
    fn rejects_bad_lines() {
        let err = ImageMap::parse("just-one-field", Path::new("/"), Path::new("/"), Path::new("f"));
        assert!(err.is_err());
    }

    #[test]
    fn glob() {
        assert!(glob_match("a*b*c", "axxbyyc"));
        assert!(!glob_match("a*b", "axxc"));
        assert!(glob_match("*", ""));
        assert!(glob_match("registry:5000/*:*", "registry:5000/x/y:1"));
    }
}
