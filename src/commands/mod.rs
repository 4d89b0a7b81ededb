//! The user-facing subcommands.
//!
//! Each entry point is `#[inline(never)]`: inlined, they made `main` a 46 kB function that
//! every daemon runs a little of, which put most of it in every daemon's resident set
//! (see .cargo/config.toml).

pub mod api_key;
pub mod chaos;
pub mod events;
pub mod health;
pub mod logs;
pub mod metrics;
pub mod remote;
pub mod service;
pub mod services_view;
pub mod start;
pub mod status;
pub mod steer;
pub mod stop;
pub mod task;

use std::path::{Path, PathBuf};

use crate::config::Config;
use crate::runtime_dir::RuntimeDir;

/// Options every command accepts.
#[derive(Debug, Default)]
pub struct Common {
    pub runtime_dir: Option<PathBuf>,
    pub config: Option<PathBuf>,
}

impl Common {
    /// `--config`, then `NEXUS_CONFIG`, then `runtime/nexus_config.json` when present
    /// (the repository's default cluster); `None` means built-in defaults.
    pub fn config_path(&self) -> Option<PathBuf> {
        self.config
            .clone()
            .or_else(|| {
                std::env::var_os("NEXUS_CONFIG")
                    .filter(|v| !v.is_empty())
                    .map(PathBuf::from)
            })
            .or_else(|| {
                let p = Path::new("runtime/nexus_config.json");
                p.exists().then(|| p.to_path_buf())
            })
    }

    pub fn load_config(&self) -> Result<Config, String> {
        match self.config_path() {
            Some(p) => Config::load(&p).map_err(|e| e.to_string()),
            None => Ok(Config::default()),
        }
    }

    /// The config, also checked against this machine (cwd, users, probe hosts): for
    /// commands that put a config into effect.
    pub fn load_checked_config(&self) -> Result<Config, String> {
        match self.config_path() {
            Some(p) => Config::load_and_check(&p).map_err(|e| e.to_string()),
            None => Ok(Config::default()),
        }
    }

    /// The runtime directory for commands that act on a running cluster. The config is
    /// consulted only for its `runtime_dir`, and only when neither the flag nor the
    /// environment names one, so a broken config never stops you stopping a cluster.
    pub fn runtime_dir(&self) -> Result<RuntimeDir, String> {
        let named = self.runtime_dir.is_some()
            || std::env::var_os("NEXUS_RUNTIME_DIR").is_some_and(|v| !v.is_empty());
        if named {
            return Ok(RuntimeDir::resolve(self.runtime_dir.as_deref(), None));
        }
        let cfg = self.load_config()?;
        Ok(RuntimeDir::resolve(None, cfg.runtime_dir.as_deref()))
    }
}
