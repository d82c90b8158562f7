"""Logit lens for generative vision-language models (BLIP captioning/VQA, LLaVA).

nostalgebraist (2020), "interpreting GPT: the logit lens": project the hidden state of every
layer through the model's own final norm and LM head, and read what the layer "thinks" the next
token is. At the image-token positions of a joint sequence (LLaVA) the same projection says
which word each patch "means" at a layer (Neo et al. 2024, "Towards interpreting visual
information processing in vision-language models").

Example:
    >>> lens = cv.lens.logit_lens(model, processor, image, "what color is the circle?")  # doctest: +SKIP
    >>> lens.produced_tokens, lens.produced_ranks[-1]          # rank 1 at the last layer  # doctest: +SKIP
    >>> lens.plot()                                                                     # doctest: +SKIP
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from captum_vlm._checks import (
    check_count,
    check_input_ids,
    check_pixel_values,
    check_processor_kwargs,
)
from captum_vlm.adapters import get_adapter
from captum_vlm.adapters.base import classes_with_decoder
from captum_vlm.hooks import capture, preserved_model_state
from captum_vlm.targets import TokenLogProbs

__all__ = ["LogitLens", "logit_lens", "logit_lens_from_inputs", "logit_lens_scored", "mean_rank_per_layer"]


@dataclass
class LogitLens:
    """What each layer predicts at each position (nostalgebraist 2020).

    Layer 0 is the embedding output, layer ``l`` the output of decoder block ``l``; the last
    layer's projection is the model's own next-token distribution.

    Attributes:
        top_ids, top_probs: ``[layers, positions, k]`` top-k next tokens and probabilities.
        produced_ids: ``[positions]`` the token that follows each position (the answer).
        produced_probs, produced_ranks: ``[layers, positions]`` its probability and rank (1 = top).
        entropy: ``[layers, positions]`` entropy (nats) of each layer's next-token distribution.
        positions: ``[positions]`` sequence index of each lensed position.
        top_tokens, produced_tokens: the same ids as strings.
        image_top_ids, image_top_probs: ``[layers, image tokens, k]`` at the image-token positions
            of a joint sequence (None when the image is not in the decoder's sequence).
        image_grid: the patch grid ``(rows, cols)`` the image tokens stand for.
        image_positions: sequence index of each image token (the adapter's image-token layout).
        word_maps: per word asked for, its probability ``[layers, rows, cols]`` over the image
            tokens, put on the grid by the adapter's layout: a cell holds the mean probability of
            the image tokens that cover it (``mean_on_grid``: a tiled model's tile token and the
            global-view tokens whose box holds the cell, a pooled token on each cell it reads),
            0 where none does (padding).
        sequence: the decoder's token ids ``[T]``.
        prompt: the text the lens was run on (set by :func:`logit_lens`), for titles.
    """

    top_ids: torch.Tensor
    top_probs: torch.Tensor
    produced_ids: torch.Tensor
    produced_probs: torch.Tensor
    produced_ranks: torch.Tensor
    entropy: torch.Tensor
    positions: torch.Tensor
    top_tokens: list[list[list[str]]]
    produced_tokens: list[str]
    sequence: torch.Tensor
    image_top_ids: torch.Tensor | None = None
    image_top_probs: torch.Tensor | None = None
    image_grid: tuple[int, int] | None = None
    image_positions: torch.Tensor | None = None
    word_maps: dict[str, torch.Tensor] = field(default_factory=dict)
    prompt: str | None = None

    @property
    def num_layers(self) -> int:
        return int(self.top_ids.shape[0])

    def plot(self, title: str | None = None):
        """Layers x positions grid of each layer's top-1 token (colour: its probability), and the
        produced token's rank per layer for each position beside it.

        Returns:
            A matplotlib Figure.
        """
        from captum_vlm.viz.lens_inside import plot_logit_lens

        return plot_logit_lens(self, title=title)

    def html_section(self, title: str | None = None) -> str:
        """This lens as one ``<section>`` of an inside-the-model report (escaped, no script)."""
        from captum_vlm.viz.lens_inside import logit_lens_html

        notes = [f"text: {self.prompt}"] if self.prompt is not None else []
        return logit_lens_html(self, title=title or "logit lens", notes=notes)

    def to_html(self, path: str | Path | None = None, title: str | None = None) -> str:
        """A self-contained HTML page of this lens (see :func:`captum_vlm.lens.inside_report`)."""
        from captum_vlm.lens.inside_report import inside_report

        return inside_report([self], path, title=title)

    def word_map(self, word: str, layer: int = -1) -> torch.Tensor:
        """Probability of ``word`` over the image tokens at ``layer``, ``[rows, cols]``.

        Raises:
            KeyError: ``word`` was not in ``words`` when the lens was computed.
        """
        if word not in self.word_maps:
            raise KeyError(f"word: {word!r} was not asked for; pass words=[{word!r}] to logit_lens "
                           f"(asked: {sorted(self.word_maps)})")
        _check_layer(layer, self.num_layers)
        return self.word_maps[word][layer]


def _check_layer(layer: object, n_layers: int, name: str = "layer") -> int:
    if isinstance(layer, bool) or not isinstance(layer, int) or not -n_layers <= layer < n_layers:
        raise ValueError(f"{name}: expected an int in {-n_layers}..{n_layers - 1} "
                         f"({n_layers} layers, 0 = embeddings), got {layer!r}")
    return layer % n_layers


def _require_decoder(model: nn.Module):
    adapter = get_adapter(model)
    if not adapter.has_decoder:
        raise TypeError(
            f"model: the logit lens needs a language decoder with an LM head; "
            f"{type(adapter.model).__name__} has none. Classes with a decoder: "
            f"{', '.join(classes_with_decoder())}"
        )
    return adapter


def _strings(tokenizer: Any, ids: list[int]) -> list[str]:
    if tokenizer is None:
        return [str(i) for i in ids]
    return [str(t) for t in tokenizer.convert_ids_to_tokens(ids)]


def _word_id(tokenizer: Any, word: str | int) -> int:
    if isinstance(word, int) and not isinstance(word, bool):
        return word
    if tokenizer is None:
        raise ValueError(f"words: {word!r} is a string; give token ids or pass a tokenizer")
    ids = tokenizer(word, add_special_tokens=False)["input_ids"]
    if len(ids) != 1:
        raise ValueError(f"words: {word!r} is {len(ids)} tokens ({ids}); give single-token words")
    return int(ids[0])


def _vocab_size(adapter) -> int:
    """Rows of the LM head's output: its last linear layer's ``out_features``."""
    return [m for m in adapter.lm_head().modules() if isinstance(m, nn.Linear)][-1].out_features


def _check_words(adapter, tokenizer: Any, words: Sequence[str | int]) -> list[int]:
    """Token ids of ``words``, refused where the decoder reads no image tokens or out of vocabulary."""
    word_ids = [_word_id(tokenizer, w) for w in words]
    if word_ids and not adapter.image_tokens_in_input_ids:
        raise ValueError("words: this model's decoder does not read image tokens, so there is "
                         "no patch map of a word")
    if word_ids and adapter.image_tokens == "queries":
        raise ValueError("words: this model's image tokens are learned queries, which stand for no cell "
                         "of the image, so there is no patch map of a word")
    vocab = _vocab_size(adapter)
    bad = [w for w in word_ids if not 0 <= w < vocab]
    if bad:
        raise ValueError(f"words: token ids {bad} are outside the vocabulary (0..{vocab - 1})")
    return word_ids


def _project(adapter, hidden: torch.Tensor) -> torch.Tensor:
    """Next-token probabilities ``[..., V]`` of hidden states ``[..., D]`` (final norm, LM head)."""
    logits = adapter.lm_head()(adapter.final_norm()(hidden))
    return torch.softmax(logits.float(), dim=-1)


def _pad_right(rows: list[torch.Tensor]) -> torch.Tensor:
    """``[1, L_i]`` rows as one ``[B, max L]`` tensor, right-padded with 0."""
    length = max(r.shape[1] for r in rows)
    return torch.cat([torch.nn.functional.pad(r, (0, length - r.shape[1])) for r in rows])


def _full_args(target: TokenLogProbs, args: tuple) -> tuple[torch.Tensor, ...]:
    """``args`` with every mask present: ``(ids, mask)`` or ``(ids, mask, answer, answer_mask)``."""
    args = tuple(args)
    if len(args) == 1:
        args = (args[0], torch.ones_like(args[0]))
    if not target.scores_input_ids and len(args) == 3:
        args = (*args, torch.ones_like(args[2]))
    return args


def logit_lens_scored(
    model: nn.Module,
    pixel_values: torch.Tensor,
    scored_args: Sequence[tuple[torch.Tensor, ...]],
    starts: Sequence[int],
    k: int = 5,
    tokenizer: Any = None,
    words: Sequence[str | int] = (),
    batch_size: int = 8,
) -> list[LogitLens]:
    """The logit lens of the tokens a :class:`~captum_vlm.targets.TokenLogProbs` target scores.

    Row ``i`` is scored as ``TokenLogProbs(model).logits(pixel_values[i:i+1], *scored_args[i])``;
    its tokens from ``starts[i]`` on are lensed (each from the position before it). Rows run
    ``batch_size`` at a time, the scored tokens right-padded with 0 (masked; the decoders are
    causal, so no lensed position sees the padding); rows whose other inputs (a VQA question)
    differ in length run in separate forwards. Batched equals one by one.

    Args:
        model: a model whose adapter ``has_decoder``.
        pixel_values: ``[B, 3, H, W]``, one image per row.
        scored_args: per row, ``TokenLogProbs``'s arguments after ``pixel_values``, each ``[1, L_i]``,
            the scored tokens without padding (``(input_ids, attention_mask)``; BLIP VQA
            ``(input_ids, attention_mask, answer_ids[, answer_attention_mask])``, the question as
            it was scored, padded or not).
        starts: per row, the index in the scored token sequence of the first lensed token (>= 1).
        k, tokenizer, words: see :func:`logit_lens_from_inputs`.
        batch_size: rows per forward.

    Returns:
        One :class:`LogitLens` per row.
    """
    adapter = _require_decoder(model)
    check_count(k, "k")
    check_count(batch_size, "batch_size")
    check_pixel_values(pixel_values)
    if len(scored_args) != pixel_values.shape[0] or len(starts) != len(scored_args):
        raise ValueError(f"scored_args, starts: expected one per image ({pixel_values.shape[0]}), got "
                         f"{len(scored_args)} and {len(starts)}")
    word_ids = _check_words(adapter, tokenizer, words)
    joint = adapter.image_tokens_in_input_ids  # the image tokens sit in the decoder's sequence
    target = TokenLogProbs(model)
    rows = [_full_args(target, args) for args in scored_args]
    lengths = [int((r[0] if target.scores_input_ids else r[2]).shape[1]) for r in rows]
    bad = [(i, s) for i, (s, n) in enumerate(zip(starts, lengths))
           if isinstance(s, bool) or not isinstance(s, int) or not 1 <= s < n]
    if bad:
        raise ValueError(f"starts: row {bad[0][0]} starts at {bad[0][1]!r}, expected an int in 1..{lengths[bad[0][0]] - 1} "
                         "(its scored sequence has that many tokens after the first)")
    lenses: dict[int, LogitLens] = {}
    with preserved_model_state(model), torch.no_grad():
        for chunk in _chunks(rows, target.scores_input_ids, batch_size):
            args = tuple(_pad_right([rows[i][j] for i in chunk]) for j in range(len(rows[chunk[0]])))
            pixels = pixel_values[torch.tensor(chunk)]
            with ExitStack() as scope:
                read_layout = scope.enter_context(adapter.image_layout(pixels, args[0])) if joint else None
                rec = scope.enter_context(capture(model, blocks=adapter.decoder_blocks(), grads=False))
                _, tokens, _ = target.logits(pixels, *args)
                layout = read_layout() if joint else None
            hidden = [rec.block_inputs[0], *rec.block_outputs]
            for row, i in enumerate(chunk):
                lenses[i] = _lens_row(adapter, hidden, row, tokens[row, : lengths[i]], starts[i], k, tokenizer,
                                      layout, word_ids, words)
    return [lenses[i] for i in range(len(rows))]


def _chunks(rows: list[tuple], scores_input_ids: bool, batch_size: int) -> list[list[int]]:
    """Row indices, ``batch_size`` at a time, grouped so that only the scored tokens get padded:
    rows whose other inputs (a VQA question) differ in length run apart, since BLIP's answer
    decoder in transformers 5 attends to the question's padding despite its mask."""
    groups: dict[tuple, list[int]] = {}
    for i, args in enumerate(rows):
        rest = () if scores_input_ids else tuple(a.shape[1] for a in args[:2])
        groups.setdefault(rest, []).append(i)
    return [group[j : j + batch_size] for group in groups.values() for j in range(0, len(group), batch_size)]


def _lens_row(adapter, hidden, row, sequence, start, k, tokenizer, layout, word_ids, words) -> LogitLens:
    """The :class:`LogitLens` of one row of a batched forward's hidden states."""
    positions = torch.arange(start - 1, sequence.shape[0] - 1)
    produced = sequence[start:]
    k = min(k, _vocab_size(adapter))
    top_ids, top_probs, produced_probs, ranks, entropy = [], [], [], [], []
    for h in hidden:
        probs = _project(adapter, h[row, positions])  # [P, V]
        values, ids = probs.topk(k, dim=-1)
        top_ids.append(ids)
        top_probs.append(values)
        picked = probs.gather(1, produced[:, None])
        produced_probs.append(picked[:, 0])
        ranks.append(1 + (probs > picked).sum(dim=1))
        entropy.append(-(probs * torch.log(probs.clamp_min(1e-30))).sum(dim=1))
    lens = LogitLens(
        top_ids=torch.stack(top_ids),
        top_probs=torch.stack(top_probs),
        produced_ids=produced,
        produced_probs=torch.stack(produced_probs),
        produced_ranks=torch.stack(ranks),
        entropy=torch.stack(entropy),
        positions=positions,
        top_tokens=[[_strings(tokenizer, r.tolist()) for r in layer] for layer in top_ids],
        produced_tokens=_strings(tokenizer, produced.tolist()),
        sequence=sequence,
    )
    if layout is not None:
        _image_token_lens(adapter, lens, hidden, row, layout, k, word_ids, words)
    return lens


def _image_token_lens(adapter, lens: LogitLens, hidden, row, layout, k, word_ids, words) -> None:
    """Fill the image-token fields from the adapter's image-token layout of this row."""
    index = layout.columns[row]
    top_ids, top_probs, maps = [], [], {str(w): [] for w in words}
    for h in hidden:
        probs = _project(adapter, h[row, index])  # [N, V]
        values, ids = probs.topk(k, dim=-1)
        top_ids.append(ids)
        top_probs.append(values)
        for word, word_id in zip(words, word_ids):
            on_sequence = probs.new_zeros(layout.columns.shape[0], 1, h.shape[1])
            on_sequence[row, 0, index] = probs[:, word_id]
            maps[str(word)].append(layout.mean_on_grid(on_sequence)[row, 0])
    lens.image_top_ids, lens.image_top_probs = torch.stack(top_ids), torch.stack(top_probs)
    lens.image_positions = index
    lens.image_grid = layout.grid
    lens.word_maps = {w: torch.stack(v) for w, v in maps.items()}


def _answer_rows(answer_ids: Any, n: int) -> list[torch.Tensor] | None:
    """``answer_ids`` as ``n`` rows ``[1, n_i]``: a ``[n, m]`` tensor or a list of 1-D / ``[1, m]``."""
    if answer_ids is None:
        return None
    if isinstance(answer_ids, torch.Tensor):
        if answer_ids.dim() == 1 and n == 1:
            answer_ids = answer_ids[None]
        check_input_ids(answer_ids, name="answer_ids")
        rows = list(answer_ids)
    elif isinstance(answer_ids, (list, tuple)):
        rows = list(answer_ids)
    else:
        raise TypeError(f"answer_ids: expected a tensor [B, n] or a list of B tensors, got {type(answer_ids).__name__}")
    if len(rows) != n:
        raise ValueError(f"answer_ids: expected one answer per image ({n}), got {len(rows)}")
    out = []
    for row in rows:
        if not isinstance(row, torch.Tensor):
            raise TypeError(f"answer_ids: expected tensors of token ids, got {type(row).__name__}")
        row = row.reshape(1, -1)
        check_input_ids(row, name="answer_ids")
        out.append(row)
    return out


def _extra_rows(adapter, extra_text_inputs: Sequence[torch.Tensor | None], n: int) -> list[tuple]:
    """Per row ``[1, ...]``, the given :attr:`extra_text_inputs` (``None`` ones left out)."""
    if isinstance(extra_text_inputs, torch.Tensor) or not isinstance(extra_text_inputs, (list, tuple)):
        raise TypeError(f"extra_text_inputs: expected a tuple of tensors ({', '.join(adapter.extra_text_inputs) or 'none'} "
                        f"for {type(adapter.model).__name__}), got {type(extra_text_inputs).__name__}")
    if len(extra_text_inputs) > len(adapter.extra_text_inputs):
        raise ValueError(f"extra_text_inputs: {type(adapter.model).__name__} takes "
                         f"{', '.join(adapter.extra_text_inputs) or 'none'}, got {len(extra_text_inputs)} tensors")
    given = [e for e in extra_text_inputs if e is not None]
    for name, value in zip(adapter.extra_text_inputs, extra_text_inputs):
        if value is not None and (not isinstance(value, torch.Tensor) or value.dim() < 1 or value.shape[0] != n):
            got = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
            raise ValueError(f"{name}: expected a tensor with one row per image ({n}), got {got}")
    return [tuple(e[b : b + 1] for e in given) for b in range(n)]


def logit_lens_from_inputs(
    model: nn.Module,
    pixel_values: torch.Tensor,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    answer_ids: Any = None,
    k: int = 5,
    max_new_tokens: int = 10,
    tokenizer: Any = None,
    words: Sequence[str | int] = (),
    batch_size: int = 8,
    extra_text_inputs: Sequence[torch.Tensor | None] = (),
) -> LogitLens | list[LogitLens]:
    """The logit lens on processor outputs: one image and text, or a batch of them.

    Args:
        model: a model whose adapter ``has_decoder`` (BLIP captioning/VQA, LLaVA).
        pixel_values: ``[B, 3, H, W]``.
        input_ids, attention_mask: ``[B, T]`` the prompts / questions (LLaVA: with image tokens),
            padded on either side (the padding is dropped per row).
        answer_ids: the continuations to lens (no start token): ``[B, n]``, or a list of ``B``
            rows of any length; None for the model's own greedy answers.
        k: how many top tokens per layer and position.
        max_new_tokens: longest greedy answer when ``answer_ids`` is None.
        tokenizer: for token strings and string ``words``.
        words: words (single tokens) or token ids whose probability to map over the image tokens.
        batch_size: rows per teacher-forced forward (:func:`logit_lens_scored`).
        extra_text_inputs: what the processor gave besides ``input_ids`` and ``attention_mask``
            that the forward needs, in the order of the adapter's
            :attr:`~captum_vlm.adapters.VLMAdapter.extra_text_inputs` (InstructBLIP:
            ``qformer_input_ids, qformer_attention_mask``), each ``[B, ...]``.

    Returns:
        :class:`LogitLens` for a batch of one, else a list of them, one per row.
    """
    adapter = _require_decoder(model)
    check_count(k, "k")
    check_count(max_new_tokens, "max_new_tokens")
    check_pixel_values(pixel_values)
    input_ids, attention_mask = check_input_ids(input_ids, attention_mask)
    n = pixel_values.shape[0]
    if input_ids.shape[0] != n:
        raise ValueError(f"pixel_values, input_ids: the logit lens takes one text per image, got "
                         f"{n} images and {input_ids.shape[0]} texts")
    answers = _answer_rows(answer_ids, n)
    _check_words(adapter, tokenizer, words)
    extra = _extra_rows(adapter, extra_text_inputs, n)
    prompts = [input_ids[b][attention_mask[b].bool()][None] for b in range(n)]
    scored, starts = [], []
    with preserved_model_state(model), torch.no_grad():
        for b, prompt in enumerate(prompts):
            adapter.language_kwargs(prompt, extra[b])  # says what is missing, before any work
            answer = answers[b] if answers is not None else adapter.greedy_answer(
                pixel_values[b : b + 1], prompt, torch.ones_like(prompt), max_new_tokens, extra[b])
            args, start = adapter.lens_sequence(prompt, torch.ones_like(prompt), answer, extra[b])
            scored.append(args)
            starts.append(start)
    lenses = logit_lens_scored(model, pixel_values, scored, starts, k=k, tokenizer=tokenizer, words=words,
                               batch_size=batch_size)
    return lenses[0] if n == 1 else lenses


def _as_list(value: Any) -> list | None:
    return list(value) if isinstance(value, (list, tuple)) else None


def logit_lens(
    model: nn.Module,
    processor: Any,
    image: Any,
    text: str | Sequence[str],
    answer: str | Sequence[str] | None = None,
    k: int = 5,
    max_new_tokens: int = 10,
    words: Sequence[str] = (),
    batch_size: int = 8,
    show_progress: bool = False,
    processor_kwargs: Mapping[str, Any] | None = None,
) -> LogitLens | list[LogitLens]:
    """The logit lens on an image and a text (a caption prompt, a question, a LLaVA prompt
    holding the image token), or on a batch: a list of images and/or a list of texts.

    Args:
        model: BLIP captioning/VQA or LLaVA (any class whose adapter ``has_decoder``).
        processor: the model's processor.
        image: a PIL image (or what the processor takes), or a list of them.
        text: the prompt or question, or a list (one per image; one text goes with every image,
            one image with every text).
        answer: the continuation(s) to lens; None lenses the model's own greedy answer.
        k: top tokens per layer and position.
        max_new_tokens: longest greedy answer.
        words: single-token words whose probability to map over the image tokens (LLaVA).
        batch_size: rows per forward; batched equals one by one.
        show_progress: a tqdm bar over the rows.
        processor_kwargs: more keyword arguments for the processor call, such as Gemma 3's
            ``{"do_pan_and_scan": True}``.

    Returns:
        :class:`LogitLens`; a list of them (one per row) when ``image`` or ``text`` is a list.

    Raises:
        TypeError: the model has no language decoder (the message lists the classes that do).

    Example:
        >>> lens = logit_lens(model, processor, image, "what color is the circle?")  # doctest: +SKIP
        >>> lenses = logit_lens(model, processor, [a, b], ["what color?", "what shape?"])  # doctest: +SKIP
    """
    _require_decoder(model)
    check_count(batch_size, "batch_size")
    check_processor_kwargs(processor_kwargs, ("images", "text", "return_tensors"))
    images, texts = _as_list(image), _as_list(text)
    batched = images is not None or texts is not None
    texts = texts if texts is not None else [text]
    bad = [t for t in texts if not isinstance(t, str)]
    if bad or not texts:
        raise TypeError(f"text: expected a string or a list of strings, got {type(bad[0] if bad else text).__name__}"
                        + ("" if bad else " (empty list)"))
    images = images if images is not None else [image]
    if not images:
        raise ValueError("image: the list of images is empty")
    n = max(len(images), len(texts))
    if len(images) not in (1, n) or len(texts) not in (1, n):
        raise ValueError(f"image, text: expected as many texts as images (or one of either), got "
                         f"{len(images)} images and {len(texts)} texts")
    images, texts = images * (n // len(images)), texts * (n // len(texts))
    answers = _as_list(answer) if answer is not None else None
    if answer is not None and answers is None:
        answers = [answer]
    if answers is not None:
        if len(answers) != n:
            raise ValueError(f"answer: expected one answer per row ({n}), got {len(answers)}")
        wrong = [a for a in answers if not isinstance(a, str)]
        if wrong:
            raise TypeError(f"answer: expected strings or None, got {type(wrong[0]).__name__}")
    tokenizer = getattr(processor, "tokenizer", processor)
    answer_rows = None
    if answers is not None:
        answer_rows = [torch.as_tensor([tokenizer(a, add_special_tokens=False)["input_ids"]]) for a in answers]
        empty = [a for a, r in zip(answers, answer_rows) if r.shape[1] == 0]
        if empty:
            raise ValueError(f"answer: {empty[0]!r} has no tokens")
    lenses = []
    rows = range(0, n, batch_size)
    if show_progress:
        from tqdm.auto import tqdm

        rows = tqdm(rows, desc="logit lens", total=len(rows))
    for first in rows:
        part = slice(first, first + batch_size)
        pixels, prompts, extras = [], [], []
        adapter = get_adapter(model)
        for img, txt in zip(images[part], texts[part]):  # each row on its own: no padding side matters
            inputs = adapter.processor_inputs(processor(images=img, text=txt, return_tensors="pt",
                                                        **dict(processor_kwargs or {})))
            pixels.append(inputs["pixel_values"])
            ids = inputs["input_ids"]
            mask = inputs.get("attention_mask")
            kept = slice(None) if mask is None else mask[0].bool()
            prompts.append(ids[:, kept])
            # the forward's further text inputs (InstructBLIP's instruction for the Q-Former); one
            # per position of the prompt loses its padding with it
            extras.append([None if inputs.get(name) is None else
                           inputs[name][:, kept] if inputs[name].shape == ids.shape else inputs[name]
                           for name in adapter.extra_text_inputs])
        extra = [None if any(row[j] is None for row in extras) else _pad_right([row[j] for row in extras])
                 for j in range(len(adapter.extra_text_inputs))]
        out = logit_lens_from_inputs(
            model, torch.cat(pixels), _pad_right(prompts),
            _pad_right([torch.ones_like(p) for p in prompts]),
            None if answer_rows is None else answer_rows[part], k=k, max_new_tokens=max_new_tokens,
            tokenizer=tokenizer, words=words, batch_size=batch_size, extra_text_inputs=tuple(extra))
        lenses += out if isinstance(out, list) else [out]
    for lens, txt in zip(lenses, texts):
        lens.prompt = txt
    return lenses if batched else lenses[0]


def mean_rank_per_layer(lenses: Sequence[LogitLens]) -> np.ndarray:
    """Mean rank of the produced token per layer over every position of every lens ``[layers]``."""
    return torch.cat([lens.produced_ranks.float() for lens in lenses], dim=1).mean(dim=1).numpy()
