"""Export the latest checkpoint as a release folder anyone can load: weights, config, vocabulary, model card.

    python -m tangshi_jax.export --out DIR [--checkpoint-dir checkpoints] [--evaluation report.json | --eval-num 100]

The folder (see release.py) holds `model.safetensors` (parameters only), `config.json`,
`vocab.json` and a `README.md` model card: the data, the training command, the evaluation
table of `evaluate` and the sampling defaults. `sample`, `evaluate` and `serve` read it
with `--model DIR`.
"""

import argparse
import dataclasses
import hashlib
import json
import sys
from pathlib import Path

import jax
import jax.numpy as jnp

from tangshi_jax import __version__, evaluate, release, request
from tangshi_jax.config import training_command
from tangshi_jax.corpus import PACKAGE_SPEC
from tangshi_jax.devices import PLATFORMS, use_platform
from tangshi_jax.errors import TangshiError, run_cli
from tangshi_jax.model import describe_head


def data_line(path: str) -> str:
    """The training poems file, with its digest when it is at hand, and where such a file comes from."""
    source = (
        f"`python -m tangshi_jax.corpus` writes this file from 全唐诗 in the npm package `{PACKAGE_SPEC}` "
        "(its published sha512 checked), converted to simplified characters with OpenCC t2s; a file of "
        "another origin has another digest"
    )
    try:
        content = Path(path).read_bytes()
    except OSError:
        return f"`{Path(path).name}` (not at hand when exporting, so not described here). {source}."
    digest, lines = hashlib.sha256(content).hexdigest(), content.count(b"\n")
    return f"`{Path(path).name}`: {lines:,} lines, sha256 `{digest}`. {source}."


def model_card(loaded: release.Loaded, metrics: dict | None, report: dict | None) -> str:
    model_config, train_config, progress = loaded.model_config, loaded.train_config, loaded.progress
    shape = (
        f"{model_config.layers}×{model_config.hidden} {model_config.cell.upper()}, embedding {model_config.embed}"
        + describe_head(model_config)
        + (", reads titles" if train_config.titles else "")
    )
    count = sum(int(array.size) for array in jax.tree_util.tree_leaves(loaded.params))
    stored = "float16, read back as float32" if metrics and metrics.get("half") else "float32"
    lines = [
        "---",
        "language: zh",
        "library_name: tangshi-jax",
        "tags: [poetry, classical-chinese, text-generation, jax]",
        "---",
        "",
        "# tangshi-jax: a character-level model of Tang poems",
        "",
        f"A {shape} ({count:,} parameters, vocabulary of {len(loaded.vocab):,} characters), "
        f"trained for {progress.get('epoch')} epoch{'' if progress.get('epoch') == 1 else 's'} "
        f"({progress.get('step'):,} steps). Exported by tangshi-jax "
        f"{__version__}.",
        "",
        "| file | what |",
        "|---|---|",
        f"| `{release.WEIGHTS}` | the parameters only ({stored}), named like `embed.embedding` |",
        f"| `{release.CONFIG}` | the model config, the training settings, step and validation figures |",
        f"| `{release.VOCAB}` | character → id |",
        "",
        "## Use",
        "",
        "```sh",
        "pip install -e .   # in a clone of the tangshi-jax repository",
        "python -m tangshi_jax.sample --model THIS_FOLDER --begin 日 --num 3",
        "python -m tangshi_jax.serve --model THIS_FOLDER      # a web page on http://127.0.0.1:8000",
        "```",
        "",
        "The weights are plain safetensors: `safetensors.numpy.load_file('model.safetensors')` reads them without JAX.",
        "",
        "## Data",
        "",
        data_line(train_config.data),
        "",
        "## Training",
        "",
        "```sh",
        training_command(model_config, train_config),
        "```",
        "",
    ]
    if metrics and metrics.get("val_loss") is not None:
        lines += [
            f"Validation after epoch {metrics['epoch']}: NLL {metrics['val_loss']:.3f} nats over all targets "
            f"(perplexity {metrics['val_ppl']:.1f}), {metrics['val_char_loss']:.3f} over Chinese characters "
            f"only (perplexity {metrics['val_char_ppl']:.1f}).",
            "",
        ]
    if metrics and metrics.get("half"):
        half = metrics["half"]
        lines += [
            f"Weights stored as float16: validation NLL {half['float16_nll']:.4f} nats against "
            f"{half['float32_nll']:.4f} with the float32 weights they were rounded from.",
            "",
        ]
    lines += ["## Evaluation", ""]
    if report:
        lines += [
            "`python -m tangshi_jax.evaluate` on this model "
            f"({report['num']} poems a row, seed {report['seed']}; definitions at the top of "
            "`tangshi_jax/evaluate.py`):",
            "",
            evaluate.format_report(report),
            "",
        ]
    else:
        lines += ["Not evaluated at export; `python -m tangshi_jax.evaluate --model THIS_FOLDER` measures it.", ""]
    lines += [
        "## Sampling defaults",
        "",
        f"Temperature {request.DEFAULT_TEMPERATURE}, top-p {request.DEFAULT_TOP_P}, repetition penalty "
        f"{request.DEFAULT_REPETITION_PENALTY}, the best of {request.DEFAULT_CANDIDATES} drafts, at most "
        f"{request.MAX_LEN} characters. Forms (五绝 七绝 五律 七律), rhyme (平水韵) and tones (平仄) are masks on "
        "the sampler, so they hold whatever the model.",
        "",
    ]
    return "\n".join(lines)


def export(
    checkpoint_dir,
    out,
    report: dict | None = None,
    eval_num: int = 0,
    data_path=None,
    settings=evaluate.SETTINGS,
    log=print,
    half: bool = False,
) -> Path:
    """Write the release folder of the latest checkpoint; evaluate it first when eval_num > 0
    and no report is given. With half, the weights are stored as float16 if that moves the
    validation NLL by under HALF_TOLERANCE nats (measured here, stated in the card)."""
    release.require_new(out)  # before a long evaluation
    loaded = release.load_model(checkpoint_dir=checkpoint_dir)
    metrics = release.last_metrics(checkpoint_dir, epoch=loaded.progress.get("epoch"))
    if half:
        loaded, metrics = halved(loaded, metrics, data_path or loaded.train_config.data, log)
    if report is None and eval_num > 0:
        log(f"evaluating the checkpoint ({eval_num} poems a row; --eval-num 0 skips this)")
        report = evaluate.evaluate_checkpoint(checkpoint_dir, data_path, eval_num, settings=settings, log=log)
    if report is not None and report.get("step") != loaded.progress.get("step"):
        raise TangshiError(
            f"the evaluation report is of step {report.get('step')}, the checkpoint is at step "
            f"{loaded.progress.get('step')}; evaluate the checkpoint again or leave out --evaluation"
        )
    card = model_card(loaded, metrics, report)
    return release.write_release(out, loaded, metrics, card, "float16" if half else "float32")


HALF_TOLERANCE = 0.001  # nats of validation NLL that storing the weights as float16 may cost


def halved(loaded: release.Loaded, metrics: dict | None, data_path, log) -> tuple[release.Loaded, dict]:
    """The model with its weights rounded to float16 (kept float32 in memory), and the metrics
    with both validation NLLs; refused when rounding costs HALF_TOLERANCE nats or more."""
    rounded = jax.tree_util.tree_map(lambda w: w.astype(jnp.float16).astype(jnp.float32), loaded.params)
    log(f"measuring what float16 weights cost on the validation split of {data_path}")
    val = evaluate.load_dataset(data_path, loaded.train_config, loaded.vocab).val
    before, after = (
        evaluate.validation_nll(params, loaded.model_config, loaded.train_config, val)
        for params in (loaded.params, rounded)
    )
    change = after["nll"] - before["nll"]
    if abs(change) >= HALF_TOLERANCE:
        raise TangshiError(
            f"float16 weights move the validation NLL by {change:+.4f} nats (limit {HALF_TOLERANCE}); "
            "export without --half"
        )
    figures = {"float32_nll": before["nll"], "float16_nll": after["nll"], "float16_char_nll": after["char_nll"]}
    return dataclasses.replace(loaded, params=rounded), dict(metrics or {}, half=figures)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m tangshi_jax.export", description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="the release folder to write (must not exist yet)")
    parser.add_argument("--checkpoint-dir", default="checkpoints")
    parser.add_argument(
        "--evaluation",
        default=None,
        help="a report of `python -m tangshi_jax.evaluate --json PATH` to put in the model card",
    )
    parser.add_argument(
        "--eval-num",
        type=int,
        default=100,
        help="without --evaluation: poems a row of the evaluation run for the card (0: none)",
    )
    parser.add_argument("--data", default=None, help="poems file for the evaluation (default: the training one)")
    parser.add_argument(
        "--half",
        action="store_true",
        help=f"store the weights as float16 (half the size) if the validation NLL moves by < {HALF_TOLERANCE} nats",
    )
    parser.add_argument("--platform", choices=PLATFORMS, default=None)
    return parser


def main(argv=None) -> None:
    args = build_parser().parse_args(argv)
    if args.eval_num < 0:
        raise TangshiError(f"--eval-num must be 0 or more, got {args.eval_num}")
    report = None
    if args.evaluation:
        try:
            report = json.loads(Path(args.evaluation).read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as error:
            raise TangshiError(
                f"cannot read --evaluation {args.evaluation} ({type(error).__name__}); write one with "
                "`python -m tangshi_jax.evaluate --json report.json`"
            ) from None
    use_platform(args.platform)
    out = export(
        args.checkpoint_dir,
        args.out,
        report,
        args.eval_num,
        args.data,
        log=lambda message: print(message, file=sys.stderr),
        half=args.half,
    )
    print(f"wrote {out}: " + ", ".join(sorted(path.name for path in out.iterdir())))


if __name__ == "__main__":
    sys.exit(run_cli(main))
