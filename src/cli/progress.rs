//! Byte-progress bars on stderr (drawn only on a terminal), shared by the verbs that
//! copy or re-encrypt volumes; the controller reports progress through callbacks and never
//! draws itself.

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

/// A byte-progress bar with `template` (indicatif syntax, e.g. `{bar:40} {bytes}`).
pub(crate) struct ByteBar(ProgressBar);

impl ByteBar {
    /// A hidden-until-updated bar on stderr.
    pub(crate) fn new(template: &'static str) -> Self {
        let bar = ProgressBar::with_draw_target(Some(0), ProgressDrawTarget::stderr());
        bar.set_style(ProgressStyle::with_template(template).expect("static template"));
        Self(bar)
    }

    /// Sets the message shown by `{msg}`.
    pub(crate) fn message(&self, msg: &str) {
        self.0.set_message(msg.to_string());
    }

    /// `done` of `total` bytes.
    pub(crate) fn update(&self, done: u64, total: u64) {
        self.0.set_length(total);
        self.0.set_position(done);
    }

    /// Removes the bar.
    pub(crate) fn finish(&self) {
        self.0.finish_and_clear();
    }
}
