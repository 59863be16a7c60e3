//! `llm-sim` binary: parses flags, sets up logging, then serves (or
//! supervises a server child with `--supervise`).

use clap::Parser;
use tokentap_llm_sim::config::Args;
use tracing_subscriber::EnvFilter;

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let filter = EnvFilter::try_from_env("LLM_SIM_LOG").unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    if args.log_json {
        builder.json().init();
    } else {
        builder.init();
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    if args.supervise {
        runtime.block_on(tokentap_llm_sim::supervisor::run(args))?;
    } else {
        runtime.block_on(tokentap_llm_sim::server::serve(args))?;
    }
    Ok(())
}
