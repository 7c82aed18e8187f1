use std::collections::HashSet;
use std::sync::{Arc, Mutex};

use crate::CsiError;

/// At most one operation per volume at a time; a second one gets `ABORTED` (the CO
/// retries), as the CSI specification allows.
#[derive(Debug, Clone, Default)]
pub struct VolumeGuard {
    busy: Arc<Mutex<HashSet<String>>>,
}

/// Held while an operation runs; releases the volume when dropped.
#[derive(Debug)]
pub struct Held {
    busy: Arc<Mutex<HashSet<String>>>,
    volume_id: String,
}

impl VolumeGuard {
    /// Claim `volume_id` or fail with [`CsiError::Busy`].
    pub fn acquire(&self, volume_id: &str) -> Result<Held, CsiError> {
        let mut busy = self
            .busy
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if !busy.insert(volume_id.to_string()) {
            return Err(CsiError::Busy {
                volume_id: volume_id.to_string(),
            });
        }
        Ok(Held {
            busy: self.busy.clone(),
            volume_id: volume_id.to_string(),
        })
    }
}

impl Drop for Held {
    fn drop(&mut self) {
        self.busy
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .remove(&self.volume_id);
    }
}
