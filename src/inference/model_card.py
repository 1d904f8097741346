"""MODEL_CARD.md: what a trained model is, what it was trained on and how well it does, in the Hugging Face
model-card layout (YAML metadata, then model, data, training, evaluation, limitations, how to load it).

Written by every training run into its folder; ``src.eval`` writes a refreshed one beside its metrics.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from src.utils.io import TEXT_OPTIONS


def model_card(
    hparams: dict[str, Any],
    images: dict[str, dict[str, int]] | None,
    training: dict[str, Any],
    evaluations: dict[str, dict[str, Any]],
    checkpoint: str | None,
) -> str:
    """The card's Markdown. ``images``: split → class → count; ``training``: settings to list;
    ``evaluations``: name (``val``, ``test``, ...) → metrics with ``accuracy``, ``macro_f1`` and, when known,
    ``per_class`` (class → {f1, precision, recall, support})."""
    classes = list(hparams.get("class_names") or [])
    backbone = hparams.get("backbone") or {}
    frozen = not training.get("finetune_schedule")
    lines = [
        "---",
        "library_name: pytorch",
        "pipeline_tag: image-classification",
        f"tags: [image-classification, transfer-learning, {backbone.get('name', 'unknown')}]",
        "metrics: [accuracy, f1]",
        "---",
        "",
        f"# {backbone.get('name', 'image')} classifier: {', '.join(text(c) for c in classes)}",
        "",
        "## Model",
        "",
        f"- Backbone: `{backbone.get('name')}`, ImageNet weights `{backbone.get('weights')}`"
        + (" (frozen: a feature extractor)" if frozen else " (fine-tuned)"),
        f"- Head: Linear → ReLU → Dropout({(hparams.get('head') or {}).get('dropout')}) → Linear({len(classes)})"
        " → LogSoftmax: outputs log-probabilities, one per class in the order below",
        f"- Classes ({len(classes)}): {', '.join(code(c) for c in classes)}",
        f"- Preprocessing: {describe_preprocessing(hparams.get('preprocessing') or {})}",
        "",
        "## Data",
        "",
    ]
    if images:
        splits = [s for s in ("train", "val", "test") if s in images]
        lines += ["| class | " + " | ".join(splits) + " |", "|---|" + "---|" * len(splits)]
        for c in classes:
            lines.append(f"| {text(c)} | " + " | ".join(str(images[s].get(c, 0)) for s in splits) + " |")
        lines.append("| **total** | " + " | ".join(str(sum(images[s].values())) for s in splits) + " |")
    else:
        lines.append("Not recorded.")
    if hparams.get("data_root"):
        lines += ["", f"Data root at training time: `{hparams['data_root']}`."]
    lines += ["", "## Training", ""]
    lines += [f"- {key}: `{value}`" for key, value in training.items() if value is not None]
    lines += ["", "## Evaluation", ""]
    for name, metrics in evaluations.items():
        lines += [
            f"### {name}",
            "",
            f"accuracy {fmt(metrics.get('accuracy'))}, macro-F1 {fmt(metrics.get('macro_f1'))}"
            + (f", loss {fmt(metrics.get('loss'))}" if metrics.get("loss") is not None else "")
            + (f" ({metrics['samples']} images)" if metrics.get("samples") else ""),
        ]
        per_class = metrics.get("per_class") or {}
        if per_class:
            lines += ["", "| class | F1 | precision | recall | images |", "|---|---|---|---|---|"]
            for c, m in per_class.items():
                scores = " | ".join(fmt(m.get(k)) for k in ("f1", "precision", "recall"))
                lines.append(f"| {text(c)} | {scores} | {m.get('support')} |")
        lines.append("")
    lines += [
        "## Limitations",
        "",
        f"- It only knows these {len(classes)} classes: every image gets one of them, however unlike them it is.",
        "- Its scores come from the images above: photos from other cameras, places or class balances can score lower.",
        "- Small validation sets make its metrics noisy (one image of 150 is 0.007 accuracy).",
        "",
        "## How to load it",
        "",
        "```python",
        "from src.inference import Classifier",
        f"clf = Classifier.from_checkpoint({str(checkpoint or 'path/to/checkpoint.ckpt')!r})",
        'clf.predict(["image.jpg"], top_k=3)',
        "```",
        "",
        "Or `python -m src.predict ckpt_path=... input=...`, `python -m src.serve ckpt_path=...`, and "
        "`python -m src.export ckpt_path=... format=onnx` for a bundle that runs without torch.",
        "",
    ]
    return "\n".join(lines)


def describe_preprocessing(record: dict[str, Any]) -> str:
    steps = [
        f"{str(s.get('transform', '')).rsplit('.', 1)[-1]}({s.get('size')})"
        for s in record.get("eval_transforms") or []
        if isinstance(s, dict)
    ]
    return " → ".join([*steps, "ToTensor", f"Normalize(mean={record.get('mean')}, std={record.get('std')})"])


MARKDOWN_SPECIAL = "\\`*_[]<>|~"  # inline text and table cells: emphasis, code, links, HTML, columns


def text(name: str) -> str:
    """A class name (a folder name: anything) as literal Markdown text, in a line or a table cell: every
    character Markdown or HTML could read as syntax escaped, so ``<img onerror=...>`` or ``a|b`` stay text."""
    return "".join("\\" + ch if ch in MARKDOWN_SPECIAL else ch for ch in str(name))


def code(name: str) -> str:
    """A class name in a code span (shown as typed), or escaped text when it holds a backtick."""
    return f"`{name}`" if "`" not in str(name) and str(name).strip() == str(name) else text(name)


def fmt(value: Any) -> str:
    return f"{value:.4f}" if isinstance(value, float) else str(value)


def write_model_card(folder: Path, *args: Any, **kwargs: Any) -> Path:
    """Write MODEL_CARD.md into ``folder`` (arguments as ``model_card``)."""
    path = Path(folder) / "MODEL_CARD.md"
    path.write_text(model_card(*args, **kwargs), **TEXT_OPTIONS)
    return path
