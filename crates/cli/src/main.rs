//! The `ramole` command line: a thin layer of argument parsing and printing over ramole-core.
//! Errors go to stderr with a non-zero exit status; `--json` prints exactly one JSON object.
//!
//! One file per group of commands; they share `common` and never import each other: this file
//! parses and dispatches.

mod bench;
mod chat;
mod common;
mod eval;
mod generate;
mod hub;
mod library;
mod retriever;
mod router;
mod train;

use std::process::ExitCode;

use anyhow::Result;
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "ramole",
    version,
    about = "Chat with a local model that mixes LoRA experts"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Generate a continuation (or, with --chat, an assistant reply).
    Generate(generate::GenerateArgs),
    /// Print the next-token logits after a prompt.
    Logits(generate::LogitsArgs),
    /// Record the active base model and embedder in $RAMOLE_HOME.
    Init(library::InitArgs),
    /// Installed adapters: add, list, show, enable, disable, remove.
    #[command(subcommand)]
    Adapter(AdapterCommand),
    /// The Hugging Face Hub: search adapters for a base, inspect a repository.
    #[command(subcommand)]
    Hub(hub::HubCommand),
    /// Base models and embedders from the Hub.
    #[command(subcommand)]
    Model(hub::ModelCommand),
    /// The adapters retrieval picks for a message, with scores and gates.
    Retrieve(library::RetrieveArgs),
    /// Answer a message with retrieved adapters and store the exchange with its provenance.
    Chat(chat::ChatArgs),
    /// A local OpenAI-compatible API (chat completions, models) over the library's base.
    Serve(chat::ServeArgs),
    /// Stored chat sessions and the provenance of their replies.
    #[command(subcommand)]
    Session(library::SessionCommand),
    /// The chat defaults and retrieval settings of $RAMOLE_HOME: show them, or change some.
    Settings(library::SettingsArgs),
    /// The RouterLoRA of the active base: train, add, show, remove.
    #[command(subcommand)]
    Router(router::RouterCommand),
    /// Fine-tune the retriever's sentence encoder (contrastive, on tasks' profile samples).
    #[command(subcommand)]
    Retriever(retriever::RetrieverCommand),
    /// The active sentence encoder: switch it (adapters re-embedded, index rebuilt).
    #[command(subcommand)]
    Embedder(retriever::EmbedderCommand),
    /// Evaluations on the paper's benchmark data.
    #[command(subcommand)]
    Eval(eval::EvalCommand),
    /// Benchmarks, printed as a table or JSON.
    #[command(subcommand)]
    Bench(bench::BenchCommand),
}

/// `ramole adapter ...`: the library's own commands, plus installing from the Hub and training.
#[derive(Subcommand)]
enum AdapterCommand {
    #[command(flatten)]
    Library(library::AdapterCommand),
    /// Install an adapter from the Hugging Face Hub: `org/name[@revision]`.
    Install(hub::InstallArgs),
    /// Train a new LoRA adapter from examples (JSON lines with input and target).
    Train(train::TrainArgs),
    /// Update Hub adapters to the newest commit of their revision (`--check`: only report).
    Update(hub::UpdateArgs),
}

fn main() -> ExitCode {
    // SAFETY: first statement of main; no other thread exists yet.
    unsafe { ramole_core::config::pin_thread_count() };
    let cli = Cli::parse();
    let result: Result<()> = match cli.command {
        Command::Generate(a) => generate::run_generate(a),
        Command::Logits(a) => generate::run_logits(a),
        Command::Init(a) => library::run_init(a),
        Command::Adapter(AdapterCommand::Library(c)) => library::run_adapter(c),
        Command::Adapter(AdapterCommand::Install(a)) => hub::run_install(a),
        Command::Adapter(AdapterCommand::Train(a)) => train::run_train(a),
        Command::Adapter(AdapterCommand::Update(a)) => hub::run_update(a),
        Command::Hub(c) => hub::run_hub(c),
        Command::Model(c) => hub::run_model(c),
        Command::Retrieve(a) => library::run_retrieve(a),
        Command::Chat(a) => chat::run_chat(a),
        Command::Serve(a) => chat::run_serve(a),
        Command::Session(c) => library::run_session(c),
        Command::Settings(a) => library::run_settings(a),
        Command::Router(c) => router::run_router(c),
        Command::Retriever(c) => retriever::run_retriever(c),
        Command::Embedder(c) => retriever::run_embedder(c),
        Command::Eval(c) => eval::run_eval(c),
        Command::Bench(b) => bench::run(b),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {}", error_chain(&e));
            ExitCode::FAILURE
        }
    }
}

/// The error and its causes joined by `: `, skipping a cause whose text the message before it
/// already includes (our errors print their source inline).
fn error_chain(e: &anyhow::Error) -> String {
    let mut out = String::new();
    for cause in e.chain() {
        let text = cause.to_string();
        if !out.contains(&text) {
            if !out.is_empty() {
                out.push_str(": ");
            }
            out.push_str(&text);
        }
    }
    out
}
