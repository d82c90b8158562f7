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

from collections.abc import Sequence
from contextlib import ExitStack
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from captum_vlm._checks import check_count, check_input_ids, check_pixel_values
from captum_vlm.adapters import get_adapter
from captum_vlm.adapters.base import classes_with_decoder
from captum_vlm.hooks import capture, preserved_model_state
from captum_vlm.targets import TokenLogProbs

__all__ = ["LogitLens", "logit_lens", "logit_lens_from_inputs"]


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
            tokens, put on the grid by the adapter's layout (``to_grid``).
        sequence: the decoder's token ids ``[T]``.
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


def _project(adapter, hidden: torch.Tensor) -> torch.Tensor:
    """Next-token probabilities ``[..., V]`` of hidden states ``[..., D]`` (final norm, LM head)."""
    logits = adapter.lm_head()(adapter.final_norm()(hidden))
    return torch.softmax(logits.float(), dim=-1)


def logit_lens_from_inputs(
    model: nn.Module,
    pixel_values: torch.Tensor,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    answer_ids: torch.Tensor | None = None,
    k: int = 5,
    max_new_tokens: int = 10,
    tokenizer: Any = None,
    words: Sequence[str | int] = (),
) -> LogitLens:
    """The logit lens on processor outputs (one image, one text).

    Args:
        model: a model whose adapter ``has_decoder`` (BLIP captioning/VQA, LLaVA).
        pixel_values: ``[1, 3, H, W]``.
        input_ids, attention_mask: ``[1, T]`` the prompt / question (LLaVA: with image tokens).
        answer_ids: ``[1, n]`` the continuation to lens (no start token); None for the model's
            own greedy answer.
        k: how many top tokens per layer and position.
        max_new_tokens: longest greedy answer when ``answer_ids`` is None.
        tokenizer: for token strings and string ``words``.
        words: words (single tokens) or token ids whose probability to map over the image tokens.

    Returns:
        :class:`LogitLens`.
    """
    adapter = _require_decoder(model)
    check_count(k, "k")
    check_count(max_new_tokens, "max_new_tokens")
    check_pixel_values(pixel_values)
    input_ids, attention_mask = check_input_ids(input_ids, attention_mask)
    if pixel_values.shape[0] != 1 or input_ids.shape[0] != 1:
        raise ValueError(f"pixel_values, input_ids: the logit lens takes one image and one text, got "
                         f"{pixel_values.shape[0]} images and {input_ids.shape[0]} texts")
    word_ids = [_word_id(tokenizer, w) for w in words]
    if word_ids and not adapter.image_tokens_in_input_ids:
        raise ValueError("words: this model's decoder does not read image tokens, so there is "
                         "no patch map of a word")
    with preserved_model_state(model), torch.no_grad():
        if answer_ids is None:
            answer_ids = adapter.greedy_answer(pixel_values, input_ids, attention_mask, max_new_tokens)
        else:
            answer_ids, _ = check_input_ids(answer_ids, name="answer_ids")
        if answer_ids.shape[0] != 1:
            raise ValueError(f"answer_ids: expected one row [1, n], got shape {tuple(answer_ids.shape)}")
        args, start = adapter.lens_sequence(input_ids, attention_mask, answer_ids)
        joint = adapter.image_tokens_in_input_ids  # the image tokens sit in the decoder's sequence
        with ExitStack() as scope:
            read_layout = scope.enter_context(adapter.image_layout(pixel_values, args[0])) if joint else None
            rec = scope.enter_context(capture(model, blocks=adapter.decoder_blocks(), grads=False))
            _, tokens, _ = TokenLogProbs(model).logits(pixel_values, *args)
            layout = read_layout() if joint else None
        hidden = [rec.block_inputs[0], *rec.block_outputs]
        sequence = tokens[0]
        positions = torch.arange(start - 1, sequence.shape[0] - 1)
        produced = sequence[start:]
        vocab = adapter.lm_head()(adapter.final_norm()(hidden[-1][:1, :1])).shape[-1]
        bad = [w for w in word_ids if not 0 <= w < vocab]
        if bad:
            raise ValueError(f"words: token ids {bad} are outside the vocabulary (0..{vocab - 1})")
        k = min(k, vocab)
        top_ids, top_probs, produced_probs, ranks, entropy = [], [], [], [], []
        for h in hidden:
            probs = _project(adapter, h[0, positions])  # [P, V]
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
            top_tokens=[[_strings(tokenizer, row.tolist()) for row in layer] for layer in top_ids],
            produced_tokens=_strings(tokenizer, produced.tolist()),
            sequence=sequence,
        )
        if layout is not None:
            _image_token_lens(adapter, lens, hidden, layout, k, word_ids, words)
    return lens


def _image_token_lens(adapter, lens: LogitLens, hidden, layout, k, word_ids, words) -> None:
    """Fill the image-token fields from the adapter's image-token layout of this sequence."""
    index = layout.columns[0]
    top_ids, top_probs, maps = [], [], {str(w): [] for w in words}
    for h in hidden:
        probs = _project(adapter, h[0, index])  # [N, V]
        values, ids = probs.topk(k, dim=-1)
        top_ids.append(ids)
        top_probs.append(values)
        for word, word_id in zip(words, word_ids):
            on_sequence = probs.new_zeros(1, 1, h.shape[1])
            on_sequence[0, 0, index] = probs[:, word_id]
            maps[str(word)].append(layout.to_grid(on_sequence)[0, 0])
    lens.image_top_ids, lens.image_top_probs = torch.stack(top_ids), torch.stack(top_probs)
    lens.image_positions = index
    lens.image_grid = layout.grid
    lens.word_maps = {w: torch.stack(v) for w, v in maps.items()}


def logit_lens(
    model: nn.Module,
    processor: Any,
    image: Any,
    text: str,
    answer: str | None = None,
    k: int = 5,
    max_new_tokens: int = 10,
    words: Sequence[str] = (),
) -> LogitLens:
    """The logit lens on one image and one text (a caption prompt, a question, a LLaVA prompt
    holding the image token).

    Args:
        model: BLIP captioning/VQA or LLaVA (any class whose adapter ``has_decoder``).
        processor: the model's processor.
        image: a PIL image (or what the processor takes).
        text: the prompt or question.
        answer: the continuation to lens; None lenses the model's own greedy answer.
        k: top tokens per layer and position.
        max_new_tokens: longest greedy answer.
        words: single-token words whose probability to map over the image tokens (LLaVA).

    Returns:
        :class:`LogitLens`.

    Raises:
        TypeError: the model has no language decoder (the message lists the classes that do).

    Example:
        >>> lens = logit_lens(model, processor, image, "what color is the circle?")  # doctest: +SKIP
    """
    adapter = _require_decoder(model)
    if not isinstance(text, str):
        raise TypeError(f"text: expected one string, got {type(text).__name__}")
    if answer is not None and not isinstance(answer, str):
        raise TypeError(f"answer: expected a string or None, got {type(answer).__name__}")
    inputs = adapter.processor_inputs(processor(images=image, text=text, return_tensors="pt"))
    tokenizer = getattr(processor, "tokenizer", processor)
    answer_ids = None
    if answer is not None:
        answer_ids = torch.as_tensor([tokenizer(answer, add_special_tokens=False)["input_ids"]])
        if answer_ids.shape[1] == 0:
            raise ValueError(f"answer: {answer!r} has no tokens")
    mask = inputs.get("attention_mask")
    return logit_lens_from_inputs(model, inputs["pixel_values"], inputs["input_ids"], mask, answer_ids,
                                  k=k, max_new_tokens=max_new_tokens, tokenizer=tokenizer, words=words)


def mean_rank_per_layer(lenses: Sequence[LogitLens]) -> np.ndarray:
    """Mean rank of the produced token per layer over every position of every lens ``[layers]``."""
    return torch.cat([lens.produced_ranks.float() for lens in lenses], dim=1).mean(dim=1).numpy()
