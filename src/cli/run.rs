//! `merge-indexer run`: the streaming indexer until Ctrl-C/SIGTERM (or caught up).

use clap::Args;

use merge_indexer::config::Config;

use super::CommonArgs;

/// `run` flags.
#[derive(Debug, Args)]
pub struct RunArgs {
    /// Flags shared with the other indexing commands.
    #[command(flatten)]
    pub common: CommonArgs,
    /// Exit once every assigned partition is caught up, instead of running until interrupted.
    #[arg(long)]
    pub until_caught_up: bool,
}

pub(super) async fn run_command(config: Config, until_caught_up: bool) -> anyhow::Result<()> {
    merge_indexer::service::run_indexer(config, until_caught_up).await
}
