//! Training progress: a progress bar over epochs on a terminal, one line per epoch elsewhere.

/// A progress bar over `epochs` on a terminal; one line per epoch elsewhere (CI, logs).
pub fn epoch_progress(epochs: usize) -> (indicatif::ProgressBar, impl FnMut(usize, &crate::docid::train::LossTerms)) {
    let progress = indicatif::ProgressBar::new(epochs as u64);
    progress.set_style(
        indicatif::ProgressStyle::with_template("{elapsed_precise} [{bar:30}] epoch {pos}/{len} (eta {eta}) {msg}")
            .expect("a valid progress template")
            .progress_chars("=> "),
    );
    let bar = progress.clone();
    let on_epoch = move |epoch: usize, terms: &crate::docid::train::LossTerms| {
        let line = format!(
            "total {:.4}  recon {:.4}  rq {:.4}  align {:.4}  rel {:.4}",
            terms.total, terms.reconstruction, terms.rq, terms.align, terms.relevance
        );
        bar.inc(1);
        if bar.is_hidden() {
            eprintln!("epoch {:>4}: {line}", epoch + 1);
        } else {
            bar.set_message(line);
        }
    };
    (progress, on_epoch)
}
