//! `tern`: the command-line front end.

mod args;
mod bench;
mod bench_serve;
mod bench_spec;
mod eval;
mod generate;
mod pull;
mod quantize;
mod registry;
mod serve;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "tern", version, about = "An efficient LLM inference engine")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Download known models into the cache ($TERN_HOME, default ~/.cache/tern); prints their paths.
    Pull {
        /// Model keys (see `tern models`).
        #[arg(required = true)]
        keys: Vec<String>,
    },
    /// List known models and whether they are pulled.
    Models,
    /// Generate a completion for one prompt.
    Generate(generate::GenerateArgs),
    /// Chat interactively (streams tokens; /reset clears the conversation, /exit quits).
    Chat(generate::ChatArgs),
    /// Print the token ids of a text as JSON.
    Tokenize {
        #[command(flatten)]
        model: args::ModelArgs,
        /// Do not add BOS even when the model asks for it.
        #[arg(long)]
        no_special: bool,
        text: String,
    },
    /// Write a model's tokenizer as tokenizer.json + tokenizer_config.json into a directory
    /// (usable with --tokenizer, e.g. to serve dummy weights where the model file cannot go).
    ExportTokenizer {
        #[command(flatten)]
        model: args::ModelArgs,
        /// Directory to write (created if missing).
        dir: std::path::PathBuf,
    },
    /// Measure prefill and decode speed and peak memory.
    Bench(bench::BenchArgs),
    /// Serve the model over an OpenAI-compatible HTTP API (completions, chat, tokenize, metrics).
    Serve(serve::ServeArgs),
    /// Write a quantized copy of a GGUF model (int8, int4 RTN/GPTQ/AWQ; f32/f16 baselines).
    Quantize(quantize::QuantizeArgs),
    /// Measure model quality (perplexity).
    #[command(subcommand)]
    Eval(eval::EvalCommand),
}

fn main() {
    if let Err(e) = run(Cli::parse()) {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}

fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Pull { keys } => {
            for key in keys {
                let known =
                    registry::find(&key).with_context(|| format!("unknown model key {key:?}; see `tern models`"))?;
                println!("{}", pull::ensure(known, false)?.display());
            }
            Ok(())
        }
        Command::Models => {
            println!("{:<14} {:>9}  {:<8} description", "key", "size", "pulled");
            for m in registry::KNOWN_MODELS {
                let pulled = registry::model_path(m.key).is_ok_and(|p| p.is_file());
                println!(
                    "{:<14} {:>6} MB  {:<8} {}",
                    m.key,
                    m.size / 1_000_000,
                    if pulled { "yes" } else { "no" },
                    m.description
                );
            }
            println!("cache: {}", registry::tern_home()?.join("models").display());
            Ok(())
        }
        Command::Generate(a) => generate::run_generate(a),
        Command::Chat(a) => generate::run_chat(a),
        Command::Tokenize { model, no_special, text } => {
            let tok = model.tokenizer()?.context("this model has no tokenizer (see --tokenizer)")?;
            let ids = tok.encode(&text, !no_special)?;
            println!("{}", serde_json::to_string(&ids)?);
            Ok(())
        }
        Command::ExportTokenizer { model, dir } => {
            let tok = model.tokenizer()?.context("this model has no tokenizer")?;
            std::fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
            tok.save_hf_dir(&dir)?;
            println!("{}", dir.display());
            Ok(())
        }
        Command::Bench(a) => bench::run(a),
        Command::Serve(a) => serve::run(a),
        Command::Eval(c) => eval::run(c),
        Command::Quantize(a) => quantize::run(a),
    }
}
