//! Writing an export folder atomically: everything goes into a hidden sibling `.<name>.tmp-<pid>` and is renamed
//! to `<name>` only once complete. A crash, kill, error or cancel mid-export therefore never leaves a folder (or a
//! half-written checkpoint a loader would pick up) at the final path; at worst a hidden temp folder remains.
//!
//! Replacing an existing export (`force`) moves the old folder aside to `.<name>.old-<pid>`, renames the new one in,
//! then deletes the old one, so the final path only ever holds a complete export (or, during the instant between
//! the two renames, nothing). Without `force` an existing target is refused before anything is written.

use std::path::{Path, PathBuf};

use super::error::{ExportError, Result};

/// A folder being written; becomes the final folder on [`AtomicDir::commit`], and is removed if dropped before.
#[derive(Debug)]
pub struct AtomicDir {
    target: PathBuf,
    tmp: PathBuf,
    force: bool,
    committed: bool,
}

fn sibling(target: &Path, tag: &str) -> Result<PathBuf> {
    let name = target
        .file_name()
        .ok_or_else(|| ExportError::io(target, std::io::Error::other("export path has no folder name")))?;
    let parent = target.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    Ok(parent.join(format!(".{}.{tag}-{}", name.to_string_lossy(), std::process::id())))
}

fn remove_any(path: &Path) -> std::io::Result<()> {
    if std::fs::symlink_metadata(path)?.is_dir() {
        std::fs::remove_dir_all(path)
    } else {
        std::fs::remove_file(path)
    }
}

fn exists(path: &Path) -> bool {
    std::fs::symlink_metadata(path).is_ok()
}

impl AtomicDir {
    /// Starts writing the folder `target`. Refuses an existing `target` unless `force`. Creates missing parents.
    pub fn begin(target: &Path, force: bool) -> Result<Self> {
        if exists(target) && !force {
            return Err(ExportError::TargetExists { path: target.to_path_buf() });
        }
        let tmp = sibling(target, "tmp")?;
        if let Some(parent) = tmp.parent() {
            std::fs::create_dir_all(parent).map_err(|e| ExportError::io(parent, e))?;
        }
        // Left over by an earlier run that was killed and happened to have our pid.
        if exists(&tmp) {
            remove_any(&tmp).map_err(|e| ExportError::io(&tmp, e))?;
        }
        std::fs::create_dir(&tmp).map_err(|e| ExportError::io(&tmp, e))?;
        Ok(Self { target: target.to_path_buf(), tmp, force, committed: false })
    }

    /// The folder to write into (the temp folder, until commit).
    pub fn path(&self) -> &Path {
        &self.tmp
    }

    /// The final path.
    pub fn target(&self) -> &Path {
        &self.target
    }

    /// Moves the finished folder to the final path, replacing an existing one when `force` was given.
    pub fn commit(mut self) -> Result<PathBuf> {
        if exists(&self.target) {
            if !self.force {
                return Err(ExportError::TargetExists { path: self.target.clone() });
            }
            let old = sibling(&self.target, "old")?;
            if exists(&old) {
                remove_any(&old).map_err(|e| ExportError::io(&old, e))?;
            }
            std::fs::rename(&self.target, &old).map_err(|e| ExportError::io(&self.target, e))?;
            if let Err(e) = std::fs::rename(&self.tmp, &self.target) {
                // Put the previous export back rather than leave nothing.
                let _ = std::fs::rename(&old, &self.target);
                return Err(ExportError::io(&self.target, e));
            }
            self.committed = true;
            // The new export is in place, so this is best effort: failing to delete the old copy only leaves a
            // hidden folder behind, and reporting the export as failed would be wrong.
            let _ = remove_any(&old);
        } else {
            std::fs::rename(&self.tmp, &self.target).map_err(|e| ExportError::io(&self.target, e))?;
            self.committed = true;
        }
        Ok(self.target.clone())
    }
}

impl Drop for AtomicDir {
    fn drop(&mut self) {
        if !self.committed {
            // Best effort: an unwritable temp folder must not turn an export error into a panic.
            let _ = std::fs::remove_dir_all(&self.tmp);
        }
    }
}

/// Runs `write` on a temp folder and commits it to `target` if it succeeds; on error (or panic) the temp folder is
/// removed and `target` is untouched.
pub fn write_atomic_dir<T>(target: &Path, force: bool, write: impl FnOnce(&Path) -> Result<T>) -> Result<(PathBuf, T)> {
    let dir = AtomicDir::begin(target, force)?;
    let value = write(dir.path())?;
    Ok((dir.commit()?, value))
}

/// Writes `bytes` to `path` through a temporary file in the same folder and a rename, so `path` is complete or
/// absent.
pub fn write_atomic_file(path: &Path, bytes: &[u8]) -> crate::error::Result<()> {
    write_atomic_with(path, |tmp| {
        use std::io::Write;
        std::fs::File::create(tmp)?.write_all(bytes)
    })
}

/// [`write_atomic_file`] for a writer that creates the temporary file itself (`write(tmp)`, e.g. streaming tensors
/// without building the file in memory); the file is synced before the rename.
pub fn write_atomic_with(path: &Path, write: impl FnOnce(&Path) -> std::io::Result<()>) -> crate::error::Result<()> {
    let mut name = path.file_name().unwrap_or_default().to_os_string();
    name.push(".tmp");
    let tmp = path.with_file_name(name);
    let commit = || -> std::io::Result<()> {
        write(&tmp)?;
        std::fs::File::open(&tmp)?.sync_all()?;
        std::fs::rename(&tmp, path)
    };
    commit().map_err(|e| {
        let _ = std::fs::remove_file(&tmp);
        crate::error::WhittleError::io(path, e)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entries(dir: &Path) -> Vec<String> {
        let mut v: Vec<String> =
            std::fs::read_dir(dir).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
        v.sort();
        v
    }

    #[test]
    fn writes_into_hidden_temp_then_renames() {
        let root = tempfile::tempdir().unwrap();
        let target = root.path().join("out");
        let (path, ()) = write_atomic_dir(&target, false, |d| {
            assert_eq!(d.file_name().unwrap().to_string_lossy(), format!(".out.tmp-{}", std::process::id()));
            assert!(!target.exists(), "nothing at the final path while writing");
            std::fs::write(d.join("config.json"), "{}").map_err(|e| ExportError::io(d, e))
        })
        .unwrap();
        assert_eq!(path, target);
        assert_eq!(entries(root.path()), vec!["out"]);
        assert_eq!(entries(&target), vec!["config.json"]);
    }

    #[test]
    fn existing_target_is_refused_without_force_and_replaced_with_it() {
        let root = tempfile::tempdir().unwrap();
        let target = root.path().join("out");
        std::fs::create_dir(&target).unwrap();
        std::fs::write(target.join("old.txt"), "old").unwrap();
        let err = write_atomic_dir(&target, false, |_| -> Result<()> { panic!("must not start writing") }).unwrap_err();
        assert!(matches!(err, ExportError::TargetExists { .. }), "{err}");
        assert_eq!(entries(&target), vec!["old.txt"]);

        write_atomic_dir(&target, true, |d| {
            std::fs::write(d.join("new.txt"), "new").map_err(|e| ExportError::io(d, e))
        })
        .unwrap();
        assert_eq!(entries(&target), vec!["new.txt"]);
        assert_eq!(entries(root.path()), vec!["out"], "old copy and temp folder are gone");
    }

    #[test]
    fn failure_mid_write_leaves_no_final_folder() {
        let root = tempfile::tempdir().unwrap();
        let target = root.path().join("out");
        let err = write_atomic_dir(&target, false, |d| -> Result<()> {
            std::fs::write(d.join("model-00001-of-00002.safetensors"), [0u8; 16]).unwrap();
            Err(ExportError::layer("model.layers.1.mlp.up_proj", "simulated failure"))
        })
        .unwrap_err();
        assert!(err.to_string().contains("simulated failure"));
        assert!(!target.exists());
        assert!(entries(root.path()).is_empty(), "temp folder removed: {:?}", entries(root.path()));

        // A panic (e.g. a bug) unwinds through Drop: same outcome.
        let t2 = target.clone();
        let r = std::panic::catch_unwind(move || {
            let _ = write_atomic_dir(&t2, false, |d| -> Result<()> {
                std::fs::write(d.join("partial"), [1u8]).unwrap();
                panic!("simulated crash")
            });
        });
        assert!(r.is_err());
        assert!(!target.exists());
        assert!(entries(root.path()).is_empty());

        // A kill runs no destructor at all: only the hidden temp folder remains, never the final one.
        let dir = AtomicDir::begin(&target, false).unwrap();
        std::fs::write(dir.path().join("partial"), [1u8]).unwrap();
        std::mem::forget(dir);
        assert!(!target.exists());
        assert_eq!(entries(root.path()), vec![format!(".out.tmp-{}", std::process::id())]);
        // The next export with the same pid clears the leftover and succeeds.
        write_atomic_dir(&target, false, |_| Ok(())).unwrap();
        assert_eq!(entries(root.path()), vec!["out"]);
    }

    #[test]
    fn forced_replace_of_a_plain_file_works() {
        let root = tempfile::tempdir().unwrap();
        let target = root.path().join("out");
        std::fs::write(&target, "not a folder").unwrap();
        write_atomic_dir(&target, true, |_| Ok(())).unwrap();
        assert!(target.is_dir());
    }
}
