//! `merge-indexer demo`: flags of the demo, which the library runs (`service::demo`).

use clap::Args;

use super::CommonArgs;

/// `demo` flags.
#[derive(Debug, Args)]
pub struct DemoArgs {
    /// Flags shared with the other indexing commands.
    #[command(flatten)]
    pub common: CommonArgs,
    /// Products in the synthetic catalog.
    #[arg(long, default_value_t = 2_000)]
    pub products: usize,
    /// Queries in the synthetic catalog.
    #[arg(long, default_value_t = 300)]
    pub queries: usize,
    /// Seed of the synthetic catalog.
    #[arg(long, default_value_t = 42)]
    pub seed: u64,
    /// Epochs of the DocID model trained on the indexed catalog (0: no DocID training; an
    /// existing model in the state's model directory is used instead, if any).
    #[arg(long, default_value_t = 20)]
    pub docid_epochs: usize,
    /// Products of a second wave produced after DocID training, which get DocIDs incrementally.
    #[arg(long, default_value_t = 50)]
    pub new_products: usize,
    /// Keep indexing (and serving /metrics) after the summary until interrupted.
    #[arg(long)]
    pub keep_running: bool,
}

impl DemoArgs {
    /// The library's demo options from these flags.
    pub(super) fn options(&self) -> merge_indexer::service::demo::DemoOptions {
        merge_indexer::service::demo::DemoOptions {
            products: self.products,
            queries: self.queries,
            seed: self.seed,
            docid_epochs: self.docid_epochs,
            new_products: self.new_products,
            keep_running: self.keep_running,
        }
    }
}
