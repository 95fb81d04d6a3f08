//! Paths that job args carry, confined to configured directories.
//!
//! `regenerate_vault {path}`, `ingest_logs {path}` and `scan_log_spool {dir, done_dir}`
//! touch the file system. Whoever enqueued them (a schedule, the CLI, plain SQL), their
//! paths must resolve, symlinks followed, under one of `billing.file_roots`: no `..`, no
//! link that points out. With no roots configured, no path is accepted.

use std::path::{Component, Path, PathBuf};

/// The directories file-touching jobs may use.
#[derive(Debug, Clone, Default)]
pub struct FileRoots(Vec<PathBuf>);

impl FileRoots {
    pub fn new(roots: &[String]) -> Result<FileRoots, String> {
        let mut out = Vec::with_capacity(roots.len());
        for r in roots {
            if r.is_empty() {
                return Err("an empty directory name".into());
            }
            let p = Path::new(r);
            if p.components().any(|c| c == Component::ParentDir) {
                return Err(format!("{r:?}: no `..` in a root"));
            }
            out.push(absolute(p));
        }
        Ok(FileRoots(out))
    }

    /// `path` resolved (symlinks followed as far as the path exists), if it lies under a
    /// root; else why not. The file itself need not exist (a vault about to be written).
    pub fn check(&self, path: &str) -> Result<PathBuf, String> {
        if self.0.is_empty() {
            return Err(format!(
                "{path:?}: no directory is allowed for files (set billing.file_roots)"
            ));
        }
        let p = Path::new(path);
        if path.is_empty() || p.components().any(|c| c == Component::ParentDir) {
            return Err(format!(
                "{path:?}: a path must not be empty or contain `..`"
            ));
        }
        let resolved = resolve(&absolute(p))
            .ok_or_else(|| format!("{path:?}: a part of it is a symlink that leads nowhere"))?;
        for root in &self.0 {
            let Some(root) = resolve(root) else { continue };
            // Strictly under the root: a job given the root itself would work in its
            // parent (a vault's temp file, a spool's done directory).
            if resolved.starts_with(&root) && resolved != root {
                return Ok(resolved);
            }
        }
        Err(format!(
            "{path:?} resolves to {}, outside billing.file_roots",
            resolved.display()
        ))
    }
}

fn absolute(p: &Path) -> PathBuf {
    if p.is_absolute() {
        p.to_path_buf()
    } else {
        std::env::current_dir().unwrap_or_default().join(p)
    }
}

/// The longest existing ancestor canonicalized (symlinks resolved), the rest appended.
/// The rest must really not exist: a dangling symlink among it (which canonicalize
/// cannot follow, and which could later point anywhere) makes the path refused.
fn resolve(p: &Path) -> Option<PathBuf> {
    let mut existing = p.to_path_buf();
    let mut rest = Vec::new();
    loop {
        if let Ok(c) = existing.canonicalize() {
            let mut out = c;
            for part in rest.iter().rev() {
                out.push(part);
            }
            return Some(out);
        }
        if std::fs::symlink_metadata(&existing).is_ok() {
            return None; // exists but cannot be resolved: a dangling (or looping) link
        }
        match (
            existing.file_name().map(|f| f.to_os_string()),
            existing.parent(),
        ) {
            (Some(name), Some(parent)) => {
                rest.push(name);
                existing = parent.to_path_buf();
            }
            _ => return Some(p.to_path_buf()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_stay_under_their_roots() {
        let base = std::env::temp_dir().join(format!("ls-roots-{}", std::process::id()));
        let root = base.join("spool");
        let outside = base.join("secret");
        std::fs::create_dir_all(&root).unwrap();
        std::fs::create_dir_all(&outside).unwrap();
        std::fs::write(outside.join("key"), "x").unwrap();
        let _ = std::fs::remove_file(root.join("link"));
        std::os::unix::fs::symlink(outside.join("key"), root.join("link")).unwrap();
        let _ = std::fs::remove_file(root.join("dirlink"));
        std::os::unix::fs::symlink(&outside, root.join("dirlink")).unwrap();
        let roots = FileRoots::new(&[root.display().to_string()]).unwrap();
        let ok = |p: PathBuf| roots.check(&p.display().to_string());
        assert!(ok(root.join("a.log")).is_ok(), "a file to be");
        assert!(ok(root.join("sub/new.csv")).is_ok(), "under a dir to be");
        assert!(ok(outside.join("key")).is_err(), "outside");
        assert!(ok(root.join("link")).is_err(), "a symlink out");
        assert!(
            ok(root.join("dirlink/key")).is_err(),
            "through a dir symlink out"
        );
        let _ = std::fs::remove_file(root.join("dangling"));
        std::os::unix::fs::symlink(base.join("not-yet"), root.join("dangling")).unwrap();
        assert!(
            ok(root.join("dangling/vault.csv")).is_err(),
            "through a link that leads nowhere (yet)"
        );
        assert!(ok(root.join("dangling")).is_err(), "a dangling link itself");
        assert!(ok(root.clone()).is_err(), "the root itself");
        let dotdot = format!("{}/../secret/key", root.display());
        assert!(roots.check(&dotdot).unwrap_err().contains(".."));
        assert!(roots.check("").is_err());
        assert!(
            FileRoots::default()
                .check(&root.join("a").display().to_string())
                .unwrap_err()
                .contains("billing.file_roots")
        );
        std::fs::remove_dir_all(&base).unwrap();
    }
}
