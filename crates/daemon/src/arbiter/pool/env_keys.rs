//! The names of the variables each generation's workers were given (never the
//! values), for `status`: a generation's environment is fixed when its first
//! worker or template starts, since only a reload changes the configuration and
//! a reload is a new generation.

use super::Pool;
use crate::config::Config;

impl Pool {
    /// The current generation starts (or starts again) with `cfg`'s environment:
    /// note its names, and forget those of generations with nothing left.
    pub(super) fn note_env_keys(&mut self, cfg: &Config) {
        if self.env_keys.contains_key(&self.generation) {
            return;
        }
        let alive: Vec<u64> = self.env_generations().collect();
        self.env_keys.retain(|g, _| alive.contains(g));
        let keys = cfg.env.iter().map(|(k, _)| k.clone()).collect();
        self.env_keys.insert(self.generation, keys);
    }

    /// Generations with a worker or a template.
    fn env_generations(&self) -> impl Iterator<Item = u64> + '_ {
        self.workers
            .iter()
            .map(|w| w.generation)
            .chain(self.templates.iter().map(|t| t.generation))
    }

    /// Each generation alive and the names of the variables its workers were given,
    /// oldest first.
    pub fn env_keys(&self) -> Vec<(u64, &[String])> {
        let alive: Vec<u64> = self.env_generations().collect();
        self.env_keys
            .iter()
            .filter(|(g, _)| alive.contains(g))
            .map(|(g, keys)| (*g, keys.as_slice()))
            .collect()
    }
}
