//! `merge-indexer demo`: flags of the demo, which the library runs (`service::demo`).

use clap::Args;
use merge_indexer::service::demo::DemoOptions;

use super::CommonArgs;

/// `demo` flags.
#[derive(Debug, Args)]
pub struct DemoArgs {
    /// Flags shared with the other indexing commands.
    #[command(flatten)]
    pub common: CommonArgs,
    /// What the demo produces and trains.
    #[command(flatten)]
    pub options: DemoOptions,
}
