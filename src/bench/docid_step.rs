//! `merge-indexer bench docid-step`: one MERGE training step at the PyTorch reference's shapes,
//! and the reference itself on the same machine right after, with the ratio.

use anyhow::Context;
use clap::Args;

/// `bench docid-step` flags.
#[derive(Debug, Args, Clone)]
pub struct DocidStepBenchArgs {
    /// Anchors per batch (rows = 4 × anchors), as `merge_step_torch.py --batch`.
    #[arg(long, default_value_t = 2048)]
    pub anchors: usize,
    /// Input embedding width, as `--dim`.
    #[arg(long, default_value_t = 384)]
    pub dim: usize,
    /// Untimed warm-up steps (on the GPU: ≥ 100, kernels compile during the first ones).
    #[arg(long, default_value_t = 3)]
    pub warm_up: usize,
    /// Timed steps.
    #[arg(long, default_value_t = 10)]
    pub steps: usize,
    /// Also run the PyTorch reference step (this path to `merge_step_torch.py`) in the same run.
    #[arg(long)]
    pub torch_reference: Option<std::path::PathBuf>,
    /// Python interpreter (with torch) for the reference.
    #[arg(long, default_value = "python3")]
    pub python: String,
}

/// Times our MERGE training step at `merge_step_torch.py`'s shapes and, when asked, runs the
/// PyTorch reference on the same machine right after; prints both and their ratio.
pub fn docid_step_benchmark(arguments: &DocidStepBenchArgs) -> anyhow::Result<()> {
    use merge_indexer::docid::model::RqVaeConfig;
    use merge_indexer::docid::train::{time_steps, DocIdTrainingConfig};
    let config = DocIdTrainingConfig::new(RqVaeConfig::new(arguments.dim));
    let device = burn::tensor::Device::<merge_indexer::encoder::InferenceBackend>::default();
    let mut timings = time_steps::<burn::backend::Autodiff<merge_indexer::encoder::InferenceBackend>>(&config, arguments.anchors, arguments.warm_up, arguments.steps.max(1), &device);
    timings.sort_by(f64::total_cmp);
    let median_ms = timings[timings.len() / 2] * 1e3;
    println!(
        "burn merge_step batch={} rows={} dim={} backend={}: {median_ms:.3} ms/step (median of {})",
        arguments.anchors,
        4 * arguments.anchors,
        arguments.dim,
        merge_indexer::BACKEND_NAME,
        timings.len()
    );
    let mut torch_ms = None;
    if let Some(script) = &arguments.torch_reference {
        let device_flag = if merge_indexer::BACKEND_NAME == "cuda" { "cuda" } else { "cpu" };
        let output = std::process::Command::new(&arguments.python)
            .arg(script)
            .args(["--device", device_flag, "--dim", &arguments.dim.to_string(), "--batch", &arguments.anchors.to_string()])
            .args(["--steps", &(arguments.warm_up + arguments.steps.max(1)).to_string()])
            .output()
            .with_context(|| format!("running {} {}", arguments.python, script.display()))?;
        let text = String::from_utf8_lossy(&output.stdout).into_owned();
        anyhow::ensure!(output.status.success(), "reference failed: {}{}", text, String::from_utf8_lossy(&output.stderr));
        print!("{text}");
        torch_ms = text.split("ms/step").next().and_then(|head| head.rsplit(' ').nth(1)).and_then(|number| number.parse::<f64>().ok());
        if let Some(torch_ms) = torch_ms {
            println!("ratio burn / torch: {:.2}", median_ms / torch_ms);
        }
    }
    println!("{}", serde_json::json!({ "burn_ms_per_step": median_ms, "torch_ms_per_step": torch_ms, "anchors": arguments.anchors, "dim": arguments.dim, "backend": merge_indexer::BACKEND_NAME }));
    Ok(())
}
