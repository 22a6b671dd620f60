"""The `vlrl` command line. Each command parses, loads the config and calls one function.

Heavy imports (torch, transformers) happen inside the commands so that `vlrl --help` answers at once.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

app = typer.Typer(
    name="vlrl",
    help="Reinforcement learning with verifiable rewards for Qwen3-VL vision-language models.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

ConfigArg = Annotated[Path, typer.Argument(help="The run's TOML config file.", show_default=False)]
SetOpt = Annotated[
    Optional[list[str]],
    typer.Option("--set", help="Override a config value, e.g. --set rollout.group_size=16 (repeatable)."),
]


def _fail(message: str, code: int = 2) -> None:
    from rich.console import Console

    Console(stderr=True).print(f"[bold red]error:[/] {message}", highlight=False)
    raise typer.Exit(code)


def _load(config: Path, overrides: list[str] | None):
    from .config import ConfigError, load_config

    try:
        return load_config(config, overrides or [])
    except ConfigError as e:
        _fail(str(e))


@app.command("check-batch")
def check_batch(
    config: ConfigArg,
    overrides: SetOpt = None,
    prompts: Annotated[int, typer.Option(help="Prompts to roll out (one group each).", min=1)] = 2,
    as_json: Annotated[bool,
                       typer.Option("--json", help="Print the report as JSON (top-level \"ok\").")] = False,
) -> None:
    """Dry run: roll out one group per prompt, build the batch, and check it is sound.

    Checks shapes, image tokens against the image grid, the token budget, loss-mask coverage, and the
    agreement of the trainer's logprobs with the sampler's. Exits non-zero when a check fails.
    """
    from rich.console import Console

    from .errors import UserError

    cfg = _load(config, overrides)
    console = Console(stderr=as_json)
    try:
        with console.status("check-batch", spinner="dots") as status:
            from .check_batch import run_check_batch

            report, spans = run_check_batch(cfg, prompts, progress=lambda m: status.update(m))
    except UserError as e:
        _fail(str(e))
    if as_json:
        print(json.dumps(report.to_dict(), indent=2))
    else:
        from .check_batch import print_report

        print_report(console, report, spans)
    raise typer.Exit(0 if report.ok else 1)


@app.command()
def train(
    config: ConfigArg,
    overrides: SetOpt = None,
    resume: Annotated[bool,
                      typer.Option("--resume", help="Continue the run from its newest checkpoint.")] = False,
) -> None:
    """Train a policy with RL: rollouts, rewards, group advantages, policy update, checkpoints.

    Writes runs/NAME/: config.toml (resolved), metrics.jsonl (one line per step), samples.jsonl (rollouts
    with image references) and step-N/ checkpoints (HF format, servable by vLLM). Ctrl-C or SIGTERM saves and
    exits (130 / 143); --resume continues.
    """
    from rich.console import Console

    from .errors import UserError

    cfg = _load(config, overrides)
    console = Console()
    try:
        from .train import train as run_training

        result = run_training(cfg, resume=resume, console=console)
    except UserError as e:
        _fail(str(e))
    except KeyboardInterrupt:  # a second Ctrl-C (train said what was saved): 130, as a shell reports Ctrl-C
        raise typer.Exit(130) from None
    run_dir = result.run_dir
    if not result.main:  # under accelerate launch, one process reports
        raise typer.Exit(result.exit_code)
    from .checkpoint import latest_checkpoint
    from .summary import read_jsonl, reward_curve

    ckpt = latest_checkpoint(run_dir)
    console.print(reward_curve(read_jsonl(run_dir / "metrics.jsonl")))
    console.print(f"metrics: {run_dir / 'metrics.jsonl'}")
    console.print(f"samples: {run_dir / 'samples.jsonl'}")
    console.print(f"report: {run_dir / 'report.html'}")
    console.print(f"checkpoint: {ckpt if ckpt else '(none yet)'}")
    if result.stopped:
        raise typer.Exit(result.exit_code)


@app.command("eval")
def eval_policy(
    config: ConfigArg,
    checkpoint: Annotated[
        Optional[Path], typer.Option(help="A checkpoint directory (runs/NAME/step-N); default: model.path.")
    ] = None,
    split: Annotated[str, typer.Option(help="The split to score: eval or train.")] = "eval",
    n: Annotated[
        Optional[int], typer.Option("--n", help="Completions per prompt (default rollout.group_size).", min=1)
    ] = None,
    limit: Annotated[Optional[int], typer.Option(help="Score only the first N prompts.", min=1)] = None,
    overrides: SetOpt = None,
) -> None:
    """Score a policy on a split: mean reward per reward function, accuracy, pass@k, response length.

    Writes summary.json, samples.jsonl (every completion, with image references) and report.html to
    <checkpoint>/eval-SPLIT/, or to runs/NAME/eval-base-SPLIT/ for the base model. Seeded by rollout.seed.
    """
    from rich.console import Console

    from .errors import UserError

    cfg = _load(config, overrides)
    console = Console()
    try:
        from .evaluate import run_eval, summary_table

        summary = run_eval(cfg, checkpoint, split, n, limit, console)
    except UserError as e:
        _fail(str(e))
    console.print(summary_table(summary))
    for message in summary.get("reward_errors", [])[:5]:
        console.print(f"reward failed: {message}", highlight=False, markup=False)
    out = Path(summary["out_dir"])
    for name in ("summary.json", "samples.jsonl", "report.html"):
        console.print(f"{name}: {out / name}", highlight=False)


@app.command()
def report(
    run_dir: Annotated[Path, typer.Argument(help="A run directory (runs/NAME), or an eval directory.")],
) -> None:
    """(Re)write the self-contained HTML report of a run (curves, last metrics, samples) and print its
    path."""
    from .errors import UserError
    from .report import write_report

    try:
        path = write_report(run_dir)
    except UserError as e:
        _fail(str(e))
    typer.echo(str(path))


@app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def serve(
    ctx: typer.Context,
    model: Annotated[str, typer.Option(help="Model directory or hub id to serve.")],
    host: Annotated[str,
                    typer.Option(help="Interface to bind; 127.0.0.1 keeps the server "
                                      "private.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port.")] = 8000,
    gpu_memory_utilization: Annotated[float, typer.Option(help="Fraction of GPU memory vLLM may use.")] = 0.8,
    max_model_len: Annotated[Optional[int],
                             typer.Option(help="Longest sequence, prompt + completion.")] = None,
    limit_mm_per_prompt: Annotated[str,
                                   typer.Option(help="Most items per prompt: image=4, or JSON.")] = "image=4",
    tensor_parallel_size: Annotated[int, typer.Option(help="GPUs per model replica.")] = 1,
    data_parallel_size: Annotated[int, typer.Option(help="Model replicas.")] = 1,
    min_pixels: Annotated[Optional[int],
                          typer.Option(help="Smallest image area: the trainer's model.min_pixels.")] = None,
    max_pixels: Annotated[Optional[int],
                          typer.Option(help="Largest image area: the trainer's model.max_pixels.")] = None,
    video_max_pixels: Annotated[Optional[int], typer.Option(
        help="Largest video frame area: the trainer's model.video_max_pixels (with video=N).")] = None,
    video_max_frames: Annotated[Optional[int], typer.Option(
        help="Most frames per video: the trainer's model.video_max_frames (with video=N).")] = None,
    dtype: Annotated[str, typer.Option(help="Weights dtype (auto, bfloat16, float32...).")] = "auto",
    weight_sync: Annotated[str,
                           typer.Option(help="disk (default) or nccl (enables vLLM's NCCL weight "
                                             "transfer).")] = "disk",
    allowed_local_media_path: Annotated[Optional[str],
                                        typer.Option(help="Directory file:// images may come from.")] = None,
    trust_remote_code: Annotated[bool, typer.Option(help="Run code shipped with the checkpoint.")] = False,
    api_key_env: Annotated[str,
                           typer.Option(help="Env var holding an API key clients must "
                                             "send.")] = "VLLM_API_KEY",
    log_file: Annotated[Optional[Path], typer.Option(help="Where the server log goes.")] = None,
    startup_timeout: Annotated[float,
                               typer.Option(help="Seconds to wait for the server to be healthy.")] = 900.0,
) -> None:
    """Start a real vLLM server with what RL needs; arguments after `--` go to vLLM unchanged.

    Turns on the RL routes (weight reload/transfer, pause/resume), returns the logprobs of the distribution
    actually sampled from, ignores the checkpoint's generation defaults, and uses the trainer's pixel limits.
    Refuses a port already in use. Waits until its own server is healthy, tees the log to a file, and stops
    the server cleanly on Ctrl-C (exit 0), SIGTERM (exit 143) or SIGHUP (exit 129); killed outright, it takes
    the server down with it.
    """
    import os

    from rich.console import Console

    from .errors import UserError
    from .serve import (
        ROUTED_EXPERTS_ON_CPU,
        ServerProcess,
        StopSignal,
        build_command,
        check_port_free,
        cpu_dtype,
        raise_on_stop_signals,
        routes_experts,
        server_env,
        wait_healthy,
        watch_health,
    )

    console = Console()
    if weight_sync not in ("disk", "nccl"):
        _fail(f"--weight-sync {weight_sync!r}: choose disk or nccl")
    try:
        check_port_free(host, port)  # before anything slow: an orphaned server must not pass for this one
        import torch

        on_cpu = not torch.cuda.is_available()
        routed = routes_experts(model)  # a mixture-of-experts model: its routing for replay
        if routed and on_cpu:
            console.print(f"[yellow]{ROUTED_EXPERTS_ON_CPU}[/]")
        routed = routed and not on_cpu
        forced = cpu_dtype(model, dtype) if on_cpu else None
        if forced:
            console.print(f"--dtype auto: serving in {forced} on the CPU (vLLM's CPU kernels for this model family "
                          "need it); the trainer's float32 logprobs then agree to that dtype's noise",
                          highlight=False)
            dtype = forced
        cmd = build_command(
            model, host, port, gpu_memory_utilization, max_model_len, limit_mm_per_prompt,
            tensor_parallel_size,
            data_parallel_size, min_pixels, max_pixels, dtype, weight_sync, allowed_local_media_path,
            trust_remote_code, enforce_eager=on_cpu, extra=ctx.args, video_max_pixels=video_max_pixels,
            video_max_frames=video_max_frames, routed_experts=routed,
        )
        api_key = os.environ.get(api_key_env) or None
        log_path = log_file or Path("runs") / f"vllm-serve-{port}.log"
        raise_on_stop_signals()
        server = ServerProcess(cmd, log_path, server_env(on_cpu, api_key, routed_experts=routed))
    except UserError as e:
        _fail(str(e))
    url = f"http://{host}:{port}"
    try:
        with console.status(f"starting vLLM ({model}) at {url}; log: {log_path}") as status:
            wait_healthy(url, server.proc, startup_timeout,
                         on_wait=lambda: status.update(f"starting vLLM at {url}: "
                                                       f"{(server.tail or [''])[-1][:100]}"),
                         api_key=api_key, port=port)
        console.print(f"[bold green]vLLM ready[/] at {url} (log: {log_path}); Ctrl-C or SIGTERM stops it")
        failed = watch_health(url, server.proc, api_key)  # returns when it exits, or lives on but is dead
        code = server.stop()  # whatever it left in its group goes too
        console.print("\n".join(list(server.tail)[-15:]), highlight=False, markup=False)
        if failed:
            console.print(f"[red]{failed}[/]: stopped it (exit code {code}) for a new start; see {log_path}")
        else:
            console.print(f"[red]the vLLM server exited[/] with code {code}; see {log_path}")
        raise typer.Exit(1)
    except UserError as e:
        server.stop()
        console.print("\n".join(list(server.tail)[-15:]), highlight=False, markup=False)
        _fail(f"{e}; see {log_path}", code=1)
    except (KeyboardInterrupt, StopSignal) as e:
        console.print(f"{'Ctrl-C' if isinstance(e, KeyboardInterrupt) else e}: stopping the vLLM server...")
        code = server.stop()
        console.print(f"vLLM server stopped (exit code {code})")
        if isinstance(e, StopSignal):
            raise typer.Exit(e.exit_code) from None


@app.command("build-tiny-model")
def build_tiny_model(
    out: Annotated[Path, typer.Argument(help="Directory to write the model to.")],
    seed: Annotated[int, typer.Option(help="Seed of the random weights.")] = 0,
    tied: Annotated[bool,
                    typer.Option(help="Tie the output head to the input embedding (as "
                                      "Qwen3-VL-2B/4B).")] = False,
    vocab: Annotated[str, typer.Option(
        help="toy: a few hundred tokens, answers and zoom calls one token each (the CPU demo); qwen: Qwen's "
             "real "
             "151,643-token BPE and vocab size 151,936 (token tests; needs the quicktok-v1 wheel).")] = "toy",
    warm_start_tools: Annotated[bool, typer.Option(
        help="Then train its first turns to call the built-in tools (zoom, calculator), so its episodes have "
             "several turns (vlrl/tiny_warm_start.py).")] = False,
    family: Annotated[str, typer.Option(help="The model family (vlrl/adapters: FAMILIES).")] = "qwen3-vl",
) -> None:
    """Write a tiny random Qwen3-VL (for tests and the CPU demo) that transformers and vLLM load offline."""
    from .adapters import build_tiny_model as build
    from .errors import UserError

    if vocab not in ("toy", "qwen"):
        raise UserError(f"--vocab {vocab!r}: expected toy or qwen")
    path = build(out, family, seed=seed, tied=tied, vocab=vocab)
    if warm_start_tools:
        from .tiny_warm_start import warm_start_tools as warm_start

        losses = warm_start(path, seed=seed, progress=lambda k, n, loss: typer.echo(
            f"tool-call warm start {k}/{n}: loss {loss:.3f}") if k % 10 == 0 or k == 1 else None)
        typer.echo(f"tool-call warm start: loss {losses[0]:.2f} -> {losses[-1]:.3f} in {len(losses)} steps")
    typer.echo(f"tiny {family} ({vocab} vocabulary) written to {path}")


def main() -> None:  # pragma: no cover
    sys.exit(app())
