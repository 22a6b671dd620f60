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
    as_json: Annotated[bool, typer.Option("--json", help="Print the report as JSON (top-level \"ok\").")] = False,
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
    resume: Annotated[bool, typer.Option("--resume", help="Continue the run from its newest checkpoint.")] = False,
) -> None:
    """Train a policy with RL: rollouts, rewards, group advantages, policy update, checkpoints.

    Writes runs/NAME/: config.toml (resolved), metrics.jsonl (one line per step), samples.jsonl (rollouts
    with image references) and step-N/ checkpoints (HF format, servable by vLLM). Ctrl-C saves and exits.
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
    run_dir = result.run_dir
    from .checkpoint import latest_checkpoint
    from .summary import read_metrics, reward_curve

    ckpt = latest_checkpoint(run_dir)
    console.print(reward_curve(read_metrics(run_dir / "metrics.jsonl")))
    console.print(f"metrics: {run_dir / 'metrics.jsonl'}")
    console.print(f"samples: {run_dir / 'samples.jsonl'}")
    console.print(f"checkpoint: {ckpt if ckpt else '(none yet)'}")
    if result.stopped:
        raise typer.Exit(130)


@app.command("build-tiny-model")
def build_tiny_model(
    out: Annotated[Path, typer.Argument(help="Directory to write the model to.")],
    seed: Annotated[int, typer.Option(help="Seed of the random weights.")] = 0,
) -> None:
    """Write a tiny random Qwen3-VL (for tests and the CPU demo) that transformers and vLLM load offline."""
    from .tiny_model import build_tiny_qwen3_vl

    path = build_tiny_qwen3_vl(out, seed=seed)
    typer.echo(f"tiny Qwen3-VL written to {path}")


def main() -> None:  # pragma: no cover
    sys.exit(app())
