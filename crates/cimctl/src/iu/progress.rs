//! The progress bar of `cimctl iu` uploads and downloads: on stderr only when it is a
//! terminal, labelled from its first frame, and never wider than 80 columns.

use std::io::IsTerminal;

use cim_iu_client::Progress;
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

/// With a known size. Every field at its widest — "download", "1023.99 GiB" twice,
/// "1023.99 GiB/s", an eta such as "52w" — adds up to 78 columns.
const SIZED: &str = "{msg:8} [{bar:20}] {bytes}/{total_bytes} {binary_bytes_per_sec} eta {eta}";
/// Before the size is known, or when it never is.
const UNSIZED: &str = "{msg:8} {spinner} {bytes} {binary_bytes_per_sec}";

/// A progress bar on stderr when it is a terminal; nothing otherwise.
pub struct Bar(Option<ProgressBar>);

impl Bar {
    pub fn new(label: &str) -> Bar {
        if !std::io::stderr().is_terminal() {
            return Bar(None);
        }
        Bar::on(ProgressDrawTarget::stderr(), label)
    }

    /// A bar drawn on `target`, already labelled (the first frame says what it counts).
    fn on(target: ProgressDrawTarget, label: &str) -> Bar {
        let bar = ProgressBar::with_draw_target(None, target);
        set_style(&bar, UNSIZED);
        bar.set_message(label.to_string());
        Bar(Some(bar))
    }
}

fn set_style(bar: &ProgressBar, template: &str) {
    if let Ok(style) = ProgressStyle::with_template(template) {
        bar.set_style(style.progress_chars("=> "));
    }
}

impl Progress for Bar {
    fn start(&mut self, total: Option<u64>) {
        let Some(bar) = &self.0 else { return };
        match total {
            Some(t) => {
                bar.set_length(t);
                set_style(bar, SIZED);
            }
            None => set_style(bar, UNSIZED),
        }
    }
    fn update(&mut self, done: u64) {
        if let Some(bar) = &self.0 {
            bar.set_position(done);
        }
    }
    fn finish(&mut self) {
        if let Some(bar) = &self.0 {
            bar.finish_and_clear();
        }
    }
}

impl Drop for Bar {
    fn drop(&mut self) {
        if let Some(bar) = &self.0 {
            bar.finish_and_clear();
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use indicatif::TermLike;

    use super::*;

    /// A terminal wider than 80 columns that keeps every line drawn on it, so a line longer
    /// than 80 columns shows as it is.
    #[derive(Clone, Debug, Default)]
    struct Screen(Arc<Mutex<Vec<String>>>);

    impl TermLike for Screen {
        fn width(&self) -> u16 {
            200
        }
        fn move_cursor_up(&self, _: usize) -> std::io::Result<()> {
            Ok(())
        }
        fn move_cursor_down(&self, _: usize) -> std::io::Result<()> {
            Ok(())
        }
        fn move_cursor_right(&self, _: usize) -> std::io::Result<()> {
            Ok(())
        }
        fn move_cursor_left(&self, _: usize) -> std::io::Result<()> {
            Ok(())
        }
        fn write_line(&self, s: &str) -> std::io::Result<()> {
            self.write_str(s)
        }
        fn write_str(&self, s: &str) -> std::io::Result<()> {
            let s = s.trim_matches(['\r', '\n']).trim_end();
            if !s.is_empty() {
                self.0.lock().unwrap().push(s.to_string());
            }
            Ok(())
        }
        fn clear_line(&self) -> std::io::Result<()> {
            Ok(())
        }
        fn flush(&self) -> std::io::Result<()> {
            Ok(())
        }
    }

    fn frames(screen: &Screen) -> Vec<String> {
        screen.0.lock().unwrap().clone()
    }

    #[test]
    fn the_first_frame_is_labelled() {
        let screen = Screen::default();
        let bar = Bar::on(ProgressDrawTarget::term_like(Box::new(screen.clone())), "upload");
        bar.0.as_ref().unwrap().abandon();
        let drawn = frames(&screen);
        assert!(drawn.last().is_some_and(|l| l.starts_with("upload")), "{drawn:?}");
    }

    #[test]
    fn a_large_transfer_fits_80_columns() {
        let screen = Screen::default();
        let mut bar = Bar::on(ProgressDrawTarget::term_like(Box::new(screen.clone())), "download");
        let total = 1023 * (1 << 30) + 1013 * (1 << 20);
        bar.start(Some(total));
        bar.update(total - 1);
        bar.0.as_ref().unwrap().abandon();
        let drawn = frames(&screen);
        let last = drawn.last().cloned().unwrap_or_default();
        assert!(last.starts_with("download [") && last.contains("GiB/1023.99 GiB"), "{drawn:?}");
        for line in &drawn {
            assert!(line.chars().count() <= 80, "{} columns: {line:?}", line.chars().count());
        }
    }
}
