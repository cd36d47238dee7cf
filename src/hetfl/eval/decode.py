"""Batched greedy decoding that shares its prompt pass with teacher-forced answer scoring.

Scoring an instruction model needs two things per held-out item: its greedy answer (Rouge-L,
exact match) and the negative log-likelihood of the reference answer (perplexity). Both start
with a forward pass over the prompt, which dominates the cost (a prompt is ~10x longer than an
answer). `greedy_with_nll` runs that pass once per batch and keeps its KV cache:

1. prompts, left-padded (B, P) -> cache + logits at the last prompt position;
2. reference answers (B, A), right-padded, continue the cache -> NLL of every answer token;
3. the cache is cropped back to P and greedy decoding continues from step 1's logits.

Positions are counted over real tokens only (``cumsum(mask) - 1``), as `transformers`'
``generate`` does, so each row decodes exactly as it would alone (tests/test_eval.py checks
this against ``generate`` one prompt at a time).
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F


@torch.no_grad()
def greedy_with_nll(model, tokenizer, prompts: Sequence[str], answers: Sequence[Sequence[int]],
                    max_new_tokens: int, batch_size: int = 48) -> tuple[list[str], float, int]:
    """Greedy answers to `prompts` and the summed NLL of `answers` given the same prompts.

    Args:
        model: a Hugging Face causal LM (eval mode is set and restored here).
        tokenizer: its tokenizer, with a pad token.
        prompts: prompt texts; each is tokenized with the tokenizer's special tokens (bos) and
            cut from the left so that prompt plus answer fit the model's context.
        answers: reference answer token ids per prompt (eos included), scored teacher-forced.
        max_new_tokens: greedy decoding budget; a row stops at its first eos.
        batch_size: prompts per forward pass.

    Returns:
        ``(texts, nll_sum, n_tokens)``: the decoded new text per prompt (special tokens dropped,
        stripped), the summed NLL (nats) of all answer tokens, and how many there were.
    """
    from transformers import DynamicCache

    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    eos_id = tokenizer.eos_token_id
    ctx = getattr(model.config, "max_position_embeddings", None) or 2048
    old = tokenizer.padding_side, tokenizer.truncation_side
    tokenizer.padding_side, tokenizer.truncation_side = "left", "left"
    was_training = model.training
    model.eval()
    texts: list[str] = []
    nll, ntok = 0.0, 0
    try:
        for i in range(0, len(prompts), batch_size):
            ans = [list(a) for a in answers[i:i + batch_size]]
            room = max(max_new_tokens, max(len(a) for a in ans))
            enc = tokenizer(list(prompts[i:i + batch_size]), return_tensors="pt", padding=True,
                            truncation=True, max_length=max(1, ctx - room))
            ids, mask = enc["input_ids"], enc["attention_mask"]  # (B, P), left-padded
            pos = (mask.cumsum(-1) - 1).clamp(min=0)  # (B, P): positions over real tokens
            cache = DynamicCache()
            last = model(input_ids=ids, attention_mask=mask, position_ids=pos, past_key_values=cache,
                         use_cache=True).logits[:, -1].float()  # (B, V): predicts each answer's first token
            p_len, nxt_pos = ids.shape[1], pos[:, -1:] + 1  # (B, 1)

            # Teacher-forced answers: right-padded (B, A); logits at answer token j predict j + 1.
            a_len = max(len(a) for a in ans)
            a_ids = torch.full((len(ans), a_len), pad_id, dtype=torch.long)
            a_mask = torch.zeros((len(ans), a_len), dtype=torch.long)
            for r, a in enumerate(ans):
                a_ids[r, :len(a)] = torch.tensor(a, dtype=torch.long)
                a_mask[r, :len(a)] = 1
            logits = last[:, None]  # (B, 1, V)
            if a_len > 1:
                cont = model(input_ids=a_ids[:, :-1], attention_mask=torch.cat([mask, a_mask[:, :-1]], 1),
                             position_ids=nxt_pos + torch.arange(a_len - 1), past_key_values=cache,
                             use_cache=True).logits.float()  # (B, A-1, V)
                logits = torch.cat([logits, cont], 1)  # (B, A, V)
            ce = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), a_ids.reshape(-1), reduction="none")
            nll += float((ce * a_mask.reshape(-1)).sum())
            ntok += int(a_mask.sum())
            if cache.get_seq_length() > p_len:  # back to the prompt-only cache (negative: drop that many)
                cache.crop(p_len - cache.get_seq_length())

            # Greedy decoding from the prompt's last logits.
            out, done, step_logits = [], torch.zeros(len(ans), dtype=torch.bool), last
            for step in range(max_new_tokens):
                tok = step_logits.argmax(-1).masked_fill(done, pad_id)  # (B,)
                out.append(tok)
                if eos_id is not None:
                    done |= tok == eos_id
                if bool(done.all()) or step == max_new_tokens - 1:
                    break
                mask = torch.cat([mask, torch.ones((len(ans), 1), dtype=torch.long)], 1)
                step_logits = model(input_ids=tok[:, None], attention_mask=mask, position_ids=nxt_pos + step,
                                    past_key_values=cache, use_cache=True).logits[:, -1].float()  # (B, V)
            new = torch.stack(out, 1)  # (B, T_new)
            texts += [t.strip() for t in tokenizer.batch_decode(new, skip_special_tokens=True)]
    finally:
        tokenizer.padding_side, tokenizer.truncation_side = old
        model.train(was_training)
    return texts, nll, ntok
