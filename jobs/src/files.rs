//! Paths that job args carry, confined to configured directories.
//!
//! `regenerate_vault {path}`, `ingest_logs {path}` and `scan_log_spool {dir, done_dir}`
//! touch the file system. Whoever enqueued them (a schedule, the CLI, plain SQL), their
//! paths must resolve, symlinks followed, under one of their kind's roots: the log jobs
//! under `billing.log_roots`, the vault under `billing.vault_roots`. No `..`, no link
//! that points out. With no roots configured, no path is accepted. Two lists, not one:
//! a log job must not read (or move) the vault, nor the vault job overwrite a log.

use std::path::{Component, Path, PathBuf};

/// The directories one kind of file-touching job may use, and the config key that
/// names them (errors say which list to change).
#[derive(Debug, Clone)]
pub struct FileRoots {
    roots: Vec<PathBuf>,
    key: &'static str,
}

impl FileRoots {
    /// No directory: every path refused, naming `key`.
    pub fn none(key: &'static str) -> FileRoots {
        FileRoots {
            roots: Vec::new(),
            key,
        }
    }

    pub fn new(key: &'static str, roots: &[String]) -> Result<FileRoots, String> {
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
        Ok(FileRoots { roots: out, key })
    }

    /// A root of `self` and one of `other` where one lies within the other (or they
    /// are the same), resolved.
    pub fn overlap(&self, other: &FileRoots) -> Option<(PathBuf, PathBuf)> {
        let resolved = |r: &FileRoots| -> Vec<PathBuf> {
            r.roots
                .iter()
                .map(|p| resolve(p).unwrap_or_else(|| p.clone()))
                .collect()
        };
        let theirs = resolved(other);
        resolved(self).into_iter().find_map(|a| {
            theirs
                .iter()
                .find(|b| a.starts_with(b) || b.starts_with(&a))
                .map(|b| (a.clone(), b.clone()))
        })
    }

    /// `path` resolved (symlinks followed as far as the path exists), if it lies under a
    /// root; else why not. The file itself need not exist (a vault about to be written).
    pub fn check(&self, path: &str) -> Result<PathBuf, String> {
        if self.roots.is_empty() {
            return Err(format!(
                "{path:?}: no directory is allowed for this job's files (set {})",
                self.key
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
        for root in &self.roots {
            let Some(root) = resolve(root) else { continue };
            // Strictly under the root: a job given the root itself would work in its
            // parent (a vault's temp file, a spool's done directory).
            if resolved.starts_with(&root) && resolved != root {
                return Ok(resolved);
            }
        }
        Err(format!(
            "{path:?} resolves to {}, outside {}",
            resolved.display(),
            self.key
        ))
    }
}

/// Why a confined read failed.
#[derive(Debug)]
pub enum ReadError {
    /// There is no such file (a scan raced with a mover, a path that never existed).
    NotFound(String),
    /// Not a file this job may read: outside the roots, a link, not a regular file,
    /// larger than allowed. Retrying cannot help.
    Refused(String),
    /// Reading failed (I/O): maybe later.
    Io(String),
}

impl FileRoots {
    /// Reads `path` whole, only if it is a regular file of at most `max_bytes` that
    /// lies under a root when it is opened, not only when it was checked: the final
    /// component is opened without following a link, and the file actually opened
    /// (`/proc/self/fd`) must still resolve under the root, so a component swapped
    /// for a link between the check and the open is caught. Devices, FIFOs and
    /// oversized files are refused before anything is read.
    pub fn read(&self, path: &str, max_bytes: u64) -> Result<Vec<u8>, ReadError> {
        use std::io::Read as _;
        use std::os::unix::fs::OpenOptionsExt as _;
        let resolved = self.check(path).map_err(ReadError::Refused)?;
        let f = match std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
            .open(&resolved)
        {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(ReadError::NotFound(format!("{path}: no such file")));
            }
            Err(e) if e.raw_os_error() == Some(libc::ELOOP) => {
                return Err(ReadError::Refused(format!("{path}: a symlink")));
            }
            Err(e) => return Err(ReadError::Io(format!("{path}: {e}"))),
        };
        self.opened_under_a_root(&f, path, "file")?;
        let meta = f
            .metadata()
            .map_err(|e| ReadError::Io(format!("{path}: {e}")))?;
        if !meta.is_file() {
            return Err(ReadError::Refused(format!("{path}: not a regular file")));
        }
        if meta.len() > max_bytes {
            return Err(ReadError::Refused(format!(
                "{path}: {} bytes, more than the {max_bytes} a job may read",
                meta.len()
            )));
        }
        let mut bytes = Vec::with_capacity(meta.len() as usize);
        // A file still growing is read up to the limit, no further.
        f.take(max_bytes.saturating_add(1))
            .read_to_end(&mut bytes)
            .map_err(|e| ReadError::Io(format!("{path}: {e}")))?;
        if bytes.len() as u64 > max_bytes {
            return Err(ReadError::Refused(format!(
                "{path}: more than the {max_bytes} bytes a job may read"
            )));
        }
        Ok(bytes)
    }
}

impl FileRoots {
    /// Moves the file `from` into the directory `done` (made if missing), both under a
    /// root, with the directories pinned: each is opened (not following a final link)
    /// and must still resolve under a root as opened, and the move is a `renameat`
    /// between the two open directories, so a `done` swapped for a link after the
    /// check (into the vault's directory, say) cannot redirect it.
    /// The entry itself is moved, never what it may link to, and never over a file
    /// of the same name already in `done`.
    pub fn rename_into(&self, from: &str, done: &str) -> Result<(), ReadError> {
        let from_path = Path::new(from);
        let (Some(dir), Some(name)) = (from_path.parent(), from_path.file_name()) else {
            return Err(ReadError::Refused(format!("{from}: not a file")));
        };
        let dir = self
            .check(&dir.display().to_string())
            .map_err(ReadError::Refused)?;
        let done = self.check(done).map_err(ReadError::Refused)?;
        std::fs::create_dir_all(&done)
            .map_err(|e| ReadError::Io(format!("{}: {e}", done.display())))?;
        self.rename_pinned(&dir, name, &done)
    }

    fn rename_pinned(
        &self,
        dir: &Path,
        name: &std::ffi::OsStr,
        done: &Path,
    ) -> Result<(), ReadError> {
        use std::os::fd::AsRawFd as _;
        use std::os::unix::ffi::OsStrExt as _;
        let src = self.open_dir(dir)?;
        let dst = self.open_dir(done)?;
        let name = std::ffi::CString::new(name.as_bytes())
            .map_err(|_| ReadError::Refused("a file name with a NUL".into()))?;
        // SAFETY: both descriptors are open directories owned above; the name is a
        // NUL-terminated single component (it came from `file_name`).
        let r = unsafe {
            libc::renameat2(
                src.as_raw_fd(),
                name.as_ptr(),
                dst.as_raw_fd(),
                name.as_ptr(),
                libc::RENAME_NOREPLACE,
            )
        };
        if r != 0 {
            let e = std::io::Error::last_os_error();
            let shown = name.to_string_lossy();
            return Err(match e.raw_os_error() {
                Some(libc::ENOENT) => ReadError::NotFound(format!("{shown}: no such file")),
                Some(libc::EEXIST) => {
                    ReadError::Refused(format!("{shown}: a file of that name is already done"))
                }
                _ => ReadError::Io(format!("{shown}: {e}")),
            });
        }
        Ok(())
    }

    /// A directory opened without following a final link, which must resolve (as
    /// opened) under a root.
    fn open_dir(&self, dir: &Path) -> Result<std::fs::File, ReadError> {
        use std::os::unix::fs::OpenOptionsExt as _;
        let f = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_DIRECTORY | libc::O_NOFOLLOW)
            .open(dir)
            .map_err(|e| match e.raw_os_error() {
                Some(libc::ELOOP) | Some(libc::ENOTDIR) => {
                    ReadError::Refused(format!("{}: not a directory (a link?)", dir.display()))
                }
                _ => ReadError::Io(format!("{}: {e}", dir.display())),
            })?;
        self.opened_under_a_root(&f, &dir.display().to_string(), "directory")?;
        Ok(f)
    }

    /// What `f` really is (`/proc/self/fd`), which must lie under a root: a
    /// component swapped for a link between a check and an open is caught here.
    fn opened_under_a_root(
        &self,
        f: &std::fs::File,
        shown: &str,
        what: &str,
    ) -> Result<(), ReadError> {
        use std::os::fd::AsRawFd as _;
        let opened = std::fs::read_link(format!("/proc/self/fd/{}", f.as_raw_fd()))
            .map_err(|e| ReadError::Io(format!("{shown}: {e}")))?;
        if self
            .roots
            .iter()
            .filter_map(|r| resolve(r))
            .any(|r| opened.starts_with(&r))
        {
            return Ok(());
        }
        Err(ReadError::Refused(format!(
            "{shown}: the {what} opened is {}, outside {}",
            opened.display(),
            self.key
        )))
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
        let roots = FileRoots::new("billing.log_roots", &[root.display().to_string()]).unwrap();
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
        // Reading: a regular file within the limit; not a FIFO, not an oversized one.
        std::fs::write(root.join("small.log"), "0123456789").unwrap();
        let read = |p: PathBuf, max| roots.read(&p.display().to_string(), max);
        assert_eq!(read(root.join("small.log"), 10).unwrap(), b"0123456789");
        assert!(matches!(
            read(root.join("small.log"), 9),
            Err(ReadError::Refused(_))
        ));
        assert!(matches!(
            read(root.join("missing.log"), 9),
            Err(ReadError::NotFound(_))
        ));
        assert!(matches!(
            read(root.join("link"), 1 << 20),
            Err(ReadError::Refused(_))
        ));
        let fifo = root.join("fifo");
        let _ = std::fs::remove_file(&fifo);
        let c = std::ffi::CString::new(fifo.display().to_string()).unwrap();
        // SAFETY: mkfifo reads the NUL-terminated path only.
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
        assert!(
            matches!(read(fifo, 1 << 20), Err(ReadError::Refused(m)) if m.contains("regular")),
            "a FIFO is refused, not waited on"
        );
        let vault = FileRoots::new("v", &[root.join("vault").display().to_string()]).unwrap();
        assert!(
            roots.overlap(&vault).is_some(),
            "a vault root inside a log root"
        );
        let apart = FileRoots::new("v", &[outside.display().to_string()]).unwrap();
        assert!(roots.overlap(&apart).is_none());
        // Moving into a done directory: pinned, so one swapped for a link out (after
        // the check) is refused, and the file stays.
        std::fs::create_dir_all(root.join("in")).unwrap();
        std::fs::write(root.join("in/moved.log"), "x").unwrap();
        let file = root.join("in/moved.log").display().to_string();
        roots
            .rename_into(&file, &root.join("done").display().to_string())
            .unwrap();
        assert!(root.join("done/moved.log").exists());
        std::fs::write(root.join("in/moved.log"), "a second").unwrap();
        assert!(
            matches!(
                roots.rename_into(&file, &root.join("done").display().to_string()),
                Err(ReadError::Refused(_))
            ),
            "never over a done file"
        );
        assert_eq!(
            std::fs::read_to_string(root.join("done/moved.log")).unwrap(),
            "x"
        );
        std::fs::write(root.join("kept.log"), "x").unwrap();
        let _ = std::fs::remove_file(root.join("swapped"));
        std::os::unix::fs::symlink(&outside, root.join("swapped")).unwrap();
        let swapped = roots.rename_pinned(
            &root,
            std::ffi::OsStr::new("kept.log"),
            &root.join("swapped"),
        );
        assert!(matches!(swapped, Err(ReadError::Refused(_))), "{swapped:?}");
        assert!(root.join("kept.log").exists() && !outside.join("kept.log").exists());
        // And a directory that resolves outside as opened (a link higher up).
        let via = roots.rename_pinned(
            &root,
            std::ffi::OsStr::new("kept.log"),
            &root.join("dirlink"),
        );
        assert!(matches!(via, Err(ReadError::Refused(_))), "{via:?}");
        let dotdot = format!("{}/../secret/key", root.display());
        assert!(roots.check(&dotdot).unwrap_err().contains(".."));
        assert!(roots.check("").is_err());
        assert!(
            FileRoots::none("billing.vault_roots")
                .check(&root.join("a").display().to_string())
                .unwrap_err()
                .contains("billing.vault_roots")
        );
        std::fs::remove_dir_all(&base).unwrap();
    }
}
