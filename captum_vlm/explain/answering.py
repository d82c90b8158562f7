"""What a VQA or generative model answers: the answers that its maps explain."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn


@dataclass
class Answers:
    """A VQA or generative model's own answer to each text: what their maps explain.

    Args:
        texts: the answers as strings, one per text.
        probabilities: BLIP, LLaVA: the probability of the answer's tokens (teacher-forced);
            ViLT: the sigmoid of the answer's logit.
        label_ids: ViLT: the answer label id per question ``[n]``.
        answer_ids, answer_mask: BLIP: the generated answer tokens ``[n, T]`` (start token first).
        sequences, prompt_lengths: LLaVA: per text, the prompt followed by the generated tokens
            ``[1, L]``, and where the generated tokens start.
        forward_args: generative models: per text, what the target takes after ``pixel_values``
            to score the answer (the adapter's ``lens_sequence``: ``(sequence, mask)``, plus
            e.g. PaliGemma's ``token_type_ids``, InstructBLIP's Q-Former instruction).
        tokens: BLIP: the answer's token strings; LLaVA: the whole sequence's; per text.
    """

    texts: list[str]
    probabilities: list[float]
    label_ids: torch.Tensor | None = None
    answer_ids: torch.Tensor | None = None
    answer_mask: torch.Tensor | None = None
    sequences: list[torch.Tensor] | None = None
    prompt_lengths: list[int] | None = None
    tokens: list[list[str]] | None = None
    forward_args: list[tuple[torch.Tensor, ...]] | None = None


def answer_questions(
    model: nn.Module, tokenizer: Any, inputs: dict[str, torch.Tensor], max_new_tokens: int = 10
) -> Answers:
    """What a VQA or generative model answers: BLIP and LLaVA generate greedily, ViLT picks its
    top label.

    Args:
        model: ``BlipForQuestionAnswering``, ``ViltForQuestionAnswering`` or
            ``LlavaForConditionalGeneration``.
        tokenizer: the processor's tokenizer (to decode generated answers).
        inputs: the processor's output for the image(s) and the texts (LLaVA: prompts holding
            the image token; padding is dropped, each prompt is answered on its own).
        max_new_tokens: longest generated answer.

    Returns:
        :class:`Answers`, one per text.
    """
    from captum_vlm.adapters import get_adapter
    from captum_vlm.targets import TokenLogProbs

    pixels, ids, mask = inputs["pixel_values"], inputs["input_ids"], inputs["attention_mask"]
    adapter = get_adapter(model)
    if not adapter.answers_questions:
        raise TypeError(f"model: {type(model).__name__} does not answer questions (task {adapter.task!r})")
    with torch.no_grad():
        if adapter.task == "answer_label":
            logits = model(input_ids=ids, attention_mask=mask, pixel_values=pixels,
                           pixel_mask=inputs.get("pixel_mask")).logits
            labels = logits.argmax(-1)
            texts = [str(model.config.id2label.get(int(k), int(k))) for k in labels]
            probabilities = adapter.to_probability(logits.gather(1, labels[:, None])[:, 0]).tolist()
            return Answers(texts, probabilities, label_ids=labels)
        if adapter.task == "generate":
            extra = [inputs.get(name) for name in adapter.extra_text_inputs]
            return _generate_each(adapter, tokenizer, pixels, ids, mask, max_new_tokens, extra)
        generated = model.generate(pixel_values=pixels, input_ids=ids, attention_mask=mask,
                                   max_new_tokens=max_new_tokens, do_sample=False)
        end = model.config.text_config.sep_token_id
        ended_before = (generated == end).long().cumsum(1) - (generated == end).long()  # EOS seen before t
        answer_mask = (ended_before == 0).long()
        log_p = TokenLogProbs(model, reduction="sum")(pixels, ids, mask, generated, answer_mask)
        texts = [tokenizer.decode(row[m.bool()], skip_special_tokens=True).strip() for row, m in zip(generated, answer_mask)]
        tokens = [_token_strings(tokenizer, row) for row in generated]
        return Answers(texts, log_p.exp().tolist(), answer_ids=generated, answer_mask=answer_mask, tokens=tokens)


def _generate_each(adapter, tokenizer, pixels, ids, mask, max_new_tokens, extra=()) -> Answers:
    """A generative model: each prompt (padding dropped) answered on its own, so no padding side
    matters; the adapter generates and lays out prompt and answer for scoring. ``extra``: the
    processor's :attr:`extra_text_inputs` for all prompts (``None`` where it gave none); each
    prompt's rows go to the adapter as given."""
    from captum_vlm.targets import TokenLogProbs

    sequences, lengths, texts, probabilities, tokens, forward_args = [], [], [], [], [], []
    for k in range(ids.shape[0]):
        prompt = ids[k][mask[k].bool()][None]
        own = tuple(e[k : k + 1] for e in extra if e is not None)
        new = adapter.greedy_answer(pixels[k : k + 1], prompt, torch.ones_like(prompt), max_new_tokens, own)
        args, start = adapter.lens_sequence(prompt, torch.ones_like(prompt), new, own)
        log_p = TokenLogProbs(adapter.model, reduction="sum", score_from=start)(pixels[k : k + 1], *args)
        sequence = args[0]
        sequences.append(sequence)
        lengths.append(start)
        forward_args.append(args)
        texts.append(tokenizer.decode(sequence[0, start:], skip_special_tokens=True).strip())
        probabilities.append(float(log_p.exp()[0]))
        tokens.append(_token_strings(tokenizer, sequence[0]))
    return Answers(texts, probabilities, sequences=sequences, prompt_lengths=lengths, tokens=tokens,
                   forward_args=forward_args)


def _token_strings(tokenizer: Any, ids: torch.Tensor) -> list[str]:
    """Token strings of ``ids`` ``[T]``; ids the tokenizer does not know show as ``[id N]``."""
    ids = ids.tolist()
    return [t if t is not None else f"[id {i}]" for i, t in zip(ids, tokenizer.convert_ids_to_tokens(ids))]
