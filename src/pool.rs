//! What bb8 pools share: remembering why connections fail.
//!
//! bb8 connects in the background and a waiting `get()` only ever reports
//! "timed out"; the real cause (connection refused, auth failed, …) goes to
//! the pool's error sink. [`LastError`] keeps the latest one so a failed
//! checkout can say *why*, which is what an operator needs at 3 a.m.

use std::fmt;
use std::sync::{Arc, Mutex};

/// The most recent connection error of one pool (cheap to clone, shared).
#[derive(Debug, Clone, Default)]
pub struct LastError(Arc<Mutex<Option<String>>>);

impl LastError {
    /// The latest error, if any was seen since the last successful checkout.
    pub fn take(&self) -> Option<String> {
        self.0.lock().ok().and_then(|mut g| g.take())
    }

    /// Describe a failed checkout: `timed out (last error: connection refused)`.
    pub fn describe<E: fmt::Display>(&self, err: &bb8::RunError<E>) -> String {
        match (err, self.take()) {
            (bb8::RunError::TimedOut, Some(cause)) => format!("timed out ({cause})"),
            (bb8::RunError::TimedOut, None) => "timed out".to_string(),
            (bb8::RunError::User(e), _) => e.to_string(),
        }
    }
}

impl<E: fmt::Display + 'static> bb8::ErrorSink<E> for LastError {
    fn sink(&self, error: E) {
        if let Ok(mut g) = self.0.lock() {
            *g = Some(error.to_string());
        }
    }

    fn boxed_clone(&self) -> Box<dyn bb8::ErrorSink<E>> {
        Box::new(self.clone())
    }
}
