//! Equal regions of f32 values in an unnamed temporary file: where the calibration restart points of a big model
//! wait between stages (`calib::ResumeCache`), so they cost disk and page cache instead of resident memory. The
//! file has no name (`tempfile::tempfile_in`), so the system removes it when the job ends, however it ends.

use crate::error::{Result, WhittleError};
use std::fs::File;
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

#[derive(Debug)]
pub struct SpillFile {
    /// Seek-then-transfer under one lock: portable (no positional I/O needed), and the transfers are copies to and
    /// from the page cache, short beside the forward pass each one saves.
    file: Mutex<File>,
    regions: usize,
    region_floats: usize,
    /// The folder it lives in, for error messages (the file has no name).
    dir: PathBuf,
}

impl SpillFile {
    /// A file of `regions` regions of `region_floats` values each, in `dir`. Space is taken as regions are written.
    pub fn create_in(dir: &Path, regions: usize, region_floats: usize) -> Result<Self> {
        let file = tempfile::tempfile_in(dir).map_err(|e| WhittleError::io(dir, e))?;
        Ok(Self { file: Mutex::new(file), regions, region_floats, dir: dir.to_path_buf() })
    }

    /// Bytes the file takes once every region is written.
    pub fn bytes(regions: usize, region_floats: usize) -> usize {
        regions * region_floats * 4
    }

    /// Writes `parts`, one after another, at the start of region `region`.
    pub fn write(&self, region: usize, parts: &[&[f32]]) -> Result<()> {
        let floats: usize = parts.iter().map(|p| p.len()).sum();
        let mut file = self.region(region, floats)?;
        for p in parts {
            file.write_all(bytemuck::cast_slice(p)).map_err(|e| self.err(e))?;
        }
        Ok(())
    }

    /// Reads back parts of `lens` values each from the start of region `region` (as [`Self::write`] left them).
    pub fn read(&self, region: usize, lens: &[usize]) -> Result<Vec<Vec<f32>>> {
        let mut file = self.region(region, lens.iter().sum())?;
        lens.iter()
            .map(|&n| {
                let mut v = vec![0f32; n];
                file.read_exact(bytemuck::cast_slice_mut(&mut v)).map_err(|e| self.err(e))?;
                Ok(v)
            })
            .collect()
    }

    /// The locked file, positioned at the start of `region`, which must hold `floats` values.
    fn region(&self, region: usize, floats: usize) -> Result<std::sync::MutexGuard<'_, File>> {
        if region >= self.regions || floats > self.region_floats {
            return Err(WhittleError::Invalid(format!(
                "restart cache in {}: {floats} values in region {region} of {} regions of {}",
                self.dir.display(),
                self.regions,
                self.region_floats
            )));
        }
        // A panic while holding the lock leaves the file usable: every access seeks first.
        let mut file = self.file.lock().unwrap_or_else(|p| p.into_inner());
        file.seek(SeekFrom::Start((region * self.region_floats * 4) as u64)).map_err(|e| self.err(e))?;
        Ok(file)
    }

    fn err(&self, e: std::io::Error) -> WhittleError {
        WhittleError::Io { path: self.dir.join("(restart cache, unnamed temporary file)"), err: e }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn regions_read_back_what_was_written_and_stay_apart() {
        let dir = tempfile::tempdir().unwrap();
        let f = SpillFile::create_in(dir.path(), 3, 5).unwrap();
        f.write(2, &[&[1.0, 2.0], &[3.0, 4.0, 5.0]]).unwrap();
        f.write(0, &[&[-1.0; 5]]).unwrap();
        f.write(1, &[&[f32::NAN, 7.5]]).unwrap();
        assert_eq!(f.read(2, &[2, 3]).unwrap(), vec![vec![1.0, 2.0], vec![3.0, 4.0, 5.0]]);
        assert_eq!(f.read(0, &[5]).unwrap(), vec![vec![-1.0; 5]]);
        let back = f.read(1, &[1, 1]).unwrap();
        assert!(back[0][0].is_nan() && back[1] == [7.5]);
        // Overwriting a region with fewer values keeps the others' contents.
        f.write(0, &[&[9.0]]).unwrap();
        assert_eq!(f.read(2, &[5]).unwrap(), vec![vec![1.0, 2.0, 3.0, 4.0, 5.0]]);
        assert_eq!(f.read(0, &[2]).unwrap(), vec![vec![9.0, -1.0]]);
    }

    #[test]
    fn out_of_range_access_is_an_error_not_a_neighbours_data() {
        let dir = tempfile::tempdir().unwrap();
        let f = SpillFile::create_in(dir.path(), 2, 4).unwrap();
        assert!(f.write(2, &[&[1.0]]).is_err());
        assert!(f.write(0, &[&[1.0; 3], &[2.0; 2]]).is_err());
        assert!(f.read(1, &[5]).is_err());
        // A region never written (past the file's end) is an error naming the folder.
        f.write(0, &[&[1.0; 4]]).unwrap();
        let e = f.read(1, &[4]).unwrap_err().to_string();
        assert!(e.contains(&dir.path().display().to_string()), "{e}");
    }
}
