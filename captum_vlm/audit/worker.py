"""One audit record per image: the work both engines run (in process, or in a Ray actor).

:class:`AuditWorker` is a callable class in Ray Data's style: it holds the model once and turns a
batch of rows (see :mod:`captum_vlm.audit.sources`) into a ``pyarrow.Table`` of records. Each
image is scored and explained on its own, so a record does not depend on which batch the image
fell in: the local engine and any number of Ray actors write the same records.

Two kinds of model, told apart by the adapter's capability flags: two-tower models score the
image against every prompt (the prediction is the best prompt); answer models (the adapter's
``answers_questions``) are asked the row's question and explained through their own answer, whose
score the checks perturb: the log-probability of answer tokens after the question (BLIP VQA), or
the logit of an answer label of the model's classifier (ViLT VQA: ``config.label2id``; a row's
label must be one of them).
"""

from __future__ import annotations

import io
import json
import math
import zlib
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import torch
from PIL import Image

from captum_vlm.audit.summaries import box_to_mask, map_entropy, mask_cells, mass_inside, peak_cell

__all__ = ["CHECKS", "AuditConfig", "AuditWorker", "answer_label_ids", "record_schema", "unknown_answer_labels"]

CHECKS = ("deletion", "grounding")
METRICS = {  # per method: column suffix -> Arrow type
    "peak_row": pa.int32(), "peak_col": pa.int32(), "entropy": pa.float64(),
    "mass_inside": pa.float64(), "mass_outside": pa.float64(),
    "deletion_auc": pa.float64(), "deletion_auc_random": pa.float64(),
    "grounded": pa.bool_(), "grounding_drop": pa.float64(), "grounding_drop_random": pa.float64(),
}
OBJECT_GROUNDING = {  # per record, with a mask and the grounding check: the object's own patches masked
    "object_grounded": pa.bool_(), "object_grounding_drop": pa.float64(),
    "object_grounding_drop_random": pa.float64(),
}
#: answer models the audit explains: answer tokens after the question, or answer labels
ANSWER_TASKS = ("answer_tokens", "answer_label")


def answer_label_ids(model: Any) -> dict[str, int] | None:
    """The answer labels of a model whose answers are classifier labels (its adapter's task is
    ``"answer_label"``), keyed by their normalised text: ``{"red": 0, ...}``; ``None`` for other
    models.

    Example:
        >>> answer_label_ids(vilt_vqa)["red"]     # doctest: +SKIP
        0
    """
    from captum_vlm.adapters import get_adapter

    if get_adapter(model).task != "answer_label":
        return None
    known = getattr(model.config, "label2id", None) or {}
    return {_normalised(label): int(index) for label, index in known.items()}


def unknown_answer_labels(model: Any, labels: list[Any]) -> list[str]:
    """The labels (expected answers) that are not answers of a label-answer model, in order of
    first appearance; ``[]`` for any other model or when every label is known."""
    known = answer_label_ids(model)
    if known is None:
        return []
    return list(dict.fromkeys(str(v) for v in labels if v is not None and _normalised(v) not in known))


@dataclass(frozen=True)
class AuditConfig:
    """What an audit computes; two runs resume each other only when their configs are equal.

    Args:
        texts: two-tower models: the prompts (the classes; the model's prediction is one of
            them); answer models: ``()`` or the one question asked of rows that carry none.
        methods: registry names of the methods (see :func:`captum_vlm.method_names`).
        checks: per map, ``"deletion"`` (deletion AUC of the map's order and of a random order)
            and/or ``"grounding"`` (:meth:`CausalOcclusion.grounding_test` of the map; with a
            mask or box, also of the object's own patches: ``object_grounded``).
        explain: ``"prediction"`` (explain the predicted prompt) or ``"label"`` (the true one).
        keep_maps: also store each map as a flat float32 list (``{method}.map``).
        deletion_steps: deletion steps (at most one per patch).
        grounding_fraction: share of patches the grounding test masks.
        seed: seed of the random orders and random maskings (combined with each image's id).
        model_name: the model's name, for the report.
    """

    texts: tuple[str, ...]
    methods: tuple[str, ...]
    checks: tuple[str, ...] = CHECKS
    explain: str = "prediction"
    keep_maps: bool = False
    deletion_steps: int = 16
    grounding_fraction: float = 0.2
    seed: int = 0
    model_name: str = ""

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> AuditConfig:
        values = json.loads(text)
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in values.items()})


def record_schema(config: AuditConfig) -> pa.Schema:
    """The Arrow schema of the records: one row per image, ``{method}.{metric}`` columns."""
    fields = [
        pa.field("id", pa.string()), pa.field("label", pa.string()), pa.field("label_index", pa.int32()),
        pa.field("prediction", pa.string()), pa.field("prediction_index", pa.int32()),
        pa.field("confidence", pa.float64()), pa.field("label_confidence", pa.float64()),
        pa.field("correct", pa.bool_()), pa.field("explained", pa.string()), pa.field("has_mask", pa.bool_()),
        pa.field("path", pa.string()), pa.field("question", pa.string()),
        pa.field("map_rows", pa.int32()), pa.field("map_cols", pa.int32()),
    ]
    fields += [pa.field(name, kind) for name, kind in OBJECT_GROUNDING.items()]
    for method in config.methods:
        fields += [pa.field(f"{method}.{name}", kind) for name, kind in METRICS.items()]
        if config.keep_maps:
            fields.append(pa.field(f"{method}.map", pa.list_(pa.float32())))
    fields.append(pa.field("error", pa.string()))
    return pa.schema(fields)


def _image_of(row: dict[str, Any]) -> Image.Image:
    image = row.get("image")
    if isinstance(image, (bytes, bytearray)):
        with Image.open(io.BytesIO(image)) as opened:
            return opened.convert("RGB")
    if isinstance(image, np.ndarray) and image.ndim == 3:
        return Image.fromarray(image.astype(np.uint8)).convert("RGB")
    if row.get("path"):
        with Image.open(row["path"]) as opened:
            return opened.convert("RGB")
    raise ValueError("row has neither an image nor a path")


def _mask_of(row: dict[str, Any], size: tuple[int, int]) -> np.ndarray | None:
    """The object mask ``(H, W)`` of the row (mask bytes, mask file or box), or ``None``."""
    mask = None
    if isinstance(row.get("mask"), (bytes, bytearray)):
        mask = np.load(io.BytesIO(row["mask"]), allow_pickle=False)
    elif isinstance(row.get("mask"), np.ndarray) and row["mask"].ndim == 2:
        mask = row["mask"]
    elif row.get("mask_path"):
        path = str(row["mask_path"])
        if path.endswith(".npy"):
            mask = np.load(path, allow_pickle=False)
        else:
            with Image.open(path) as opened:
                mask = np.asarray(opened.convert("L")) > 127
    elif row.get("box") is not None and len(row["box"]) == 4:
        return box_to_mask(row["box"], size)
    if mask is None:
        return None
    mask = np.asarray(mask).astype(bool)
    if mask.shape != (size[1], size[0]):
        raise ValueError(f"mask: shape {mask.shape} does not match the image's (height, width) {(size[1], size[0])}")
    return mask


def _resolve(value: Any) -> Any:
    """Ray object references (the model put once in the object store) become their value."""
    if type(value).__name__ == "ObjectRef":
        import ray

        return ray.get(value)
    return value


def _rows(batch: Any) -> list[dict[str, Any]]:
    """A batch (list of rows, or Ray's dict of columns) as a list of rows.

    In Ray's numpy batches a column that is empty in every row of the batch (no mask, no label)
    holds NaN (``float32``); no field of a row is a float, so NaN is read as missing (``None``)."""
    if isinstance(batch, list):
        return batch
    columns = {k: [None if isinstance(x, (float, np.floating)) and math.isnan(x) else x for x in v]
               for k, v in batch.items()}
    n = len(next(iter(columns.values()))) if columns else 0
    return [{k: v[i] for k, v in columns.items()} for i in range(n)]


class AuditWorker:
    """Holds the model once; ``worker(batch) -> pyarrow.Table`` of records.

    Args:
        model: a two-tower model (CLIP, SigLIP, ...) or an answer model (BLIP or ViLT VQA), or a Ray
            object reference to it.
        processor: its processor, or a reference to it.
        config: an :class:`AuditConfig` (or its JSON).

    Example:
        >>> worker = AuditWorker(model, processor, AuditConfig(texts=("a cat", "a dog"),   # doctest: +SKIP
        ...                      methods=("grad-eclip",)))
        >>> worker([{"id": "0", "path": "cat.png", "label": "a cat"}])                     # doctest: +SKIP
    """

    def __init__(self, model: Any, processor: Any, config: AuditConfig | str):
        import captum_vlm as cv

        self.model, self.processor = _resolve(model), _resolve(processor)
        self.config = AuditConfig.from_json(config) if isinstance(config, str) else config
        self.schema = record_schema(self.config)
        self.adapter = cv.get_adapter(self.model)
        self.answers = self.adapter.answers_questions
        self.occlusion = cv.CausalOcclusion(self.model) if "grounding" in self.config.checks else None
        self.label_ids = answer_label_ids(self.model) if self.answers else None
        self.score = self.adapter.default_target()  # similarity logits, answer log-prob or label logits
        if not self.answers:
            text = self.processor(text=list(self.config.texts), return_tensors="pt",
                                  padding=self.adapter.text_padding)
            self.ids, self.mask = text["input_ids"], text["attention_mask"]

    def __call__(self, batch: Any) -> pa.Table:
        records = [self.record(row) for row in _rows(batch)]
        return pa.Table.from_pylist(records, schema=self.schema)

    # ----- one image -----------------------------------------------------------------------
    def record(self, row: dict[str, Any]) -> dict[str, Any]:
        """The record of one row; a failure becomes the record's ``error`` (the run goes on)."""
        label = row.get("label")
        texts = list(self.config.texts)
        record: dict[str, Any] = {
            "id": str(row["id"]), "label": None if label is None else str(label),
            "label_index": texts.index(label) if label in texts and not self.answers else None,
            "path": None if not row.get("path") else str(row["path"]),
        }
        if self.answers:
            record["question"] = row.get("question") or (texts[0] if texts else None)
        try:
            image = _image_of(row)
        except Exception as err:  # noqa: BLE001 - any unreadable image is one error record
            record["error"] = f"cannot read image: {type(err).__name__}: {err}"
            return record
        try:
            if self.answers:
                record.update(self._explain_answer(image, row, record["question"]))
            else:
                record.update(self._explain(image, row, record["label_index"]))
        except Exception as err:  # noqa: BLE001 - one bad example must not stop the run
            record["error"] = f"{type(err).__name__}: {err}"
        return record

    def _explain(self, image: Image.Image, row: dict[str, Any], label_index: int | None) -> dict[str, Any]:
        """A two-tower model: the prediction over the prompts, and the map of the explained one."""
        import captum_vlm as cv

        pixels = self.processor(images=image, return_tensors="pt")["pixel_values"]
        with torch.no_grad():
            probabilities = self.adapter.to_probability(self.score(pixels, self.ids, self.mask))[0]
        predicted = int(probabilities.argmax())
        if self.config.explain == "label" and label_index is None:
            raise ValueError(f"label {row.get('label')!r} is not one of the texts; cannot explain it")
        target = label_index if self.config.explain == "label" else predicted
        out: dict[str, Any] = {
            "prediction": self.config.texts[predicted], "prediction_index": predicted,
            "confidence": float(probabilities[predicted]),
            "label_confidence": None if label_index is None else float(probabilities[label_index]),
            "correct": None if label_index is None else predicted == label_index,
            "explained": self.config.texts[target],
        }
        # the audit's own checks below, not explain()'s per-map evidence (its randomisation check
        # alone would cost ~10x the map)
        explanation = cv.explain(self.model, self.processor, image, list(self.config.texts),
                                 methods=list(self.config.methods), target=target, evidence=False)
        scored = _Scored(pixels, (self.ids, self.mask), target, expand=False)
        return out | self._maps(explanation, scored, row, image)

    def _explain_answer(self, image: Image.Image, row: dict[str, Any], question: str | None) -> dict[str, Any]:
        """An answer model: its answer to the row's question, and the map of that answer."""
        import captum_vlm as cv
        from captum_vlm.explain.answering import answer_questions

        if not question:
            raise ValueError("row has no question and the audit has none (texts) to ask")
        label = row.get("label")
        label_id = None
        if self.label_ids is not None and label is not None:
            label_id = self.label_ids.get(_normalised(label))
            if label_id is None:
                raise ValueError(f"label {label!r} is not an answer of this model (its config.label2id); "
                                 f"answers: {sorted(self.label_ids)[:12]}")
        inputs = self.processor(images=image, text=[question], return_tensors="pt", padding=self.adapter.text_padding)
        answers = answer_questions(self.model, getattr(self.processor, "tokenizer", self.processor), dict(inputs))
        answer = answers.texts[0]
        out: dict[str, Any] = {
            "prediction": answer, "confidence": float(answers.probabilities[0]),
            "correct": None if label is None else _normalised(answer) == _normalised(label),
            "explained": f"{question} → {answer}",
        }
        explanation = cv.explain(self.model, self.processor, image, [question],
                                 methods=list(self.config.methods), target=0, evidence=False)
        pixels, ids, mask = inputs["pixel_values"], inputs["input_ids"], inputs["attention_mask"]
        if answers.label_ids is None:  # the answer's tokens, scored after the question
            scored = _Scored(pixels, (ids, mask, answers.answer_ids, answers.answer_mask), None)
        else:  # the answer is a label of the model's classifier: its logit, by label id
            predicted = int(answers.label_ids[0])
            scored = _Scored(pixels, (ids, mask), predicted)
            out.update(prediction_index=predicted, label_index=label_id, correct=None if label_id is None
                       else predicted == label_id)
            if label_id is not None:
                with torch.no_grad():
                    out["label_confidence"] = float(self._probabilities(pixels, ids, mask)[0, label_id])
        return out | self._maps(explanation, scored, row, image)

    def _maps(self, explanation, scored: _Scored, row: dict[str, Any], image: Image.Image) -> dict[str, Any]:
        """Summaries and checks of every whole-text map of ``explanation``; the object check."""
        mask = _mask_of(row, image.size)
        out: dict[str, Any] = {"has_mask": mask is not None}
        seed = (zlib.crc32(str(row["id"]).encode()) + self.config.seed) % 2**31
        grid = None
        for record in explanation.records:
            if record.text_index is None:  # per-token maps of an answer: the whole answer's map is kept
                continue
            grid = np.asarray(record.grid, dtype=np.float64)
            out["map_rows"], out["map_cols"] = grid.shape
            out.update(self._summary(record.method, grid, scored, mask, explanation.crop_box, seed))
        if mask is not None and self.occlusion is not None and grid is not None:
            cells = torch.as_tensor(mask_cells(mask, grid.shape, explanation.crop_box))[None]
            test = self._grounding(scored, cells, seed)
            out.update(object_grounded=bool(test.grounded[0]), object_grounding_drop=float(test.drop_relevant[0]),
                       object_grounding_drop_random=float(test.drop_random[0]))
        return out

    def _grounding(self, scored: _Scored, heat: torch.Tensor, seed: int):
        return self.occlusion.grounding_test(scored.pixels, heat, target=scored.target,
                                             additional_forward_args=scored.args,
                                             fraction=self.config.grounding_fraction, seed=seed)

    def _summary(self, method, grid, scored: _Scored, mask, crop_box, seed) -> dict[str, Any]:
        from captum_vlm.metrics import deletion_curve

        row, col = peak_cell(grid) or (None, None)
        values: dict[str, Any] = {"peak_row": row, "peak_col": col, "entropy": map_entropy(grid)}
        if mask is not None:
            inside = mass_inside(grid, mask_cells(mask, grid.shape, crop_box))
            values.update(mass_inside=inside, mass_outside=1.0 - inside)
        heat = torch.as_tensor(grid)[None]
        if "deletion" in self.config.checks:
            steps = min(self.config.deletion_steps, grid.size)
            random_order = torch.rand(grid.shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)

            def auc(order):
                return float(deletion_curve(self._probabilities, scored.pixels, order, target=scored.target,
                                            additional_forward_args=scored.args, expand_additional_args=scored.expand,
                                            patch_size=self.adapter.patch_size(), steps=steps,
                                            batch_size=steps + 1).auc[0])

            values.update(deletion_auc=auc(heat), deletion_auc_random=auc(random_order[None]))
        if self.occlusion is not None:
            test = self._grounding(scored, heat, seed)
            values.update(grounded=bool(test.grounded[0]), grounding_drop=float(test.drop_relevant[0]),
                          grounding_drop_random=float(test.drop_random[0]))
        if self.config.keep_maps:
            values["map"] = grid.astype(np.float32).ravel().tolist()
        return {f"{method}.{k}": v for k, v in values.items()}

    def _probabilities(self, pixels, *args):
        """The explained score as a probability (softmax over the prompts, SigLIP's sigmoid or the
        answer's exp(log-probability): the adapter says which)."""
        return self.adapter.to_probability(self.score(pixels, *args))


@dataclass
class _Scored:
    """What the checks perturb: ``pixel_values``, the forward arguments after them, the target
    (a prompt index, or ``None`` for a one-number score), and whether
    the arguments are per example (expanded with the perturbed images) or shared prompts."""

    pixels: torch.Tensor
    args: tuple
    target: Any
    expand: bool = True


def _normalised(text: Any) -> str:
    return " ".join(str(text).lower().split())
