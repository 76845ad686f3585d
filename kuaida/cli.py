"""The `kuaida` command line: a table of typed functions (typer); each option's help is its doc."""
from __future__ import annotations

import functools
import logging
import sys
from pathlib import Path
from typing import Callable, Optional

import typer
from rich.console import Console
from rich.logging import RichHandler

from kuaida.errors import KuaidaError
from kuaida.knowledge.cli import kb_app

app = typer.Typer(help="kuaida (快答): make generative dialogue models answer fast.",
                  no_args_is_help=True, pretty_exceptions_enable=False, add_completion=False)
err = Console(stderr=True)

MODEL_HELP = "'default' (SmolLM2-135M-Instruct, shipped offline), a Hugging Face model directory, or a .gguf file."
DTYPE_HELP = "Weight precision: fp32, bf16, int8 or int4 (int8/int4 use kuaida's AVX2 kernels)."


def user_errors(fn: Callable) -> Callable:
    """Print errors a user can cause as one line and exit 2, never a stack trace."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except KuaidaError as e:
            err.print(f"[bold red]error:[/] {e}", highlight=False)
            raise typer.Exit(2)
        except KeyboardInterrupt:
            err.print("interrupted")
            raise typer.Exit(130)
    return wrapper


@app.callback()
def main(verbose: bool = typer.Option(False, "--verbose", "-v", help="Log what kuaida does (INFO level).")):
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, format="%(message)s",
                        handlers=[RichHandler(console=err, show_path=False)])


@app.command()
@user_errors
def info(model: str = typer.Argument("default", help=MODEL_HELP)):
    """Describe a model without loading its weights: format, architecture, backend, size."""
    from kuaida.model.loader import describe

    for key, value in describe(model).items():
        typer.echo(f"{key:>16}: {value}")


@app.command()
@user_errors
def chat(
    model: str = typer.Argument("default", help=MODEL_HELP),
    dtype: str = typer.Option("int8", help=DTYPE_HELP),
    system: Optional[str] = typer.Option(None, help="System prompt (persona) for the conversation."),
    max_new_tokens: int = typer.Option(256, help="Longest reply, in tokens."),
    temperature: float = typer.Option(0.7, help="Sampling temperature; 0 = greedy (deterministic)."),
    top_p: float = typer.Option(1.0, help="Nucleus sampling: keep the smallest token set of this probability."),
    top_k: int = typer.Option(0, help="Keep only the k most likely tokens (0 = off)."),
    repetition_penalty: float = typer.Option(1.0, help="Penalize tokens already seen (1.0 = off)."),
    seed: Optional[int] = typer.Option(None, help="Random seed for reproducible sampling."),
    max_context: Optional[int] = typer.Option(None, help="KV-cache length in tokens (default: the model's)."),
):
    """Chat in the terminal: streaming replies, multi-turn history, /reset, /system TEXT, /quit.

    When stdin is not a terminal, each input line is one user turn and each reply is printed on stdout
    (speed figures go to stderr), so a conversation can be scripted.
    """
    from kuaida.bot import load
    from kuaida.chat_repl import ChatSession
    from kuaida.engine.sampling import SamplingParams

    sampling = dict(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, top_k=top_k,
                    repetition_penalty=repetition_penalty, seed=seed)
    SamplingParams(**sampling)  # validate before the (slow) model load
    with err.status(f"loading {model} ({dtype}) ..."):
        bot = load(model, dtype=dtype, max_context=max_context)
    ChatSession(bot, sampling, system, interactive=sys.stdin.isatty(), console=err).run(sys.stdin)


@app.command()
@user_errors
def serve(
    model: str = typer.Argument("default", help=MODEL_HELP),
    host: str = typer.Option("127.0.0.1", help="Address to listen on (0.0.0.0 exposes it: set an API key)."),
    port: int = typer.Option(8000, help="Port to listen on (0 = any free port)."),
    api_key: Optional[str] = typer.Option(None, envvar="KUAIDA_API_KEY",
                                          help="Require 'Authorization: Bearer KEY' on /v1 routes; "
                                               "KEY1,KEY2 for several users (each sees only its sessions)."),
    dtype: str = typer.Option("int8", help=DTYPE_HELP),
    max_batch: int = typer.Option(8, help="Replies decoded together in one batch."),
    max_context: int = typer.Option(4096, help="Context per conversation, in tokens (capped by the model's)."),
    cache_mb: int = typer.Option(2048, help="KV-cache memory: more keeps more conversations cached."),
    max_queue: int = typer.Option(64, help="Requests that may wait for a batch slot; beyond: HTTP 429."),
    db: Optional[Path] = typer.Option(None, help="Session database (default: $KUAIDA_CACHE or "
                                                 "~/.cache/kuaida, file sessions.db)."),
    prefix_cache: bool = typer.Option(True, help="Reuse each conversation's cached KV prefix; "
                                      "--no-prefix-cache prefills every prompt whole (a baseline)."),
    kb: list[str] = typer.Option([], help="Knowledge base to open at start-up (repeatable); requests name "
                                 "a base in their 'knowledge' field. Bases live in --kb-dir."),
    kb_dir: Optional[Path] = typer.Option(None, help="Where knowledge bases are (default: $KUAIDA_KB_DIR or "
                                                     "~/.local/share/kuaida/kb)."),
    passage_cache_mb: int = typer.Option(0, help="Memory for knowledge-base passages encoded once and reused "
                                         "wherever they recur (block attention: faster grounded replies, "
                                         "fewer of them use the passages; see benchmarks/results/kb.md); "
                                         "0: prefill passages in place (full attention)."),
    prompt_lookup: bool = typer.Option(True, help="Greedy replies (temperature 0) verify tokens drafted "
                                       "from their prompt in the decode step's spare rows: the same "
                                       "replies, faster where they quote the prompt (grounded answers)."),
    prefill_next_turn: bool = typer.Option(True, help="While idle, write the chat template's tokens that "
                                           "follow a finished reply (<|im_end|>, the next user header) into "
                                           "its conversation's cache: the next turn prefills only its "
                                           "message."),
):
    """OpenAI-compatible server: /v1/chat/completions, /v1/models, /v1/sessions, /metrics, web chat at /.

    Stops gracefully on Ctrl-C / SIGTERM: in-flight replies get a few seconds to finish.
    """
    from kuaida.bot import load_weights
    from kuaida.serve import ServerConfig, create_app, run_server

    config = ServerConfig(model=model, host=host, port=port, api_key=api_key, dtype=dtype, max_batch=max_batch,
                          max_context=max_context, cache_mb=cache_mb, max_queue=max_queue, db=db,
                          prefix_cache=prefix_cache, kb_dir=kb_dir, knowledge_bases=tuple(kb),
                          passage_cache_mb=passage_cache_mb, prompt_lookup=prompt_lookup,
                          prefill_next_turn=prefill_next_turn)
    from kuaida import kernels

    with err.status(f"loading {model} ({dtype}) ..."):
        loaded = load_weights(model, dtype)
        server_app = create_app(config, loaded)
    head_dim = getattr(getattr(loaded.model, "args", None), "head_dim", 64)  # a transformers model: no args
    paths = kernels.describe(head_dim)
    run_server(server_app, on_ready=lambda url: typer.echo(
        f"kuaida serving {config.model_id} at {url} (web chat at /, API at /v1); {paths}"))


app.add_typer(kb_app, name="kb", help=kb_app.info.help)

bench_app = typer.Typer(help="Benchmarks against transformers and llama.cpp; results as JSON + Markdown.",
                        pretty_exceptions_enable=False, add_completion=False)
app.add_typer(bench_app, name="bench")


@bench_app.callback(invoke_without_command=True)
def bench(ctx: typer.Context):
    """Benchmarks. Without a subcommand: `latency` with its defaults."""
    if ctx.invoked_subcommand is None:
        # Parse an empty command line for `latency`: its options take their declared defaults.
        command = ctx.command.get_command(ctx, "latency")
        with command.make_context("latency", [], parent=ctx) as sub:
            command.invoke(sub)


@bench_app.command()
@user_errors
def latency(
    model: str = typer.Option("default", help=MODEL_HELP),
    variants: str = typer.Option("all", help="Comma list of hf, fp32, bf16, int8, int4, llamacpp, or 'all'."),
    prompts: int = typer.Option(8, help="Dialogue prompts to time (after one warm-up)."),
    new_tokens: int = typer.Option(64, help="Tokens each variant decodes per prompt (end of turn ignored)."),
    json_path: Optional[Path] = typer.Option(None, "--json", help="Write the full report as JSON here."),
    md_path: Optional[Path] = typer.Option(None, "--md", help="Write the table as Markdown here."),
):
    """Time to first token, decode tok/s, peak RSS and agreement with fp32, per variant.

    Each variant runs in its own process with 2 threads, on the same dialogue prompts. Takes minutes
    (transformers decodes at ~8 tok/s).
    """
    from kuaida.bench.latency import COLUMNS, TITLE, parse_variants, run_latency
    from kuaida.bench.report import rich_table, write_json, write_markdown

    chosen = parse_variants(variants)
    with err.status("benchmarking ...") as status:
        report = run_latency(model, chosen, prompts, new_tokens,
                             progress=lambda step: status.update(f"benchmarking {step} ..."))
    # Piped output is not wrapped to 80 columns: the table needs ~130.
    Console(width=None if sys.stdout.isatty() else 160).print(rich_table(report, COLUMNS, TITLE))
    if json_path:
        write_json(report, json_path)
    if md_path:
        write_markdown(report, COLUMNS, md_path, TITLE)


@bench_app.command()
@user_errors
def load(
    url: Optional[str] = typer.Option(None, help="A running OpenAI-compatible server, e.g. "
                                      "http://127.0.0.1:8000 (default: start `kuaida serve` on a free port, "
                                      "and stop it after)."),
    model: str = typer.Option("default", help=MODEL_HELP),
    dtype: str = typer.Option("int8", help=DTYPE_HELP),
    clients: str = typer.Option("1,2,4,8,16", help="Concurrency levels: a comma list of client counts."),
    turns: int = typer.Option(10, help="Turns per conversation (each resends the growing history)."),
    reply_tokens: int = typer.Option(64, help="max_tokens of each reply."),
    think_s: float = typer.Option(0.0, "--think-s", help="Seconds the turn curve's user takes to read a "
                                  "reply and type the next turn (0: at once, as a script would; the "
                                  "concurrency levels always send at once)."),
    type_ahead: bool = typer.Option(False, "--type-ahead", help="The turn curve's user also sends drafts of "
                                    "the message while typing it (POST /v1/chat/drafts, as the web chat "
                                    "does), which the server writes ahead. Needs --think-s 0.5 or more."),
    curve_runs: int = typer.Option(2, help="Conversations run one at a time for the TTFT-by-turn curve."),
    peers: bool = typer.Option(True, help="Also load llama.cpp's server (when llama-cpp-python[server] is "
                               "installed and the model is a GGUF)."),
    api_key: Optional[str] = typer.Option(None, help="Bearer key for --url."),
    seed: int = typer.Option(0, help="Picks the chitchat conversations."),
    without_lookup: bool = typer.Option(True, help="Also sweep the clients on a server with prompt lookup "
                                        "off: continuous batching alone (lookup fills one stream's spare "
                                        "batch rows with drafts, so with it on, N clients against one "
                                        "measures both). Not with --url."),
    json_path: Optional[Path] = typer.Option(None, "--json", help="Write the full report as JSON here."),
    md_path: Optional[Path] = typer.Option(None, "--md", help="Write the tables as Markdown here."),
    png_path: Optional[Path] = typer.Option(None, "--png", help="Plot TTFT by turn and tok/s by clients here "
                                            "(needs matplotlib)."),
):
    """Concurrent multi-turn chat clients over HTTP: TTFT p50/p95, output tok/s and errors per
    concurrency, and time to first token by turn with prefix reuse on and off.

    Servers run on 127.0.0.1 with 2 threads; every request is bounded (count and timeout). Takes
    several minutes on the default model.
    """
    from kuaida.bench.load import (COLUMNS, TITLE, LoadSettings, load_markdown, parse_clients, plot_load,
                                   run_load)
    from kuaida.bench.report import rich_table, write_json

    levels = parse_clients(clients)
    settings = LoadSettings(turns=turns, reply_tokens=reply_tokens, think_s=think_s, type_ahead=type_ahead)
    with err.status("benchmarking ...") as status:
        report = run_load(url, model, dtype, levels, settings, curve_runs, peers, api_key, seed,
                          progress=lambda step: status.update(f"benchmarking {step} ..."),
                          without_lookup=without_lookup)
    # Piped output is not wrapped to 80 columns: the table needs ~130.
    Console(width=None if sys.stdout.isatty() else 160).print(rich_table(report, COLUMNS, TITLE))
    for key, target in report["targets"].items():
        err.print(f"{key}: {target['value']} (target {target['target']}; met: {target['met']})",
                  highlight=False)
    if json_path:
        write_json(report, json_path)
    if md_path:
        md_path.parent.mkdir(parents=True, exist_ok=True)
        md_path.write_text(load_markdown(report))
    if png_path:
        plot_load(report, png_path)


@bench_app.command("kb")
@user_errors
def bench_kb(
    model: Optional[list[str]] = typer.Option(None, "--model", help=MODEL_HELP + " Repeat to compare models "
                                              "(default: default)."),
    dtype: str = typer.Option("int8", help=DTYPE_HELP),
    k: int = typer.Option(3, "--k", help="Passages retrieved into a grounded prompt."),
    questions: Optional[int] = typer.Option(None, help="Only the first N sample questions (a quick run)."),
    scale_chunks: int = typer.Option(10_000, help="Grow the base to this many chunks for the scale test "
                                     "(perturbed copies of the sample, really ingested); 0 skips it."),
    max_new_tokens: int = typer.Option(96, help="Longest reply, in tokens (greedy)."),
    conversations: int = typer.Option(5, help="3-turn conversations timed for TTFT with and without retrieval."),
    json_path: Optional[Path] = typer.Option(None, "--json", help="Write the full report as JSON here."),
    md_path: Optional[Path] = typer.Option(None, "--md", help="Write the tables as Markdown here."),
):
    """Knowledge base on the shipped sample (a smart-home hub's manual and FAQ): ingest chunks/s, retrieval
    recall@1/3/5 per search mode, search latency at scale, answers with and without the base, and time
    to first token with retrieval. Takes ~15 minutes on 2 cores with the defaults.
    """
    from kuaida.bench.kb import COLUMNS, TITLE, KbBenchConfig, kb_markdown, run_kb
    from kuaida.bench.report import rich_table, write_json

    config = KbBenchConfig(models=tuple(model or ["default"]), dtype=dtype, k=k, questions=questions,
                           scale_chunks=scale_chunks, max_new_tokens=max_new_tokens,
                           ttft_conversations=conversations)
    report = run_kb(config, progress=True)
    Console(width=None if sys.stdout.isatty() else 160).print(rich_table(report, COLUMNS, TITLE))
    for key, target in report["targets"].items():
        err.print(f"{key}: {target['value']} (target {target['target']}; met: {target['met']})",
                  highlight=False)
    if json_path:
        write_json(report, json_path)
    if md_path:
        md_path.parent.mkdir(parents=True, exist_ok=True)
        md_path.write_text(kb_markdown(report))


@app.command()
@user_errors
def finetune(
    model: str = typer.Argument(..., help=MODEL_HELP),
    out_dir: Path = typer.Argument(..., help="Where to save the fine-tuned model (a Hugging Face directory)."),
    data: str = typer.Option("chitchat", help="'chitchat' or a JSONL file of {\"messages\": [...]} (OpenAI format)."),
    method: str = typer.Option("full", help="full (every weight) or lora (low-rank adapters, merged at the end)."),
    budget: Optional[str] = typer.Option(None, help="Training time, e.g. 90s, 10m, 1h (default 10m unless --steps)."),
    steps: Optional[int] = typer.Option(None, help="Optimizer steps (instead of, or as well as, --budget)."),
    batch_size: int = typer.Option(8, help="Sequences per optimizer step, over all processes."),
    micro_batch: int = typer.Option(0, help="Sequences per forward pass and process (0: no accumulation)."),
    lr: float = typer.Option(2e-4, help="Peak learning rate (warmup, then cosine to a tenth)."),
    max_len: int = typer.Option(256, help="Tokens per conversation (whole early turns kept)."),
    lora_rank: int = typer.Option(8, help="LoRA rank (with --method lora)."),
    parallel: str = typer.Option("auto", help="auto, none, ddp, fsdp or hsdp (under torchrun; auto: ddp)."),
    resume: bool = typer.Option(True, help="Continue from OUT_DIR.checkpoints when a run was interrupted."),
    overwrite: bool = typer.Option(False, help="Replace a non-empty OUT_DIR."),
):
    """Fine-tune on conversations; prints held-out perplexity before and after. Multi-GPU:
    `torchrun --nproc_per_node 8 -m kuaida.cli finetune ...`."""
    from kuaida.train.data import DataConfig
    from kuaida.train.distributed import is_main
    from kuaida.train.finetune import FinetuneConfig, finetune_and_save
    from kuaida.train.loop import TrainConfig, parse_duration

    budget_s = parse_duration(budget) if budget else (None if steps else 600.0)
    cfg = FinetuneConfig(method=method, lora_rank=lora_rank, lora_alpha=2.0 * lora_rank,
                         data=DataConfig(source=data, max_len=max_len),
                         train=TrainConfig(lr=lr, batch_size=batch_size, micro_batch=micro_batch, steps=steps,
                                           budget_s=budget_s, resume=resume, parallel=parallel))
    report = finetune_and_save(model, out_dir, cfg, overwrite=overwrite)
    if is_main():
        before, after = report["perplexity_before"], report["perplexity_after"]
        typer.echo(f"held-out perplexity: {before['perplexity']:.3f} before, {after['perplexity']:.3f} after "
                   f"({report['steps']} steps, {report['seconds']:.0f} s, {report['tokens_per_s']:.0f} tok/s)")
        typer.echo(f"saved to {report['out_dir']}")


@app.command("distill")
@user_errors
def distill_cmd(
    teacher: str = typer.Argument(..., help=MODEL_HELP),
    student: str = typer.Argument(..., help="A model directory (e.g. from `kuaida prune`), 'layers:N' (the teacher "
                                  "with N evenly spaced blocks; layers:15 of 30 is every other one) or "
                                  "'gru:dim=256,layers=2[,hidden=H][,tie=0|1]' (a recurrent student whose "
                                  "embedding starts from the teacher's)."),
    out_dir: Path = typer.Argument(..., help="Where to save the student (a Hugging Face directory; a GRU: "
                                   "kuaida's own format, loadable by kuaida only)."),
    budget: Optional[str] = typer.Option(None, help="Training time, e.g. 90s, 10m, 1h (default 10m unless --steps)."),
    steps: Optional[int] = typer.Option(None, help="Optimizer steps (instead of, or as well as, --budget)."),
    temperature: float = typer.Option(2.0, help="Softens teacher and student distributions; the KL is scaled by T^2."),
    alpha: float = typer.Option(0.5, help="Weight of the cross-entropy on the data's replies; 1 - alpha weighs "
                                "the KL to the teacher (1 = plain fine-tuning, 0 = pure distillation)."),
    kind: str = typer.Option("forward", help="forward: KL(teacher || student), covers every teacher mode; "
                             "reverse: KL(student || teacher), concentrates on the teacher's likeliest ones."),
    ce_first: float = typer.Option(0.0, help="Share of the training (time or steps) spent on cross-entropy "
                                   "alone before distilling (the teacher is not run then). Measured on the "
                                   "default recipe: no gain at 10 minutes "
                                   "(benchmarks/results/kd-vs-ce-first.md)."),
    sequence_level: bool = typer.Option(False, "--sequence-level", help="Train on the teacher's own (greedy) "
                                        "replies instead of the data's (generated once, cached in a JSONL)."),
    reply_conversations: int = typer.Option(512, help="Conversations the teacher re-generates with "
                                            "--sequence-level (costly on a CPU: ~3 replies each)."),
    data: str = typer.Option("chitchat", help="'chitchat' or a JSONL file of {\"messages\": [...]} (OpenAI format)."),
    batch_size: int = typer.Option(8, help="Sequences per optimizer step, over all processes."),
    micro_batch: int = typer.Option(0, help="Sequences per forward pass and process (0: no accumulation)."),
    lr: float = typer.Option(2e-4, help="Peak learning rate (warmup, then cosine to a tenth). A freshly "
                             "pruned student recovers faster at 1e-3, the optimize recipe's rate "
                             "(benchmarks/results/kd-vs-ce-lr.md)."),
    max_len: int = typer.Option(256, help="Tokens per conversation (whole early turns kept)."),
    parallel: str = typer.Option("auto", help="auto, none, ddp, fsdp or hsdp (under torchrun; auto: ddp)."),
    resume: bool = typer.Option(True, help="Continue from OUT_DIR.checkpoints when a run was interrupted."),
    overwrite: bool = typer.Option(False, help="Replace a non-empty OUT_DIR."),
):
    """Distill TEACHER into STUDENT: loss = alpha * CE(data) + (1 - alpha) * T^2 * KL; prints held-out
    perplexity and top-1 agreement with the teacher before and after. Multi-GPU:
    `torchrun --nproc_per_node 8 -m kuaida.cli distill ...`."""
    from kuaida.train.data import DataConfig
    from kuaida.train.distill import DistillConfig, distill_and_save
    from kuaida.train.distributed import is_main
    from kuaida.train.loop import TrainConfig, parse_duration
    from kuaida.train.sequence_kd import ReplyConfig

    budget_s = parse_duration(budget) if budget else (None if steps else 600.0)
    cfg = DistillConfig(temperature=temperature, alpha=alpha, kind=kind, sequence_level=sequence_level,
                        ce_first=ce_first, replies=ReplyConfig(conversations=reply_conversations),
                        data=DataConfig(source=data, max_len=max_len),
                        train=TrainConfig(lr=lr, batch_size=batch_size, micro_batch=micro_batch, steps=steps,
                                          budget_s=budget_s, resume=resume, parallel=parallel))
    report = distill_and_save(teacher, student, out_dir, cfg, overwrite=overwrite)
    if is_main():
        before, after = report["before"], report["after"]
        typer.echo(f"held-out perplexity: {before['perplexity']['perplexity']:.3f} before, "
                   f"{after['perplexity']['perplexity']:.3f} after (teacher "
                   f"{report['teacher_perplexity']['perplexity']:.3f}); top-1 agreement with the teacher "
                   f"{before['agreement']['top1']:.3f} -> {after['agreement']['top1']:.3f}")
        typer.echo(f"{report['steps']} steps, {report['seconds']:.0f} s, {report['tokens_per_s']:.0f} tok/s; "
                   f"saved to {report['out_dir']}")


@app.command("prune")
@user_errors
def prune_cmd(
    model: str = typer.Argument(..., help=MODEL_HELP),
    out_dir: Path = typer.Argument(..., help="Where to write the pruned model (a Hugging Face directory)."),
    layers: Optional[int] = typer.Option(None, help="Blocks to keep (depth pruning; block 0 always stays)."),
    depth_method: str = typer.Option("block", help="block: drop the blocks that change their input least; "
                                     "window: the contiguous window that does (Gromov et al. 2024)."),
    intermediate_size: Optional[int] = typer.Option(None, help="MLP channels to keep per layer (multiple of 32)."),
    kv_heads: Optional[int] = typer.Option(None, help="KV groups (a KV head with its query heads) to keep per layer."),
    heads: Optional[int] = typer.Option(None, help="Query heads to keep per layer (default: kv-heads x group size)."),
    vocab_from: Optional[str] = typer.Option(None, help="Keep the output tokens that 'chitchat' or a JSONL of "
                                             "{\"messages\": [...]} uses (training split; + special and byte tokens)."),
    vocab_min_count: int = typer.Option(1, help="Occurrences a token needs to stay in the output vocabulary."),
    sparsity: float = typer.Option(0.0, help="Unstructured magnitude sparsity: zeros only, no CPU speed-up."),
    two_four: bool = typer.Option(False, "--two-four", help="2:4 sparsity: zeros only, no CPU speed-up."),
    calib_from: str = typer.Option("chitchat", help="Calibration conversations: 'chitchat' or a JSONL of "
                                   "{\"messages\": [...]} (training split)."),
    calib_samples: int = typer.Option(64, help="Calibration conversations for depth and width importance."),
    seed: int = typer.Option(0, help="Picks the calibration conversations."),
    overwrite: bool = typer.Option(False, help="Replace a non-empty OUT_DIR."),
):
    """Structured pruning: fewer blocks, narrower MLPs, fewer heads, a smaller output vocabulary; writes a
    Hugging Face directory (heal it with `kuaida distill` or `kuaida finetune`)."""
    from kuaida.compress.prune import PruneConfig, prune, report_table
    from kuaida.errors import UnsupportedModelError
    from kuaida.model import load_model
    from kuaida.model.save import save_model

    cfg = PruneConfig(n_layers=layers, depth_method=depth_method, intermediate_size=intermediate_size,
                      n_kv_heads=kv_heads, n_heads=heads, vocab_from=vocab_from, vocab_min_count=vocab_min_count,
                      sparsity=sparsity, two_four=two_four, calib_from=calib_from,
                      calib_samples=calib_samples, seed=seed)
    with err.status(f"loading {model} ..."):
        loaded = load_model(model)
    if loaded.backend != "native":
        raise UnsupportedModelError(f"{model} runs through transformers: kuaida prunes only its native "
                                    "architectures (llama, qwen2, mistral)")
    pruned, report = prune(loaded.model, loaded.tokenizer, cfg, progress=True)
    save_model(pruned, loaded.tokenizer, out_dir, overwrite=overwrite,
               extra={"history": [{"step": "prune", "source": model, **report}]})
    Console().print(report_table(report))
    typer.echo(f"saved to {out_dir}")


@app.command("quantize")
@user_errors
def quantize_cmd(
    model: str = typer.Argument(..., help=MODEL_HELP),
    out_dir: Path = typer.Argument(..., help="Where to write the quantized model (a directory kuaida loads)."),
    dtype: str = typer.Option("int8", help="int8, int4 (output layer int8) or bf16."),
    group_size: int = typer.Option(32, help="Weights per scale (a multiple of 32)."),
    eval_samples: int = typer.Option(200, help="Held-out chitchat conversations scored before and after "
                                     "(0: skip the perplexity)."),
    json_path: Optional[Path] = typer.Option(None, "--json", help="Write the report as JSON here."),
    overwrite: bool = typer.Option(False, help="Replace a non-empty OUT_DIR."),
):
    """Quantize with kuaida's kernels' formats and save; prints size on disk and held-out perplexity
    before and after. The directory loads with `kuaida chat/serve OUT_DIR --dtype DTYPE` (no second
    quantization); `kuaida export` turns it into a transformers directory or a GGUF."""
    from kuaida.bench.report import write_json
    from kuaida.export import quantize_to_dir

    report = quantize_to_dir(model, out_dir, dtype, group_size=group_size, eval_samples=eval_samples,
                             overwrite=overwrite)
    size = report["bytes"]
    typer.echo(f"size on disk: source {size['source'] / 1e6:.1f} MB, fp32 {size['fp32'] / 1e6:.1f} MB, "
               f"{dtype} {size['out'] / 1e6:.1f} MB")
    if report["eval"]:
        ev = report["eval"]
        typer.echo(f"held-out perplexity ({ev['examples']} conversations): {ev['before']['perplexity']:.3f} fp32, "
                   f"{ev['after']['perplexity']:.3f} {dtype} (x{ev['ratio']:.3f})")
    typer.echo(f"saved to {report['out']}")
    if json_path:
        write_json(report, json_path)


@app.command("export")
@user_errors
def export_cmd(
    model: str = typer.Argument(..., help=MODEL_HELP),
    out: Path = typer.Argument(..., help="The directory (--hf) or .gguf file (--gguf) to write."),
    hf: bool = typer.Option(False, "--hf", help="A transformers-loadable directory (fp32; the default)."),
    gguf: bool = typer.Option(False, "--gguf", help="A GGUF file llama.cpp loads."),
    dtype: str = typer.Option("f32", help="GGUF matrices: f32, f16 or q8_0 (an int8 model is q8_0 losslessly)."),
    overwrite: bool = typer.Option(False, help="Replace an existing OUT."),
):
    """Write a model (quantized ones dequantized) for other runtimes: transformers or llama.cpp."""
    from kuaida.errors import InvalidArgumentError
    from kuaida.export import export

    if hf and gguf:
        raise InvalidArgumentError("choose one of --hf and --gguf")
    path = export(model, out, "gguf" if gguf else "hf", dtype=dtype, overwrite=overwrite)
    typer.echo(f"wrote {path}")


@app.command("eval")
@user_errors
def eval_cmd(
    model: str = typer.Argument("default", help=MODEL_HELP),
    teacher: Optional[str] = typer.Option(None, help="Compare with this model: its perplexity, top-1 agreement, "
                                          "KL(teacher||model), greedy reply agreement."),
    dtype: Optional[str] = typer.Option(None, help=DTYPE_HELP + " Default: as stored."),
    samples: int = typer.Option(200, help="Held-out conversations scored (fixed seeded split)."),
    data: str = typer.Option("chitchat", help="'chitchat' or a JSONL of {\"messages\": [...]}."),
    prompts: int = typer.Option(16, help="Held-out prompts for greedy reply agreement (with --teacher)."),
    reply_tokens: int = typer.Option(32, help="Greedy reply tokens compared per prompt."),
    json_path: Optional[Path] = typer.Option(None, "--json", help="Write the report as JSON here."),
):
    """Held-out perplexity on the assistant's tokens; with --teacher, agreement with it."""
    from kuaida.bench.quality import EvalConfig, evaluate
    from kuaida.bench.report import write_json
    from kuaida.bot import load_weights
    from kuaida.train.data import DataConfig

    cfg = EvalConfig(samples=samples, prompts=prompts, reply_tokens=reply_tokens, data=DataConfig(source=data))
    with err.status(f"loading {model} ..."):
        student = load_weights(model, dtype)
        reference = load_weights(teacher, None) if teacher else None
    report = evaluate(student, reference, cfg)
    ppl = report["perplexity"]
    typer.echo(f"perplexity {ppl['perplexity']:.3f} on {ppl['tokens']} reply tokens of {report['examples']} "
               f"held-out conversations (coverage {ppl['coverage']:.1%})")
    if teacher:
        agree, greedy = report["agreement"], report["greedy"]
        typer.echo(f"teacher perplexity {report['teacher']['perplexity']['perplexity']:.3f} "
                   f"(ratio {report['perplexity_ratio']:.3f}); top-1 agreement {agree['top1']:.1%}, "
                   f"KL {agree['kl']:.4f} nats/token; greedy: {greedy['prefix']:.1%} of the first "
                   f"{greedy['n_tokens']} tokens shared, {greedy['exact']:.1%} identical")
    if json_path:
        write_json(report, json_path)


if __name__ == "__main__":
    app()


@app.command("optimize")
@user_errors
def optimize_cmd(
    recipe: str = typer.Argument("default", help="A YAML recipe (see kuaida/recipes/default.yaml), or 'default': "
                                 "prune 30 -> 16 blocks and the output vocabulary, distill 10 min, int8."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Output directory (default: runs/<recipe name>)."),
    overwrite: bool = typer.Option(False, help="Replace a non-empty output directory."),
):
    """Prune -> distill -> quantize -> evaluate, from a recipe; writes the optimized model (a Hugging Face
    directory, and a quantized one for `kuaida serve`) and report.{md,json,png}: decode speed against
    held-out perplexity for the teacher, each step and the result."""
    from kuaida.optimize import OptimizeConfig, optimize

    cfg = OptimizeConfig.from_yaml(recipe)
    out = out or Path("runs") / (Path(recipe).stem if recipe != "default" else "default")
    report = optimize(cfg, out, overwrite=overwrite)
    for name, t in report["targets"].items():
        verdict = {True: "met", False: "MISSED", None: "reported"}[t["met"]]
        typer.echo(f"{name}: {t['value']} (target {t['target']}): {verdict}")
    typer.echo(f"report: {out / 'report.md'}; model: {out / 'model'}")
